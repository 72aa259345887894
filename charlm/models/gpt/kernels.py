"""The GPT's attention kernels, its fast CPU ops and RoPE's tables, and the one call the model makes: `attend`.

Which kernel runs is decided once per stage (`charlm.hardware.AttentionKernels`); `attend` takes that
decision and the model never asks the device. Each op equals plain PyTorch code, and a test proves it:

- `attend` equals softmax(q k^T / sqrt(hs)) v under the causal or the window's band mask, for every
  kernel: tests/test_kernels.py::test_attend_equals_a_band_mask;
- `explicit_causal_attention` equals `F.scaled_dot_product_attention(is_causal=True)`:
  tests/test_kernels.py::test_explicit_attention_equals_sdpa_in_float32;
- `ChunkedWindowAttention` equals the band-masked softmax, forward and backward:
  tests/test_kernels.py::test_the_chunked_window_kernel_passes_gradcheck_in_float64;
- `NormRotateHeads` equals a split into heads, `F.rms_norm` with a gain, then `apply_rope`:
  tests/test_kernels.py::test_the_fused_heads_op_gives_the_composed_ops_values_and_gradients;
- `SquaredReLU` equals `F.relu(x).square()` bit for bit:
  tests/test_kernels.py::test_squared_relu_gives_the_composed_ops_numbers_forward_and_backward;
- `dropout` equals `F.dropout` with p rounded to a multiple of 1/256:
  tests/test_kernels.py::test_cpu_dropout_drops_about_p_and_keeps_the_expectation.

The CPU ops exist because torch's generic kernels are slow at this model's shapes (small matmuls,
many elementwise passes); docs/performance.md "What makes it fast" has what each buys.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from charlm.hardware import AttentionKernels, Kernel

ROPE_BASE = 10000.0


def rope_angles(head_size: int, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation tables (T, hs) for positions [start, start+T): cos of the angles pos * base^(-2i/hs)
    for both halves of a head, and sin with the first half negated, as `apply_rope` takes them.

    Computed in float64 on the CPU, then moved: a sliding KV cache reaches positions where float32
    angles would have lost their precision, and some devices (mps) have no float64.
    """
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    angles = torch.arange(start, start + length, dtype=torch.float64)[:, None] * inv_freq  # (T, hs/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).float().to(device), torch.cat([-sin, sin], dim=-1).float().to(device)


def random_bytes(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Uniform uint8 random numbers from the CPU generator, drawn 8 at a time as int64 words: several
    times faster than `torch.randint(0, 256, dtype=uint8)`, which draws one generator number per byte."""
    n = math.prod(shape)
    words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1)  # every bit random
    return words.view(torch.uint8)[:n].view(shape)


def dropped(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor | None, float]:
    """A CPU dropout mask (True = dropped, p rounded to a multiple of 1/256) and the rescale factor
    that keeps the expectation, or (None, 1.0) when p rounds to 0."""
    threshold = round(p * 256)  # drop when a uniform byte falls below it
    if threshold == 0:
        return None, 1.0
    return random_bytes(shape) < threshold, 256.0 / (256 - threshold)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout`, but on the CPU with p rounded to a multiple of 1/256 and one random byte per element.

    Why: torch's CPU dropout draws a float Bernoulli per element, a large share of a CPU training
    step at the lecture's size; random bytes are several times cheaper forward and backward. Elsewhere
    (CUDA's fused kernel is already fast) it is plain `F.dropout`.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p=p, training=True)
    drop, scale = dropped(x.shape, p)
    if drop is None:
        return x
    return x.masked_fill(drop, 0.0) * scale


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class SquaredReLU(torch.autograd.Function):
    """relu(x)^2 with one saved tensor and a one-op backward: grad * 2 relu(x).

    Why: autograd's `F.relu(x).square()` keeps x and relu(x) and runs three passes over the MLP's
    widest activation backward (square's two multiplies, then relu's mask); 2 relu(x) is already 0
    where relu's mask would zero the gradient. Same numbers as the composed ops (tested).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - torch's Function signature
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (r,) = ctx.saved_tensors
        return torch.mul(grad, r).mul_(2.0)  # = grad * 2r bit for bit (doubling is exact), one tensor fewer


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return SquaredReLU.apply(x)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


class NormRotateHeads(torch.autograd.Function):
    """The fused projection's output (B, T, 3C) -> q, k, v (B, nh, T, hs), with q and k each
    RMS-normalised per head, times its gain (hs,), then rotated by RoPE's tables cos, sin (T, hs)
    (`charlm.models.gpt.model.apply_rope`'s convention); a hand-written backward.

    Why: on a CPU, autograd over the composed ops (split, transpose, `F.rms_norm`, which is not
    fused there, and RoPE's halves) makes ~20 passes over q and k backward and a copy for the
    attention's layout; this makes ~10, with the gains folded into the rotation tables and the
    three gradients written straight into one (B, T, 3C) tensor (docs/performance.md
    "What makes it fast").
    Computed in float32 for bf16 inputs (as torch's CPU `rms_norm` does), in the input's dtype
    otherwise; the same values as the composed ops up to rounding (tested, and by gradcheck in float64).
    """

    @staticmethod
    def forward(ctx, qkv, q_gain, k_gain, cos, sin, n_head, eps):  # noqa: ANN001, ANN205
        B, T, C3 = qkv.shape
        hs = C3 // 3 // n_head
        compute = torch.promote_types(qkv.dtype, torch.float32)
        parts = qkv.view(B, T, 3, n_head, hs)
        out = torch.empty(3, B, n_head, T, hs, dtype=qkv.dtype, device=qkv.device)  # q, k, v contiguous
        cos, sin = cos.to(compute), sin.to(compute)
        saved = []
        for i, gain in enumerate((q_gain.to(compute), k_gain.to(compute))):
            x = parts[:, :, i].transpose(1, 2).to(compute)  # (B, nh, T, hs); a strided view when no cast
            r = x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()  # (B, nh, T, 1)
            n = torch.mul(x, r, out=torch.empty(B, n_head, T, hs, dtype=compute, device=qkv.device))
            # n w cos + swap(n w) sin = n (w cos) + swap(n) (swap(w) sin): the gain rides on the tables.
            torch.addcmul(n * (cos * gain), _swap_halves(n), sin * _swap_halves(gain), out=out[i])
            saved += [n, r]
        out[2].copy_(parts[:, :, 2].transpose(1, 2))
        ctx.save_for_backward(*saved, cos, sin, q_gain, k_gain)
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):  # noqa: ANN001, ANN205
        n_q, r_q, n_k, r_k, cos, sin, q_gain, k_gain = ctx.saved_tensors
        B, nh, T, hs = n_q.shape
        grad = torch.empty(B, T, 3, nh, hs, dtype=grad_v.dtype, device=grad_v.device)
        grad_gains = []
        for i, (g, n, r, gain) in enumerate(((grad_q, n_q, r_q, q_gain), (grad_k, n_k, r_k, k_gain))):
            g = g.to(n.dtype)
            grad_y = torch.addcmul(_swap_halves(g * sin), g, cos)  # the gradient of y = n * gain
            grad_gains.append((grad_y * n).sum((0, 1, 2)).to(gain.dtype))
            grad_n = grad_y.mul_(gain.to(n.dtype))
            # RMSNorm's backward: r (grad_n - n mean(grad_n n)).
            dot = (grad_n * n).sum(-1, keepdim=True)
            torch.mul(torch.addcmul(grad_n, n, dot, value=-1.0 / hs), r, out=grad[:, :, i].transpose(1, 2))
        grad[:, :, 2].copy_(grad_v.transpose(1, 2))
        return grad.view(B, T, 3 * nh * hs), grad_gains[0], grad_gains[1], None, None, None, None


def norm_rotate_heads(
    qkv: torch.Tensor,
    q_gain: torch.Tensor,
    k_gain: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_head: int,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`NormRotateHeads`; `eps` None is `F.rms_norm`'s default on a CPU: the machine epsilon of the
    dtype it computes in (float32 for a bf16 input)."""
    eps = torch.finfo(torch.promote_types(qkv.dtype, torch.float32)).eps if eps is None else eps
    return NormRotateHeads.apply(qkv, q_gain, k_gain, cos, sin, n_head, eps)


def explicit_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """The lecture's attention: softmax(q k^T / sqrt(hs), causal) v, dropout on the weights.

    `visible` (Tq, Tk), or broadcastable to the scores, replaces the causal mask (True = attend):
    `sliding_window_attention` passes its windows' mask. The softmax runs in the input dtype: torch's
    CPU bf16 softmax accumulates in float32 and gives exactly float32-softmax-then-cast (checked in
    tests), without materialising float32 copies of the (B, nh, T, T) weights, which at the lecture's
    size cost a large share of the step.
    """
    T, hs = q.size(-2), q.size(-1)
    # Scaling q (B, nh, T, hs) is T/hs times fewer multiplies than scaling the (B, nh, T, T) scores.
    att = (q * hs**-0.5) @ k.transpose(-2, -1)  # (B, nh, T, T)
    hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1) if visible is None else ~visible
    # In place: the matmul's backward needs q and k, not its output, so no copy of the scores is kept.
    att = att.masked_fill_(hidden, float("-inf")).softmax(dim=-1)
    drop, scale = dropped(att.shape, dropout_p) if dropout_p > 0 else (None, 1.0)
    if drop is None:
        return att @ v  # (B, nh, T, hs)
    # Dropout's rescale is applied to the (B, nh, T, hs) output, T/hs times smaller than the weights.
    return (att.masked_fill(drop, 0.0) @ v) * scale


def chunk_pairs(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, nh * T/W, 2W, hs): each chunk of W positions after the chunk before it
    (zeros before the first), the keys or values a chunk of queries can see."""
    B, nh, T, hs = x.shape
    chunks = x.view(B, nh, T // window, window, hs)
    before = torch.cat([x.new_zeros(B, nh, 1, window, hs), chunks[:, :, :-1]], dim=2)
    return torch.cat([before, chunks], dim=3).view(B, nh * (T // window), 2 * window, hs)


class ChunkedWindowAttention(torch.autograd.Function):
    """Sliding-window attention over chunk pairs (see `sliding_window_attention`) as batched matmuls
    with a hand-written backward, in the inputs' dtype.

    Why: at the default's shapes (chunks of 32 queries, 64 keys, heads of 32) the work is tiny
    matmuls, and what costs is the passes around them, where torch's fused CPU SDPA kernel and
    autograd over the explicit ops are slower (docs/performance.md "What makes it fast"): no dropout
    mask, no zero-filled gradient buffers, the concatenation's backward folded into one add, and
    softmax's backward as torch's single fused op. Same results as the other kernels to float
    rounding (tested against a band mask, and by gradcheck in float64).
    """

    @staticmethod
    def forward(ctx, q, k, v, window, visible):  # noqa: ANN001, ANN205 - torch's Function signature
        B, nh, T, hs = q.shape
        chunks = T // window
        queries = q.reshape(B * nh, chunks, window, hs)  # a copy only where q is a strided view
        keys = chunk_pairs(k, window).view(B * nh, chunks, 2 * window, hs)
        values = chunk_pairs(v, window).view(B * nh, chunks, 2 * window, hs)
        scores = torch.matmul(queries, keys.transpose(-2, -1))  # (B nh, chunks, W, 2W)
        scores.mul_(hs**-0.5).masked_fill_(~visible, float("-inf"))  # visible: (chunks, W, 2W)
        weights = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(queries, keys, values, weights)
        ctx.input_shape = q.shape
        return torch.matmul(weights, values).view(B, nh, T, hs)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        queries, keys, values, weights = ctx.saved_tensors
        BH, chunks, W, hs = queries.shape
        grad = grad.reshape(BH, chunks, W, hs)
        grad_values = torch.matmul(weights.transpose(-2, -1), grad)  # (B nh, chunks, 2W, hs)
        grad_weights = torch.matmul(grad, values.transpose(-2, -1))
        # softmax's backward, w * (g - sum(g * w)), in one fused op instead of four passes.
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype).mul_(hs**-0.5)
        grad_queries = torch.matmul(grad_scores, keys)  # (B nh, chunks, W, hs)
        grad_keys = torch.matmul(grad_scores.transpose(-2, -1), queries)
        shape = ctx.input_shape  # (B, nh, T, hs)
        return (
            grad_queries.view(shape),
            _unpair(grad_keys, W).view(shape),
            _unpair(grad_values, W).view(shape),
            None,
            None,
        )


def _unpair(pairs: torch.Tensor, window: int) -> torch.Tensor:
    """The gradient of `chunk_pairs`: each chunk's own half, plus the next chunk's first half (the
    chunk seen as that one's predecessor)."""
    own = pairs[:, :, window:].clone()
    own[:, :-1] += pairs[:, 1:, :window]
    return own


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    dropout_p: float,
    kernels: AttentionKernels,
    training: bool,
    cached: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v for q, k, v (B, nh, T, hs): each position sees itself and the ones
    before it, or with `window` W > 0 only the W - 1 before it; dropout on the weights.

    `cached`: k and v are what a KV cache holds, the last T of them the new positions' own.
    `kernels` (decided once per stage) and `training` pick the kernel.
    """
    T, W = q.size(2), window
    if cached:
        return _attend_cached(q, k, v, W, kernels.window_evaluation)
    windowed = 0 < W < T
    kernel = kernels.pick(windowed, training)
    if windowed:
        return _windowed(q, k, v, W, dropout_p, kernel)
    if kernel == "explicit":
        return explicit_causal_attention(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, kernel: Kernel) -> torch.Tensor:
    T_new, T_all = q.size(2), k.size(2)
    if T_new == 1:
        return F.scaled_dot_product_attention(q, k, v)  # one query sees everything held: its window
    if 0 < window < T_new:  # a prompt longer than the window, on a new cache: only its own keys
        return _windowed(q, k, v, window, 0.0, kernel)
    # Within a window-sized cache every held key is inside every new query's window. New query i sits
    # at absolute position T_all - T_new + i and may see keys up to there.
    visible = torch.ones(T_new, T_all, dtype=torch.bool, device=q.device).tril(T_all - T_new)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


def _windowed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout_p: float, kernel: Kernel
) -> torch.Tensor:
    """`sliding_window_attention` for any length: one that is not a multiple of the window is padded
    at the end (the padded keys lie after every real query, so the causal mask hides them)."""
    T = q.size(2)
    pad = -T % window
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    mask = window_mask(q.size(2) // window, window, q.size(1), q.device)
    y = sliding_window_attention(q, k, v, window, mask, dropout_p, kernel)
    return y[:, :, :T] if pad else y


@functools.lru_cache(maxsize=16)
def window_mask(n_chunks: int, window: int, n_head: int, device: torch.device) -> torch.Tensor:
    """(1, nh * n_chunks, W, 2W) bool, True = attend: query a of a chunk sees key b of [previous chunk,
    own chunk] iff a < b <= a + W, i.e. itself and the W - 1 characters before it; the first chunk
    has no previous one. Cached, and made outside inference mode even when an evaluation asks first:
    training saves the mask for its backward, which an inference tensor cannot be."""
    with torch.inference_mode(False):
        a = torch.arange(window, device=device)[:, None]
        b = torch.arange(2 * window, device=device)[None, :]
        mask = ((b > a) & (b <= a + window)).expand(n_chunks, window, 2 * window).clone()
        mask[0, :, :window] = False
        return mask.repeat(n_head, 1, 1)[None]


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    mask: torch.Tensor,
    dropout_p: float = 0.0,
    kernel: Kernel = "sdpa",
) -> torch.Tensor:
    """Causal attention in which each position sees itself and the `window` - 1 positions before it.

    q, k, v (B, nh, T, hs) with T a multiple of `window`; `mask` is `window_mask` for T / window
    chunks. The sequence is cut into chunks of `window` queries, each attending to its own chunk and
    the one before (2W keys, the mask keeping W), so the work grows with T * W instead of T^2.
    Why not SDPA with a (T, T) band mask: that computes all T^2 scores; and the chunks as 4-D
    (B, nh * chunks, ...) tensors keep SDPA on its fused CPU kernel (a 5-D batch falls back to
    separate ops). `kernel` (`charlm.hardware.attention_kernels` picks it):
    "sdpa", "explicit" (`explicit_causal_attention`: dropout as random bytes) or "chunked"
    (`ChunkedWindowAttention`, no dropout: the CPU's fastest).
    """
    if kernel == "chunked":
        if dropout_p > 0:
            raise ValueError("the chunked attention kernel has no dropout: use 'explicit' or 'sdpa'")
        return ChunkedWindowAttention.apply(q, k, v, window, mask[0, : q.size(2) // window])
    B, nh, T, hs = q.shape
    queries = q.reshape(B, nh * (T // window), window, hs)  # a copy only where q is a strided view
    keys, values = chunk_pairs(k, window), chunk_pairs(v, window)
    if kernel == "explicit":
        y = explicit_causal_attention(queries, keys, values, dropout_p, visible=mask)
    else:
        y = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout_p)
    return y.view(B, nh, T, hs)
