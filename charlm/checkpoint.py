"""Checkpoints: a plain state_dict plus `asdict(config)`, the vocabulary and the training stats.

Loading never unpickles code: `torch.load(weights_only=True, map_location="cpu")` accepts only
tensors and plain containers, and every failure names the file and what to do about it.
"""

from __future__ import annotations

import io as _io
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from charlm import io
from charlm.device import configure_threads, resolve_device
from charlm.errors import CharlmError
from charlm.hardware import Runtime, resolve_runtime
from charlm.memory import available_memory, check_fits
from charlm.models import MODEL_NAMES, build_model
from charlm.params import Params, load_params
from charlm.tokenizer import CharTokenizer

FORMAT = "charlm-checkpoint-v1"


class CheckpointError(CharlmError, ValueError):
    """A checkpoint that is missing, unsafe, corrupt or does not match what it is used with."""


@dataclass
class Checkpoint:
    model_name: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer: CharTokenizer
    train_stats: dict[str, Any] = field(default_factory=dict)

    def build(self, runtime: Runtime | None = None) -> nn.Module:
        """The model with these weights, in eval mode: on the CPU, or on `runtime`'s device with its
        attention kernels."""
        model = build_model(self.model_name, self.config, runtime)
        model.load_state_dict(self.state_dict)
        return model.eval()

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


def make_checkpoint(
    model_name: str, model: nn.Module, tokenizer: CharTokenizer, train_stats: dict[str, Any]
) -> Checkpoint:
    # Unwrap torch.compile's wrapper so the keys are the plain module's.
    plain = getattr(model, "_orig_mod", model)
    state = {k: v.detach().to("cpu", copy=True) for k, v in plain.state_dict().items()}
    return Checkpoint(model_name, asdict(plain.config), state, tokenizer, dict(train_stats))


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    payload = {
        "format": FORMAT,
        "model": ckpt.model_name,
        "config": ckpt.config,
        "state_dict": ckpt.state_dict,
        "vocab": "".join(ckpt.tokenizer.chars),
        "train_stats": ckpt.train_stats,
    }
    # Serialised in memory first: torch.save on a full disk fails with an opaque RuntimeError of its
    # zip writer, while a plain write raises the OSError (ENOSPC) that io turns into one clear line.
    buffer = _io.BytesIO()
    torch.save(payload, buffer)
    io.write_bytes(path, buffer.getbuffer())


def load_for_stage(
    model: str, checkpoint: Path, vocab: Path, params: Path, sampling: bool = False
) -> tuple[Params, Runtime, Checkpoint]:
    """The evaluate and sample stages' common start: their params, the runtime they resolve once (with
    `sample.precision` and `sample.compile` when `sampling`), the threads set, and the checkpoint,
    checked against the model name and the pipeline's vocabulary."""
    p = load_params(params)
    runtime = resolve_runtime(
        resolve_device(p.device),
        sample_precision=p.sample.precision if sampling else "auto",
        sample_compile=p.sample.compile if sampling else False,
    )
    configure_threads(p.threads)
    ckpt = load_checkpoint(checkpoint, expected_model=model, tokenizer=CharTokenizer.load(vocab))
    return p, runtime, ckpt


def load_checkpoint(
    path: str | Path, expected_model: str | None = None, tokenizer: CharTokenizer | None = None
) -> Checkpoint:
    """Load and check a checkpoint; `expected_model` and `tokenizer` must match it when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train one with `dvc repro`")
    # The loaded weights, the model built from them and a sampling copy (int8 or on a device): ~3x the file.
    needed = 3 * path.stat().st_size
    check_fits(needed, available_memory(torch.device("cpu")), f"{path}: loading it", "use a machine with more memory")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" not in text:  # not a refused import: the bytes are simply not a pickle we can read
            raise CheckpointError(
                f"{path}: not a readable checkpoint (truncated or corrupt); re-run the train stage"
            ) from None
        detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(
            f"{path}: refused to load: it references Python code, which a checkpoint never needs "
            f"({detail[:140]}); only load checkpoints written by charlm"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {str(e)[:120]}); re-run the train stage"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a charlm checkpoint (no '{FORMAT}' marker); re-run the train stage")
    try:
        name = payload["model"]
        if name not in MODEL_NAMES:
            raise CheckpointError(f"{path}: unknown model type {name!r}")
        ckpt = Checkpoint(
            name,
            dict(payload["config"]),
            dict(payload["state_dict"]),
            CharTokenizer(tuple(payload["vocab"])),
            dict(payload.get("train_stats", {})),
        )
        vocab_size = ckpt.config["vocab_size"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({e}); re-run the train stage") from None
    if expected_model is not None and name != expected_model:
        raise CheckpointError(f"{path}: is a {name} checkpoint, expected {expected_model}; check the path")
    if vocab_size != ckpt.tokenizer.vocab_size:
        raise CheckpointError(f"{path}: config vocab_size {vocab_size} != its vocabulary's {ckpt.tokenizer.vocab_size}")
    if tokenizer is not None and tokenizer.chars != ckpt.tokenizer.chars:
        raise CheckpointError(
            f"{path}: its vocabulary ({ckpt.tokenizer.vocab_size} chars) does not match data/vocab.json "
            f"({tokenizer.vocab_size} chars); re-run `dvc repro` so they come from the same corpus"
        )
    try:
        ckpt.build()
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit the {name} config ({str(e)[:160]})") from None
    return ckpt
