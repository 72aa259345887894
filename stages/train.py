"""Stage `train@<model>`: train the bigram or the GPT on the train split, with the loss curve.

With `nproc` > 1 the stage re-launches itself under torchrun (DDP); only rank 0 writes outputs.
"""

import sys
from pathlib import Path

import torch
import typer

from charlm import distributed
from charlm.batches import load_tokens
from charlm.checkpoint import make_checkpoint, save_checkpoint
from charlm.curves import CurvePoint, write_curve
from charlm.device import configure_threads, resolve_device, seed_everything
from charlm.errors import reported_errors
from charlm.models import build_model, config_for, count_params
from charlm.params import ParamsError, load_params
from charlm.progress import Progress
from charlm.tokenizer import CharTokenizer
from charlm.training import micro_batches, train


def main(
    model: str = typer.Argument(..., help="bigram or gpt: which params section and model to train."),
    train_tokens: Path = typer.Option(..., "--train", help="The training tokens from `split`."),
    val_tokens: Path = typer.Option(..., "--val", help="The validation tokens from `split`."),
    vocab: Path = typer.Option(..., help="The vocabulary from `encode`."),
    checkpoint: Path = typer.Option(..., help="Output: the trained model."),
    curve: Path = typer.Option(..., help="Output: the loss curve CSV, rewritten at each evaluation."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file."),
) -> None:
    with reported_errors(f"train@{model}"):
        p = load_params(params)
        cfg = p.model(model)
        device = resolve_device(p.device)
        if p.nproc > 1 and not distributed.under_torchrun():
            micro_batches(cfg, p.nproc, model)  # a bad split of the batch fails here, before any launch
            distributed.relaunch_under_torchrun(p.nproc, "stages.train", sys.argv[1:])
            return
        dist = distributed.Distributed.from_env()
        device = distributed.worker_device(device, dist)
        configure_threads(p.threads)
        tokenizer = CharTokenizer.load(vocab)
        splits = {"train": load_tokens(train_tokens, tokenizer.dtype), "val": load_tokens(val_tokens, tokenizer.dtype)}
        for name, data in splits.items():
            if cfg.block_size >= len(data):
                raise ParamsError(
                    f"{model}.block_size = {cfg.block_size}: must be shorter than the {name} split ({len(data)} tokens)"
                )
        seed_everything(p.seed)
        net = build_model(model, config_for(model, cfg, tokenizer.vocab_size))
        if dist.rank:
            torch.manual_seed(p.seed + 7919 * dist.rank)  # its own dropout masks; DDP copies rank 0's weights
        if dist.world_size > 1:
            distributed.init_process_group(device)
        try:
            if dist.is_main:
                where = f"{dist.world_size} processes" if dist.world_size > 1 else device
                print(f"train@{model}: {count_params(net):,} parameters on {where}, {cfg.max_iters} steps", flush=True)
            progress = Progress(model)
            on_progress = progress.on_progress if dist.is_main else None
            points = []

            def on_eval(point: CurvePoint) -> None:
                # Rewritten whole at each evaluation, so `dvc plots show` can follow a running stage.
                points.append(point)
                write_curve(curve, points)
                progress.on_eval(point)

            result = train(net, splits["train"], splits["val"], cfg, device, p.seed, on_progress, on_eval, dist, model)
        finally:
            distributed.destroy_process_group()
        if not dist.is_main:
            return  # one writer: rank 0
        stats = {
            "train_seconds": round(result.train_seconds, 3),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "precision": result.precision,
            "device": device,
            "nproc": dist.world_size,
            "steps": cfg.max_iters,
        }
        save_checkpoint(checkpoint, make_checkpoint(model, net, tokenizer, stats))


if __name__ == "__main__":
    typer.run(main)
