"""Stage `sample@<model>`: generate text from a checkpoint with the `sample` params."""

from pathlib import Path

import typer

from charlm import io
from charlm.checkpoint import load_for_stage
from charlm.errors import reported_errors
from charlm.sampling import format_samples, sample_text


def main(
    model: str = typer.Argument(..., help="bigram or gpt."),
    checkpoint: Path = typer.Option(..., help="The checkpoint from `train`."),
    vocab: Path = typer.Option(..., help="The vocabulary from `encode`."),
    out: Path = typer.Option(..., help="Output: the generated text."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file."),
) -> None:
    with reported_errors(f"sample@{model}"):
        p, runtime, ckpt = load_for_stage(model, checkpoint, vocab, params, sampling=True)
        samples = sample_text(ckpt, p.sample, runtime, p.seed)
        io.write_text(out, format_samples(samples.texts))
        count = f"{len(samples.texts)} x " if len(samples.texts) > 1 else ""
        print(f"sample@{model}: {count}{p.sample.max_new_tokens} tokens ({samples.weights} weights) to {out}")


if __name__ == "__main__":
    typer.run(main)
