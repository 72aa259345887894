"""Text generation as small pure functions: temperature, top-k and an explicit CPU generator.

Sampling draws on a CPU `torch.Generator` whatever the model's device, so the same seed gives the
same text on cpu, cuda and mps (up to the logits' own rounding). Temperature 0 is greedy argmax.

The GPT path keeps a KV cache. While the text fits in `block_size` it gives exactly the tokens of
the lecture's loop (which re-runs the whole cropped context for every token). Past `block_size`:

- with RoPE (`position: rope`) the cache slides: each new token sees the last `block_size` tokens
  (or its attention window), whose keys and values were computed when they were generated. With a
  sliding attention window W in every layer and n_layer * (W - 1) < block_size (the default), that is
  exactly the lecture's recompute of the last `block_size` characters, for any number of layers
  (tested): every character a prediction reads lies inside that block either way. With full attention
  (or `full_attention_layers`) it is exact for one layer only: with more, the recompute forgets, in
  every layer, what lay before the block while the cached keys remember it (a model of the same text
  with more context, as in streaming attention);
- with learned absolute positions the positions would have to shift under every cached key, so the
  cache is rebuilt from the last `block_size // 2` tokens and generation continues from there: each
  new token still sees at least half a block of context, for one batched forward per
  `block_size // 2` tokens instead of one per token.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from charlm.errors import UsageError
from charlm.quantize import quantize_int8
from charlm.tokenizer import CharTokenizer

if TYPE_CHECKING:
    from charlm.checkpoint import Checkpoint
    from charlm.hardware import Runtime
    from charlm.params import SampleParams


def prompt_ids(tokenizer: CharTokenizer, prompt: str, drop_unknown: bool = False) -> tuple[list[int], list[str]]:
    """Token ids of `prompt` and the characters dropped from it.

    An empty prompt (the default) starts from a newline, or, in a corpus without one, from token 0:
    the corpus's first character in sorted order. The lecture's `torch.zeros((1, 1))` is both in
    tinyshakespeare, where token 0 is "\\n". Unknown characters raise
    `UnknownCharactersError` unless `drop_unknown`, which removes them and reports them.
    """
    dropped: list[str] = []
    if drop_unknown:
        dropped = tokenizer.missing_chars(prompt)
        prompt = "".join(c for c in prompt if c not in set(dropped))
    if not prompt:
        return [tokenizer.chars.index("\n") if "\n" in tokenizer.chars else 0], dropped
    return tokenizer.encode(prompt), dropped


class KVCache:
    """Keys and values of every layer for the positions generated so far, preallocated to
    `block_size` (or to the layer's attention window, all a new token can see there) so each new token
    writes in place instead of concatenating.

    `position` counts every token seen; `held(layer)` those a layer keeps (at most its capacity). Once
    full, a layer's cache in a RoPE model slides: a new token overwrites the oldest slot. Its keys carry
    their absolute rotation, and one query attends to a set of keys in any order, so no re-ordering or
    re-computation is needed (see `charlm.sampling` for how this compares to the lecture's loop).
    """

    def __init__(self, config: Any, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        """`config`: the GPT's (`n_head`, `n_embd`, `block_size`, `layer_windows()`)."""
        self.capacities = tuple(w if 0 < w < config.block_size else config.block_size for w in config.layer_windows())
        shape = (batch_size, 2, config.n_head)
        hs = config.n_embd // config.n_head
        # Per layer, keys and values side by side (B, 2, nh, capacity, hs), so a decode step stores a
        # token's pair with one copy.
        self.keys_values = [torch.zeros((*shape, cap, hs), device=device, dtype=dtype) for cap in self.capacities]
        self.keys = [layer[:, 0] for layer in self.keys_values]  # (B, nh, capacity, hs) each
        self.values = [layer[:, 1] for layer in self.keys_values]
        self.position = 0
        self.last_embedding: torch.Tensor | None = None  # (B, 1, C): the token shift's previous character

    def held(self, layer: int) -> int:
        return min(self.capacities[layer], self.position)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, nh, T, hs); return all keys and values held (with the new ones),
        or, for a prompt longer than a window-sized cache, the prompt's own (it keeps their last ones)."""
        T, capacity, held = k.size(2), self.capacities[layer], self.held(layer)
        keys, values = self.keys[layer], self.values[layer]
        k, v = k.detach(), v.detach()  # generation never differentiates through the cache
        if held + T <= capacity:
            keys[:, :, held : held + T] = k
            values[:, :, held : held + T] = v
            return keys[:, :, : held + T], values[:, :, : held + T]
        if held == 0:
            # Position p lives in slot p % capacity, where the sliding below expects it.
            slots = torch.arange(T - capacity, T, device=k.device) % capacity
            keys[:, :, slots] = k[:, :, -capacity:]
            values[:, :, slots] = v[:, :, -capacity:]
            return k, v
        if T != 1:
            raise ValueError("a full KV cache takes one new token at a time")
        slot = self.position % capacity  # the oldest token's slot
        keys[:, :, slot : slot + 1] = k
        values[:, :, slot : slot + 1] = v
        return keys, values

    def advance(self, n: int) -> None:
        self.position += n


class TokenSampler:
    """The next token of every stream from last-position logits (B, V): temperature (0 = greedy
    argmax), top-k, then `torch.multinomial`'s own draw, vectorised over the streams.

    For one sample torch's CPU multinomial takes argmax(p / q) with q ~ Exp(1) drawn from the
    generator, one number per vocabulary entry. This draws the same numbers ahead, a block of steps
    per generator call, so each token is the one `torch.multinomial(p, 1, generator=g)` would give,
    at one division and one argmax per step for all the streams instead of a call per stream
    (tests/test_sampling.py::test_the_sampler_draws_torch_multinomials_tokens).

    `generator`: one for the whole batch (its rows draw one after another, as multinomial on a
    (B, V) tensor draws them) or one per stream, so a stream's text does not depend on the streams
    beside it.
    """

    BLOCK = 16384  # random numbers per generator call

    def __init__(
        self, temperature: float, top_k: int, generator: torch.Generator | Sequence[torch.Generator], batch: int
    ) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
        self.rows_per_generator = batch if isinstance(generator, torch.Generator) else 1
        if len(self.generators) * self.rows_per_generator != batch:
            raise ValueError(f"{len(self.generators)} generators for {batch} streams: give one, or one per stream")
        self._noise = torch.empty(0)
        self._next = 0

    def _draw(self, vocab_size: int) -> torch.Tensor:
        if self._next == self._noise.size(0):
            per_step = self.rows_per_generator * vocab_size
            steps = max(1, self.BLOCK // per_step)
            blocks = [
                torch.empty(steps, self.rows_per_generator, vocab_size).exponential_(generator=g)
                for g in self.generators
            ]
            self._noise = torch.cat(blocks, dim=1)  # (steps, B, V)
            self._next = 0
        self._next += 1
        return self._noise[self._next - 1]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next ids (B, 1), on the CPU."""
        logits = logits.float().cpu()
        if self.temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if 0 < self.top_k < logits.size(-1):
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        return (probs / self._draw(probs.size(-1))).argmax(dim=-1, keepdim=True)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | Sequence[torch.Generator]
) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V) with a fresh `TokenSampler`."""
    return TokenSampler(temperature, top_k, generator, logits.size(0))(logits)


@torch.inference_mode()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    fast: bool = True,
    compiled: bool = False,
    decode_step: Callable[[torch.Tensor, KVCache], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Extend `idx` (B, T) by `max_new_tokens`, all B streams as one batch; `on_token(next_ids)` sees
    each step (for streaming). `generator`: one for the batch, or one per stream.

    A GPT generates through its KV cache with its `decode_step()` (`fast`; `charlm.models.gpt.decode`),
    or, with `fast=False`, through the model's own forward for each new token: the same tokens, the
    second the reference the first is tested against. `compiled`: the decode step compiled for this
    batch first (`DecodeStep.compiled`; eager, after one warning line, if compiling fails): the same
    tokens again. `decode_step`: a step made before (`model.decode_step()`, or its `.compiled(cache)`
    for this batch) to use instead, so that many calls compile once. `use_cache=False` is the lecture's loop.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sampler = TokenSampler(temperature, top_k, generator, idx.size(0))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    idx = idx.to(device)
    if use_cache and getattr(model, "cache_slides", None) is not None:
        out = _generate_cached(model, idx, max_new_tokens, sampler, on_token, fast, compiled, decode_step)
    else:
        out = _generate_recompute(model, idx, max_new_tokens, sampler, on_token)
    model.train(was_training)
    return out


def _generate_recompute(model, idx, max_new_tokens, sampler, on_token):
    """The lecture's loop: crop to the context the model can see, run it all, keep the last logits."""
    context = model.context_size
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -context:])  # (B, T, V)
        next_id = sampler(logits[:, -1, :]).to(idx.device)
        idx = torch.cat([idx, next_id], dim=1)
        if on_token is not None:
            on_token(next_id)
    return idx


def _generate_cached(model, idx, max_new_tokens, sampler, on_token, fast, compiled, step):
    block_size = model.context_size
    keep = max(1, block_size // 2)
    dtype = model.token_embedding_table.weight.dtype
    B, T = idx.shape
    out = torch.empty((B, T + max_new_tokens), dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    if step is None and fast:
        step = model.decode_step()
    elif step is None:
        def step(ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
            return model(ids[:, None], kv_cache=cache)[0][:, -1, :]

    def prefill(context: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        cache = KVCache(model.config, context.size(0), context.device, dtype)
        logits, _ = model(context, kv_cache=cache)
        return logits[:, -1, :], cache

    logits, cache = prefill(idx[:, -block_size:])
    if compiled and hasattr(step, "compiled") and max_new_tokens > 1:
        step = compiled_or_eager(step, cache)
    for i in range(max_new_tokens):
        next_id = sampler(logits).to(idx.device)  # (B, 1)
        out.select(1, T + i).copy_(next_id.view(B))
        if on_token is not None:
            on_token(next_id)
        if i == max_new_tokens - 1:
            break
        if cache.position >= block_size and not model.cache_slides:
            # Re-prefill from the last `keep` tokens: see the module docstring.
            logits, cache = prefill(out[:, max(0, T + i + 1 - keep) : T + i + 1])
        else:
            logits = step(next_id[:, 0], cache)
    return out


def compiled_or_eager(step: Callable[..., torch.Tensor], cache: KVCache) -> Callable[..., torch.Tensor]:
    """`step.compiled(cache)`, or `step` itself after one line on stderr if compiling fails: a missing
    or broken compiler costs speed, not the text."""
    try:
        return step.compiled(cache)
    except Exception as e:  # noqa: BLE001 - any compiler failure; the eager step computes the same tokens
        first = next(iter(str(e).strip().splitlines()), "")
        reason = f"{type(e).__name__}: {first}"
        print(f"warning: compiling the decode step failed ({reason}); generating eagerly", file=sys.stderr)
        return step


# Compiling in a fresh process takes 21 s on the 2-core AVX512 EPYC and 36 s on the AVX2 one, and
# saves a third to a half of a step (docs/performance.md "Results"): it pays for itself from about a
# minute of eager generation on the first, from about a minute and a half on the second.
COMPILE_AFTER_SECONDS = 60.0


def worth_compiling(
    model: nn.Module, runtime: Runtime, batch: int, max_new_tokens: int, seconds: float | None = None
) -> bool:
    """`sample.compile: auto`: compile the decode step when generating eagerly would take longer than
    COMPILE_AFTER_SECONDS, from the eager step's `seconds` at this batch, or timed here on a few
    steps of this model (docs/models.md "Generation")."""
    seconds = seconds_per_step(model, runtime, batch) if seconds is None else seconds
    return seconds * max_new_tokens > COMPILE_AFTER_SECONDS


def stream_seeds(seed: int, n: int) -> list[int]:
    """The seed of each of n samples: the first is `seed` itself, so one sample is what it always was."""
    return [seed + 7919 * i for i in range(n)]


def format_samples(texts: list[str]) -> str:
    """Several samples one after another, each under a header line; one sample as it is."""
    if len(texts) == 1:
        return texts[0]
    return "".join(f"===== sample {i + 1} of {len(texts)} =====\n{text}\n\n" for i, text in enumerate(texts))


WEIGHTS_MARGIN = 1.2  # int8 is taken only when this much faster: float32 is the exact path


def faster_weights(model: nn.Module, runtime: Runtime, batch: int, rounds: int = 3, steps: int = 8) -> str:
    """"int8" or "float32": which weights generate faster for this model at this batch, timed.

    Each candidate runs `steps` decode steps `rounds` times, alternating, and the best round of each
    counts. Which wins depends on the model and the CPU: at batch 1 the int8 kernel reads a quarter of
    the bytes, which pays where the weights outgrow the caches (the lecture's 10.7M), while at the
    default's 0.8M its fixed cost per call loses to float32 (docs/models.md "Generation"). int8
    must win by WEIGHTS_MARGIN: float32 gives the exact model, so a near tie goes to it.
    """
    candidates = {"float32": model, "int8": quantize_int8(model, runtime.int8_activations)}
    return pick_weights(step_seconds(candidates, runtime, batch, rounds, steps))


def step_seconds(
    candidates: dict[str, nn.Module], runtime: Runtime, batch: int, rounds: int = 3, steps: int = 8
) -> dict[str, float]:
    """Each candidate's decode-step time ({"float32": model, "int8": its int8 copy}), the best of
    `rounds` runs taken in turn, as `faster_weights` times them."""
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, net in candidates.items():
            best[name] = min(best[name], seconds_per_step(net, runtime, batch, rounds=1, steps=steps))
    return best


def pick_weights(seconds: dict[str, float]) -> str:
    """int8 when its step is WEIGHTS_MARGIN times faster than float32's, else float32."""
    return "int8" if seconds["int8"] * WEIGHTS_MARGIN < seconds["float32"] else "float32"


def seconds_per_step(model: nn.Module, runtime: Runtime, batch: int, rounds: int = 3, steps: int = 8) -> float:
    """The eager decode step's time for `batch` streams: the best of `rounds` runs of `steps` steps."""
    best = float("inf")
    ids = torch.zeros(batch, dtype=torch.long, device=runtime.device)
    with torch.inference_mode():
        for _ in range(rounds):
            cache = KVCache(model.config, batch, runtime.device, torch.float32)
            step = model.decode_step()
            step(ids, cache)  # warm-up: first-call allocations
            start = time.perf_counter()
            for _ in range(steps):
                step(ids, cache)
            best = min(best, (time.perf_counter() - start) / steps)
    return best


@dataclass(frozen=True)
class Samples:
    texts: list[str]  # each the prompt, then the new characters
    dropped: list[str]  # prompt characters not in the vocabulary, removed
    weights: str  # the precision the linear layers generated with: "float32" or "int8"
    compiled: bool = False  # the compiled decode step asked for (`sample.compile`); eager if compiling failed


def sample_text(
    ckpt: Checkpoint,
    settings: SampleParams,
    runtime: Runtime,
    seed: int,
    drop_unknown: bool = False,
    on_start: Callable[[str, list[str]], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Samples:
    """A checkpoint plus sample settings to `settings.num_samples` texts (each the prompt, then the new
    characters), generated as one batch with a seeded generator per text, and the prompt characters
    dropped. The sample stage and `charlm sample` both call this; `on_start` sees the prompt as it
    will be continued and the dropped characters, `on_text` each new character of a single sample."""
    tokenizer = ckpt.tokenizer
    if settings.top_k > tokenizer.vocab_size:
        raise UsageError(
            f"sample.top_k = {settings.top_k}: must be <= the vocabulary size ({tokenizer.vocab_size}), or 0"
        )
    ids, dropped = prompt_ids(tokenizer, settings.prompt, drop_unknown=drop_unknown)
    torch.manual_seed(seed)
    model = ckpt.build(runtime)
    n = settings.num_samples
    weights = runtime.sample_weights
    float32_seconds = None  # the float32 step's time, when `auto` precision timed it
    if getattr(model, "decode_step", None) is None:
        weights = "float32"  # no linear layers to quantize, no decode step to time (the bigram)
    elif weights != "float32":
        # Quantized once: the copy `auto` timed is the one that generates.
        candidates = {"float32": model, "int8": quantize_int8(model, runtime.int8_activations)}
        if weights == "auto":
            seconds = step_seconds(candidates, runtime, n)
            weights, float32_seconds = pick_weights(seconds), seconds["float32"]
        model = candidates[weights]
    # Compiled for float32 weights only: int8 wins where a step is memory traffic, which compiling leaves as it is.
    compiled = getattr(model, "decode_step", None) is not None and weights == "float32" and runtime.sample_compile
    if compiled == "auto":
        compiled = worth_compiling(model, runtime, n, settings.max_new_tokens, float32_seconds)
    if on_start is not None:
        on_start(tokenizer.decode(ids), dropped)
    show = None if on_text is None or n > 1 else (lambda next_id: on_text(tokenizer.chars[int(next_id[0, 0])]))
    out = generate(
        model,
        torch.tensor([ids] * n, dtype=torch.long),
        settings.max_new_tokens,
        settings.temperature,
        settings.top_k,
        [torch.Generator().manual_seed(s) for s in stream_seeds(seed, n)],
        on_token=show,
        compiled=compiled,
    )
    return Samples([tokenizer.decode(row.tolist()) for row in out], dropped, weights, compiled)
