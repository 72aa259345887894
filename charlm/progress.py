"""Training progress: a live bar on a terminal, plain flushed log lines when piped.

An interactive `dvc repro` hands the stage the terminal, which gets the bar; `dvc queue` (read with
`dvc queue logs --follow`), the VS Code extension and CI pipe the stage's output, which gets a line
every 30 seconds and one per evaluation. Reading the loss forces a host sync, so it happens only when
a line is actually printed.

Why not tqdm or rich (both installed with DVC and typer): piped, tqdm keeps redrawing its bar with
carriage returns, so a log holds one ever-growing line, and rich's progress prints nothing until the
task ends. Both would need this module's plain-line path anyway; the terminal bar it would replace is
ten lines.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import torch

from charlm.curves import CurvePoint


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        tty: bool | None = None,
        bar_every: float = 0.2,
        log_every: float = 30.0,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar_every = bar_every
        self.log_every = log_every
        self._last = 0.0
        self._last_log = time.monotonic()
        self._start: tuple[int, float] | None = None  # (step, time) of the first report: a resumed run starts late

    def _status(self, step: int, total: int, loss: torch.Tensor | None, tokens_per_s: float) -> str:
        first_step, started = self._start or (step, time.monotonic())
        eta = (total - step) / max(step - first_step + 1, 1) * (time.monotonic() - started)
        loss_text = f" loss {loss.item():.4f}" if loss is not None else ""
        return f"{self.label} step {step}/{total}{loss_text} | {tokens_per_s:,.0f} tok/s | eta {_duration(eta)}"

    def on_progress(self, step: int, total: int, loss: torch.Tensor | None, tokens_per_s: float) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = (step - 1, now)
        if self.tty:
            if now - self._last >= self.bar_every or step == total:
                self._last = now
                done = int(30 * step / total)
                bar = "#" * done + "." * (30 - done)
                self.stream.write(f"\r[{bar}] {self._status(step, total, loss, tokens_per_s)}\x1b[K")
                if step == total:
                    self.stream.write("\n")
                self.stream.flush()
        elif now - self._last_log >= self.log_every or step == total:
            self._last_log = now
            print(self._status(step, total, loss, tokens_per_s), file=self.stream, flush=True)

    def on_eval(self, point: CurvePoint) -> None:
        line = f"{self.label} step {point.step}: train loss {point.train_loss:.4f}, val loss {point.val_loss:.4f}"
        if (point.average_train_loss, point.average_val_loss) != (point.train_loss, point.val_loss):
            line += f" | weight average: train {point.average_train_loss:.4f}, val {point.average_val_loss:.4f}"
        line += " (estimates)"
        if self.tty:
            self.stream.write("\r\x1b[K")
        print(line, file=self.stream, flush=True)
