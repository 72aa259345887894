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
    lecture = dict(position="learned", qk_norm=False, mlp="gelu", zero_init=False, logit_softcap=0.0, token_shift=False)
    lecture |= dict(attention_window=0)  # every earlier character
    assert config == dict(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8, dropout=0.0, bias=True) | lecture
    assert count_params(build_model("gpt", config)) > 0


def test_bigram_floor_is_the_count_optimum():
    train = torch.tensor([0, 1, 0, 1, 0, 2], dtype=torch.uint8)
    val = torch.tensor([0, 1, 0], dtype=torch.uint8)
    # counts+1 from 0: to 0 ->1, to 1 ->3, to 2 ->2 (sum 6); from 1: to 0 ->3, others 1 (sum 5)
    expected = -(math.log(3 / 6) + math.log(3 / 5)) / 2
    assert bigram_loss_floor(train, val, 3) == pytest.approx(expected)


def test_cpu_dropout_drops_about_p_and_keeps_the_expectation():
    from charlm.models.gpt.ops import dropout

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
    from charlm.models.gpt.ops import random_bytes

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
    from charlm.models.gpt.ops import explicit_causal_attention

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


def test_lecture_switches_off_is_the_lecture_model_exactly():
    # The default config must be the lecture's model: same parameters, same numbers.
    a = tiny_gpt()
    b = tiny_gpt(
        position="learned", qk_norm=False, mlp="gelu", zero_init=False, logit_softcap=0.0, token_shift=False,
        attention_window=0,
    )
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(4))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert torch.equal(a(idx)[0], b(idx)[0])


def test_rope_against_an_explicit_rotation():
    from charlm.models.gpt import apply_rope, rope_angles

    hs, T = 8, 5
    x = torch.randn(1, 1, T, hs, generator=torch.Generator().manual_seed(5))
    cos, sin = rope_angles(hs, 3, T, torch.device("cpu"))
    out = apply_rope(x, cos, sin)
    for t in range(T):
        for i in range(hs // 2):
            theta = (3 + t) * 10000.0 ** (-2 * i / hs)
            rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            pair = rot @ torch.stack([x[0, 0, t, i], x[0, 0, t, i + hs // 2]])
            assert torch.allclose(torch.stack([out[0, 0, t, i], out[0, 0, t, i + hs // 2]]), pair, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_halves_formula_bit_for_bit_forward_and_backward(dtype):
    """The whole-width tables give exactly the numbers (and gradients) of the textbook halves formula."""
    from charlm.models.gpt import apply_rope, rope_angles

    hs, T = 16, 7
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, T, hs, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(2, 3, T, hs, generator=g).to(dtype)
    cos, sin = rope_angles(hs, 5, T, torch.device("cpu"))
    out = apply_rope(x, cos, sin)
    (fast,) = torch.autograd.grad(out, x, grad)

    angles = torch.arange(5, 5 + T, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, hs, 2, dtype=torch.float64) / hs
    )
    c, s = angles.cos().float().to(dtype), angles.sin().float().to(dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
    ref = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    assert torch.equal(out, ref)
    assert torch.equal(fast, ref_grad)


def test_rope_scores_depend_only_on_relative_position():
    from charlm.models.gpt import apply_rope, rope_angles

    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(pq, pk):
        cq, sq = rope_angles(8, pq, 1, torch.device("cpu"))
        ck, sk = rope_angles(8, pk, 1, torch.device("cpu"))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(1007, 1003), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-4)


def test_qk_norm_gives_unit_rms_queries_and_keys_per_head():
    model = tiny_gpt(qk_norm=True)
    attn = model.blocks[0].attn
    q, k, _ = attn._heads(torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(7)))
    assert q.shape == (2, 2, 6, 16)
    for t in (q, k):
        assert torch.allclose(t.pow(2).mean(-1).sqrt(), torch.ones(2, 2, 6), atol=1e-3)


def test_relu2_zero_init_and_softcap():
    model = tiny_gpt(mlp="relu2", zero_init=True, logit_softcap=2.0)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith("proj.weight"))
    x = torch.randn(3, 32)
    assert torch.equal(model.blocks[0].mlp.fc(x).relu().square(), torch.relu(model.blocks[0].mlp.fc(x)) ** 2)
    logits, _ = model(torch.randint(V, (2, 16)))
    assert logits.abs().max() <= 2.0


@pytest.mark.parametrize("bad", [{"position": "alibi"}, {"mlp": "swiglu"}, {"logit_softcap": -1.0}])
def test_bad_switches_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny_gpt(**bad)


@pytest.mark.parametrize(
    "arch",
    [
        {},
        {"position": "rope", "qk_norm": True, "mlp": "relu2"},
        {"position": "rope", "token_shift": True},
        {"token_shift": True},
        {"position": "rope", "attention_window": 4},  # a 9-character prompt: longer than the window
        {"attention_window": 4},
    ],
)
def test_kv_cache_matches_full_forward_for_either_architecture(arch):
    model = tiny_gpt(**arch)
    if model.token_shift is not None:  # starts at 0 (a no-op): make it matter
        torch.nn.init.normal_(model.token_shift, std=0.5, generator=torch.Generator().manual_seed(10))
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(8))
    full, _ = model(idx)
    last, cache = model.forward_cached(idx[:, :9], None)
    assert torch.allclose(last, full[:, 8], atol=1e-5)
    for t in range(9, 16):
        last, cache = model.forward_cached(idx[:, t : t + 1], cache)
        assert torch.allclose(last, full[:, t], atol=1e-5)


def test_one_layer_rope_cache_slides_exactly_like_recomputing_the_last_block():
    # Past block_size the lecture re-runs the last block_size characters; a 1-layer RoPE model's
    # sliding cache holds exactly those keys and values, so the logits agree.
    model = tiny_gpt(position="rope", n_layer=1, block_size=8)
    idx = torch.randint(V, (1, 30), generator=torch.Generator().manual_seed(9))
    last, cache = model.forward_cached(idx[:, :8], None)
    for t in range(8, 30):
        last, cache = model.forward_cached(idx[:, t : t + 1], cache)
        recomputed, _ = model(idx[:, t - 7 : t + 1])
        assert torch.allclose(last, recomputed[:, -1], atol=1e-5), t


def test_token_shift_against_an_explicit_previous_character_sum():
    model = tiny_gpt(token_shift=True)
    assert torch.equal(model.token_shift, torch.zeros(32))  # starts as the lecture's embedding
    gain = torch.randn(32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        model.token_shift.copy_(gain)
    idx = torch.randint(V, (2, 7), generator=torch.Generator().manual_seed(12))
    emb, pos = model.token_embedding_table.weight, model.position_embedding_table.weight
    for b in range(2):
        for t in range(7):
            expected = emb[idx[b, t]] + pos[t] + (gain * emb[idx[b, t - 1]] if t > 0 else 0)
            assert torch.allclose(model._embed(idx, 0)[b, t], expected, atol=1e-6), (b, t)


def test_token_shift_trains_and_changes_the_output():
    model = tiny_gpt(token_shift=True).train()
    idx = torch.randint(V, (4, 16), generator=torch.Generator().manual_seed(13))
    _, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    assert model.token_shift.grad is not None and model.token_shift.grad.abs().sum() > 0



def band_attention(q, k, v, window):
    """Reference: softmax over all keys with a (T, T) band mask, each query seeing itself and window - 1 before."""
    T, hs = q.size(-2), q.size(-1)
    i = torch.arange(T)
    visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    scores = (q @ k.transpose(-2, -1)) * hs**-0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("kernel", ["sdpa", "explicit", "chunked"])
@pytest.mark.parametrize("T", [24, 21])  # a multiple of the window, and one the model pads
def test_sliding_window_attention_against_a_band_mask(kernel, T):
    model = tiny_gpt(attention_window=6, block_size=32)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(2, 2, T, 16, generator=g, requires_grad=True) for _ in range(3))
    y = attn._windowed(q, k, v, 0.0, kernel)
    expected = band_attention(q, k, v, 6)
    assert torch.allclose(y, expected, atol=1e-5)
    # the backward too: the chunking must route every gradient to the key it came from
    grads = torch.autograd.grad((y * expected.detach()).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * expected.detach()).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_chunked_window_kernel_passes_gradcheck_in_float64():
    from charlm.models.gpt.ops import ChunkedWindowAttention, window_mask

    g = torch.Generator().manual_seed(18)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    visible = window_mask(3, 4, 1, torch.device("cpu"))[0]  # (chunks, W, 2W)
    assert torch.autograd.gradcheck(lambda q, k, v: ChunkedWindowAttention.apply(q, k, v, 4, visible), (q, k, v))


def test_the_chunked_window_kernel_in_bf16_stays_close_to_the_explicit_ops():
    from charlm.models.gpt.ops import sliding_window_attention, window_mask

    g = torch.Generator().manual_seed(19)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = window_mask(4, 4, 2, torch.device("cpu"))
    outputs, grads = [], []
    for kernel in ("explicit", "chunked"):
        y = sliding_window_attention(q, k, v, 4, mask, kernel=kernel)
        assert y.dtype == torch.bfloat16
        outputs.append(y.float())
        grads.append([t.float() for t in torch.autograd.grad(y.float().square().sum(), (q, k, v))])
    assert (outputs[0] - outputs[1]).abs().max() < 0.05
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() < 0.1 * max(1.0, a.abs().max().item())


def test_the_chunked_window_kernel_refuses_dropout():
    from charlm.models.gpt.ops import sliding_window_attention, window_mask

    q = torch.zeros(1, 1, 8, 4)
    with pytest.raises(ValueError, match="no dropout"):
        sliding_window_attention(q, q, q, 4, window_mask(2, 4, 1, torch.device("cpu")), 0.1, "chunked")


def test_a_window_as_long_as_the_text_is_the_causal_attention():
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(15))
    assert torch.equal(tiny_gpt(attention_window=16)(idx)[0], tiny_gpt()(idx)[0])
    assert not torch.allclose(tiny_gpt(attention_window=4)(idx)[0], tiny_gpt()(idx)[0])


def test_a_windowed_model_sees_exactly_n_layer_windows_back():
    # 2 layers of window 4: position 20 reads positions 20 - 2 * 3 = 14 to 20, and nothing before.
    model = tiny_gpt(position="rope", attention_window=4, block_size=32)
    idx = torch.randint(V, (1, 32), generator=torch.Generator().manual_seed(16))
    base, _ = model(idx)
    for changed_at, seen in ((13, False), (14, True)):
        other = idx.clone()
        other[0, changed_at] = (other[0, changed_at] + 1) % V
        logits, _ = model(other)
        assert torch.allclose(logits[0, 20], base[0, 20], atol=1e-6) != seen, changed_at


def test_windowed_rope_cache_slides_exactly_like_recomputing_the_last_block():
    # With a window, the characters a prediction reads (n_layer * (window - 1) back) all lie inside
    # the last block_size, so the lecture's recompute of that block and the sliding cache (which
    # holds one window per layer) compute the same thing, for any number of layers.
    model = tiny_gpt(position="rope", qk_norm=True, mlp="relu2", n_layer=3, attention_window=4, block_size=12)
    assert model.config.n_layer * (model.config.attention_window - 1) < model.config.block_size
    idx = torch.randint(V, (2, 60), generator=torch.Generator().manual_seed(17))
    last, cache = model.forward_cached(idx[:, :12], None)
    assert cache.capacity == 4  # all a new token can see
    for t in range(12, 60):
        last, cache = model.forward_cached(idx[:, t : t + 1], cache)
        recomputed, _ = model(idx[:, t - 11 : t + 1])
        assert torch.allclose(last, recomputed[:, -1], atol=1e-5), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_relu_gives_the_composed_ops_numbers_forward_and_backward(dtype):
    import torch.nn.functional as F

    from charlm.models.gpt.ops import squared_relu

    g = torch.Generator().manual_seed(18)
    x = torch.randn(16, 96, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(16, 96, generator=g).to(dtype)
    ours = squared_relu(x)
    composed = F.relu(x).square()
    assert torch.equal(ours, composed)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (ours, composed)))


def composed_heads(qkv, q_gain, k_gain, cos, sin, n_head, eps=None):
    """The ops `NormRotateHeads` fuses, as the model composes them off the CPU."""
    import torch.nn.functional as F

    from charlm.models.gpt import apply_rope

    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, n_head, -1).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    hs = (q.size(-1),)
    q, k = F.rms_norm(q, hs, q_gain.to(q.dtype), eps), F.rms_norm(k, hs, k_gain.to(k.dtype), eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def heads_inputs(dtype, seed=20, B=2, T=12, n_head=3, hs=8, start=5):
    from charlm.models.gpt import rope_angles

    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * n_head * hs, generator=g).to(dtype).requires_grad_()
    gain_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the model's gains stay float32
    gains = [(1 + 0.3 * torch.randn(hs, generator=g)).to(gain_dtype).requires_grad_() for _ in range(2)]
    cos, sin = (t.to(gains[0].dtype) for t in rope_angles(hs, start, T, torch.device("cpu")))
    return qkv, gains[0], gains[1], cos, sin, n_head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_heads_op_gives_the_composed_ops_values_and_gradients(dtype):
    from charlm.models.gpt.ops import norm_rotate_heads

    qkv, q_gain, k_gain, cos, sin, n_head = heads_inputs(dtype)
    grads_out = [torch.randn(2, 3, 12, 8, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3)]
    results = []
    for heads in (norm_rotate_heads, composed_heads):
        outs = heads(qkv, q_gain, k_gain, cos, sin, n_head)
        assert all(o.shape == (2, 3, 12, 8) and o.dtype == dtype for o in outs)
        loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grads_out, strict=True))
        results.append((outs, torch.autograd.grad(loss, (qkv, q_gain, k_gain))))
    (fused, fused_grads), (composed, composed_grads) = results
    tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16: the composed RoPE rounds to bf16 at each op
    assert torch.equal(fused[2], composed[2])  # v passes through
    for a, b in zip(fused[:2], composed[:2], strict=True):
        assert (a.float() - b.float()).abs().max() <= tol * max(1.0, b.float().abs().max().item())
    for a, b in zip(fused_grads, composed_grads, strict=True):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).abs().max() <= tol * max(1.0, b.float().abs().max().item())


def test_the_fused_heads_op_passes_gradcheck_in_float64():
    from charlm.models.gpt.ops import NormRotateHeads

    qkv, q_gain, k_gain, cos, sin, n_head = heads_inputs(torch.float64, B=1, T=4, n_head=2, hs=4)
    assert torch.autograd.gradcheck(
        lambda qkv, q_gain, k_gain: NormRotateHeads.apply(qkv, q_gain, k_gain, cos, sin, n_head, 1e-6),
        (qkv, q_gain, k_gain),
    )


def test_a_cpu_model_with_qk_norm_and_rope_takes_the_fused_op(monkeypatch):
    import charlm.models.gpt as gpt

    calls = []
    monkeypatch.setattr(gpt, "norm_rotate_heads", lambda *a: calls.append(1) or composed_heads(*a))
    model = tiny_gpt(position="rope", qk_norm=True)
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(21))
    model(idx)
    assert len(calls) == model.config.n_layer
    tiny_gpt(position="rope")(idx)  # without QK-norm: the composed ops
    assert len(calls) == model.config.n_layer


def test_the_default_window_lets_generation_slide_exactly():
    # The sliding KV cache equals the lecture's recompute when everything a prediction reads,
    # n_layer * (window - 1) characters back, fits in block_size: keep params.yaml's GPT that way.
    from pathlib import Path

    from charlm.params import load_params

    gpt = load_params(Path(__file__).resolve().parent.parent / "params.yaml").gpt
    assert gpt.position == "rope" and 0 < gpt.attention_window < gpt.block_size
    assert gpt.n_layer * (gpt.attention_window - 1) < gpt.block_size
