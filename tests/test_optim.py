"""Muon written here against torch.optim.Muon, and its Newton-Schulz dtype rule."""

import pytest
import torch
from torch import nn

from charlm.hardware import CPU_BF16_ENV
from charlm.optim import Muon, make_optimizer, orthogonalize
from charlm.params import GPTTraining, TrainConfig
from tests.helpers import cpu_runtime


def _matrices(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # Two of one shape (batched together), a tall one and a square one, as in the GPT's blocks.
    shapes = [(48, 16), (48, 16), (16, 64), (16, 16)]
    return [nn.Parameter(torch.randn(shape, generator=g) * 0.1) for shape in shapes]


def _step_both(dtype: torch.dtype, steps: int = 5):
    ours, theirs = _matrices(0), _matrices(0)
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=dtype)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ours, theirs, strict=True):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
        yield ours, theirs, opt_ours, opt_theirs


def test_matches_torch_muon_step_for_step_in_bf16():
    # torch.optim.Muon always orthogonalises in bf16; in the same dtype the two are the same update.
    for ours, theirs, opt_ours, opt_theirs in _step_both(torch.bfloat16):
        for a, b in zip(ours, theirs, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
            assert torch.equal(opt_ours.state[a]["momentum_buffer"], opt_theirs.state[b]["momentum_buffer"])


def test_float32_orthogonalization_differs_from_bf16_only_by_rounding():
    *_, (ours, theirs, _, _) = _step_both(torch.float32)
    moved = [(a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True)]
    assert 0 < max(moved) < 2e-3  # a different dtype really ran, and it is the same algorithm


def test_orthogonalize_gives_near_orthogonal_rows_for_each_matrix_of_a_batch():
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 16, 40, generator=g)
    out = orthogonalize(batch, torch.float32)
    assert out.shape == batch.shape and out.dtype == torch.float32
    singular = torch.linalg.svdvals(out)
    # Muon's quintic trades exactness for speed: singular values land in about (0.5, 1.5), not at 1.
    assert singular.min() > 0.3 and singular.max() < 1.6
    one = orthogonalize(batch[1:2], torch.float32)
    assert torch.allclose(one[0], out[1], atol=1e-5)  # batching does not mix matrices
    tall = orthogonalize(batch.mT.contiguous(), torch.float32)
    assert torch.allclose(tall, out.mT, atol=1e-5)


@pytest.mark.parametrize(("forced", "expected"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_muon_asks_the_precision_rule_for_its_dtype(monkeypatch, forced, expected):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    model = nn.Sequential()
    model.blocks = nn.ModuleList([nn.Linear(8, 8)])
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), cpu_runtime())
    assert optimizer.optimizers[0].ns_dtype is expected


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([nn.Parameter(torch.zeros(4))], lr=0.1)


def test_a_stacked_matrix_steps_as_its_parts_would_on_their_own():
    """stacked=3 on a (3n, m) matrix: the update of three separate (n, m) matrices, lr scaled by (n, m)."""
    g = torch.Generator().manual_seed(0)
    fused = nn.Parameter(torch.randn(48, 16, generator=g) * 0.1)
    parts = [nn.Parameter(chunk.detach().clone()) for chunk in fused.detach().chunk(3)]
    opt_fused = Muon([{"params": [fused], "stacked": 3}], lr=0.02, weight_decay=0.1)
    opt_parts = Muon(parts, lr=0.02, weight_decay=0.1)
    unsplit = nn.Parameter(fused.detach().clone())
    opt_unsplit = Muon([unsplit], lr=0.02, weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(48, 16, generator=g)
        fused.grad, unsplit.grad = grad.clone(), grad.clone()
        for part, chunk in zip(parts, grad.chunk(3), strict=True):
            part.grad = chunk.clone()
        for opt in (opt_fused, opt_parts, opt_unsplit):
            opt.step()
    assert torch.allclose(fused.detach(), torch.cat([p.detach() for p in parts]), rtol=0, atol=1e-6)
    assert not torch.allclose(fused, unsplit, atol=1e-3)  # splitting really changes the update


def test_muon_refuses_a_stack_that_does_not_divide_the_rows():
    with pytest.raises(ValueError, match="does not split into 3"):
        Muon([{"params": [nn.Parameter(torch.zeros(8, 4))], "stacked": 3}], lr=0.1)


@pytest.mark.parametrize("split", [True, False])
def test_muon_split_qkv_puts_only_the_gpts_qkv_projections_in_the_stacked_group(split):
    from charlm.models.gpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=16, block_size=8))
    cfg = GPTTraining(optimizer="muon", muon_split_qkv=split)
    muon = make_optimizer(model, cfg, cpu_runtime()).optimizers[0]
    stacked = [p for group in muon.param_groups if group["stacked"] == 3 for p in group["params"]]
    qkv = [block.attn.qkv.weight for block in model.blocks]
    assert [id(p) for p in stacked] == ([id(p) for p in qkv] if split else [])
    assert sum(len(group["params"]) for group in muon.param_groups) == 2 * 4  # every block matrix, once
