"""Text generation as small pure functions: temperature, top-k and an explicit CPU generator.

Sampling draws on a CPU `torch.Generator` whatever the model's device, so the same seed gives the
same text on cpu, cuda and mps (up to the logits' own rounding). Temperature 0 is greedy argmax.

The GPT path keeps a KV cache. While the text fits in `block_size` it gives exactly the tokens of
the lecture's loop (which re-runs the whole cropped context for every token). Past `block_size`
the learned absolute positions would have to shift under every cached key, so the cache is rebuilt
from the last `block_size // 2` tokens and generation continues from there: each new token still
sees at least half a block of context, and the rebuild costs one batched forward per
`block_size // 2` tokens instead of one per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from charlm.tokenizer import CharTokenizer


def prompt_ids(tokenizer: CharTokenizer, prompt: str, drop_unknown: bool = False) -> tuple[list[int], list[str]]:
    """Token ids of `prompt` and the characters dropped from it.

    An empty prompt starts from a newline (or token 0 if the corpus has none), like the lecture's
    `torch.zeros((1, 1))`, which is "\\n" in tinyshakespeare. Unknown characters raise
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
    logits, cache = model.forward_cached(idx[:, -block_size:], None)
    for i in range(max_new_tokens):
        next_id = sample_next(logits, temperature, top_k, generator).to(idx.device)
        idx = torch.cat([idx, next_id], dim=1)
        if on_token is not None:
            on_token(next_id)
        if i == max_new_tokens - 1:
            break
        if cache.length >= block_size:
            logits, cache = model.forward_cached(idx[:, -keep:], None)  # re-prefill: see module docstring
        else:
            logits, cache = model.forward_cached(next_id, cache)
    return idx
