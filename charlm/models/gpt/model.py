"""The lecture's GPT ("Let's build GPT"): token embeddings, blocks of masked multi-head
self-attention and an MLP with residual connections and pre-LayerNorm, a final LayerNorm, a linear head.

Where the lecture's classes are:

- `Head` and `MultiHeadAttention`: `CausalSelfAttention`, every head's key, query and value from one
  fused projection (`qkv`), the attention itself by `kernels.attend`;
- `FeedFoward`: `MLP`;
- `Block`: `Block`;
- the GPT `BigramLanguageModel`: `GPT`, whose `forward(idx, targets=None, kv_cache=None)` serves
  training, evaluation and generation.

The default `GPTConfig` is the lecture's model. Switches from the small-model speed-run literature
(modded-nanogpt) change it, each a `gpt.*` param (docs/models.md "What the default trains";
docs/recipe.md "Architecture switches" has the measured effect of each): `position="rope"`,
`qk_norm`, `mlp="relu2"`, `zero_init`, `logit_softcap`, `token_shift` and `attention_window` W > 0
(each character attends to itself and the W - 1 before it; each layer reaches W - 1 further back),
with `full_attention_layers` N the last N layers attending to the whole block instead.
Which kernel computes attention is not the model's business: a stage decides it once
(`charlm.hardware.AttentionKernels`) and hands it over with `use_kernels`. The KV cache that
generation passes as `kv_cache` lives beside generation, in `charlm.sampling`; `decode_step()` gives
generation this forward for one new token per stream in fewer ops (`charlm.models.gpt.decode`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from charlm.hardware import AttentionKernels
from charlm.models.gpt.config import GPTConfig
from charlm.models.gpt.decode import DecodeStep
from charlm.models.gpt.kernels import Dropout, attend, norm_rotate_heads, rope_angles, squared_relu

if TYPE_CHECKING:
    from charlm.sampling import KVCache

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
    """The lecture's multi-head attention: each head's queries, keys and values, the causal softmax of
    their scaled dot products, the heads concatenated and projected back to n_embd."""

    def __init__(self, config: GPTConfig, window: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.window = window  # this layer's: config.layer_windows()
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        head_size = config.n_embd // config.n_head
        self.q_norm = nn.RMSNorm(head_size) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(head_size) if config.qk_norm else None
        self.kernels = AttentionKernels()  # the portable choice until a stage hands its own (GPT.use_kernels)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        q, k, v = self.heads(self.qkv(x), rope)  # 3 x (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # (B, nh, T_held, hs): the cached keys, then the new ones
        y = attend(
            q, k, v,
            window=self.window,
            dropout_p=self.dropout if self.training else 0.0,
            kernels=self.kernels,
            training=self.training,
            cached=kv_cache is not None,
        )  # (B, nh, T, hs)
        B, nh, T, hs = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, nh * hs)))  # (B, T, C)

    def heads(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, 3C) -> q, k, v (B, nh, T, hs), with QK-norm and RoPE applied to q and k where on."""
        if self.kernels.fused_heads and self.q_norm is not None and rope is not None:
            # The same ops as below as one CPU autograd Function (kernels.NormRotateHeads).
            q_gain, k_gain = self.q_norm.weight, self.k_norm.weight
            return norm_rotate_heads(qkv, q_gain, k_gain, *rope, self.n_head, self.q_norm.eps)
        B, T, C3 = qkv.shape
        q, k, v = qkv.split(C3 // 3, dim=2)  # 3 x (B, T, C)
        shape = (B, T, self.n_head, C3 // 3 // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # 3 x (B, nh, T, hs)
        if self.q_norm is not None:
            # The gain cast to q's dtype: under bf16 autocast a float32 gain misses the fused kernel.
            hs = (q.size(-1),)
            q = F.rms_norm(q, hs, self.q_norm.weight.to(q.dtype), self.q_norm.eps)
            k = F.rms_norm(k, hs, self.k_norm.weight.to(k.dtype), self.k_norm.eps)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # cos, sin: (T, hs)
        return q, k, v


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
    def __init__(self, config: GPTConfig, window: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, window)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope, kv_cache, layer)  # communication
        return x + self.mlp(self.ln2(x))  # computation


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
        self.blocks = nn.ModuleList([Block(config, window) for window in config.layer_windows()])
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
    def receptive_field(self) -> int:
        """How many characters, the last one included, can reach a prediction: with an attention
        window W in every layer, each looks W - 1 further back (and token_shift one more); with a
        full-attention layer, block_size."""
        c = self.config
        windows = c.layer_windows()
        if min(windows) <= 0:
            return c.block_size
        return min(c.block_size, sum(w - 1 for w in windows) + 1 + int(c.token_shift))

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
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for `idx` (B, T), and the mean cross-entropy against `targets` if given.

        With `kv_cache` (generation, `charlm.sampling`), `idx` follows the tokens the cache holds, the
        cache takes the new keys and values, and the logits are the last position's only (B, 1, V).
        """
        start = 0 if kv_cache is None else kv_cache.position
        x = self._embed(idx, start, kv_cache)  # (B, T, C)
        rope = self._rope(start, idx.size(1), idx.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
            x = x[:, -1:, :]  # generation reads the next character's logits only
        logits = self._logits(x)  # (B, T, V)
        if targets is None:
            return logits, None
        # float() so that under bf16 autocast the softmax and the loss are still computed in float32.
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def decode_step(self) -> DecodeStep:
        """This model's forward for one new token per stream, for generation (`charlm.models.gpt.decode`)."""
        return DecodeStep(self)

    def use_kernels(self, kernels: AttentionKernels) -> GPT:
        """Compute attention with these kernels from now on (a stage's `Runtime.attention`)."""
        for block in self.blocks:
            block.attn.kernels = kernels
        return self


MODEL = GPT
