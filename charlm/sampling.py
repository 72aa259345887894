"""Text generation as small pure functions: temperature, top-k and an explicit CPU generator.

Sampling draws on a CPU `torch.Generator` whatever the model's device, so the same seed gives the
same text on cpu, cuda and mps (up to the logits' own rounding). Temperature 0 is greedy argmax.

The GPT path keeps a KV cache. While the text fits in `block_size` it gives exactly the tokens of
the lecture's loop (which re-runs the whole cropped context for every token). Past `block_size`:

- with RoPE (`position: rope`) the cache slides: each new token sees the last `block_size` tokens
  (or its attention window), whose keys and values were computed when they were generated. With a
  sliding attention window W and n_layer * (W - 1) < block_size (the default), that is exactly the
  lecture's recompute of the last `block_size` characters, for any number of layers (tested): every
  character a prediction reads lies inside that block either way. With full attention it is exact for
  one layer only: with more, the recompute forgets, in every layer, what lay before the block while
  the cached keys remember it (a model of the same text with more context, as in streaming attention);
- with learned absolute positions the positions would have to shift under every cached key, so the
  cache is rebuilt from the last `block_size // 2` tokens and generation continues from there: each
  new token still sees at least half a block of context, for one batched forward per
  `block_size // 2` tokens instead of one per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from charlm.errors import UsageError
from charlm.precision import sample_precision
from charlm.quantize import quantize_int8
from charlm.tokenizer import CharTokenizer

if TYPE_CHECKING:
    from charlm.checkpoint import Checkpoint
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


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V)."""
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Extend `idx` (B, T) by `max_new_tokens`; `on_token(next_ids)` sees each step (for streaming)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    idx = idx.to(device)
    if use_cache and hasattr(model, "forward_cached"):
        out = _generate_cached(model, idx, max_new_tokens, temperature, top_k, generator, on_token)
    else:
        out = _generate_recompute(model, idx, max_new_tokens, temperature, top_k, generator, on_token)
    model.train(was_training)
    return out


def _generate_recompute(model, idx, max_new_tokens, temperature, top_k, generator, on_token):
    """The lecture's loop: crop to the context the model can see, run it all, keep the last logits."""
    context = model.context_size
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -context:])  # (B, T, V)
        next_id = sample_next(logits[:, -1, :], temperature, top_k, generator).to(idx.device)
        idx = torch.cat([idx, next_id], dim=1)
        if on_token is not None:
            on_token(next_id)
    return idx


def _generate_cached(model, idx, max_new_tokens, temperature, top_k, generator, on_token):
    block_size = model.context_size
    keep = max(1, block_size // 2)
    slides = getattr(model, "cache_slides", False)  # a RoPE cache slides past block_size; see module docstring
    logits, cache = model.forward_cached(idx[:, -block_size:], None)
    for i in range(max_new_tokens):
        next_id = sample_next(logits, temperature, top_k, generator).to(idx.device)
        idx = torch.cat([idx, next_id], dim=1)
        if on_token is not None:
            on_token(next_id)
        if i == max_new_tokens - 1:
            break
        if cache.position >= block_size and not slides:
            logits, cache = model.forward_cached(idx[:, -keep:], None)  # re-prefill: see module docstring
        else:
            logits, cache = model.forward_cached(next_id, cache)
    return idx


def sample_text(
    ckpt: Checkpoint,
    settings: SampleParams,
    device: torch.device,
    seed: int,
    drop_unknown: bool = False,
    on_start: Callable[[str, list[str]], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> tuple[str, list[str]]:
    """A checkpoint plus sample settings to text (the prompt, then the new characters), and the prompt
    characters dropped. The sample stage and `charlm sample` both call this; `on_start` sees the
    prompt as it will be continued and the dropped characters, `on_text` each new character."""
    tokenizer = ckpt.tokenizer
    if settings.top_k > tokenizer.vocab_size:
        raise UsageError(
            f"sample.top_k = {settings.top_k}: must be <= the vocabulary size ({tokenizer.vocab_size}), or 0"
        )
    precision = sample_precision(device, settings.precision)
    ids, dropped = prompt_ids(tokenizer, settings.prompt, drop_unknown=drop_unknown)
    torch.manual_seed(seed)
    model = ckpt.build().to(device)
    if precision == "int8":
        model = quantize_int8(model)
    if on_start is not None:
        on_start(tokenizer.decode(ids), dropped)
    show = None if on_text is None else (lambda next_id: on_text(tokenizer.chars[int(next_id[0, 0])]))
    out = generate(
        model,
        torch.tensor([ids], dtype=torch.long),
        settings.max_new_tokens,
        settings.temperature,
        settings.top_k,
        torch.Generator().manual_seed(seed),
        on_token=show,
    )
    return tokenizer.decode(out[0].tolist()), dropped
