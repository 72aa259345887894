import math

import pytest
import torch

from charlm.models import build_model, config_for, count_params
from charlm.models.bigram import bigram_loss_floor
from charlm.params import GPTParams

V = 65


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0) | overrides
    return build_model("gpt", config).eval()


@pytest.mark.parametrize("name", ["bigram", "gpt"])
def test_one_interface(name):
    torch.manual_seed(0)
    model = build_model(name, {"vocab_size": V} | ({"block_size": 16, "n_embd": 32} if name == "gpt" else {}))
    idx = torch.randint(V, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, V) and loss is None
    logits, loss = model(idx, idx)
    assert loss.ndim == 0


def test_gpt_loss_at_init_is_near_uniform():
    model = tiny_gpt()
    idx = torch.randint(V, (8, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, torch.roll(idx, -1, 1))
    assert abs(loss.item() - math.log(V)) < 0.1  # small init: near-uniform predictions, loss ~ ln(V)


def test_causal_masking_future_tokens_never_change_earlier_logits():
    model = tiny_gpt()
    idx = torch.randint(V, (1, 16), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % V
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_kv_cache_matches_full_forward():
    model = tiny_gpt()
    idx = torch.randint(V, (2, 12), generator=torch.Generator().manual_seed(3))
    full, _ = model(idx)
    last, cache = model.forward_cached(idx[:, :5], None)
    assert torch.allclose(last, full[:, 4], atol=1e-5)
    last, cache = model.forward_cached(idx[:, 5:6], cache)
    assert torch.allclose(last, full[:, 5], atol=1e-5)
    last, cache = model.forward_cached(idx[:, 6:12], cache)  # several new tokens at once
    assert torch.allclose(last, full[:, 11], atol=1e-5)


def test_sequence_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_config_from_params_section():
    section = GPTParams(n_layer=1, n_head=2, n_embd=8, block_size=4)
    config = config_for("gpt", section, vocab_size=11)
    assert config == dict(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8, dropout=0.0, bias=True)
    assert count_params(build_model("gpt", config)) > 0


def test_bigram_floor_is_the_count_optimum():
    train = torch.tensor([0, 1, 0, 1, 0, 2], dtype=torch.uint8)
    val = torch.tensor([0, 1, 0], dtype=torch.uint8)
    # counts+1 from 0: to 0 ->1, to 1 ->3, to 2 ->2 (sum 6); from 1: to 0 ->3, others 1 (sum 5)
    expected = -(math.log(3 / 6) + math.log(3 / 5)) / 2
    assert bigram_loss_floor(train, val, 3) == pytest.approx(expected)


def test_cpu_dropout_drops_about_p_and_keeps_the_expectation():
    from charlm.models.gpt import dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, 0.2)
    kept = (y != 0).float().mean().item()
    assert kept == pytest.approx(1 - 51 / 256, abs=0.005)  # p rounded to 51/256
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # survivors rescaled
    assert torch.equal(dropout(x, 0.2, training=False), x) and torch.equal(dropout(x, 0.0), x)
    x.requires_grad_()
    y = dropout(x, 0.5)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * 2.0)  # gradient flows through the kept ones only


def test_random_bytes_are_uniform_in_every_position_of_the_word():
    """The bytes come 8 to an int64 word: each of the 8 positions must be uniform, not just the mean."""
    from charlm.models.gpt import random_bytes

    torch.manual_seed(0)
    b = random_bytes((100_003,))  # not a multiple of 8: the tail is cut, not padded
    assert b.shape == (100_003,) and b.dtype == torch.uint8
    per_position = b[:100_000].view(-1, 8).float()
    assert (per_position.mean(0) - 127.5).abs().max() < 2.0
    assert ((per_position < 51).float().mean(0) - 51 / 256).abs().max() < 0.01
    counts = torch.bincount(random_bytes((256 * 2000,)).long(), minlength=256).float()
    assert counts.min() > 1700 and counts.max() < 2300  # every value, about equally often
    assert random_bytes((4, 5, 6)).shape == (4, 5, 6)


def test_attention_dropout_keeps_the_expectation():
    """Dropout on the attention weights rescales after `att @ v`: with v = 1 each output is the
    rescaled sum of the kept weights of a row, whose mean must stay 1."""
    from charlm.models.gpt import explicit_causal_attention

    torch.manual_seed(0)
    q, k = torch.randn(8, 2, 64, 16), torch.randn(8, 2, 64, 16)
    v = torch.ones(8, 2, 64, 16)
    assert torch.allclose(explicit_causal_attention(q, k, v), v, atol=1e-5)
    y = explicit_causal_attention(q, k, v, dropout_p=0.2)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    assert y.std().item() > 0.05  # and it did drop something


def test_eval_mode_has_no_dropout():
    model = tiny_gpt(dropout=0.5)
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
