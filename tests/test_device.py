import pytest
import torch

from charlm.device import Availability, DeviceError, resolve_device

CPU_ONLY = Availability(cuda_count=0, mps=False)
TWO_GPUS = Availability(cuda_count=2, mps=False)
MAC = Availability(cuda_count=0, mps=True)


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [
        ("cpu", CPU_ONLY, "cpu"),
        ("auto", CPU_ONLY, "cpu"),
        ("auto", TWO_GPUS, "cuda"),
        ("auto", MAC, "mps"),
        ("cuda", TWO_GPUS, "cuda"),
        ("cuda:1", TWO_GPUS, "cuda:1"),
        ("mps", MAC, "mps"),
    ],
)
def test_resolution(requested, available, expected):
    assert resolve_device(requested, available) == torch.device(expected)


@pytest.mark.parametrize(
    ("requested", "available", "named"),
    [
        ("mps", CPU_ONLY, "available: cpu"),
        ("cuda", CPU_ONLY, "available: cpu"),
        ("cuda:2", TWO_GPUS, "available: cpu, cuda:0, cuda:1"),
        ("cuda", MAC, "available: cpu, mps"),
    ],
)
def test_unavailable_explicit_device_is_an_error_naming_what_exists(requested, available, named):
    with pytest.raises(DeviceError) as info:
        resolve_device(requested, available)
    assert repr(requested) in str(info.value) and named in str(info.value)


def test_malformed_device():
    with pytest.raises(DeviceError, match="must be cpu"):
        resolve_device("tpu", CPU_ONLY)


def test_this_machine_has_no_mps():
    # The CI machine has no GPU: asking for one must fail, never fall back to the CPU.
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="mps"):
            resolve_device("mps")
