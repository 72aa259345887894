"""The CUDA and MPS paths, checked on a CPU: what each rank binds, how batches move, what the device
gets. No GPU runs here; docs/devices.md says what is verified where."""

from __future__ import annotations

import pytest
import torch

from charlm import distributed
from charlm.batches import blocks_at


def test_each_cuda_rank_binds_its_own_gpu_before_joining_the_group(monkeypatch):
    import torch.distributed as torch_dist

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch_dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    rank_device = distributed.worker_device(torch.device("cuda"), distributed.Distributed(3, 1, 4))
    distributed.init_process_group(rank_device)
    assert calls == [
        ("set_device", torch.device("cuda", 1)),
        ("init", {"backend": "nccl", "device_id": torch.device("cuda", 1)}),
    ]
    calls.clear()
    distributed.init_process_group(torch.device("cpu"))
    assert calls == [("init", {"backend": "gloo"})]  # the CPU binds nothing


def test_a_cuda_batch_is_one_contiguous_pinned_buffer_copied_without_blocking(monkeypatch):
    moves = []

    def pin_memory(tensor):
        moves.append(("pin", tensor.shape, tensor.is_contiguous()))
        return tensor

    def to(tensor, device, non_blocking=False):
        moves.append(("to", torch.device(device), non_blocking))
        return tensor

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    data = torch.arange(100, dtype=torch.uint8)
    x, y = blocks_at(data, torch.tensor([0, 10, 20]), 8, torch.device("cuda"))
    assert moves == [("pin", (3, 9), True), ("to", torch.device("cuda"), True)]
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == y.shape == (3, 8)


class DeviceOps:
    """Records every op that produces a tensor on a non-CPU device, with its dtypes."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        records = self.records = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, tuple | list) else (out,):
                    if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                        records.append((str(func), t.dtype))
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_a_training_step_and_a_generation_step_on_an_accelerator_use_no_float64():
    """On the `meta` device (what an accelerator sees, without one): the default recipe's forward,
    backward and Muon/AdamW step, then a KV-cached generation step, put no float64 tensor on the device
    (mps has none) and run the portable kernels an accelerator gets."""
    from charlm.hardware import resolve_runtime
    from charlm.models import build_model, config_for
    from charlm.optim import make_optimizer
    from charlm.params import load_params
    from charlm.sampling import KVCache
    from tests.helpers import ROOT

    meta = torch.device("meta")
    section = load_params(ROOT / "params.yaml").gpt.replace(block_size=64, batch_size=2)
    runtime = resolve_runtime(meta, "float32", section.model.dropout)
    assert runtime.attention.window_training == "sdpa" and not runtime.attention.fused_heads
    assert runtime.sample_weights == "float32" and runtime.orthogonalization == torch.float32
    model = build_model("gpt", config_for("gpt", section, 65), runtime)
    optimizer = make_optimizer(model, section.train, runtime)
    x, y = blocks_at(torch.randint(65, (1000,), dtype=torch.uint8), torch.tensor([0, 100]), 64, meta)
    with DeviceOps() as ops:
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        model.eval()
        cache = KVCache(model.config, 1, meta, torch.float32)
        logits, _ = model(x[:1, :5], kv_cache=cache)
        logits, _ = model(x[:1, 5:6], kv_cache=cache)
    assert logits.shape == (1, 1, 65) and loss.device == meta
    assert ops.records, "nothing ran on the device"
    float64 = [op for op, dtype in ops.records if dtype == torch.float64]
    assert not float64, float64


@pytest.mark.slow
def test_the_device_check_script_passes_its_checks_on_the_cpu(tmp_path):
    """benchmarks/device_check.py is for a GPU or a Mac; on the CPU its checks must hold too."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    for name in ("kv_cache_equals_full_forward", "window_attention_equals_cpu", "training_lowers_the_loss"):
        assert results[name]["ok"] is True, results[name]
    assert results["nccl_two_processes_with_states"]["ok"] is None  # no GPUs here: skipped, and said so
    assert results["tokens_per_second"]["default"] > 0 and results["generation_characters_per_second"] > 0
