"""The one loader of params.yaml: typed, validated dataclass configs.

Every stage calls `load_params`; a wrong value fails here, before any work, with one line that names
the key, the value and what is allowed (`ParamsError`, which the stages turn into exit code 2).
params.yaml holds the tuned values; a key it leaves out takes the dataclass default below (for
the training sections, plain lecture-style settings such as `optimizer: adamw`, not the tuned ones).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from charlm.errors import UsageError
from charlm.models import MODEL_NAMES
from charlm.models.gpt.config import ConfigError, GPTArchitecture

DEFAULT_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
Precision = Literal["float32", "bfloat16", "float16", "auto"]
Optimizer = Literal["adamw", "muon"]
BatchWindows = Literal["random", "epoch"]
SamplePrecision = Literal["auto", "float32", "int8"]
PRECISIONS, OPTIMIZERS, BATCH_WINDOWS = get_args(Precision), get_args(Optimizer), get_args(BatchWindows)
SAMPLE_PRECISIONS = get_args(SamplePrecision)
# The `device` grammar, here and nowhere else (charlm.device resolves what it matches).
DEVICE_GRAMMAR = re.compile(r"^(?P<kind>cpu|mps|auto|cuda)(:(?P<index>\d+))?$")
DEVICE_FORMS = "cpu, cuda, cuda:N, mps or auto"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ParamsError(UsageError, ValueError):
    """A bad value in params.yaml (or an option): the message is the whole story, one line."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ParamsError(f"{key} = {value!r}: {allowed}")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(key, value, allowed)


@dataclass(frozen=True)
class DataParams:
    url: str = DEFAULT_URL
    sha256: str = DEFAULT_SHA256  # "" means: not pinned, record whatever arrives (with a warning)

    def __post_init__(self) -> None:
        _check(bool(self.url.strip()), "data.url", self.url, "must be an http(s) URL, a file:// URL or a path")
        _check(
            self.sha256 == "" or bool(_SHA256_RE.match(self.sha256)),
            "data.sha256",
            self.sha256,
            "must be 64 lowercase hex digits, or '' to accept any content",
        )


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "split.val_fraction", self.val_fraction, "must be in (0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained: the keys the `bigram` and `gpt` sections share."""

    batch_size: int = 32  # the global batch of one optimizer step, whatever the process count
    micro_batch_size: int = 0  # rows per forward/backward; 0 = the whole per-process batch at once
    block_size: int = 8  # the context: characters per training block
    max_iters: int = 3000
    learning_rate: float = 1e-2
    min_lr_ratio: float = 1.0  # cosine decay ends at learning_rate * min_lr_ratio; 1.0 keeps it constant
    warmup_iters: int = 0  # clamped to max_iters / 10, so a short smoke run (`-S gpt.max_iters=10`) just works
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    eval_interval: int = 300
    eval_iters: int = 200
    precision: Precision = "float32"  # "auto": bf16 where native, float16 on CUDA without it (hardware.autocast_dtype)
    compile: bool | Literal["auto"] = False  # torch.compile for training; "auto" = on CUDA only (hardware.compiles)
    optimizer: Optimizer = "adamw"  # "muon": Muon for the blocks' matrices, AdamW for the rest (charlm.optim)
    ema_decay: float = 0.0  # > 0: keep and save an exponential moving average of the weights; 0 = off
    batch_windows: BatchWindows = "random"  # "epoch": every block once per epoch, shuffled (charlm.batches)

    def check(self, section: str) -> None:
        positive_ints = ("batch_size", "block_size", "max_iters", "eval_interval", "eval_iters")
        for name in positive_ints:
            value = getattr(self, name)
            _check(value > 0, f"{section}.{name}", value, "must be a positive integer")
        _check(0.0 < self.learning_rate < 10.0, f"{section}.learning_rate", self.learning_rate, "must be in (0, 10)")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{section}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.warmup_iters >= 0, f"{section}.warmup_iters", self.warmup_iters, "must be >= 0")
        # Decoupled decay shrinks every matrix by learning_rate * weight_decay a step: under 1 or it flips sign.
        _check(
            self.weight_decay >= 0.0 and self.learning_rate * self.weight_decay < 1.0,
            f"{section}.weight_decay",
            self.weight_decay,
            f"must be >= 0 and under 1 / learning_rate ({1 / self.learning_rate:g})",
        )
        _check(
            self.micro_batch_size >= 0 and (self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0),
            f"{section}.micro_batch_size",
            self.micro_batch_size,
            f"must be 0 or divide batch_size ({self.batch_size})",
        )
        _check(self.grad_clip >= 0.0, f"{section}.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _check(self.precision in PRECISIONS, f"{section}.precision", self.precision, f"must be one of {PRECISIONS}")
        _check(
            self.compile is True or self.compile is False or self.compile == "auto",
            f"{section}.compile",
            self.compile,
            "must be true, false or auto",
        )
        _check(self.optimizer in OPTIMIZERS, f"{section}.optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        _check(
            self.batch_windows in BATCH_WINDOWS,
            f"{section}.batch_windows",
            self.batch_windows,
            f"must be one of {BATCH_WINDOWS} (random: the lecture's independent starts)",
        )
        _check(
            0.0 <= self.ema_decay < 1.0,
            f"{section}.ema_decay",
            self.ema_decay,
            "must be in [0, 1) (0 = no weight averaging; 0.998 averages over ~500 steps)",
        )


@dataclass(frozen=True)
class GPTTraining(TrainConfig):
    """The GPT's training keys: the shared ones, and how Muon treats its fused query/key/value matrix."""

    block_size: int = 128
    muon_split_qkv: bool = False  # with muon: q, k and v orthogonalised each on its own


class Section:
    """A model's params section: `train` (how to train it) beside `model` (what to build), written
    flat in params.yaml. `block_size` belongs to both: the model's context and training's blocks."""

    train: TrainConfig
    model: Any

    @classmethod
    def parts(cls) -> tuple[type, type | None]:
        hints = get_type_hints(cls)
        return hints["train"], hints["model"] if dataclasses.is_dataclass(hints["model"]) else None

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """Every flat key of the section and its type."""
        train_cls, model_cls = cls.parts()
        return get_type_hints(train_cls) | (get_type_hints(model_cls) if model_cls else {})

    @classmethod
    def of(cls, **flat: Any) -> Any:
        """The section from its flat keys, as params.yaml writes them; a key missing takes its default."""
        train_cls, model_cls = cls.parts()
        train_keys = {f.name for f in dataclasses.fields(train_cls)}
        unknown = set(flat) - set(cls.keys())
        if unknown:
            raise TypeError(f"unknown keys for {cls.__name__}: {sorted(unknown)}")
        train = train_cls(**{k: v for k, v in flat.items() if k in train_keys})
        if model_cls is None:
            return cls(train)
        model_keys = {f.name for f in dataclasses.fields(model_cls)}
        shared = {"block_size": train.block_size} if "block_size" in model_keys else {}
        return cls(train, model_cls(**({k: v for k, v in flat.items() if k in model_keys} | shared)))

    def flat(self) -> dict[str, Any]:
        return dataclasses.asdict(self.train) | (dataclasses.asdict(self.model) if self.model is not None else {})

    def replace(self, **flat: Any) -> Any:
        """This section with some flat keys changed (and checked again)."""
        return type(self).of(**(self.flat() | flat))


@dataclass(frozen=True)
class BigramParams(Section):
    """The `bigram` section: training keys only (the lookup table has no shape to choose)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: None = None

    def __post_init__(self) -> None:
        self.train.check("bigram")
        _check(
            self.train.optimizer == "adamw",
            "bigram.optimizer",
            self.train.optimizer,
            "must be adamw: the bigram is one lookup table, with no hidden matrices for Muon",
        )


@dataclass(frozen=True)
class GPTParams(Section):
    """The `gpt` section: how to train (`GPTTraining`) and what to build (`GPTArchitecture`, beside the
    model in `charlm.models.gpt.config`)."""

    train: GPTTraining = field(default_factory=GPTTraining)
    model: GPTArchitecture = field(default_factory=GPTArchitecture)

    def __post_init__(self) -> None:
        self.train.check("gpt")
        try:
            self.model.check_architecture("gpt.")
        except ConfigError as e:
            raise ParamsError(str(e)) from None
        if self.model.block_size != self.train.block_size:
            raise ValueError("block_size differs between training and the model: build the section with of()")


@dataclass(frozen=True)
class EvaluateParams:
    """The evaluate stage's windows (charlm.evaluation.split_loss) and dynamic evaluation
    (charlm.evaluation.dynamic_loss): the val split read in order, each segment scored first, then
    learned from, with the weights pulled back towards the trained ones."""

    full_context: bool = False  # val_loss/train_loss windows overlap so every character has its full context
    dynamic_lr: float = 0.0  # SGD step on each scored segment; 0 = no dynamic evaluation
    dynamic_decay: float = 0.0  # share of the way back to the trained weights after each step
    dynamic_segment: int = 128  # characters scored, then learned from, per step
    temperature: float = 1.0  # every loss scores the logits divided by this; 1 = the model's own

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.dynamic_lr < 1.0 and math.isfinite(self.dynamic_lr),
            "evaluate.dynamic_lr",
            self.dynamic_lr,
            "must be in [0, 1) (0 = no dynamic evaluation)",
        )
        _check(
            0.0 <= self.dynamic_decay <= 1.0, "evaluate.dynamic_decay", self.dynamic_decay, "must be in [0, 1]"
        )
        _check(
            1 <= self.dynamic_segment <= 1_000_000,
            "evaluate.dynamic_segment",
            self.dynamic_segment,
            "must be in [1, 1000000]",
        )
        _check(
            0.0 < self.temperature <= 100.0 and math.isfinite(self.temperature),
            "evaluate.temperature",
            self.temperature,
            "must be in (0, 100] (1 = the model's own probabilities)",
        )


@dataclass(frozen=True)
class SampleParams:
    prompt: str = ""  # empty: a newline, or token 0 in a corpus without one (charlm.sampling.prompt_ids)
    max_new_tokens: int = 500
    temperature: float = 1.0
    top_k: int = 0  # 0 means no top-k filtering
    num_samples: int = 1  # texts generated as one batch, each with its own seeded randomness
    precision: SamplePrecision = "auto"  # CPU: the faster of float32/int8, timed; else float32 (sampling_weights)
    compile: bool | Literal["auto"] = "auto"  # compiled decode step: auto = on a CPU with a C++ compiler, for long jobs

    def __post_init__(self) -> None:
        _check(
            self.compile is True or self.compile is False or self.compile == "auto",
            "sample.compile",
            self.compile,
            "must be true, false or auto",
        )
        _check(
            self.precision in SAMPLE_PRECISIONS,
            "sample.precision",
            self.precision,
            f"must be one of {SAMPLE_PRECISIONS}",
        )
        _check(
            0 < self.max_new_tokens <= 1_000_000,
            "sample.max_new_tokens",
            self.max_new_tokens,
            "must be in [1, 1000000]",
        )
        _check(
            0.0 <= self.temperature <= 100.0 and math.isfinite(self.temperature),
            "sample.temperature",
            self.temperature,
            "must be in [0, 100] (0 means greedy argmax)",
        )
        _check(self.top_k >= 0, "sample.top_k", self.top_k, "must be >= 0 (0 means no top-k filtering)")
        _check(1 <= self.num_samples <= 1024, "sample.num_samples", self.num_samples, "must be in [1, 1024]")


@dataclass(frozen=True)
class Params:
    seed: int = 1337
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
    nproc: int = 1  # data-parallel training processes on this machine (torchrun + DDP when > 1)
    save_state_every_seconds: float = 60.0  # the train stage's resumable state (charlm/resume.py); 0 = never
    data: DataParams = field(default_factory=DataParams)
    split: SplitParams = field(default_factory=SplitParams)
    bigram: BigramParams = field(default_factory=BigramParams)
    gpt: GPTParams = field(default_factory=GPTParams)
    sample: SampleParams = field(default_factory=SampleParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**63, "seed", self.seed, "must be an integer in [0, 2**63)")
        _check(parse_device(self.device) is not None, "device", self.device, f"must be {DEVICE_FORMS}")
        _check(0 <= self.threads <= 1024, "threads", self.threads, "must be in [0, 1024] (0 = torch's default)")
        _check(1 <= self.nproc <= 256, "nproc", self.nproc, "must be in [1, 256] (1 = plain single process)")
        _check(
            self.save_state_every_seconds >= 0,
            "save_state_every_seconds",
            self.save_state_every_seconds,
            "must be >= 0 (0 = never save a resumable state)",
        )

    def section(self, name: str) -> BigramParams | GPTParams:
        if name not in MODEL_NAMES:
            raise ParamsError(f"model {name!r}: must be one of {', '.join(MODEL_NAMES)}")
        return getattr(self, name)


def parse_device(text: str) -> tuple[str, int | None] | None:
    """`cuda:1` -> ("cuda", 1), `mps` -> ("mps", None); None for anything else (only cuda has an index)."""
    match = DEVICE_GRAMMAR.match(text)
    if match is None or (match["index"] is not None and match["kind"] != "cuda"):
        return None
    return match["kind"], None if match["index"] is None else int(match["index"])


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Turn one YAML value into `kind`, or fail naming the key. Handles YAML 1.1's `3e-4` string."""
    if kind is bool:
        _check(isinstance(value, bool), key, value, "must be true or false")
        return value
    if kind is int:
        # bool is an int subclass in Python; `batch_size: yes` is a mistake, not 1.
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
        return value
    if kind is float:
        if isinstance(value, str):
            # PyYAML implements YAML 1.1, which reads `3e-4` (no dot) as a string.
            try:
                value = float(value.strip())
            except ValueError:
                _fail(key, value, "must be a number")
        _check(isinstance(value, int | float) and not isinstance(value, bool), key, value, "must be a number")
        _check(math.isfinite(value), key, value, "must be a finite number")
        return float(value)
    if kind == bool | Literal["auto"]:
        _check(isinstance(value, bool) or value == "auto", key, value, "must be true, false or auto")
        return value
    if kind is str or get_origin(kind) is Literal:
        # A Literal's allowed values are checked, with the section's message, by its dataclass.
        _check(isinstance(value, str), key, value, "must be a string (quote it in YAML)")
        return value
    raise TypeError(f"no coercion for {kind}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: must be a mapping of keys to values, got {raw!r}")
    section = isinstance(cls, type) and issubclass(cls, Section)
    hints = cls.keys() if section else get_type_hints(cls)
    fields = hints if section else {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        # repr() for keys YAML made odd (numbers, newlines): the message stays one readable line
        shown = key if isinstance(key, str) and key.isidentifier() else repr(key)
        dotted = f"{prefix}.{shown}" if prefix else shown
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            known = ", ".join(fields)
            raise ParamsError(f"{dotted}: unknown key{hint} (known keys: {known})")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, dotted)
        else:
            kwargs[key] = _coerce(dotted, value, kind)
    return cls.of(**kwargs) if section else cls(**kwargs)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML) into `Params`."""
    return _build(Params, raw, "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, list | dict):
                continue  # unhashable keys are refused later as unknown keys
            if key in seen:
                raise ParamsError(
                    f"{key!s}: given twice (lines {seen[key]} and {line}) in the same section; keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root or pass --params") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: cannot be read ({e})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ParamsError(f"{path}: not valid YAML{at}; fix the syntax") from None
    return parse_params(raw)
