"""Stage `sample@<model>`: generate text from a checkpoint with the `sample` params."""

from pathlib import Path

import torch
import typer

from charlm import io
from charlm.checkpoint import load_checkpoint
from charlm.device import configure_threads, resolve_device, seed_everything
from charlm.errors import reported_errors
from charlm.params import ParamsError, load_params
from charlm.quantize import quantize_int8
from charlm.sampling import generate, prompt_ids
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
        s = p.sample
        device = resolve_device(p.device)
        configure_threads(p.threads)
        tokenizer = CharTokenizer.load(vocab)
        if s.top_k > tokenizer.vocab_size:
            raise ParamsError(
                f"sample.top_k = {s.top_k}: must be <= the vocabulary size ({tokenizer.vocab_size}), or 0"
            )
        s.check_device(device)
        ids, _ = prompt_ids(tokenizer, s.prompt)
        ckpt = load_checkpoint(checkpoint, expected_model=model, tokenizer=tokenizer)
        seed_everything(p.seed)
        net = ckpt.build().to(device)
        if s.precision == "int8":
            net = quantize_int8(net)
        idx = torch.tensor([ids], dtype=torch.long)
        out_ids = generate(net, idx, s.max_new_tokens, s.temperature, s.top_k, torch.Generator().manual_seed(p.seed))
        io.write_text(out, tokenizer.decode(out_ids[0].tolist()))
        print(f"sample@{model}: {s.max_new_tokens} tokens to {out}")


if __name__ == "__main__":
    typer.run(main)
