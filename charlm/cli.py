"""The `charlm` command: sample from and describe trained checkpoints.

    charlm sample models/gpt.pt --prompt "ROMEO:" -n 300 --temperature 0.8
    charlm info models/gpt.pt
    charlm positions models/gpt.pt data/val.bin

The pipeline itself runs through DVC (`dvc repro`); this command is for using what it produced.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from charlm.errors import reported_errors

app = typer.Typer(
    help="Sample from and inspect charlm checkpoints. The pipeline itself runs with `dvc repro`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command(
    epilog="Examples:\n\n  charlm sample models/gpt.pt\n\n"
    "  charlm sample models/gpt.pt --prompt 'ROMEO:' -n 300 --temperature 0.8 --top-k 20 --seed 7\n\n"
    "  charlm sample models/gpt.pt --num-samples 5 -n 200\n\n"
    "  charlm sample models/gpt.pt --num-samples 64 -n 3000 --compile true"
)
def sample(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by the train stage, e.g. models/gpt.pt."),
    prompt: str = typer.Option("", help="Text to continue; empty (the default) starts from a newline."),
    max_new_tokens: int = typer.Option(500, "-n", "--max-new-tokens", help="How many characters to generate."),
    temperature: float = typer.Option(1.0, help="Softmax temperature; 0 is greedy (always the likeliest)."),
    top_k: int = typer.Option(0, help="Sample only among the k likeliest characters; 0 means all."),
    seed: int = typer.Option(1337, help="Random seed: the same seed gives the same text."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, mps or auto."),
    precision: str = typer.Option(
        "auto",
        help="auto (on the CPU the faster of float32 and int8 weights, timed; float32 elsewhere), float32 or int8.",
    ),
    drop_unknown: bool = typer.Option(
        False, "--drop-unknown", help="Remove prompt characters the model has never seen instead of failing."
    ),
    num_samples: int = typer.Option(
        1, "--num-samples", help="Texts to generate as one batch; sample i is the same whatever their number."
    ),
    compile: str = typer.Option(
        "auto",
        help="Compile the decode step (CPU, a C++ compiler): true, false, or auto (when the job is long enough).",
    ),
) -> None:
    """Stream generated text to the terminal, character by character; several samples print as they
    complete, one after another under a header."""
    with reported_errors("charlm sample"):
        from charlm.checkpoint import load_checkpoint
        from charlm.device import resolve_device
        from charlm.errors import UsageError
        from charlm.hardware import resolve_runtime
        from charlm.params import SampleParams
        from charlm.sampling import format_samples, sample_text

        if compile.lower() not in ("auto", "true", "false"):
            raise UsageError(f"--compile {compile!r}: must be true, false or auto")
        compile_choice = {"true": True, "false": False}.get(compile.lower(), "auto")
        settings = SampleParams(
            compile=compile_choice,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            precision=precision,
            num_samples=num_samples,
        )
        ckpt = load_checkpoint(checkpoint)

        def start(prompt_text: str, dropped: list[str]) -> None:
            if dropped:
                shown = " ".join(map(repr, dropped))
                print(f"warning: dropped characters not in the vocabulary: {shown}", file=sys.stderr)
            if num_samples == 1:
                write(prompt_text)

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        runtime = resolve_runtime(resolve_device(device), sample_precision=precision, sample_compile=settings.compile)
        samples = sample_text(ckpt, settings, runtime, seed, drop_unknown, on_start=start, on_text=write)
        write("\n" if num_samples == 1 else format_samples(samples.texts))


@app.command(epilog="Example:\n\n  charlm info models/gpt.pt\n\n  charlm info models/gpt.pt --json")
def info(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by the train stage."),
    as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
    metrics: Path = typer.Option(
        None, help="The evaluate stage's metrics JSON; default: the path dvc.yaml gives it for this model."
    ),
) -> None:
    """Print a model card: type, config, parameter count, vocabulary and training metrics."""
    with reported_errors("charlm info"):
        from charlm.checkpoint import load_checkpoint
        from charlm.hardware import describe_cpu
        from charlm.pipeline import evaluate_metrics_path

        ckpt = load_checkpoint(checkpoint)
        card = {
            "checkpoint": str(checkpoint),
            "model": ckpt.model_name,
            "params": ckpt.n_params,
            "vocab_size": ckpt.tokenizer.vocab_size,
            "config": ckpt.config,
            "training": ckpt.train_stats,
            "this_machine": {
                "cpu": describe_cpu(),
                "sample_precision": f"auto = {auto_weights(ckpt)} on the cpu, timed for this checkpoint",
            },
        }
        metrics_file = metrics or evaluate_metrics_path(Path("dvc.yaml"), ckpt.model_name)  # dvc.yaml owns it
        if metrics_file is not None and metrics_file.is_file():
            try:
                card["metrics"] = json.loads(metrics_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass  # the card is still useful without them
        if as_json:
            print(json.dumps(card, indent=2))
            return
        print(f"{ckpt.model_name} model  ({checkpoint})")
        print(f"  parameters   {ckpt.n_params:,}")
        print(f"  vocabulary   {ckpt.tokenizer.vocab_size} characters")
        for key, value in ckpt.config.items():
            print(f"  {key:<12} {value}")
        for section in ("training", "metrics", "this_machine"):
            if card.get(section):
                print(f"  {section}:")
                for key, value in card[section].items():
                    print(f"    {key:<18} {value}")


@app.command(epilog="Example:\n\n  charlm positions models/gpt.pt data/val.bin --width 16")
def positions(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by the train stage."),
    split: Path = typer.Argument(..., help="A token file written by the split stage, e.g. data/val.bin."),
    width: int = typer.Option(16, help="Positions per printed row."),
) -> None:
    """Print the loss by position in the block, over the split's blocks the evaluate stage uses."""
    with reported_errors("charlm positions"):
        import torch

        from charlm.batches import load_tokens
        from charlm.checkpoint import load_checkpoint
        from charlm.errors import UsageError
        from charlm.evaluation import position_losses
        from charlm.hardware import resolve_runtime

        if width <= 0:
            raise UsageError(f"--width {width}: must be a positive number of positions")
        ckpt = load_checkpoint(checkpoint)
        block_size = ckpt.config.get("block_size")
        if block_size is None:  # the bigram: every position predicts from one character
            raise UsageError(f"{checkpoint}: a {ckpt.model_name} model has no context block; use a gpt checkpoint")
        data = load_tokens(split, ckpt.tokenizer.dtype)
        if len(data) <= block_size:
            raise UsageError(f"{split}: {len(data)} tokens, shorter than the model's block_size {block_size}")
        runtime = resolve_runtime(torch.device("cpu"))  # float32, as the evaluate stage
        losses = position_losses(ckpt.build(runtime), data, block_size, runtime.device)
        print(f"{split}: loss by position in blocks of {block_size} (mean {losses.mean().item():.4f})")
        for start in range(0, block_size, width):
            part = losses[start : start + width]
            print(f"  {start:>5}-{start + len(part) - 1:<5} {part.mean().item():.4f}")


def auto_weights(ckpt) -> str:
    """What `sample.precision: auto` picks on this machine's CPU for one stream of this checkpoint."""
    import torch

    from charlm.hardware import resolve_runtime
    from charlm.sampling import faster_weights

    runtime = resolve_runtime(torch.device("cpu"), sample_precision="auto")
    model = ckpt.build(runtime)
    if getattr(model, "decode_step", None) is None:
        return "float32"  # the bigram: nothing to quantize
    return faster_weights(model, runtime, batch=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
