"""Stage `train@<model>`: train the bigram or the GPT on the train split, with the loss curve.

With `nproc` > 1 the stage re-launches itself under torchrun (DDP); only rank 0 writes outputs.
Every `save_state_every_seconds` it saves a resumable state (charlm/resume.py); a re-run after an
interruption continues from it.
"""

import contextlib
import dataclasses
import sys
from pathlib import Path

import torch
import typer

from charlm import distributed
from charlm import resume as saved
from charlm.batches import load_tokens
from charlm.checkpoint import make_checkpoint, save_checkpoint
from charlm.curves import CurvePoint, write_curve
from charlm.device import configure_threads, resolve_device, seed_everything
from charlm.errors import reported_errors
from charlm.models import build_model, config_for, count_params
from charlm.params import ParamsError, load_params
from charlm.progress import Progress
from charlm.tokenizer import CharTokenizer
from charlm.training import NonFiniteLoss, check_training_memory, micro_batches, train


def main(
    model: str = typer.Argument(..., help="bigram or gpt: which params section and model to train."),
    train_tokens: Path = typer.Option(..., "--train", help="The training tokens from `split`."),
    val_tokens: Path = typer.Option(..., "--val", help="The validation tokens from `split`."),
    vocab: Path = typer.Option(..., help="The vocabulary from `encode`."),
    checkpoint: Path = typer.Option(..., help="Output: the trained model."),
    curve: Path = typer.Option(..., help="Output: the loss curve CSV, rewritten at each evaluation."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file."),
) -> None:
    stage = f"train@{model}"
    with reported_errors(stage):
        p = load_params(params)
        cfg = p.model(model)
        device = resolve_device(p.device)
        tokenizer = CharTokenizer.load(vocab)
        splits = {"train": load_tokens(train_tokens, tokenizer.dtype), "val": load_tokens(val_tokens, tokenizer.dtype)}
        for name, data in splits.items():
            if cfg.block_size >= len(data):
                raise ParamsError(
                    f"{model}.block_size = {cfg.block_size}: must be shorter than the {name} split ({len(data)} tokens)"
                )
        config = config_for(model, cfg, tokenizer.vocab_size)
        if not distributed.under_torchrun():
            # Before any allocation or launch: a bad split of the batch, or a run that cannot fit, stops here.
            micro_batches(cfg, p.nproc, model)
            check_training_memory(model, cfg, config, device, p.nproc)
            if p.nproc > 1:
                distributed.relaunch_under_torchrun(p.nproc, "stages.train", sys.argv[1:])
                return
        dist = distributed.Distributed.from_env()
        if dist.world_size > 1:
            distributed.die_with_launcher()
        device = distributed.worker_device(device, dist)
        configure_threads(p.threads)
        seed_everything(p.seed)
        net = build_model(model, config)
        # After the model is built, so its module (imported by name) is among the code in the key.
        read = {"seed": p.seed, "device": str(device), "nproc": p.nproc, model: dataclasses.asdict(cfg)}
        key = saved.training_key(stage, read, (train_tokens, val_tokens, vocab), device)
        state_dir = saved.default_state_dir()
        state_file = saved.state_path(state_dir, stage, Path.cwd(), key)
        resume_from, found, refused = saved.take_state(state_dir, key)
        if dist.is_main:
            if refused:
                warning = f"{stage}: warning: ignoring the saved state {found}: {refused}; starting from step 0"
                print(warning, flush=True)
                found.unlink(missing_ok=True)
            saved.remove_stale_states(state_dir, state_file)
        # Only rank 0 writes states; every rank still takes part in a save (it gathers their random streams).
        writer = saved.StateWriter(state_file, key, lambda line: print(f"{stage}: {line}", flush=True))
        if dist.is_main and p.save_state_every_seconds > 0:
            writer.check()

        if dist.rank:
            # Its own dropout masks; DDP copies rank 0's weights, so the initial ones do not matter.
            torch.manual_seed(distributed.rank_seed(p.seed, dist.rank))
        if dist.world_size > 1:
            distributed.init_process_group(device)
        try:
            if dist.is_main:
                where = f"{dist.world_size} processes" if dist.world_size > 1 else str(device)
                print(f"{stage}: {count_params(net):,} parameters on {where}, {cfg.max_iters} steps", flush=True)
                if resume_from is not None:
                    step, total = resume_from.step, cfg.max_iters
                    print(f"{stage}: resuming from step {step:,} of {total:,} ({found})", flush=True)
            progress = Progress(model)
            on_progress = progress.on_progress if dist.is_main else None
            points = list(resume_from.curve) if resume_from is not None else []

            def on_eval(point: CurvePoint) -> None:
                # Rewritten whole at each evaluation, so `dvc plots show` can follow a running stage.
                points.append(point)
                write_curve(curve, points)
                progress.on_eval(point)

            try:
                result = train(
                    net,
                    splits["train"],
                    splits["val"],
                    cfg,
                    device,
                    p.seed,
                    on_progress,
                    on_eval,
                    dist,
                    resume=resume_from,
                    save_state=writer if p.save_state_every_seconds > 0 else None,
                    save_every_seconds=p.save_state_every_seconds,
                )
            except NonFiniteLoss as e:
                if dist.is_main:
                    curve.unlink(missing_ok=True)
                kept = f"; the resumable state of step {writer.saved_step:,} is kept" if writer.saved_step else ""
                raise NonFiniteLoss(f"{e}{kept}") from None
            except BaseException:
                # A curve without its checkpoint is not an output (DVC deletes it before a re-run anyway).
                if dist.is_main:
                    curve.unlink(missing_ok=True)
                raise
        finally:
            distributed.destroy_process_group()
        if not dist.is_main:
            return  # one writer: rank 0
        stats = {
            "train_seconds": round(result.train_seconds, 3),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "precision": result.precision,
            "device": str(device),
            "nproc": dist.world_size,
            "steps": cfg.max_iters,
            "batch_windows": cfg.batch_windows,
        }
        save_checkpoint(checkpoint, make_checkpoint(model, net, tokenizer, stats))
        for done in {state_file, found}:
            if done is not None:
                with contextlib.suppress(OSError):  # a state directory that never worked has none
                    done.unlink(missing_ok=True)  # finished: nothing left to resume


if __name__ == "__main__":
    typer.run(main)
