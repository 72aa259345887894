"""One rule for the fast dtype: what a device does natively, asked by every place that picks a dtype.

bfloat16 is a speed-up only where the hardware computes in it. A CPU without native bf16 (AVX2-only
x86, Apple M1, most ARM before ARMv8.6) emulates it, and a bf16 matmul there runs far slower than
float32 (docs/performance.md "What makes it fast"). So no module casts to bf16 on its own: training's autocast, the
attention kernel it implies, Muon's orthogonalisation and the int8 sampling kernel all ask here.

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
import subprocess

import torch

from charlm.errors import UsageError
from charlm.params import PRECISIONS

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


@functools.lru_cache(maxsize=1)
def _cpu_facts() -> tuple[str, str, str, str] | None:
    """(system, machine, cpuinfo, sysctl FEAT_BF16) of this machine, or None when they can't be read."""
    system, machine = platform.system(), platform.machine()
    cpuinfo = sysctl = ""
    if system == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    elif system == "Darwin":
        try:
            sysctl = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            ).stdout
        except (OSError, subprocess.SubprocessError):
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
        return torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and newer
    # mps: bf16 exists from macOS 14 but has not been measured here; float32 is the safe answer.
    return False


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

    `auto` takes bfloat16 exactly where it is native; `bfloat16` forces it (slow where emulated).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r}: must be one of {PRECISIONS}")
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else None


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


def sample_precision(device: torch.device | str, requested: str) -> str:
    """The weights' precision for generation: `auto` is int8 on the CPU (where torch's int8 weight-only
    kernel runs and is faster than float32 on either CPU class, docs/performance.md "Results") and
    float32 on accelerators; an explicit `int8` elsewhere than the CPU is refused."""
    device = torch.device(device)
    if requested == "auto":
        return "int8" if device.type == "cpu" else "float32"
    if requested == "int8" and device.type != "cpu":
        raise UsageError(
            f"sample.precision = 'int8': runs on the CPU only, and the device is {device}; use float32 or auto"
        )
    return requested


def explicit_attention(x: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """Whether attention on `x` should use the explicit softmax(QK^T)V ops instead of SDPA, on a CPU.

    Two cases, each measured (docs/performance.md "What makes it fast"): under CPU bf16 autocast (which `autocast_dtype`
    grants only where bf16 is native) torch's SDPA CPU kernel is slower than the explicit ops; and
    with attention dropout SDPA's CPU path draws a float Bernoulli mask over the (B, nh, T, T)
    weights, where the explicit path draws one random byte per weight. Otherwise (float32, no
    dropout: inference, the default recipe) SDPA's fused kernel is the faster one.
    """
    bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return attention_is_explicit(x.device.type, bf16, dropout_p)


def attention_is_explicit(device_type: str, bf16_autocast: bool, dropout_p: float) -> bool:
    """`explicit_attention`'s rule from the run's settings, for the memory estimate, which needs it
    before any tensor exists (the explicit path keeps the (T, T) weights, SDPA's kernels do not)."""
    return device_type == "cpu" and (bf16_autocast or dropout_p > 0)


def window_attention_kernel(x: torch.Tensor, dropout_p: float = 0.0) -> str:
    """Which kernel `charlm.models.gpt.ops.sliding_window_attention` runs on `x`'s device.

    On a CPU without attention dropout, charlm's "chunked" kernel in either dtype (measured faster
    than SDPA in float32 and than the explicit ops in bf16: docs/performance.md "What makes it fast"); with dropout the
    explicit ops (random-byte dropout, as `explicit_attention` says for any CPU dropout). Off the CPU,
    SDPA (fused kernels; the chunked one is not measured there).
    """
    if x.device.type != "cpu":
        return "sdpa"
    return "chunked" if dropout_p == 0 else "explicit"


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (from `autocast_dtype`) on the device, or nothing for plain float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
