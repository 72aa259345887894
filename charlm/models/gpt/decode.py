"""The GPT's forward for one new character per stream, in as few ops as its math allows.

Generating with a KV cache runs the model on one token per stream per step: a few hundred tiny
ops whose cost is the framework's per-op overhead, not arithmetic (the default model needs ~1.7
MFLOP per character). `DecodeStep` computes the same function as `GPT.forward(idx, kv_cache=cache)`
for a single new token, with the constant parts folded in once, when it is built:

- the linear layers' weights transposed once, so each is one `addmm` (or the int8 kernel);
- the QK-norm gains folded into the RoPE tables, which are made for many positions at once:
  rope(g * n) = n * (g cos) + swap(n) * (swap(g) sin); swap(q) and swap(k) come out of the qkv
  matmul as extra rows (`with_swapped_qk`), and the RMS norm is one dot product, so queries and keys
  together take a few ops and no `roll`;
- the logit soft-cap's 1/cap folded into the head's weights;
- no module calls, no shape checks, no dropout.

Every float32 operation is the model's up to the order of its roundings, so the logits agree with
the model's forward to ~1e-6 and the sampled tokens are the same (tests/test_sampling.py
::test_the_decode_step_gives_the_models_logits and ::test_fast_generation_gives_the_eager_tokens).

`CompiledDecodeStep` runs the same forward at fixed shapes, compiled by TorchInductor into C++ on a
CPU (`sample.compile`): the same tokens again
(tests/test_sampling.py::test_the_compiled_decode_step_gives_the_eager_tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.gpt.kernels import rope_angles

if TYPE_CHECKING:
    from charlm.models.gpt.model import GPT
    from charlm.sampling import KVCache

Linear = Callable[[torch.Tensor], torch.Tensor]
ROPE_CHUNK = 1024  # positions per table extension


def as_linear(module: nn.Module, scale: float = 1.0) -> Linear:
    """A 2-D linear layer times `scale` as one call: `nn.Linear` with its weight scaled and transposed
    once; anything else (the int8 layers of `charlm.quantize`) as it is, then scaled."""
    if not isinstance(module, nn.Linear):
        return module if scale == 1.0 else (lambda x: module(x) * scale)
    weight_t = (module.weight.detach() * scale).t().contiguous()  # (in, out)
    if module.bias is None:
        return lambda x: torch.mm(x, weight_t)
    bias = module.bias.detach() * scale
    return lambda x: torch.addmm(bias, x, weight_t)


class _Layer:
    """One block's weights, arranged for a decode step."""

    def __init__(self, block: nn.Module, rope: bool) -> None:
        attn, mlp = block.attn, block.mlp
        self.ln1 = (block.ln1.normalized_shape, block.ln1.weight, block.ln1.bias, block.ln1.eps)
        self.ln2 = (block.ln2.normalized_shape, block.ln2.weight, block.ln2.bias, block.ln2.eps)
        self.qkv = as_linear(with_swapped_qk(attn.qkv, attn.n_head) if rope else attn.qkv)
        self.qkv_plain = as_linear(attn.qkv)  # [q, k, v] alone: the compiled step's (`DecodeStep.forward`)
        self.proj, self.proj_bias = _residual_linear(attn.proj)
        self.fc = as_linear(mlp.fc)
        self.mlp_proj, self.mlp_proj_bias = _residual_linear(mlp.proj)
        self.relu2 = mlp.relu2


def with_swapped_qk(qkv: nn.Module, n_head: int) -> nn.Module:
    """The qkv projection with two more output blocks: q and k with each head's halves swapped, which
    RoPE needs beside q and k (x cos + swap(x) sin). Swapping is a permutation of output rows, so
    the extra rows are the same weights (the same int8 rows and scales for an int8 layer), and one
    matmul yields [q, k, v, swap(q), swap(k)] where a separate `roll` would be one more op per layer."""
    n_embd = qkv.weight.size(1) if isinstance(qkv, nn.Linear) else qkv.weight_int8.size(1)
    hs = n_embd // n_head
    within = (torch.arange(hs) + hs // 2) % hs
    swap = (torch.arange(n_head)[:, None] * hs + within).flatten()  # (C,)
    rows = torch.cat([torch.arange(3 * n_embd), swap, n_embd + swap])
    if isinstance(qkv, nn.Linear):
        extended = nn.Linear(n_embd, 5 * n_embd, bias=qkv.bias is not None, device=qkv.weight.device)
        extended.weight.data = qkv.weight.detach()[rows]
        if qkv.bias is not None:
            extended.bias.data = qkv.bias.detach()[rows]
        return extended
    bias = None if qkv.bias is None else qkv.bias[rows]
    return type(qkv)(qkv.weight_int8[rows], qkv.scales.float()[rows], bias, qkv.compute_dtype)  # Int8Linear


def _residual_linear(module: nn.Module) -> tuple[Callable[..., torch.Tensor], torch.Tensor | None]:
    """`x + module(h)` as `f(x, h)` (one `addmm` for `nn.Linear`) and the bias it leaves to add."""
    if not isinstance(module, nn.Linear):
        return (lambda x, h: x + module(h)), None
    weight_t = module.weight.detach().t().contiguous()
    bias = None if module.bias is None else module.bias.detach()
    return (lambda x, h: torch.addmm(x, h, weight_t)), bias


class DecodeStep:
    """`step(ids, cache)`: the logits (B, V) of the next character after `ids` (B,), one new token per
    stream following the tokens the cache holds; the cache takes the new keys and values.

    Built from a GPT in evaluation (its float32 weights, or int8 linear layers) and used while those
    weights do not change. Positions past `block_size` need `cache_slides` (RoPE), as with the model.
    """

    def __init__(self, model: GPT) -> None:
        config = model.config
        self.n_head = config.n_head
        self.head_size = hs = config.n_embd // config.n_head
        self.rope = config.position == "rope"
        self.layers = [_Layer(block, self.rope) for block in model.blocks]
        self.token_embedding = model.token_embedding_table.weight.detach()
        table = model.position_embedding_table
        self.position_embedding = None if table is None else table.weight.detach()
        self.token_shift = None if model.token_shift is None else model.token_shift.detach()
        self.ln_f = (model.ln_f.normalized_shape, model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
        self.softcap = config.logit_softcap
        self.head = as_linear(model.lm_head, 1.0 / self.softcap if self.softcap > 0 else 1.0)
        self.qk_norm = config.qk_norm
        self.device = self.token_embedding.device
        attn = model.blocks[0].attn
        eps = attn.q_norm.eps if config.qk_norm else None
        eps = torch.finfo(self.token_embedding.dtype).eps if eps is None else eps
        # rms_norm(x) = x * rsqrt(mean(x^2) + eps) = sqrt(hs) * x * rsqrt(x.x + hs eps): one dot
        # product, an add and an rsqrt, not torch's slower fused kernel; the sqrt(hs) goes into the gains.
        self.norm_eps = hs * eps
        # Per layer, the QK-norm gains of [q, k] (2, 1, hs): with RoPE folded into its tables
        # (`_grow_tables`), without it a multiplication.
        self.gains = torch.stack([self._qk_gains(block.attn) for block in model.blocks])  # (n_layer, 2, 1, hs)
        self._cos = self._sin = torch.empty(0)  # (P, n_layer, 2, 1, hs)

    def _qk_gains(self, attn: nn.Module) -> torch.Tensor:
        ones = torch.ones(self.head_size, device=self.device)
        if attn.q_norm is None:
            return torch.stack([ones, ones])[:, None, :]
        root = math.sqrt(self.head_size)
        return torch.stack([attn.q_norm.weight.detach() * root, attn.k_norm.weight.detach() * root])[:, None, :]

    def _grow_tables(self, position: int) -> None:
        """Extend the rotation tables, gains folded in, to cover `position` (ROPE_CHUNK positions at a time)."""
        start = self._cos.size(0)
        end = (position // ROPE_CHUNK + 1) * ROPE_CHUNK
        cos, sin = rope_angles(self.head_size, start, end - start, self.device)  # (P, hs)
        cos, sin = cos[:, None, None, None, :], sin[:, None, None, None, :]  # (P, 1, 1, 1, hs)
        swapped = torch.roll(self.gains, self.head_size // 2, dims=-1)  # rope(g n) = n (g cos) + swap(n) (swap(g) sin)
        self._cos = torch.cat([self._cos.view(-1, *self.gains.shape), cos * self.gains])
        self._sin = torch.cat([self._sin.view(-1, *self.gains.shape), sin * swapped])

    def rotation(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The RoPE tables of `position`, gains folded in: cos and sin (n_layer, 2, 1, hs); None without RoPE."""
        if not self.rope:
            return None
        if position >= self._cos.size(0):
            self._grow_tables(position)
        return self._cos[position], self._sin[position]

    def compiled(self, cache: KVCache) -> CompiledDecodeStep:
        """This step compiled for caches shaped as `cache` (`CompiledDecodeStep`)."""
        return CompiledDecodeStep(self, cache)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        position = cache.position
        logits, embedded = self.forward(ids, position, self.rotation(position), cache.last_embedding, cache.keys_values)
        if self.token_shift is not None:
            cache.last_embedding = embedded.view(ids.size(0), 1, -1)
        cache.advance(1)
        return logits

    def forward(
        self,
        ids: torch.Tensor,
        position: int | torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor] | None,
        last_embedding: torch.Tensor | None,
        keys_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits (B, V) after `ids` (B,) at `position`, and the new characters' embeddings (the next
        step's token shift); each layer's `keys_values` (B, 2, nh, capacity, hs) takes the new pair.

        `position` an int: shapes follow it (the keys held so far), the eager step. A 0-d tensor: every
        shape is fixed, whatever the position, and the step can be compiled (`CompiledDecodeStep`):
        the new pair is written with `index_copy_` and attention runs over the whole capacity, the
        slots not yet written masked out (they must hold finite numbers: `KVCache` zeroes them).
        """
        B, nh, hs = ids.size(0), self.n_head, self.head_size
        C = nh * hs
        fixed = isinstance(position, torch.Tensor)
        x = F.embedding(ids, self.token_embedding)  # (B, C)
        embedded = x
        if self.token_shift is not None and last_embedding is not None:
            x = torch.addcmul(x, self.token_shift, last_embedding.view(B, C))
        if self.position_embedding is not None:
            # A tensor position indexes without reading its value on the host, which tracing cannot do.
            table = self.position_embedding
            x = x + (table.index_select(0, position.view(1)) if fixed else table[position])
        cos = sin = None
        if rotation is not None:
            cos, sin = rotation[0].unbind(0), rotation[1].unbind(0)  # n_layer x (2, 1, hs)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, keys_values, strict=True)):
            capacity = layer_cache.size(3)
            if fixed:
                # [q, k, v] from the plain projection, swap(q) and swap(k) by slicing: a compiler fuses
                # the slices into the rotation, where eagerly the extra rows save an op.
                qkv = layer.qkv_plain(F.layer_norm(x, *layer.ln1)).view(B, 3, nh, hs)
                swapped = torch.cat([qkv[:, :2, :, hs // 2 :], qkv[:, :2, :, : hs // 2]], dim=-1) if self.rope else None
            else:
                qkv = layer.qkv(F.layer_norm(x, *layer.ln1)).view(B, -1, nh, hs)  # [q, k, v] (+ [swap(q), swap(k)])
                swapped = qkv[:, 3:] if self.rope else None
            qk = qkv[:, :2]
            inverse_norm = None
            if self.qk_norm:
                inverse_norm = torch.linalg.vecdot(qk, qk).add_(self.norm_eps).rsqrt_().unsqueeze(-1)  # (B, 2, nh, 1)
            # Queries and keys normalised, gained and rotated: eagerly in place in `qkv`, so keys and
            # values sit side by side and enter the cache (B, 2, nh, capacity, hs) with one copy; in
            # the fixed-shape step as new tensors, which the compiler fuses into the attention anyway.
            into = None if fixed else qk
            if self.rope:
                if inverse_norm is None:
                    qk = torch.addcmul(qk * cos[i], swapped, sin[i], out=into)
                else:
                    qk = torch.mul(torch.addcmul(qk * cos[i], swapped, sin[i]), inverse_norm, out=into)
            elif inverse_norm is not None:
                qk = torch.mul(qk * inverse_norm, self.gains[i], out=into)
            query = qk.select(1, 0).unsqueeze(2)  # (B, nh, 1, hs)
            if fixed:
                new_pair = torch.stack([qk.select(1, 1), qkv.select(1, 2)], dim=1).unsqueeze(3)  # (B, 2, nh, 1, hs)
                layer_cache.index_copy_(3, (position % capacity).view(1), new_pair)
                k, v = layer_cache.unbind(1)  # (B, nh, capacity, hs)
                y = masked_one_query_attention(query, k, v, torch.arange(capacity, device=ids.device) > position)
            else:
                layer_cache.select(3, position % capacity).copy_(qkv[:, 1:3])
                held = layer_cache if position >= capacity else layer_cache.narrow(3, 0, position + 1)
                k, v = held.unbind(1)  # (B, nh, held, hs)
                # One query per stream and head attends to every key held: no mask.
                y = F.scaled_dot_product_attention(query, k, v)  # (B, nh, 1, hs)
            x = layer.proj(x, y.reshape(B, C))
            if layer.proj_bias is not None:
                x = x.add_(layer.proj_bias)
            h = layer.fc(F.layer_norm(x, *layer.ln2))
            h = h.relu_().square_() if layer.relu2 else F.gelu(h)
            x = layer.mlp_proj(x, h)
            if layer.mlp_proj_bias is not None:
                x = x.add_(layer.mlp_proj_bias)
        logits = self.head(F.layer_norm(x, *self.ln_f))  # (B, V)
        if self.softcap > 0:
            logits = torch.tanh(logits).mul_(self.softcap)
        return logits, embedded


def masked_one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one query (B, nh, 1, hs) over keys and values (B, nh, T, hs), the key
    slots where `hidden` (T,) is true left out: products and sums a compiler fuses into one pass over
    the cache, where SDPA's kernel is a call of its own per layer."""
    scores = (q * k).sum(-1) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T)
    weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    return (weights.unsqueeze(-1) * v).sum(2, keepdim=True)  # (B, nh, 1, hs)


class CompiledDecodeStep:
    """`step(ids, cache)` as `DecodeStep`'s, through its fixed-shape forward compiled by TorchInductor
    (C++ on the CPU) for one cache's batch size and capacities: the dozens of small ops of a step
    become a few fused loops around the matmuls. Built once per generation; needs a C++ compiler, and
    raises whatever the compiler raises (`charlm.sampling` falls back to the eager step).

    Traced without TorchDynamo (`make_fx`), so a call checks no guards: the shapes are the cache's and
    the weights are constants of the compiled code, which is why it is made afresh for each generation.
    """

    def __init__(self, step: DecodeStep, cache: KVCache) -> None:
        from torch._inductor import compile as inductor_compile
        from torch.fx.experimental.proxy_tensor import make_fx

        self.step = step
        batch = cache.keys_values[0].size(0)
        shift, rope = step.token_shift is not None, step.rope
        n_layer = len(step.layers)
        self._no_rotation = torch.zeros(n_layer, 2, 1, step.head_size, device=step.device)
        self._no_embedding = torch.zeros(batch, 1, step.n_head * step.head_size, device=step.device)

        def forward(ids, position, cos, sin, last_embedding, *keys_values):  # noqa: ANN001, ANN202
            rotation = (cos, sin) if rope else None
            return step.forward(ids, position, rotation, last_embedding if shift else None, list(keys_values))

        example = [
            torch.zeros(batch, dtype=torch.long, device=step.device),
            torch.tensor(0, device=step.device),
            *(torch.zeros_like(self._no_rotation) for _ in range(2)),  # cos, sin: two tensors, not one passed twice
            self._no_embedding,
            *[torch.zeros_like(layer) for layer in cache.keys_values],
        ]
        with torch.inference_mode():
            graph = make_fx(forward)(*example)
            self._compiled = inductor_compile(graph, example)
            self._compiled(*example)  # the first call loads the compiled code: fail here, not mid-text

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        position = cache.position
        rotation = self.step.rotation(position) or (self._no_rotation, self._no_rotation)
        # The compiled code takes its inputs laid out as traced; a prefill leaves a strided view here.
        last = cache.last_embedding.contiguous() if cache.last_embedding is not None else self._no_embedding
        logits, embedded = self._compiled(
            ids, torch.tensor(position, device=ids.device), *rotation, last, *cache.keys_values
        )
        if self.step.token_shift is not None:
            cache.last_embedding = embedded.view(ids.size(0), 1, -1)
        cache.advance(1)
        return logits
