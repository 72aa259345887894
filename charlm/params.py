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
from typing import Any, get_type_hints

import yaml

from charlm.errors import UsageError

DEFAULT_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
MODEL_NAMES = ("bigram", "gpt")
PRECISIONS = ("float32", "bfloat16", "auto")
OPTIMIZERS = ("adamw", "muon")
BATCH_WINDOWS = ("random", "epoch")
SAMPLE_PRECISIONS = ("auto", "float32", "int8")
GPT_POSITIONS = ("learned", "rope")
GPT_MLPS = ("gelu", "relu2")
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
    """How one model is trained: the keys shared by the `bigram` and `gpt` sections."""

    batch_size: int = 32  # the global batch of one optimizer step, whatever the process count
    micro_batch_size: int = 0  # rows per forward/backward; 0 = the whole per-process batch at once
    block_size: int = 8
    max_iters: int = 3000
    learning_rate: float = 1e-2
    min_lr_ratio: float = 1.0  # cosine decay ends at learning_rate * min_lr_ratio; 1.0 keeps it constant
    warmup_iters: int = 0  # clamped to max_iters / 10, so a short smoke run (`-S gpt.max_iters=10`) just works
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    eval_interval: int = 300
    eval_iters: int = 200
    precision: str = "float32"  # bfloat16 autocast where the device supports it; "auto" picks it there
    optimizer: str = "adamw"  # "muon": Muon for the blocks' matrices, AdamW for the rest (charlm.training)
    muon_split_qkv: bool = False  # with muon: the GPT's query, key and value matrices orthogonalised each on its own
    ema_decay: float = 0.0  # > 0: keep and save an exponential moving average of the weights; 0 = off
    batch_windows: str = "random"  # "epoch": every window once per epoch, shuffled (charlm.batches.EpochWindows)

    def check(self, section: str) -> None:
        positive_ints = ("batch_size", "block_size", "max_iters", "eval_interval", "eval_iters")
        for name in positive_ints:
            value = getattr(self, name)
            _check(value > 0, f"{section}.{name}", value, "must be a positive integer")
        _check(0.0 < self.learning_rate < 10.0, f"{section}.learning_rate", self.learning_rate, "must be in (0, 10)")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{section}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.warmup_iters >= 0, f"{section}.warmup_iters", self.warmup_iters, "must be >= 0")
        _check(0.0 <= self.weight_decay < 1.0, f"{section}.weight_decay", self.weight_decay, "must be in [0, 1)")
        _check(
            self.micro_batch_size >= 0 and (self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0),
            f"{section}.micro_batch_size",
            self.micro_batch_size,
            f"must be 0 or divide batch_size ({self.batch_size})",
        )
        _check(self.grad_clip >= 0.0, f"{section}.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _check(self.precision in PRECISIONS, f"{section}.precision", self.precision, f"must be one of {PRECISIONS}")
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
class BigramParams(TrainConfig):
    def __post_init__(self) -> None:
        self.check("bigram")
        _check(
            self.optimizer == "adamw",
            "bigram.optimizer",
            self.optimizer,
            "must be adamw: the bigram is one lookup table, with no hidden matrices for Muon",
        )
        _check(not self.muon_split_qkv, "bigram.muon_split_qkv", self.muon_split_qkv, "must be false: no attention")


@dataclass(frozen=True)
class GPTArchitecture:
    """The GPT's shape and switches: the `gpt` section's model keys and, with `vocab_size`, the model's
    own config (`charlm.models.gpt.GPTConfig` extends it). The defaults are the lecture's model."""

    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    position: str = "learned"  # "rope": rotary position embeddings instead of the lecture's table
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    mlp: str = "gelu"  # "relu2": ReLU squared
    zero_init: bool = False  # the blocks' output projections start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    token_shift: bool = False  # add a learned per-channel share of the previous character's embedding
    attention_window: int = 0  # > 0: each character attends to itself and the window - 1 before it; 0 = all

    def check_architecture(self, prefix: str = "") -> None:
        """The one set of rules, for params.yaml (`prefix` "gpt.") and for a model's config alike."""
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}{name}", value, "must be a positive integer")
        divisible = f"must be divisible by {prefix}n_head ({self.n_head})"
        _check(self.n_embd % self.n_head == 0, f"{prefix}n_embd", self.n_embd, divisible)
        _check(0.0 <= self.dropout < 1.0, f"{prefix}dropout", self.dropout, "must be in [0, 1)")
        _check(self.position in GPT_POSITIONS, f"{prefix}position", self.position, f"must be one of {GPT_POSITIONS}")
        _check(
            self.position != "rope" or (self.n_embd // self.n_head) % 2 == 0,
            f"{prefix}position",
            self.position,
            f"needs an even head size (n_embd / n_head = {self.n_embd / self.n_head:g})",
        )
        _check(self.mlp in GPT_MLPS, f"{prefix}mlp", self.mlp, f"must be one of {GPT_MLPS}")
        _check(self.logit_softcap >= 0.0, f"{prefix}logit_softcap", self.logit_softcap, "must be >= 0 (0 = off)")
        _check(
            self.attention_window >= 0,
            f"{prefix}attention_window",
            self.attention_window,
            "must be >= 0 (0 = every earlier character, the lecture's causal attention)",
        )


@dataclass(frozen=True)
class GPTParams(TrainConfig, GPTArchitecture):
    """The `gpt` section: the training keys plus the architecture."""

    block_size: int = 128  # both bases have it; the GPT's default, not TrainConfig's

    def __post_init__(self) -> None:
        self.check("gpt")
        self.check_architecture("gpt.")


@dataclass(frozen=True)
class SampleParams:
    prompt: str = ""  # empty: a newline, or token 0 in a corpus without one (charlm.sampling.prompt_ids)
    max_new_tokens: int = 500
    temperature: float = 1.0
    top_k: int = 0  # 0 means no top-k filtering
    precision: str = "auto"  # int8 weights on the CPU, float32 elsewhere (charlm.precision.sample_precision)

    def __post_init__(self) -> None:
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

    def model(self, name: str) -> BigramParams | GPTParams:
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
    if kind is str:
        _check(isinstance(value, str), key, value, "must be a string (quote it in YAML)")
        return value
    raise TypeError(f"no coercion for {kind}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: must be a mapping of keys to values, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
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
    return cls(**kwargs)


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
