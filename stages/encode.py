"""Stage `encode`: build the character vocabulary and encode the corpus into a raw token tensor."""

from pathlib import Path

import typer

from charlm import io
from charlm.corpus import decode_corpus, encode_text
from charlm.errors import reported_errors


def main(
    text: Path = typer.Option(..., help="The raw corpus (UTF-8)."),
    vocab: Path = typer.Option(..., help="Output: the vocabulary as JSON."),
    tokens: Path = typer.Option(..., help="Output: every character's id, as raw little-endian integers."),
) -> None:
    with reported_errors("encode"):
        corpus = decode_corpus(text.read_bytes(), str(text))
        tokenizer, encoded = encode_text(corpus)
        io.write_bytes(tokens, encoded)
        tokenizer.save(vocab)
        print(f"encode: {len(corpus):,} characters, vocab_size {tokenizer.vocab_size}, dtype {tokenizer.dtype}")


if __name__ == "__main__":
    typer.run(main)
