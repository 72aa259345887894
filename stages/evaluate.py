"""Stage `evaluate@<model>`: exact final losses of a checkpoint into a metrics JSON file."""

import math
from pathlib import Path

import typer

from charlm import io
from charlm.batches import load_tokens
from charlm.checkpoint import load_for_stage
from charlm.errors import reported_errors
from charlm.evaluation import dynamic_loss, full_context, split_loss
from charlm.models import extra_metrics


def main(
    model: str = typer.Argument(..., help="bigram or gpt."),
    checkpoint: Path = typer.Option(..., help="The checkpoint from `train`."),
    train_tokens: Path = typer.Option(..., "--train", help="The training tokens from `split`."),
    val_tokens: Path = typer.Option(..., "--val", help="The validation tokens from `split`."),
    vocab: Path = typer.Option(..., help="The vocabulary from `encode`."),
    metrics: Path = typer.Option(..., help="Output: the metrics JSON."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file."),
) -> None:
    with reported_errors(f"evaluate@{model}"):
        p, runtime, ckpt = load_for_stage(model, checkpoint, vocab, params)
        train_data = load_tokens(train_tokens, ckpt.tokenizer.dtype)
        val_data = load_tokens(val_tokens, ckpt.tokenizer.dtype)
        net = ckpt.build(runtime)
        block_size = ckpt.config.get("block_size", 256)  # the bigram sees one token whatever the block
        context = full_context(net, block_size) if p.evaluate.full_context else 0
        temperature = p.evaluate.temperature
        val_loss = split_loss(net, val_data, block_size, runtime.device, context=context, temperature=temperature)
        # The train split is 9x the val split: an even spread of blocks as large as val is enough.
        train_loss = split_loss(net, train_data, block_size, runtime.device, len(val_data), context, temperature)
        result = {
            "train_loss": round(train_loss, 5),
            "val_loss": round(val_loss, 5),
            "val_bpc": round(val_loss / math.log(2), 5),
            "overfit_gap": round(val_loss - train_loss, 5),  # val - train: how much is memorised
            "params": ckpt.n_params,
        }
        if p.evaluate.dynamic_lr > 0:
            # Beside val_loss, never instead of it: a model that learns from the text it scores.
            dynamic = dynamic_loss(net, val_data, block_size, runtime.device, p.evaluate)
            result["val_loss_dynamic"] = round(dynamic, 5)
        result |= extra_metrics(model, train_data, val_data, ckpt.tokenizer.vocab_size)
        stats = ckpt.train_stats
        result |= {
            "train_seconds": stats.get("train_seconds"),
            "tokens_per_second": stats.get("tokens_per_second"),
            "precision": stats.get("precision"),
            "device": str(runtime.device),
            "device_name": stats.get("device_name"),  # what trained: the GPU's or CPU's name
        }
        io.write_json(metrics, result)
        print(f"evaluate@{model}: val_loss {val_loss:.4f}, train_loss {train_loss:.4f}")


if __name__ == "__main__":
    typer.run(main)
