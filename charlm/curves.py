"""Loss curves as CSV (`step,train_loss,val_loss`), the format DVC plots reads."""

from __future__ import annotations

import csv
import io as _io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from charlm import io

COLUMNS = ("step", "train_loss", "val_loss")


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation during training: the estimated losses at `step` (random batches, not the whole split)."""

    step: int
    train_loss: float
    val_loss: float


def curve_csv(points: Iterable[CurvePoint]) -> str:
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for p in points:
        writer.writerow([p.step, f"{p.train_loss:.6f}", f"{p.val_loss:.6f}"])
    return buf.getvalue()


def write_curve(path: str | Path, points: Iterable[CurvePoint]) -> None:
    io.write_text(path, curve_csv(points))


def read_curve(path: str | Path) -> list[CurvePoint]:
    with open(path, encoding="utf-8", newline="") as f:
        return [CurvePoint(int(r["step"]), float(r["train_loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]
