"""Stage `split`: the first (1 - split.val_fraction) of the tokens train, the rest validate."""

from pathlib import Path

import typer

from charlm import io
from charlm.corpus import split_tokens
from charlm.errors import reported_errors
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
        train_tokens, val_tokens = split_tokens(tokens.read_bytes(), itemsize, val_fraction)
        io.write_bytes(train, train_tokens)
        io.write_bytes(val, val_tokens)
        print(f"split: {len(train_tokens) // itemsize:,} train, {len(val_tokens) // itemsize:,} val tokens")


if __name__ == "__main__":
    typer.run(main)
