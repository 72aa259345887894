"""Stage `split`: the first (1 - split.val_fraction) of the tokens train, the rest validate."""

from pathlib import Path

import typer

from charlm import io
from charlm.corpus import copy_bytes, split_counts
from charlm.errors import DataError, reported_errors
from charlm.params import load_params
from charlm.tokenizer import CharTokenizer


def main(
    tokens: Path = typer.Option(..., help="The encoded corpus from `encode`."),
    vocab: Path = typer.Option(..., help="The vocabulary from `encode` (gives the token width)."),
    train: Path = typer.Option(..., help="Output: the training tokens."),
    val: Path = typer.Option(..., help="Output: the validation tokens."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file."),
) -> None:
    with reported_errors("split"):
        val_fraction = load_params(params).split.val_fraction
        itemsize = CharTokenizer.load(vocab).itemsize
        size = tokens.stat().st_size
        if size % itemsize:
            raise DataError(f"{tokens}: {size} bytes is not a whole number of {itemsize}-byte tokens; re-run encode")
        n_train, n_val = split_counts(size // itemsize, val_fraction)
        with open(tokens, "rb") as src:
            with io.atomic_open(train, "wb") as out:
                copy_bytes(src, out, n_train * itemsize)
            with io.atomic_open(val, "wb") as out:
                copy_bytes(src, out, n_val * itemsize)
        print(f"split: {n_train:,} train, {n_val:,} val tokens")


if __name__ == "__main__":
    typer.run(main)
