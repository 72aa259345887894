"""Loss curves as CSV, the format DVC plots reads.

Columns: `step`, then the estimated losses of the weights being trained (`train_loss`, `val_loss`,
what the progress lines show), then those of the model the checkpoint saves (`average_train_loss`,
`average_val_loss`). With a weight average (`ema_decay` > 0) the saved model is the average, which
starts from the initial weights and lags the trained ones early on; without one the two pairs are
the same numbers. Every value is an estimate on random batches (`eval_iters` per split); the exact
whole-split losses are the evaluate stage's metrics.
"""

from __future__ import annotations

import csv
import io as _io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from charlm import io

COLUMNS = ("step", "train_loss", "val_loss", "average_train_loss", "average_val_loss")


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation during training, estimated on random batches (not the whole split)."""

    step: int
    train_loss: float  # the weights being trained
    val_loss: float
    average_train_loss: float  # the model the checkpoint holds: the weight average if one is kept
    average_val_loss: float

    @classmethod
    def without_average(cls, step: int, train_loss: float, val_loss: float) -> CurvePoint:
        return cls(step, train_loss, val_loss, train_loss, val_loss)


def curve_csv(points: Iterable[CurvePoint]) -> str:
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for p in points:
        writer.writerow([p.step] + [f"{getattr(p, name):.6f}" for name in COLUMNS[1:]])
    return buf.getvalue()


def write_curve(path: str | Path, points: Iterable[CurvePoint]) -> None:
    io.write_text(path, curve_csv(points))


def progress_metrics(point: CurvePoint, max_iters: int) -> dict[str, float | int]:
    """The running stage's metrics: its last evaluation's step and estimated losses (of the trained
    weights, and of the weight average the checkpoint will hold where one is kept)."""
    out: dict[str, float | int] = {
        "step": point.step,
        "max_iters": max_iters,
        "train_loss_estimate": round(point.train_loss, 5),
        "val_loss_estimate": round(point.val_loss, 5),
    }
    if (point.average_train_loss, point.average_val_loss) != (point.train_loss, point.val_loss):
        out["average_val_loss_estimate"] = round(point.average_val_loss, 5)
    return out


class CurveWriter:
    """The train stage's live outputs, rewritten whole (atomically) at each evaluation: the curve, which
    `dvc plots show` follows, and the progress metrics, which `dvc exp show` shows for a running
    experiment (queued or not). `then` sees each point after it is written."""

    def __init__(
        self,
        path: str | Path,
        progress: str | Path,
        max_iters: int,
        points: Iterable[CurvePoint],
        then: Callable[[CurvePoint], None],
    ) -> None:
        self.path, self.progress, self.max_iters, self.points, self.then = path, progress, max_iters, list(points), then

    def add(self, point: CurvePoint) -> None:
        self.points.append(point)
        write_curve(self.path, self.points)
        io.write_json(self.progress, progress_metrics(point, self.max_iters))
        self.then(point)


def read_curve(path: str | Path) -> list[CurvePoint]:
    with open(path, encoding="utf-8", newline="") as f:
        return [CurvePoint(int(r["step"]), *(float(r[name]) for name in COLUMNS[1:])) for r in csv.DictReader(f)]
