"""Stage `plot`: both models' loss curves as one PNG (offline; shown in the README)."""

from pathlib import Path

import typer

from charlm.curves import read_curve
from charlm.errors import DataError, reported_errors
from charlm.plotting import render_loss_curves


def main(
    curves: list[Path] = typer.Argument(..., help="Curve CSVs from `train`; the file name is the model's."),
    out: Path = typer.Option(..., help="Output: the PNG."),
) -> None:
    with reported_errors("plot"):
        try:
            loaded = {path.stem: read_curve(path) for path in curves}
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"cannot read a loss curve ({e}); re-run `dvc repro train`") from None
        render_loss_curves(loaded, out)


if __name__ == "__main__":
    typer.run(main)
