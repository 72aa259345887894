"""Stage `plot`: both models' loss curves as one PNG (offline; shown in the README), each panel
titled with its model's exact metrics."""

import json
from pathlib import Path

import typer

from charlm.curves import read_curve
from charlm.errors import DataError, reported_errors
from charlm.plotting import render_loss_curves


def main(
    curves: list[Path] = typer.Argument(..., help="Curve CSVs from `train`; the file name is the model's."),
    metrics: list[Path] = typer.Option(..., help="The evaluate stage's metrics JSON of each curve, in the same order."),
    out: Path = typer.Option(..., help="Output: the PNG."),
) -> None:
    with reported_errors("plot"):
        if len(metrics) != len(curves):
            raise DataError(f"{len(curves)} curves but {len(metrics)} --metrics files: give one per curve, in order")
        try:
            loaded = {path.stem: read_curve(path) for path in curves}
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"cannot read a loss curve ({e}); re-run `dvc repro train`") from None
        try:
            pairs = zip(loaded, metrics, strict=True)
            exact = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in pairs}
            for values in exact.values():
                float(values["val_loss"]), float(values["train_loss"])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"cannot read a metrics file ({e}); re-run `dvc repro evaluate`") from None
        render_loss_curves(loaded, exact, out)


if __name__ == "__main__":
    typer.run(main)
