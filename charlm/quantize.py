"""Weight-only int8 linear layers for generation on the CPU (`sample.precision: int8`).

Generating at batch 1 reads every weight once per token and does two flops with each, so its speed
is memory traffic, not arithmetic: at the lecture's size the float32 weights (42 MB) stream from
DRAM on every token, while as int8 (10.6 MB) they can stay in a large L3 cache, and torch's
`_weight_int8pack_mm` kernel reads a quarter of the bytes (docs/performance.md "Results" has the speed-up
per CPU class). Each output row gets its own scale (symmetric, max |w| -> 127), which keeps the
model's validation loss within a few thousandths of float32's (tested). Training never uses this.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and one float scale per output feature."""

    def __init__(
        self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.compute_dtype = dtype  # the kernel's activation dtype (`charlm.hardware.Runtime.int8_activations`)
        self.register_buffer("weight_int8", weight_int8)  # (out, in)
        self.register_buffer("scales", scales.to(dtype))  # (out,)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> Int8Linear:
        weight = linear.weight.detach().float()
        # Round with the scale the kernel will use (bf16 has 8 significant bits), not the exact one.
        scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(dtype).float()
        weight_int8 = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight_int8, scales, bias, dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1)).to(self.compute_dtype)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def quantize_int8(model: nn.Module, activations: torch.dtype) -> nn.Module:
    """A copy of `model`, for inference only, with every `nn.Linear` replaced by an `Int8Linear` whose
    kernel takes `activations` (`charlm.hardware.Runtime.int8_activations`).

    CPU only: that is where the kernel was measured and tested (a GPU has the bandwidth for
    float32). A model without linear layers (the bigram's lookup table) comes back unchanged.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 weights run on the CPU only, and this model is on {device}; use float32 there")
    quantized = copy.deepcopy(model).eval()
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child, activations))
    return quantized
