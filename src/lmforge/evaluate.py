"""Evaluation: mean next-token loss and perplexity of a model on token windows."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from .data import eval_batches
from .losses import linear_cross_entropy
from .precision import autocast


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            loss = linear_cross_entropy(model.hidden_states(x), model.output_weight, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": count}


def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, batch_size: int = 8, max_batches: int = 50,
                    dtype: torch.dtype = torch.float32, context: int | None = None) -> dict[str, float]:
    """Loss and perplexity on the first ``max_batches`` non-overlapping windows of a token array."""
    context = context or model.config.context_length
    return evaluate_loss(model, eval_batches(tokens, context, batch_size, max_batches), dtype)
