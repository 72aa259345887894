"""Optimizers: AdamW, Muon for the blocks' matrices, and the weight average.

Muon is written here rather than taken from `torch.optim.Muon`, which orthogonalises every update in
bfloat16 whatever the device can do: on a CPU without native bf16 that made a training step several
times slower (docs/performance.md "What makes it fast"). This one runs its Newton-Schulz iterations in the dtype
`charlm.hardware.Runtime.orthogonalization` holds, and does the same-shape matrices of all blocks as
one batch. Step for step it is torch's update (tests compare the two in the same dtype).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from charlm.hardware import Runtime
from charlm.params import ParamsError, TrainConfig

# Newton-Schulz quintic coefficients and step count of Muon's authors (and torch.optim.Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalize(updates: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T for each (A, B) matrix of `updates` (n, A, B), by Newton-Schulz in `dtype`.

    Like Muon's authors, the iteration runs on the wide orientation (A <= B), so its Gram matrix is the
    smaller one; the result comes back in `dtype`.
    """
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT  # (n, A, A)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return x.mT if tall else x


def match_rms_adamw(lr: float, shape: torch.Size) -> float:
    """Muon's lr for a matrix, scaled so its update's RMS matches AdamW's (Moonshot's rule)."""
    return lr * 0.2 * math.sqrt(max(shape[0], shape[1]))


class Muon(torch.optim.Optimizer):
    """Muon: SGD momentum (Nesterov), each 2-D update orthogonalised, decoupled weight decay.

    `ns_dtype` is the Newton-Schulz dtype; the training loop passes the one the device runs natively.
    A param group with `stacked` = n > 1 holds matrices that are n equal matrices stacked by rows
    (the GPT's fused query/key/value projection): each of the n is orthogonalised, and its lr scaled,
    on its own, as if it were a separate layer (modded-nanogpt's treatment of q, k and v).
    """

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov, "stacked": 1}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon updates matrices only; got a parameter of shape {tuple(p.shape)}")
                if p.size(0) % group["stacked"]:
                    raise ValueError(f"a {tuple(p.shape)} matrix does not split into {group['stacked']} by rows")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            stacked = group.get("stacked", 1)  # a state saved before the key existed: 1
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                # Views: the in-place updates below write through to the stacked parameter.
                for part, part_update in zip(p.chunk(stacked), update.chunk(stacked), strict=True):
                    by_shape[part.shape].append((part, part_update))
            # One batched Newton-Schulz per shape: the blocks' matrices are small, and a batch of them
            # costs little more than one in kernel launches.
            for shape, items in by_shape.items():
                ortho = orthogonalize(torch.stack([u for _, u in items]), self.ns_dtype)
                step_lr = match_rms_adamw(lr, shape)
                for (p, _), o in zip(items, ortho, strict=True):
                    p.mul_(1 - lr * weight_decay)
                    p.add_(o.to(p.dtype), alpha=-step_lr)
        return None


def stacked_projections(model: nn.Module) -> list[nn.Parameter]:
    """The blocks' fused query/key/value projections (`qkv`): three matrices stacked by rows each."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return [m.qkv.weight for m in blocks.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weight matrices of the linear layers inside the model's blocks: what Muon updates.

    The embeddings and the output head stay with AdamW, as in Muon's own recipe: an embedding
    row is only touched by its own character, and the head's update should not be orthogonalised
    across the vocabulary.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return [m.weight for m in blocks.modules() if isinstance(m, nn.Linear)]


class MuonAdamW:
    """Muon for the hidden matrices plus AdamW for everything else, stepped as one optimizer.

    `param_groups` lists both optimizers' groups, so the training loop's schedule sets every
    group's lr. Muon's lr is rescaled per matrix to AdamW's update size (`match_rms_adamw`), so
    one `learning_rate` serves both.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: an optimizer's load_state_dict replaces its group dicts (a resumed run).
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def make_optimizer(model: nn.Module, cfg: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW, or with `optimizer: muon` Muon for the blocks' matrices and AdamW for the rest.

    Muon reaches a given validation loss in fewer than half AdamW's steps on the default GPT
    (docs/recipe.md "Model size and steps").
    """
    muon_params = hidden_matrices(model) if cfg.optimizer == "muon" else []
    if cfg.optimizer == "muon" and not muon_params:
        raise ParamsError(f"optimizer = 'muon': {type(model).__name__} has no hidden matrices; use adamw")
    taken = {id(p) for p in muon_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    # Weight decay on matrices (embeddings included) only, as nanoGPT: decaying biases and LayerNorm
    # gains pulls them towards 0 rather than towards "no effect".
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.99), fused=runtime.fused_adamw)
    if not muon_params:
        return adamw
    stacked = {id(p) for p in stacked_projections(model)} if getattr(cfg, "muon_split_qkv", False) else set()
    muon_groups = [
        {"params": [p for p in muon_params if id(p) not in stacked]},
        {"params": [p for p in muon_params if id(p) in stacked], "stacked": 3},
    ]
    muon = Muon(
        [g for g in muon_groups if g["params"]],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        ns_dtype=runtime.orthogonalization,
    )
    return MuonAdamW(muon, adamw)


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), `decay` per step.

    Why: the default GPT overfits its 1M-character training split, and the average of the last
    ~1/(1 - decay) steps' weights generalises better than the last weights (docs/recipe.md "Weight average"), for
    one `lerp` per weight per step. It starts from the weights it is given (the initial ones), which
    keep a share of decay**steps: measured slightly better than a bias-corrected average that drops
    them. torch's `AveragedModel` would read a device counter back to the host on every update.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False)
        self._lerp = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self._lerp(list(self.model.parameters()), [p.detach() for p in model.parameters()], None)
        for averaged, current in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)
