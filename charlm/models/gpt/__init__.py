"""The lecture's GPT: token + position embeddings, pre-LayerNorm blocks of masked multi-head
self-attention and a 4x MLP with residuals, a final LayerNorm and a linear head.

Faster than the lecture's per-head loop: one fused QKV projection and
`F.scaled_dot_product_attention(is_causal=True)`, which scales by head_size**-0.5 as the lecture does.
`forward_cached` adds a KV cache for generation (see `charlm.sampling`).

Switches from the small-model speed-run literature (modded-nanogpt), each off by default so that the
default `GPTConfig` is the lecture's model (docs/recipe.md "Architecture switches" has the measured
effect of each):
`position="rope"` rotary position embeddings instead of a learned table; `qk_norm` RMS-normalises
queries and keys per head (with a learned gain); `mlp="relu2"` squares a ReLU instead of GELU;
`zero_init` starts the blocks' output projections at zero; `logit_softcap` bounds the logits
with cap * tanh(logits / cap); `token_shift` adds to each character's embedding a learned per-channel
share of the previous character's (RWKV's token shift, modded-nanogpt's "smear"), so the blocks get
the last two characters without spending attention on it; `attention_window` W > 0 lets each
character attend to itself and the W - 1 before it only (sliding-window attention, as in Longformer
and Mistral): each layer reaches W - 1 further back, so n_layer layers still see n_layer * (W - 1)
characters, and a window much shorter than `block_size` makes attention cost T * W instead of T^2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.gpt.ops import (
    Dropout,
    explicit_causal_attention,
    norm_rotate_heads,
    sliding_window_attention,
    squared_relu,
    window_mask,
)
from charlm.params import GPTArchitecture
from charlm.precision import explicit_attention, window_attention_kernel

ROPE_BASE = 10000.0


@dataclass(frozen=True, kw_only=True)
class GPTConfig(GPTArchitecture):
    """The architecture (fields and rules in `charlm.params.GPTArchitecture`) plus the vocabulary size."""

    vocab_size: int

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size = {self.vocab_size}: must be positive")
        self.check_architecture()


class KVCache:
    """Keys and values of every layer for the positions generated so far, preallocated to
    `block_size` (or to the attention window, all a new token can see) so each new token writes in
    place instead of concatenating.

    `position` counts every token seen; `length` those held (at most the capacity). Once full, a
    cache of a RoPE model slides: a new token overwrites the oldest slot. Its keys carry their
    absolute rotation, and one query attends to a set of keys in any order, so no re-ordering or
    re-computation is needed (see `charlm.sampling` for how this compares to the lecture's loop).
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        window = config.attention_window
        self.capacity = window if 0 < window < config.block_size else config.block_size
        shape = (config.n_layer, batch_size, config.n_head, self.capacity, config.n_embd // config.n_head)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.position = 0
        self.last_embedding: torch.Tensor | None = None  # (B, 1, C): the token shift's previous character

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, nh, T, hs); return all keys and values held (with the new ones),
        or, for a prompt longer than a window-sized cache, the prompt's own (it keeps their last ones)."""
        T = k.size(2)
        if self.length + T <= self.capacity:
            end = self.length + T
            self.keys[layer, :, :, self.length : end] = k
            self.values[layer, :, :, self.length : end] = v
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        if self.length == 0:
            # Position p lives in slot p % capacity, where the sliding below expects it.
            slots = torch.arange(T - self.capacity, T, device=k.device) % self.capacity
            self.keys[layer, :, :, slots] = k[:, :, -self.capacity :]
            self.values[layer, :, :, slots] = v[:, :, -self.capacity :]
            return k, v
        if T != 1:
            raise ValueError("a full KV cache takes one new token at a time")
        slot = self.position % self.capacity  # the oldest token's slot
        self.keys[layer, :, :, slot : slot + 1] = k
        self.values[layer, :, :, slot : slot + 1] = v
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        self.position += n
        self.length = min(self.capacity, self.length + n)


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i + hs/2}) pair of `x` (B, nh, T, hs) by its position's angle:
    (x1 cos - x2 sin, x2 cos + x1 sin), with the tables of `rope_angles`.

    Why whole-width tables and the halves swapped: 4 passes over q and k forward instead of 7 (the
    halves' 4 products, their sum and difference, and the concatenation), each pass a large share of a
    float32 CPU step's small ops; the same numbers bit for bit (negation and the order of a two-term
    sum are exact; tested).
    """
    half = x.size(-1) // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)  # (x2, x1)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        head_size = config.n_embd // config.n_head
        self.q_norm = nn.RMSNorm(head_size) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(head_size) if config.qk_norm else None
        self.window = config.attention_window

    def _heads(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        if self.q_norm is not None and rope is not None and x.device.type == "cpu":
            # The same ops as below, fused by hand: the CPU's generic kernels are slow at these shapes.
            q_gain, k_gain = self.q_norm.weight, self.k_norm.weight
            return norm_rotate_heads(self.qkv(x), q_gain, k_gain, *rope, self.n_head, self.q_norm.eps)
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        shape = (B, T, self.n_head, C // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # 3 x (B, nh, T, hs)
        if self.q_norm is not None:
            # The gain cast to q's dtype: under bf16 autocast a float32 gain misses the fused kernel.
            hs = (q.size(-1),)
            q = F.rms_norm(q, hs, self.q_norm.weight.to(q.dtype), self.q_norm.eps)
            k = F.rms_norm(k, hs, self.k_norm.weight.to(k.dtype), self.k_norm.eps)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # cos, sin: (T, hs)
        return q, k, v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, nh * hs)))  # (B, T, C)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = self._heads(x, rope)
        dropout_p = self.dropout if self.training else 0.0
        if 0 < self.window < q.size(2):
            y = self._windowed(q, k, v, dropout_p, window_attention_kernel(x, dropout_p))
        elif explicit_attention(x, dropout_p):  # CPU bf16, or CPU dropout: see the rule; tests compare the two
            y = explicit_causal_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        return self._merge(y)

    def _windowed(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, kernel: str
    ) -> torch.Tensor:
        """Sliding-window attention; a length that is not a multiple of the window is padded at the
        end (padded keys lie after every real query, so the causal mask hides them)."""
        T, W = q.size(2), self.window
        pad = -T % W
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        mask = _window_mask(q.size(2) // W, W, self.n_head, q.device)
        y = sliding_window_attention(q, k, v, W, mask, dropout_p, kernel)
        return y[:, :, :T] if pad else y

    def forward_cached(
        self, x: torch.Tensor, cache: KVCache, layer: int, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Attend from the new positions in `x` to the cached keys/values plus their own."""
        q, k, v = self._heads(x, rope)
        k, v = cache.append(layer, k, v)  # (B, nh, T_past + T, hs)
        T_new, T_all = q.size(2), k.size(2)
        if T_new == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one query sees everything held: its window
        elif 0 < self.window < T_new:  # a prompt longer than the window, on a new cache: only its own keys
            y = self._windowed(q, k, v, 0.0, window_attention_kernel(x))
        else:
            # Within a window-sized cache every held key is inside every new query's window.
            # New query i sits at absolute position T_all - T_new + i and may see keys up to there.
            mask = torch.ones(T_new, T_all, dtype=torch.bool, device=x.device).tril(T_all - T_new)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._merge(y)


@functools.lru_cache(maxsize=16)
def _window_mask(n_chunks: int, window: int, n_head: int, device: torch.device) -> torch.Tensor:
    # Made outside inference mode even when first asked for by an evaluation: training saves the mask
    # for its backward, which an inference tensor cannot be.
    with torch.inference_mode(False):
        return window_mask(n_chunks, window, n_head, device)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.relu2 = config.mlp == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, 4C)
        h = squared_relu(h) if self.relu2 else F.gelu(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope)
        return x + self.mlp(self.ln2(x))

    def forward_cached(
        self, x: torch.Tensor, cache: KVCache, layer: int, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.ln1(x), cache, layer, rope)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        # With RoPE the positions are in the attention's rotations: no table (so none in the checkpoint).
        self.position_embedding_table = (
            nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        )
        self.drop = Dropout(config.dropout)
        # Starts at 0 (the lecture's embedding); a vector, so AdamW trains it without weight decay.
        self.token_shift = nn.Parameter(torch.zeros(config.n_embd)) if config.token_shift else None
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._rope_cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.apply(self._init_weights)
        # nanoGPT / GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if config.zero_init:  # each block starts as the identity; modded-nanogpt's choice
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def context_size(self) -> int:
        return self.config.block_size

    @property
    def cache_slides(self) -> bool:
        """Whether the KV cache can slide past block_size (RoPE) or must be rebuilt (learned positions)."""
        return self.config.position == "rope"

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _embed(self, idx: torch.Tensor, start: int, cache: KVCache | None = None) -> torch.Tensor:
        T = idx.size(1)
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        if self.token_shift is not None:
            tok_emb = self._shift(tok_emb, cache)
        if self.position_embedding_table is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            return self.drop(tok_emb)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        pos_emb = self.position_embedding_table(pos)  # (T, C)
        return self.drop(tok_emb + pos_emb)  # (B, T, C)

    def _shift(self, tok_emb: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """e_t + gain * e_(t-1). The first character of a sequence has no previous one (zeros), as at
        the start of every training window; a cache hands over the one before its new tokens."""
        before = cache.last_embedding if cache is not None else None
        if before is None:
            before = torch.zeros_like(tok_emb[:, :1])
        previous = torch.cat([before, tok_emb[:, :-1]], dim=1)  # (B, T, C)
        if cache is not None:
            cache.last_embedding = tok_emb[:, -1:]
        return tok_emb + self.token_shift * previous

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotation tables for positions [start, start+length), shared by every layer; None without RoPE.

        Training always asks for the same window, so that one is kept (not in the state_dict)."""
        if self.config.position != "rope":
            return None
        key = (start, length, device)
        if key not in self._rope_cache:
            # Made outside inference mode even when first asked for by an evaluation: an inference
            # tensor kept here would break the next training step's backward.
            with torch.inference_mode(False):
                tables = rope_angles(self.config.n_embd // self.config.n_head, start, length, device)
            if start != 0:
                return tables  # a generation step: positions move on every call
            self._rope_cache[key] = tables
        return self._rope_cache[key]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.ln_f(x))  # (..., V)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._embed(idx, 0)
        rope = self._rope(0, idx.size(1), idx.device)
        for block in self.blocks:
            x = block(x, rope)
        logits = self._logits(x)  # (B, T, V)
        if targets is None:
            return logits, None
        # float() so that under bf16 autocast the softmax and the loss are still computed in float32.
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def forward_cached(self, idx: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """Last-position logits (B, V) for new tokens `idx` (B, T) that follow the cached ones.

        `cache=None` starts a new cache (the prompt's "prefill"); it holds at most block_size tokens
        (a RoPE model's cache then slides, see `KVCache`).
        """
        if cache is None:
            cache = KVCache(self.config, idx.size(0), idx.device, self.token_embedding_table.weight.dtype)
        x = self._embed(idx, cache.position, cache)
        rope = self._rope(cache.position, idx.size(1), idx.device)
        for layer, block in enumerate(self.blocks):
            x = block.forward_cached(x, cache, layer, rope)
        cache.advance(idx.size(1))
        logits = self._logits(x[:, -1, :])  # (B, V)
        return logits, cache


CONFIG = GPTConfig
MODEL = GPT
