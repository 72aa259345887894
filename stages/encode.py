"""Stage `encode`: build the character vocabulary and encode the corpus into a raw token tensor.

Two streamed passes (vocabulary, then ids), so memory does not grow with the corpus.
"""

from pathlib import Path

import typer

from charlm import io
from charlm.corpus import encode_file, fit_vocabulary
from charlm.errors import reported_errors


def main(
    text: Path = typer.Option(..., help="The raw corpus (UTF-8)."),
    vocab: Path = typer.Option(..., help="Output: the vocabulary as JSON."),
    tokens: Path = typer.Option(..., help="Output: every character's id, as raw little-endian integers."),
) -> None:
    with reported_errors("encode"):
        tokenizer = fit_vocabulary(text)
        with io.atomic_open(tokens, "wb") as out:
            count = encode_file(text, tokenizer, out)
        tokenizer.save(vocab)
        print(f"encode: {count:,} characters, vocab_size {tokenizer.vocab_size}, dtype {tokenizer.dtype}")


if __name__ == "__main__":
    typer.run(main)
