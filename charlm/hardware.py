"""The hardware, decided once: what a device computes natively, and the one record of a stage's choices.

Each stage calls `resolve_runtime` once and hands the `Runtime` it returns to the library: the
device, training's autocast dtype, the attention kernels for training and for evaluation, Muon's
Newton-Schulz dtype, fused AdamW, the sampling weights, and the CPU description as the reason.
Nothing below the stage asks the hardware again.

bfloat16 is a speed-up only where the hardware computes in it. A CPU without native bf16 (AVX2-only
x86, Apple M1, most ARM before ARMv8.6) emulates it, and a bf16 matmul there runs far slower than
float32 (docs/performance.md "What makes it fast"). So every dtype choice follows `native_bf16`.

The CPU's answer comes from its feature flags (Linux x86: avx512_bf16 / amx_bf16; Linux ARM: bf16;
macOS: hw.optional.arm.FEAT_BF16) and can be forced with CHARLM_CPU_BF16=0 or 1, so one machine
can measure both classes (docs/performance.md "Emulating the AVX2 class").
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

import torch

from charlm.errors import UsageError

CPU_BF16_ENV = "CHARLM_CPU_BF16"


def _cpu_flags(cpuinfo: str) -> set[str]:
    """The whole words of /proc/cpuinfo, so `avx512_bf16x` never reads as `avx512_bf16`."""
    return set(re.findall(r"[a-z0-9_]+", cpuinfo.lower()))


def cpu_bf16_from_facts(system: str, machine: str, cpuinfo: str, sysctl_feat_bf16: str = "") -> bool:
    """Whether a CPU computes bf16 natively, from what the OS reports (a pure function, for tests).

    `cpuinfo` is Linux's /proc/cpuinfo; `sysctl_feat_bf16` is macOS's `sysctl -n hw.optional.arm.FEAT_BF16`.
    """
    if system == "Darwin":
        return sysctl_feat_bf16.strip() == "1"
    if system != "Linux":
        return False  # no flag we can read: the safe answer is float32
    words = _cpu_flags(cpuinfo)
    if machine.lower() in ("aarch64", "arm64"):
        return "bf16" in words  # the Features line of ARMv8.6+ cores (Graviton 3, Neoverse V1/N2)
    return bool({"avx512_bf16", "amx_bf16"} & words)


def cpu_amx_from_facts(system: str, machine: str, cpuinfo: str) -> bool:
    """Whether an x86 CPU has AMX's bf16 tiles (Intel Sapphire Rapids and newer), from /proc/cpuinfo.

    Not a different dtype rule (AMX is native bf16 like AVX512-BF16), but a different machine to read
    figures from: its bf16 matmuls run several times faster than AVX512-BF16's and round differently
    (docs/devices.md "CPU classes").
    """
    x86 = machine.lower() in ("x86_64", "amd64")
    return system == "Linux" and x86 and "amx_bf16" in _cpu_flags(cpuinfo)


def _read_cpuinfo() -> str | None:
    """/proc/cpuinfo's text, or None when it can't be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _sysctl(name: str) -> str | None:
    """macOS's `sysctl -n name`, or None when it can't be run."""
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def _cpu_facts() -> tuple[str, str, str, str] | None:
    """(system, machine, cpuinfo, sysctl FEAT_BF16) of this machine, or None when they can't be read."""
    system, machine = platform.system(), platform.machine()
    cpuinfo = sysctl = ""
    if system == "Linux":
        cpuinfo = _read_cpuinfo()
    elif system == "Darwin":
        sysctl = _sysctl("hw.optional.arm.FEAT_BF16")
    if cpuinfo is None or sysctl is None:
        return None
    return system, machine, cpuinfo, sysctl


@functools.lru_cache(maxsize=1)
def _detected_cpu_bf16() -> bool:
    facts = _cpu_facts()
    return facts is not None and cpu_bf16_from_facts(*facts)


def cpu_native_bf16() -> bool:
    """This CPU's answer, or the CHARLM_CPU_BF16 override (0 or 1)."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced:
        if forced not in ("0", "1"):
            raise UsageError(f"{CPU_BF16_ENV} = {forced!r}: must be 0 or 1 (or unset to detect the CPU)")
        return forced == "1"
    return _detected_cpu_bf16()


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes in bfloat16 natively: the one question every dtype choice asks."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_native_bf16()
    if device.type == "cuda":
        # The GPU asked for, not the current one: `cuda:1` may be another generation than `cuda:0`.
        return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and newer
    # mps: bf16 exists from macOS 14 but is not verified (docs/devices.md); float32 is the safe answer.
    return False


def cpu_name_from_facts(system: str, cpuinfo: str, brand: str) -> str:
    """The CPU's marketing name: /proc/cpuinfo's first `model name` (Linux x86), macOS's brand string,
    else the architecture."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return " ".join(value.split())
    return brand.strip() or platform.machine() or system or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """What the metrics record as the hardware that trained: the GPU's name on cuda, the chip on mps,
    the CPU's name and class on the cpu (e.g. `AMD EPYC 7B13 (AVX2, native bf16: no)`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    system = platform.system()
    cpuinfo = (_read_cpuinfo() if system == "Linux" else None) or ""
    brand = (_sysctl("machdep.cpu.brand_string") if system == "Darwin" else None) or ""
    name = cpu_name_from_facts(system, cpuinfo, brand)
    if device.type == "mps":
        return f"{name} GPU (mps)"
    return f"{name} ({describe_cpu()})" if device.type == "cpu" else f"{name} ({device.type})"


def describe_cpu() -> str:
    """The CPU class, as the docs' tables name it: AVX512-BF16 (with AMX or not), ARM/Apple bf16, AVX2, other."""
    native = cpu_native_bf16()
    forced = f" ({CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]})" if os.environ.get(CPU_BF16_ENV) else ""
    capability = torch.backends.cpu.get_cpu_capability()  # what ATen's kernels were dispatched for
    facts = _cpu_facts()
    amx = " (AMX)" if native and facts is not None and cpu_amx_from_facts(*facts[:3]) else ""
    return f"{capability}, native bf16: {'yes' if native else 'no'}{amx}{forced}"


def autocast_dtype(device: torch.device | str, precision: str) -> torch.dtype | None:
    """Training's autocast dtype, or None for plain float32.

    `auto` takes bfloat16 exactly where it is native, and float16 on a CUDA GPU without it (Volta,
    Turing: fast float16 tensor cores, with a loss scaler against underflow); `bfloat16` and `float16`
    force theirs (slow where emulated). `float32` is true float32: TF32 stays off, as torch leaves it,
    since every GPU with TF32 (Ampere and newer) takes bfloat16 under `auto`.
    """
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float16":
        return torch.float16
    if precision == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if torch.device(device).type == "cuda" else None
    raise ValueError(f"precision = {precision!r}: must be one of ('float32', 'bfloat16', 'float16', 'auto')")


def compiles(device: torch.device | str, requested: bool | str) -> bool:
    """Whether training runs the model through `torch.compile` (`compile`): `auto` on CUDA only, where
    the default's many small kernels gain most and a compiler comes with the toolkit; off on mps
    (torch's mps backend for it is young) and on the CPU (charlm's own CPU kernels, and a C++ compiler
    every user would need: docs/performance.md); `true` asks for it anywhere."""
    if requested == "auto":
        return torch.device(device).type == "cuda"
    return bool(requested)


def compiles_decoding(device: torch.device | str, requested: bool | str) -> bool | str:
    """Whether generation runs the GPT's compiled decode step (`sample.compile`,
    `charlm.models.gpt.decode.CompiledDecodeStep`): only on the CPU, whose C++ kernels TorchInductor
    writes and charlm measures (docs/models.md "Generation"); only with a C++ compiler on the PATH.
    `auto` stays `auto`: `charlm.sampling.worth_compiling` decides for the job at hand, since
    compiling takes seconds that a short text never wins back."""
    if torch.device(device).type != "cpu" or requested is False or cxx_compiler() is None:
        return False
    return requested


def cxx_compiler() -> str | None:
    """The C++ compiler TorchInductor would call (`$CXX`, else the usual names), or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def orthogonalization_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz iterations: bf16 (as Muon's authors run it) only where native."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def int8_activation_dtype(device: torch.device | str) -> torch.dtype:
    """The activation dtype of the int8 weight-only kernel (`charlm.quantize`).

    That kernel only *converts* bf16 activations to float32 in registers and accumulates in float32,
    which every x86 CPU does cheaply, so bf16 is the faster input on both CPU classes (measured:
    docs/performance.md "What makes it fast"); float32 input takes a slower path. Elsewhere the general rule holds.
    """
    if torch.device(device).type == "cpu" and platform.machine().lower() in ("x86_64", "amd64"):
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else torch.float32


def sampling_weights(device: torch.device | str, requested: str) -> str:
    """The weights' precision for generation (`sample.precision`): `auto` on the CPU stays `auto`,
    decided for the checkpoint at hand by timing both (`charlm.sampling.faster_weights`: int8 wins
    at the lecture's size, float32 at the default's); float32 on accelerators. An explicit `int8`
    elsewhere than the CPU is refused."""
    device = torch.device(device)
    if requested == "auto":
        return "auto" if device.type == "cpu" else "float32"
    if requested == "int8" and device.type != "cpu":
        raise UsageError(
            f"sample.precision = 'int8': runs on the CPU only, and the device is {device}; use float32 or auto"
        )
    return requested


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (from `autocast_dtype`) on the device, or nothing for plain float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


Kernel = Literal["sdpa", "explicit", "chunked"]


@dataclass(frozen=True)
class AttentionKernels:
    """Which kernel computes the GPT's attention in each case (`charlm.models.gpt.kernels` has them).

    `training` cases may have dropout; `evaluation` ones (estimates, metrics, generation) never do.
    `fused_heads`: QK-norm and RoPE as one CPU op. The default is the portable choice, SDPA everywhere.
    """

    full_training: Kernel = "sdpa"
    full_evaluation: Kernel = "sdpa"
    window_training: Kernel = "sdpa"
    window_evaluation: Kernel = "sdpa"
    fused_heads: bool = False

    def pick(self, windowed: bool, training: bool) -> Kernel:
        if windowed:
            return self.window_training if training else self.window_evaluation
        return self.full_training if training else self.full_evaluation


def attention_kernels(device: torch.device, autocast: torch.dtype | None, dropout: float) -> AttentionKernels:
    """The attention kernels for a device, an autocast dtype and the model's dropout.

    On a CPU (each case measured, docs/performance.md "What makes it fast"): a sliding window takes
    charlm's chunked kernel unless there is attention dropout, which takes the explicit ops (dropout
    from random bytes); full attention takes the explicit ops under bf16 autocast (torch's bf16 SDPA
    CPU kernel is slower) or with dropout, else SDPA's fused kernel. Off the CPU, SDPA everywhere.
    """
    if device.type != "cpu":
        return AttentionKernels()
    bf16 = autocast == torch.bfloat16
    return AttentionKernels(
        full_training="explicit" if bf16 or dropout > 0 else "sdpa",
        full_evaluation="explicit" if bf16 else "sdpa",
        window_training="explicit" if dropout > 0 else "chunked",
        window_evaluation="chunked",
        fused_heads=True,
    )


def fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for the device (one launch per step, not one per tensor)."""
    return device.type in ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class Runtime:
    """A stage's hardware choices, decided once (`resolve_runtime`) and passed down."""

    device: torch.device
    autocast: torch.dtype | None  # training's forward passes; None = plain float32
    attention: AttentionKernels
    orthogonalization: torch.dtype  # Muon's Newton-Schulz iterations
    fused_adamw: bool
    compile: bool  # training's forward through torch.compile (`compiles`), eager if compiling fails
    sample_weights: str  # the GPT's linear layers while generating: "int8", "float32", or "auto" (timed per checkpoint)
    int8_activations: torch.dtype  # the int8 kernel's input dtype
    sample_compile: bool | str  # the compiled decode step: True, False, or "auto" (decided per job)
    cpu: str  # `describe_cpu()`: the reason behind the dtype choices

    @property
    def precision(self) -> str:
        """Training's compute dtype by name, as the metrics record it."""
        return "float32" if self.autocast is None else str(self.autocast).removeprefix("torch.")

    def describe(self) -> str:
        kernels = self.attention
        return (
            f"{self.device} ({self.cpu}): trains in {self.precision}, attention "
            f"{kernels.window_training}/{kernels.window_evaluation} (window), "
            f"{kernels.full_training}/{kernels.full_evaluation} (full), Muon in "
            f"{str(self.orthogonalization).removeprefix('torch.')}, samples with {self.sample_weights} weights"
            + (" (the faster of float32 and int8, timed)" if self.sample_weights == "auto" else "")
        )

    def autocast_context(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.autocast)


def resolve_runtime(
    device: torch.device,
    precision: str = "float32",
    dropout: float = 0.0,
    sample_precision: str = "auto",
    compile: bool | str = False,
    sample_compile: bool | str = "auto",
) -> Runtime:
    """Every hardware choice of a stage from its device and params (`precision`, the model's `dropout`,
    `sample.precision`, `compile`, `sample.compile`), decided here once."""
    autocast = autocast_dtype(device, precision)
    return Runtime(
        device=device,
        autocast=autocast,
        attention=attention_kernels(device, autocast, dropout),
        orthogonalization=orthogonalization_dtype(device),
        fused_adamw=fused_adamw(device),
        compile=compiles(device, compile),
        sample_weights=sampling_weights(device, sample_precision),
        int8_activations=int8_activation_dtype(device),
        sample_compile=compiles_decoding(device, sample_compile),
        cpu=describe_cpu(),
    )
