"""Evaluation: mean next-token loss and perplexity of a model on token windows."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from .config import LmforgeError
from .data import eval_batches
from .fused_ce import IGNORE_INDEX
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
            loss = model(x, targets=y)
        n = int((y != IGNORE_INDEX).sum())  # the loss is a mean over the targets that count
        total += loss.item() * n
        count += n
    model.train(was_training)
    if count == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": count}


def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, batch_size: int = 8, max_batches: int = 50,
                    dtype: torch.dtype = torch.float32, context: int | None = None) -> dict[str, float]:
    """Loss and perplexity on the first ``max_batches`` non-overlapping windows of a token array."""
    if batch_size < 1 or max_batches < 1 or (context is not None and context < 1):
        raise LmforgeError(f"batch_size, max_batches and context must be >= 1, got {batch_size}, {max_batches}, "
                           f"{context}")
    context = context or model.config.context_length
    return evaluate_loss(model, eval_batches(tokens, context, batch_size, max_batches), dtype)


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokenizer, text: str, window: int = 512,
                  dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Bits per UTF-8 byte of ``text``: a loss that compares models with different tokenizers.

    The text is encoded once and scored in non-overlapping windows; every token after the
    first is predicted, and the total negative log-likelihood (nats) is divided by
    ln 2 × the bytes those tokens spell.
    """
    ids = tokenizer.encode(text, disallowed_special=())
    if len(ids) < 2:
        raise LmforgeError("too little text to score: it encodes to fewer than two tokens; give a longer text")
    window = min(window, model.config.context_length)
    device = next(model.parameters()).device
    model.eval()
    total_nats, scored = 0.0, []
    t = torch.tensor(ids, device=device)
    for s in range(0, len(ids) - 1, window):
        x = t[s:s + window][None]
        y = t[s + 1:s + 1 + window][None]
        x = x[:, :y.size(1)]
        with autocast(device, dtype):
            loss = model(x, targets=y)
        total_nats += loss.item() * y.numel()
        scored.extend(y[0].tolist())
    n_bytes = len(tokenizer.decode_bytes(scored))
    return {"bits_per_byte": total_nats / math.log(2) / n_bytes, "tokens": len(scored), "bytes": n_bytes}


def classification_metrics(predictions: list[int], labels: list[int], names: list[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 (0 where undefined, as scikit-learn's
    ``zero_division=0``), their macro average, and the confusion matrix (rows: true class,
    columns: predicted)."""
    k = len(names)
    confusion = [[0] * k for _ in range(k)]
    for p, y in zip(predictions, labels):
        confusion[y][p] += 1
    per_class = {}
    for c, name in enumerate(names):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(k))
        actual = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    n = len(labels)
    return {"accuracy": sum(confusion[c][c] for c in range(k)) / n if n else float("nan"), "n": n,
            "macro_f1": sum(v["f1"] for v in per_class.values()) / k if k else float("nan"),
            "per_class": per_class, "confusion": confusion, "labels": list(names)}


def continuation_logprobs(model: torch.nn.Module, context: list[int], continuations: list[list[int]],
                          dtype: torch.dtype = torch.float32) -> list[float]:
    """Sum of log p(continuation | context) for each continuation (token ids), with the context
    computed once for all of them (``choice_eval.token_loglikelihoods``); a context that leaves no
    room in the window keeps its last tokens. The context must be at least one token and each
    continuation at most the window."""
    from .choice_eval import token_loglikelihoods

    if not continuations:
        raise LmforgeError("no choices to score; give at least one")
    if any(not c for c in continuations):
        raise LmforgeError("a choice encodes to no tokens; give every choice some text")
    scores = token_loglikelihoods(model, [(context, c) for c in continuations], len(continuations), dtype)
    return [s for s, _, _ in scores]
