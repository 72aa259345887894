"""Memory estimates: checked against measured peaks, and a run that cannot fit is refused up front."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from charlm import memory
from charlm.models import build_model, config_for
from charlm.optim import hidden_matrices
from charlm.params import GPTParams
from charlm.training import check_training_memory, parameter_counts
from tests.helpers import ROOT, cpu_runtime

pytestmark = pytest.mark.slow  # training and refusals in fresh processes: seconds each

# Trains 3 steps in a fresh process and prints (estimate, measured growth of peak RSS) in bytes.
MEASURE = r"""
import json, re, sys
import psutil, torch
from charlm.models import build_model, config_for
from charlm.params import GPTParams
from charlm.training import check_training_memory
from tests.helpers import cpu_runtime, token_splits, train_on_cpu
torch.set_num_threads(1)
vocab, tr, va = token_splits(2000)
cfg = GPTParams.of(**json.loads(sys.argv[1]))
config = config_for("gpt", cfg, vocab)
estimate = check_training_memory("gpt", cfg.train, config, cpu_runtime(cfg.train.precision, cfg.model.dropout), 1).total
before = psutil.Process().memory_info().rss
train_on_cpu(build_model("gpt", config), tr, va, cfg, 0)
peak = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024  # this program's own
print(json.dumps([estimate, peak - before]))
"""

SHORT = {"max_iters": 3, "eval_interval": 100, "eval_iters": 1}


@pytest.mark.parametrize(
    "config",
    [
        # the default recipe's switches, Muon and a weight average, at a small width
        {"position": "rope", "qk_norm": True, "mlp": "relu2", "optimizer": "muon", "ema_decay": 0.9, "n_embd": 128},
        # a sliding window over long windows: its keys and values are kept twice, its scores are short
        {"position": "rope", "block_size": 512, "batch_size": 8, "attention_window": 32, "n_embd": 128},
        # the lecture's model, wider, float32 AdamW: weights and optimizer state weigh more
        {"n_embd": 384, "n_head": 6, "n_layer": 2, "batch_size": 16, "block_size": 128, "precision": "float32"},
    ],
)
def test_the_estimate_is_within_a_factor_of_the_measured_peak(config):
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(SHORT | config)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    estimate, measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured > 50e6  # enough that the ratio means something
    # Measured/estimate is 0.91-1.16 over these and a dozen nearby configs in float32 (0.81-1.45 under
    # bf16 autocast, not run here: it is emulated on AVX2-only CPUs), and peak RSS moves ~10% run to
    # run: a bound of 1.5 catches a term that goes missing (the old estimate, without the switches'
    # and the window's measured terms, reached 1.61), 0.7 one counted twice.
    assert 0.7 < measured / estimate < 1.5, (estimate, measured)


@pytest.mark.parametrize("full_attention_layers", [0, 1, 2, 4])
def test_parameter_counts_equal_the_built_models_with_any_number_of_full_attention_layers(full_attention_layers):
    cfg = GPTParams.of(n_layer=4, attention_window=8, full_attention_layers=full_attention_layers, position="rope")
    config = config_for("gpt", cfg, 65)
    model = build_model("gpt", config)
    muon = sum(p.numel() for p in hidden_matrices(model))
    assert parameter_counts("gpt", config) == (sum(p.numel() for p in model.parameters()), muon)
    check_training_memory("gpt", cfg.train, config, cpu_runtime(), 1)  # the train stage's first check


def test_a_typo_sized_model_is_refused_with_the_params_and_the_numbers():
    cfg = GPTParams.of(n_embd=10_000_000)
    config = config_for("gpt", cfg, 65)
    with pytest.raises(memory.NotEnoughMemory) as e:
        check_training_memory("gpt", cfg.train, config, cpu_runtime(), 1)
    message = str(e.value)
    assert message.startswith("gpt.n_embd = 10000000, n_layer = 4, n_head = 4, batch_size = 32, block_size = 128:")
    assert "needs about 76.8 PB but" in message and "is available" in message and "\n" not in message


# Refuses one oversized config in a fresh process; prints (seconds, peak RSS growth in bytes, message).
REFUSE = r"""
import json, re, sys, time
import torch
from charlm.memory import NotEnoughMemory
from charlm.models import config_for
from charlm.params import GPTParams
from charlm.training import check_training_memory
from tests.helpers import cpu_runtime
cfg = GPTParams.of(**json.loads(sys.argv[1]))
def peak():  # VmHWM: this program's own high-water mark (ru_maxrss starts at the spawning process's)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
before = peak()
started = time.perf_counter()
try:
    check_training_memory("gpt", cfg.train, config_for("gpt", cfg, 65), cpu_runtime(), 1)
    message = None
except NotEnoughMemory as e:
    message = str(e)
grew = peak() - before
print(json.dumps([time.perf_counter() - started, grew, message]))
"""


@pytest.mark.parametrize(
    ("sizes", "named"),
    [
        ({"n_layer": 1_000_000}, "n_layer = 1000000"),  # a typo of 10: a million blocks, never built
        ({"n_embd": 1_000_000, "n_head": 8}, "n_embd = 1000000"),
        ({"n_head": 100_000, "n_embd": 200_000}, "n_head = 100000"),
        ({"batch_size": 10_000_000}, "batch_size = 10000000"),
        ({"block_size": 10_000_000}, "block_size = 10000000"),
    ],
)
def test_any_oversized_key_is_refused_in_seconds_without_building_the_model(sizes, named):
    proc = subprocess.run(
        [sys.executable, "-c", REFUSE, json.dumps(sizes)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    seconds, grew, message = json.loads(proc.stdout.strip().splitlines()[-1])
    assert message is not None and named in message and "is available" in message, message
    # Loose bounds: the estimate builds at most two blocks on the meta device. Building a million
    # blocks took minutes and grew to gigabytes.
    assert seconds < 20, seconds
    assert grew < 300e6, grew


def test_processes_on_one_cpu_share_its_memory(monkeypatch):
    cfg = GPTParams.of(n_embd=256, n_head=4, batch_size=2, block_size=8)  # weights, not activations, dominate
    config = config_for("gpt", cfg, 65)
    one = check_training_memory("gpt", cfg.train, config, cpu_runtime(), 1).total
    monkeypatch.setattr("charlm.training.available_memory", lambda device: int(1.5 * one))
    check_training_memory("gpt", cfg.train, config, cpu_runtime(), 1)
    with pytest.raises(memory.NotEnoughMemory, match="x 2 processes"):
        check_training_memory("gpt", cfg.train, config, cpu_runtime(), 2)


def test_available_memory_reads_meminfo_and_a_container_limit():
    meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"
    assert memory.mem_available_from(meminfo) == 20000000 * 1024
    assert memory.mem_available_from(meminfo, "4000000000\n", "1000000000\n") == 3000000000
    assert memory.mem_available_from(meminfo, "max\n", "1000000000\n") == 20000000 * 1024
    assert memory.available_memory(torch.device("cpu")) > 0  # this machine (Linux in CI)


def test_charlm_sample_refuses_a_checkpoint_that_cannot_fit(tmp_path, monkeypatch):
    from charlm.checkpoint import make_checkpoint, save_checkpoint
    from charlm.cli import app
    from charlm.tokenizer import CharTokenizer

    tok = CharTokenizer.fit("abc\n")
    path = tmp_path / "gpt.pt"
    model = build_model("gpt", dict(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(path, make_checkpoint("gpt", model, tok, {}))
    monkeypatch.setattr("charlm.checkpoint.available_memory", lambda device: 1000)
    result = CliRunner().invoke(app, ["sample", str(path), "-n", "5"])
    assert result.exit_code == 2
    assert result.output.strip().startswith(f"charlm sample: error: {path}: loading it needs about")
    assert len(result.output.strip().splitlines()) == 1
