"""The lecture's bigram model: a (V, V) lookup table of next-character logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.bigram import BigramConfig


class BigramLanguageModel(nn.Module):
    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    # Each prediction reads only the current token: generation feeds just the last one.
    context_size = 1
    receptive_field = 1

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.token_embedding_table(idx)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss


def bigram_loss_floor(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Val loss of the best bigram table fitted on `train`: add-one smoothed counts, exactly.

    A trained bigram model can only approach this number, which makes it a check on the training loop.
    """
    V = vocab_size
    pairs = train[:-1].long() * V + train[1:].long()
    counts = torch.bincount(pairs, minlength=V * V).view(V, V).double() + 1.0  # (V, V)
    log_probs = (counts / counts.sum(dim=1, keepdim=True)).log()
    return -log_probs[val[:-1].long(), val[1:].long()].mean().item()


def extra_metrics(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """The evaluate stage's bigram-only metric: the floor a trained table should approach."""
    return {"val_loss_floor": round(bigram_loss_floor(train, val, vocab_size), 5)}


MODEL = BigramLanguageModel
