"""Loss curves as CSV, the format DVC plots reads.

Columns: `step`, then the estimated losses of the weights being trained (`train_loss`, `val_loss`,
what the progress lines show), then those of the model the checkpoint saves (`saved_train_loss`,
`saved_val_loss`). With a weight average (`ema_decay` > 0) the saved model is the average, which
starts from the initial weights and lags the trained ones early on; without one the two pairs are
the same numbers. Every value is an estimate on random batches (`eval_iters` per split); the exact
whole-split losses are the evaluate stage's metrics.
"""

from __future__ import annotations

import csv
import io as _io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from charlm import io

COLUMNS = ("step", "train_loss", "val_loss", "saved_train_loss", "saved_val_loss")


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation during training, estimated on random batches (not the whole split)."""

    step: int
    train_loss: float  # the weights being trained
    val_loss: float
    saved_train_loss: float  # the model the checkpoint holds: the weight average if one is kept
    saved_val_loss: float

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


def read_curve(path: str | Path) -> list[CurvePoint]:
    with open(path, encoding="utf-8", newline="") as f:
        return [CurvePoint(int(r["step"]), *(float(r[name]) for name in COLUMNS[1:])) for r in csv.DictReader(f)]
