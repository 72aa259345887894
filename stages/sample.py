"""Stage `sample@<model>`: generate text from a checkpoint with the `sample` params."""

from pathlib import Path

import typer

from charlm import io
from charlm.checkpoint import load_checkpoint
from charlm.device import configure_threads, resolve_device
from charlm.errors import reported_errors
from charlm.params import load_params
from charlm.precision import sample_precision
from charlm.sampling import sample_text
from charlm.tokenizer import CharTokenizer


def main(
    model: str = typer.Argument(..., help="bigram or gpt."),
    checkpoint: Path = typer.Option(..., help="The checkpoint from `train`."),
    vocab: Path = typer.Option(..., help="The vocabulary from `encode`."),
    out: Path = typer.Option(..., help="Output: the generated text."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file."),
) -> None:
    with reported_errors(f"sample@{model}"):
        p = load_params(params)
        device = resolve_device(p.device)
        configure_threads(p.threads)
        tokenizer = CharTokenizer.load(vocab)
        ckpt = load_checkpoint(checkpoint, expected_model=model, tokenizer=tokenizer)
        text, _ = sample_text(ckpt, p.sample, device, p.seed)
        io.write_text(out, text)
        precision = sample_precision(device, p.sample.precision)
        print(f"sample@{model}: {p.sample.max_new_tokens} tokens ({precision} weights) to {out}")


if __name__ == "__main__":
    typer.run(main)
