"""The task losses, each ``loss_fn(model, batch) -> (loss, metrics)``, as the training loop takes them.

The output layer and cross-entropy are fused inside the model's ``forward(idx, targets=...)``
(see ``fused_ce``), so every wrapper that only sees ``forward`` (``torch.compile``, and later
DDP, FSDP, LoRA) computes the same loss.
"""

from __future__ import annotations

import torch

from .fused_ce import IGNORE_INDEX, cross_entropy_reference, linear_cross_entropy


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                    fused: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The pretraining loss on a batch ``(x, y)``: predict y[t] (= x[t+1]) from x[:t+1]."""
    x, y = batch
    return model(x, targets=y, fused=fused), {}


__all__ = ["IGNORE_INDEX", "cross_entropy_reference", "linear_cross_entropy", "next_token_loss"]
