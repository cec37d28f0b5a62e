"""Weight-only int8 for decoding: a quarter of fp32's bytes to read per generated token.

Generating one token reads every weight once and does little arithmetic with each, so on a CPU
the speed of decoding is the speed of reading the weights. Stored as int8 with one scale per
output row (symmetric: w ≈ scale · q, q in -127..127, scale = max|w_row| / 127), a matrix is a
quarter of its fp32 size; ``torch.ops.aten._weight_int8pack_mm`` multiplies by it without ever
writing the dequantized matrix out. Activations stay in fp32. For generation only (there is no
gradient), and lossy: the test suite bounds the error against the float model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LmforgeError
from .matmul import Linear

SCHEMES = ("int8",)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales fp32 (out,)) with weight ≈ q · scales[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 rows with fp32 scales (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (what the fast kernel multiplies by, never stored)."""
        return self.weight_int8.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).float()
        if flat.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales)
        else:  # the fused kernel is CPU-only here: dequantize on the fly (still a quarter of the storage)
            y = F.linear(flat, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def quantize_int8(model: nn.Module) -> int:
    """Swap every Linear layer of ``model`` (output layer included, even when tied to the
    embedding, which keeps its float table for lookups) for an Int8Linear; returns how many."""
    model.eval()
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) in (nn.Linear, Linear):  # exactly these: a LoRA layer is merged first (merge_lora)
                setattr(module, child_name, Int8Linear(child))
                swapped += 1
    return swapped


def quantize_model(model: nn.Module, scheme: str) -> int:
    """Quantize ``model`` by ``scheme`` (one of SCHEMES) for generation."""
    if scheme not in SCHEMES:
        raise LmforgeError(f"--quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if next(model.parameters()).device.type != "cpu":  # no fused kernel there: it would read more, not less
        raise LmforgeError("--quantize int8 is for CPU decoding; on a GPU use --dtype bfloat16")
    return quantize_int8(model)
