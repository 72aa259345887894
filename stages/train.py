"""Stage `train@<model>`: train the bigram or the GPT on the train split, with the loss curve.

With `nproc` > 1 the stage re-launches itself under torchrun (DDP); only rank 0 writes outputs. Every
`save_state_every_seconds` it saves a resumable state (charlm/resume.py), which a re-run after an
interruption continues.
"""

import sys
from pathlib import Path

import typer

from charlm import distributed, io
from charlm.batches import load_splits
from charlm.checkpoint import make_checkpoint, save_checkpoint
from charlm.curves import CurveWriter
from charlm.device import configure_threads, resolve_device, seed_everything
from charlm.errors import reported_errors
from charlm.hardware import resolve_runtime
from charlm.models import build_model, config_for, count_params
from charlm.params import load_params
from charlm.progress import Progress
from charlm.resume import resumable
from charlm.tokenizer import CharTokenizer
from charlm.training import check_training_memory, micro_batches, train


def main(
    model: str = typer.Argument(..., help="bigram or gpt: which params section and model to train."),
    train_tokens: Path = typer.Option(..., "--train", help="The training tokens from `split`."),
    val_tokens: Path = typer.Option(..., "--val", help="The validation tokens from `split`."),
    vocab: Path = typer.Option(..., help="The vocabulary from `encode`."),
    checkpoint: Path = typer.Option(..., help="Output: the trained model."),
    curve: Path = typer.Option(..., help="Output: the loss curve CSV, rewritten at each evaluation."),
    progress: Path = typer.Option(..., help="Output: the last evaluation's step and losses, for `dvc exp show`."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file."),
) -> None:
    stage = f"train@{model}"
    with reported_errors(stage):
        p = load_params(params)
        section = p.section(model)
        cfg = section.train
        tokenizer = CharTokenizer.load(vocab)
        splits = load_splits(train_tokens, val_tokens, tokenizer.dtype, cfg.block_size, model)
        config = config_for(model, section, tokenizer.vocab_size)
        dist = distributed.Distributed.from_env()
        device = distributed.worker_device(resolve_device(p.device), dist)
        runtime = resolve_runtime(device, cfg.precision, getattr(section.model, "dropout", 0.0), compile=cfg.compile)
        if not distributed.under_torchrun():  # before any allocation or launch
            micro_batches(cfg, p.nproc, model)
            check_training_memory(model, cfg, config, runtime, p.nproc)
            if p.nproc > 1:
                return distributed.relaunch_under_torchrun(p.nproc, "stages.train", sys.argv[1:])
        configure_threads(p.threads)
        seed_everything(p.seed)  # the same initial weights in every process
        net = build_model(model, config, runtime)
        if dist.rank:
            seed_everything(distributed.rank_seed(p.seed, dist.rank))  # its own dropout masks

        def say(line: str) -> None:
            if dist.is_main:
                print(f"{stage}: {line}", flush=True)

        read = {"seed": p.seed, "device": str(device), "nproc": p.nproc, model: section.flat()}
        every = p.save_state_every_seconds
        with (
            resumable(stage, read, (train_tokens, val_tokens, vocab), device, every, dist.is_main, say) as states,
            distributed.process_group(device, dist),
            io.removed_on_failure(curve, dist.is_main),
            io.removed_on_failure(progress, dist.is_main),
        ):
            processes = f" x {dist.world_size} processes" if dist.world_size > 1 else ""
            say(f"{count_params(net):,} parameters on {runtime.describe()}{processes}, {cfg.max_iters} steps")
            if states.state is not None:
                say(f"resuming from step {states.state.step:,} of {cfg.max_iters:,} ({states.found})")
            bar = Progress(model)
            points = states.state.curve if states.state else []
            writer = CurveWriter(curve, progress, cfg.max_iters, points, bar.on_eval)
            result = train(
                net, splits["train"], splits["val"], cfg, runtime=runtime, seed=p.seed, dist=dist,
                resume_from=states.state, save_state=states.save, save_every_seconds=every,
                on_progress=bar.on_progress if dist.is_main else None, on_eval=writer.add,
            )  # fmt: skip
            if dist.is_main:
                stats = result.stats(cfg, device, dist)
                save_checkpoint(checkpoint, make_checkpoint(model, net, tokenizer, stats))


if __name__ == "__main__":
    typer.run(main)
