"""The two matrix products of a linear layer, x Wᵀ (forward) and g W (the gradient with respect
to x), through oneDNN's kernels on the CPU where they are faster.

PyTorch sends an fp32 ``torch.mm`` on the CPU to MKL's sgemm. oneDNN (the library PyTorch
already uses for bf16 products) runs the same fp32 products at these shapes (tall activations
times a weight of a few hundred to 50k rows) 5-20 % faster on the AMD hosts this project is
measured on, in fp32 arithmetic: no reduced-precision mode is involved (it sums in another
order, so its rounding differs from MKL's, by 1.4-2x in mean error at these widths). Only the
two products whose right-hand side is a weight go this way; the weight gradient gᵀx keeps
``torch.mm``, which was as fast or faster for it. Where oneDNN is absent, for other dtypes,
devices, small row counts (decoding) and inside ``torch.compile`` (which plans its own
kernels), both functions are the plain ``F.linear`` and ``@``. A test holds them to those.

``torch.ops.mkldnn._linear_pointwise`` has no autograd formula: callers use these inside their
own ``autograd.Function``: ``Linear`` (the model's layers), LoRA layers, the fused output-layer loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 64  # below this (decoding, tiny batches) the call overhead outweighs the gain
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(a: torch.Tensor, w: torch.Tensor) -> bool:
    return (AVAILABLE and a.device.type == "cpu" and a.dtype == torch.float32 and w.dtype == torch.float32
            and a.dim() == 2 and a.size(0) >= MIN_ROWS and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b for 2-D x (N × in) and W (out × in): ``F.linear``'s value."""
    if _onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def times_weight(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g W for 2-D g (N × out) and W (out × in): the input gradient of ``linear``."""
    if _onednn(g, weight):
        return torch.ops.mkldnn._linear_pointwise(g, weight.t(), None, "none", [], "")
    return g @ weight


class _Linear(torch.autograd.Function):
    """x Wᵀ + b on rows (x: N × in) with the gradients  d/dx = g W,  d/dW = gᵀ x,  d/db = Σ g."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # x is kept only for the weight's gradient: a frozen layer keeps no activation, as in nn.Linear
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = times_weight(g, weight) if need_x else None
        grad_w = g.T @ x if need_w else None
        grad_b = g.sum(0) if need_b else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same value) whose fp32 CPU products use ``linear`` and
    ``times_weight``. Under autocast, on other devices or dtypes and when compiled, it is
    ``F.linear`` itself, so a compiled graph sees the same ``linear`` node as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        if not _onednn(rows, self.weight) or torch.is_autocast_enabled("cpu"):
            return F.linear(x, self.weight, self.bias)
        y = _Linear.apply(rows, self.weight, self.bias)
        return y.view(*x.shape[:-1], y.size(-1))  # a view made outside the Function: in-place ops allowed


__all__ = ["MIN_ROWS", "Linear", "linear", "times_weight"]
