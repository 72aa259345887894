"""Int8 weights for generation: close to float32, a copy, CPU only, and wired to the sample stage."""

import pytest
import torch
from torch import nn

from charlm.batches import get_batch
from charlm.models import build_model, config_for
from charlm.params import GPTParams
from charlm.quantize import Int8Linear, quantize_int8
from charlm.sampling import generate
from tests.helpers import cpu_runtime, token_splits, train_on_cpu


@pytest.fixture(scope="module")
def trained():
    """A small GPT trained long enough that its logits are far from uniform."""
    vocab_size, train_data, val_data = token_splits(600)
    cfg = GPTParams.of(
        batch_size=16, block_size=32, max_iters=150, eval_interval=150, eval_iters=2, n_layer=2, n_head=2,
        n_embd=32, precision="float32", learning_rate=3e-3, warmup_iters=10,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model("gpt", config_for("gpt", cfg, vocab_size))
    train_on_cpu(model, train_data, val_data, cfg, 0)
    return model.eval(), val_data


def test_int8_linear_is_within_rounding_of_float32():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8Linear.from_linear(linear, torch.bfloat16)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (48, 64)
    # each weight is within half a step of its row's scale (the last 1e-6 is float32 rounding)
    step = q.scales.float()[:, None]
    error = (q.dequantized_weight() - linear.weight).abs()
    assert (error <= step / 2 + 1e-6).all()
    assert error.mean() < 0.3 * step.mean()  # and a quarter step on average, as uniform rounding gives
    x = torch.randn(5, 3, 64)
    expected = linear(x)
    got = q(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def test_quantized_gpt_loses_almost_nothing(trained):
    model, val = trained
    q = quantize_int8(model, cpu_runtime().int8_activations)
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert any(isinstance(m, nn.Linear) for m in model.modules())  # a copy: the original is untouched
    x, y = get_batch(val, 64, 32, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, loss32 = model(x, y)
        _, loss8 = q(x, y)
    assert loss32.item() < 2.6  # trained, so agreement is meaningful
    assert abs(loss8.item() - loss32.item()) < 0.01


def test_int8_generation_is_deterministic_and_mostly_agrees_with_float32(trained):
    model, _ = trained
    q = quantize_int8(model, cpu_runtime().int8_activations)
    start = torch.zeros((1, 1), dtype=torch.long)
    a = generate(q, start, 60, temperature=0.0)
    b = generate(q, start, 60, temperature=0.0)
    assert torch.equal(a, b)
    reference = generate(model, start, 60, temperature=0.0)
    assert (a == reference).float().mean() > 0.8


def test_bigram_has_nothing_to_quantize():
    model = build_model("bigram", {"vocab_size": 7})
    q = quantize_int8(model, cpu_runtime().int8_activations)
    assert torch.equal(q.token_embedding_table.weight, model.token_embedding_table.weight)


def test_int8_refuses_a_model_off_the_cpu():
    model = build_model("bigram", {"vocab_size": 7}).to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(model, cpu_runtime().int8_activations)
