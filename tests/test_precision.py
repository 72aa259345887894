"""The one rule for the fast dtype: capability detection, its override, and every place that asks it."""

import pytest
import torch

import charlm.precision
from charlm.errors import UsageError
from charlm.precision import (
    CPU_BF16_ENV,
    autocast_dtype,
    cpu_amx_from_facts,
    cpu_bf16_from_facts,
    cpu_native_bf16,
    describe_cpu,
    explicit_attention,
    native_bf16,
    orthogonalization_dtype,
    window_attention_kernel,
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
    monkeypatch.setattr(charlm.precision, "_cpu_facts", lambda: ("Linux", "x86_64", cpuinfo, ""))
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


def test_explicit_attention_under_cpu_bf16_autocast_or_with_attention_dropout():
    x = torch.zeros(2, 3)
    assert not explicit_attention(x)  # float32 inference and the default recipe: SDPA's fused kernel
    assert explicit_attention(x, dropout_p=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert explicit_attention(x)


def test_the_window_attention_kernel_rule():
    x = torch.zeros(2, 3)
    assert window_attention_kernel(x) == "chunked"  # the default recipe on any CPU, float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert window_attention_kernel(x) == "chunked"  # and bf16
        assert window_attention_kernel(x, dropout_p=0.1) == "explicit"
    assert window_attention_kernel(x, dropout_p=0.1) == "explicit"  # dropout as random bytes
    assert window_attention_kernel(torch.zeros(2, 3, device="meta")) == "sdpa"  # off the CPU


@pytest.mark.parametrize("forced", ["0", "1"])
def test_training_under_either_class_runs_and_says_its_precision(monkeypatch, forced):
    from charlm.models import build_model, config_for
    from charlm.params import GPTParams
    from charlm.training import train
    from tests.conftest import token_splits

    monkeypatch.setenv(CPU_BF16_ENV, forced)
    vocab, train_data, val_data = token_splits(200)
    cfg = GPTParams(
        batch_size=4, block_size=16, max_iters=3, eval_interval=3, eval_iters=1, n_layer=1, n_head=2, n_embd=16,
        precision="auto", optimizer="muon",
    )
    torch.manual_seed(0)
    result = train(build_model("gpt", config_for("gpt", cfg, vocab)), train_data, val_data, cfg, torch.device("cpu"), 0)
    assert result.precision == ("bfloat16" if forced == "1" else "float32")
