"""The one rule for the fast dtype: capability detection, its override, and every place that asks it."""

import pytest
import torch

import charlm.hardware
from charlm.errors import UsageError
from charlm.hardware import (
    CPU_BF16_ENV,
    attention_kernels,
    autocast_dtype,
    cpu_amx_from_facts,
    cpu_bf16_from_facts,
    cpu_native_bf16,
    describe_cpu,
    fused_adamw,
    native_bf16,
    orthogonalization_dtype,
    resolve_runtime,
)

EPYC_GENOA = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
EPYC_ROME = "processor : 0\nflags : fpu sse2 avx2 fma bmi2\n"
SAPPHIRE_RAPIDS = "flags : avx2 avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor : 0\nFeatures : fp asimd evtstrm aes sve bf16 i8mm\n"
GRAVITON2 = "processor : 0\nFeatures : fp asimd evtstrm aes asimddp\n"


@pytest.mark.parametrize(
    ("system", "machine", "cpuinfo", "sysctl", "native"),
    [
        ("Linux", "x86_64", EPYC_GENOA, "", True),
        ("Linux", "x86_64", SAPPHIRE_RAPIDS, "", True),
        ("Linux", "x86_64", EPYC_ROME, "", False),
        ("Linux", "x86_64", "flags : avx512_bf16x\n", "", False),  # whole words only
        ("Linux", "aarch64", GRAVITON3, "", True),
        ("Linux", "aarch64", GRAVITON2, "", False),
        ("Linux", "x86_64", GRAVITON3, "", False),  # an ARM flag on x86 means nothing
        ("Darwin", "arm64", "", "1\n", True),  # Apple M2 and later
        ("Darwin", "arm64", "", "0\n", False),  # Apple M1
        ("Darwin", "x86_64", "", "", False),  # Intel Mac: no such sysctl
        ("Windows", "AMD64", "", "", False),  # nothing we can read: float32
    ],
)
def test_cpu_capability_from_what_the_os_reports(system, machine, cpuinfo, sysctl, native):
    assert cpu_bf16_from_facts(system, machine, cpuinfo, sysctl) is native


@pytest.mark.parametrize(("forced", "native"), [("0", False), ("1", True)])
def test_override_forces_either_class(monkeypatch, forced, native):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert cpu_native_bf16() is native
    assert native_bf16("cpu") is native
    assert f"{CPU_BF16_ENV}={forced}" in describe_cpu()


def test_a_bad_override_is_a_one_line_usage_error(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(UsageError, match=f"{CPU_BF16_ENV} = 'yes': must be 0 or 1"):
        cpu_native_bf16()


@pytest.mark.parametrize(
    ("system", "machine", "cpuinfo", "amx"),
    [
        ("Linux", "x86_64", SAPPHIRE_RAPIDS, True),
        ("Linux", "x86_64", EPYC_GENOA, False),  # AVX512-BF16 without AMX
        ("Linux", "x86_64", "flags : amx_bf16x\n", False),  # whole words only
        ("Linux", "aarch64", SAPPHIRE_RAPIDS, False),
        ("Darwin", "x86_64", SAPPHIRE_RAPIDS, False),
    ],
)
def test_amx_from_what_the_os_reports(system, machine, cpuinfo, amx):
    assert cpu_amx_from_facts(system, machine, cpuinfo) is amx


@pytest.mark.parametrize(
    ("cpuinfo", "forced", "says_amx"),
    [(SAPPHIRE_RAPIDS, "1", True), (SAPPHIRE_RAPIDS, "0", False), (EPYC_GENOA, "1", False)],
)
def test_describe_cpu_names_amx_only_where_bf16_runs_on_it(monkeypatch, cpuinfo, forced, says_amx):
    # An AMX machine told to behave like an AVX2 one (CHARLM_CPU_BF16=0) must not be described as AMX.
    monkeypatch.setattr(charlm.hardware, "_cpu_facts", lambda: ("Linux", "x86_64", cpuinfo, ""))
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert ("(AMX)" in describe_cpu()) is says_amx


def test_this_machine_is_detected_as_its_flags_say(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert cpu_native_bf16() is (" avx512_bf16" in flags or " amx_bf16" in flags or " bf16" in flags)


@pytest.mark.parametrize(("forced", "dtype"), [("0", None), ("1", torch.bfloat16)])
def test_every_dtype_choice_follows_the_rule(monkeypatch, forced, dtype):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert autocast_dtype("cpu", "auto") is dtype
    assert orthogonalization_dtype("cpu") is (dtype or torch.float32)


def test_explicit_precisions_and_other_devices():
    assert autocast_dtype("cpu", "float32") is None
    assert autocast_dtype("cpu", "bfloat16") is torch.bfloat16  # forced by the user, even where emulated
    assert autocast_dtype("mps", "auto") is None  # bf16 on mps is not measured here: float32
    assert orthogonalization_dtype("mps") is torch.float32
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("cpu", "fp16")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_training_under_either_class_runs_and_says_its_precision(monkeypatch, forced):
    from charlm.models import build_model, config_for
    from charlm.params import GPTParams
    from tests.helpers import token_splits, train_on_cpu

    monkeypatch.setenv(CPU_BF16_ENV, forced)
    vocab, train_data, val_data = token_splits(200)
    cfg = GPTParams.of(
        batch_size=4, block_size=16, max_iters=3, eval_interval=3, eval_iters=1, n_layer=1, n_head=2, n_embd=16,
        precision="auto", optimizer="muon",
    )
    torch.manual_seed(0)
    result = train_on_cpu(build_model("gpt", config_for("gpt", cfg, vocab)), train_data, val_data, cfg, 0)
    assert result.precision == ("bfloat16" if forced == "1" else "float32")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_a_stage_resolves_every_hardware_choice_once_from_the_one_rule(monkeypatch, forced):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    native = forced == "1"
    runtime = resolve_runtime(torch.device("cpu"), "auto", dropout=0.0, sample_precision="auto")
    assert runtime.autocast is (torch.bfloat16 if native else None)
    assert runtime.precision == ("bfloat16" if native else "float32")
    assert runtime.orthogonalization is (torch.bfloat16 if native else torch.float32)
    assert runtime.attention == attention_kernels(torch.device("cpu"), runtime.autocast, 0.0)
    assert runtime.fused_adamw and runtime.sample_weights == "auto"  # timed per checkpoint (sampling.faster_weights)
    assert runtime.cpu == describe_cpu()
    line = runtime.describe()
    assert line.startswith(f"cpu ({describe_cpu()}): trains in {runtime.precision}") and "\n" not in line
    # float32 evaluation (the evaluate stage) on the same machine: no autocast, SDPA for full attention
    assert resolve_runtime(torch.device("cpu")).attention.full_evaluation == "sdpa"


def test_native_bf16_asks_the_gpu_it_names(monkeypatch):
    """cuda:1 may be an older GPU than cuda:0: the rule asks the one named, not the current one."""
    capability = {0: (8, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability[torch.device(d).index or 0])
    assert native_bf16(torch.device("cuda:0")) and native_bf16("cuda")
    assert not native_bf16(torch.device("cuda:1"))
    # A Turing card: float16 autocast (with the loss scaler), float32 Newton-Schulz; mps stays float32.
    assert autocast_dtype("cuda:1", "auto") is torch.float16 and orthogonalization_dtype("cuda:1") is torch.float32
    assert autocast_dtype("cuda:0", "auto") is torch.bfloat16 and autocast_dtype("mps", "auto") is None
    assert autocast_dtype("cuda:0", "float32") is None  # true float32: TF32 stays off
    assert autocast_dtype("cpu", "float16") is torch.float16


def test_compile_is_on_for_cuda_only_unless_asked():
    from charlm.hardware import compiles

    assert compiles("cuda", "auto") and compiles("cuda:1", "auto")
    assert not compiles("mps", "auto") and not compiles("cpu", "auto")
    assert compiles("cpu", True) and compiles("mps", True) and not compiles("cuda", False)


def test_fused_adamw_where_torch_has_it():
    assert all(fused_adamw(torch.device(d)) for d in ("cpu", "cuda", "mps"))
    assert not fused_adamw(torch.device("meta"))


def test_the_metrics_name_the_hardware_that_trained(monkeypatch):
    from charlm import hardware

    linux = "processor : 0\nmodel name : AMD EPYC  9B14 96-Core Processor\nflags : avx2\n"
    assert hardware.cpu_name_from_facts("Linux", linux, "") == "AMD EPYC 9B14 96-Core Processor"
    assert hardware.cpu_name_from_facts("Darwin", "", "Apple M2 Pro\n") == "Apple M2 Pro"
    assert hardware.cpu_name_from_facts("Linux", "flags : neon\n", "") != ""  # ARM: no model name line
    cpu = hardware.device_name("cpu")
    assert cpu.endswith(f"({describe_cpu()})")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"NVIDIA A100 ({device})")
    assert hardware.device_name("cuda:1") == "NVIDIA A100 (cuda:1)"  # the GPU named, not the current one
    assert hardware.device_name("mps").endswith(" GPU (mps)")
