"""The GPT's kernels (charlm/models/gpt/kernels.py) against the plain ops they stand for, and the rule
that picks them (charlm.hardware.attention_kernels)."""

import pytest
import torch
import torch.nn.functional as F

from charlm.hardware import AttentionKernels, attention_kernels
from charlm.models.gpt.kernels import (
    ChunkedWindowAttention,
    NormRotateHeads,
    attend,
    dropout,
    explicit_causal_attention,
    norm_rotate_heads,
    random_bytes,
    sliding_window_attention,
    squared_relu,
    window_mask,
)
from tests.helpers import tiny_gpt

V = 65


def test_cpu_dropout_drops_about_p_and_keeps_the_expectation():

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

    torch.manual_seed(0)
    q, k = torch.randn(8, 2, 64, 16), torch.randn(8, 2, 64, 16)
    v = torch.ones(8, 2, 64, 16)
    assert torch.allclose(explicit_causal_attention(q, k, v), v, atol=1e-5)
    y = explicit_causal_attention(q, k, v, dropout_p=0.2)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    assert y.std().item() > 0.05  # and it did drop something


def band_attention(q, k, v, window):
    """Reference: softmax over all keys with a (T, T) band mask, each query seeing itself and window - 1 before."""
    T, hs = q.size(-2), q.size(-1)
    i = torch.arange(T)
    visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    scores = (q @ k.transpose(-2, -1)) * hs**-0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize(
    ("kernel", "T", "window"),
    # a multiple of the window, a length attend pads, and full causal attention (chunked is the window's)
    [(k, 24, 6) for k in ("sdpa", "explicit", "chunked")]
    + [(k, 21, 6) for k in ("sdpa", "explicit", "chunked")]
    + [(k, 21, 0) for k in ("sdpa", "explicit")],
)
def test_attend_equals_a_band_mask(kernel, T, window):
    kernels = AttentionKernels(full_training=kernel, window_training=kernel)
    g = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(2, 2, T, 16, generator=g, requires_grad=True) for _ in range(3))
    y = attend(q, k, v, window=window, dropout_p=0.0, kernels=kernels, training=True)
    expected = band_attention(q, k, v, window or T)
    assert torch.allclose(y, expected, atol=1e-5)
    # the backward too: the chunking must route every gradient to the key it came from
    grads = torch.autograd.grad((y * expected.detach()).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * expected.detach()).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_chunked_window_kernel_passes_gradcheck_in_float64():

    g = torch.Generator().manual_seed(18)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    visible = window_mask(3, 4, 1, torch.device("cpu"))[0]  # (chunks, W, 2W)
    assert torch.autograd.gradcheck(lambda q, k, v: ChunkedWindowAttention.apply(q, k, v, 4, visible), (q, k, v))


def test_the_chunked_window_kernel_in_bf16_stays_close_to_the_explicit_ops():

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

    q = torch.zeros(1, 1, 8, 4)
    with pytest.raises(ValueError, match="no dropout"):
        sliding_window_attention(q, q, q, 4, window_mask(2, 4, 1, torch.device("cpu")), 0.1, "chunked")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_relu_gives_the_composed_ops_numbers_forward_and_backward(dtype):

    g = torch.Generator().manual_seed(18)
    x = torch.randn(16, 96, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(16, 96, generator=g).to(dtype)
    ours = squared_relu(x)
    composed = F.relu(x).square()
    assert torch.equal(ours, composed)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (ours, composed)))


def composed_heads(qkv, q_gain, k_gain, cos, sin, n_head, eps=None):
    """The ops `NormRotateHeads` fuses, as the model composes them off the CPU."""
    from charlm.models.gpt.model import apply_rope

    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, n_head, -1).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    hs = (q.size(-1),)
    q, k = F.rms_norm(q, hs, q_gain.to(q.dtype), eps), F.rms_norm(k, hs, k_gain.to(k.dtype), eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def heads_inputs(dtype, seed=20, B=2, T=12, n_head=3, hs=8, start=5):
    from charlm.models.gpt.model import rope_angles

    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * n_head * hs, generator=g).to(dtype).requires_grad_()
    gain_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the model's gains stay float32
    gains = [(1 + 0.3 * torch.randn(hs, generator=g)).to(gain_dtype).requires_grad_() for _ in range(2)]
    cos, sin = (t.to(gains[0].dtype) for t in rope_angles(hs, start, T, torch.device("cpu")))
    return qkv, gains[0], gains[1], cos, sin, n_head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_heads_op_gives_the_composed_ops_values_and_gradients(dtype):

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

    qkv, q_gain, k_gain, cos, sin, n_head = heads_inputs(torch.float64, B=1, T=4, n_head=2, hs=4)
    assert torch.autograd.gradcheck(
        lambda qkv, q_gain, k_gain: NormRotateHeads.apply(qkv, q_gain, k_gain, cos, sin, n_head, 1e-6),
        (qkv, q_gain, k_gain),
    )


def test_a_model_takes_the_fused_heads_op_when_its_kernels_say_so(monkeypatch):
    import charlm.models.gpt.model as gpt

    calls = []
    monkeypatch.setattr(gpt, "norm_rotate_heads", lambda *a: calls.append(1) or composed_heads(*a))
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(21))
    fused = AttentionKernels(fused_heads=True)
    model = tiny_gpt(V, fused, position="rope", qk_norm=True)
    model(idx)
    assert len(calls) == model.config.n_layer
    tiny_gpt(V, fused, position="rope")(idx)  # without QK-norm: the composed ops
    tiny_gpt(V, None, position="rope", qk_norm=True)(idx)  # the portable kernels: the composed ops
    assert len(calls) == model.config.n_layer


def test_explicit_attention_equals_sdpa_in_float32():
    q, k, v = (torch.randn(2, 3, 10, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(explicit_causal_attention(q, k, v), expected, atol=1e-5)


def test_bf16_softmax_equals_float32_softmax_rounded():
    """Why the explicit attention may take its softmax in bf16: on the CPU it is the same numbers."""
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.equal(x.bfloat16().softmax(-1), x.bfloat16().float().softmax(-1).bfloat16())


def test_the_attention_kernel_rule():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    plain = attention_kernels(cpu, None, 0.0)  # float32, no dropout: the default recipe on an AVX2 CPU
    assert (plain.full_training, plain.full_evaluation) == ("sdpa", "sdpa")  # SDPA's fused kernel
    assert (plain.window_training, plain.window_evaluation) == ("chunked", "chunked")
    assert plain.fused_heads
    bf16 = attention_kernels(cpu, torch.bfloat16, 0.0)  # an AVX512-BF16 CPU
    assert (bf16.full_training, bf16.full_evaluation, bf16.window_training) == ("explicit", "explicit", "chunked")
    dropping = attention_kernels(cpu, None, 0.1)  # dropout as random bytes, in training only
    assert (dropping.full_training, dropping.window_training) == ("explicit", "explicit")
    assert (dropping.full_evaluation, dropping.window_evaluation) == ("sdpa", "chunked")
    assert attention_kernels(meta, torch.bfloat16, 0.1) == AttentionKernels()  # off the CPU: SDPA everywhere
    assert not AttentionKernels().fused_heads
