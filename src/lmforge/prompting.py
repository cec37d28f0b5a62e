"""Solving a classification task by prompting alone: zero-shot and few-shot (the book's
chapter 1 sets them beside fine-tuning).

The model is shown an instruction, k labelled examples from the training split and the text;
the label is the one whose text the model finds most likely as the continuation (summed
log-probability of its tokens), not free generation, so every answer is a valid label.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from . import tasks
from .config import SPLIT_RULE_TEXT, LmforgeError, one_line, valid_split
from .evaluate import classification_metrics, continuation_logprobs


def build_prompt(text: str, labels: list[str], shots: list[tuple[str, str]]) -> str:
    """Instruction, examples, then the text; the label follows ``Label:``."""
    parts = [f"Classify each text as one of: {', '.join(labels)}.\n"]
    for example, label in shots:
        parts.append(f"Text: {one_line(example)}\nLabel: {label}\n")
    parts.append(f"Text: {one_line(text)}\nLabel:")
    return "\n".join(parts)


def predict_by_prompt(model, tokenizer, text: str, labels: list[str], shots: list[tuple[str, str]],
                      template: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[int, list[float]]:
    """(index of the most likely label, every label's log-probability). With a ``template`` (chat,
    alpaca or phi3: ``chat.answer_template``), the prompt is a user's message and a label the answer."""
    context, choices = prompt_ids(tokenizer, text, labels, shots, template)
    scores = continuation_logprobs(model, context, choices, dtype)
    return max(range(len(labels)), key=lambda i: scores[i]), scores


def prompt_ids(tokenizer, text: str, labels: list[str], shots: list[tuple[str, str]],
               template: str | None = None) -> tuple[list[int], list[list[int]]]:
    """(the prompt's ids, each label's ids) as ``predict_by_prompt`` scores them."""
    from .chat import user_prompt_ids

    prompt = build_prompt(text, labels, shots)  # all of it from the data: plain text
    if template is not None:
        return user_prompt_ids(tokenizer, template, prompt, "a text"), \
            [tasks.plain_ids(tokenizer, label) for label in labels]
    return tasks.plain_ids(tokenizer, prompt), [tasks.plain_ids(tokenizer, " " + label) for label in labels]


def _draw_shots(train_rows: list[tuple[str, str]], labels: list[str], k: int, rng: random.Random) -> list:
    """k examples, the labels taken in turn (a balanced prompt), drawn from the training split."""
    by_label = {label: [r for r in train_rows if r[1] == label] for label in labels}
    shots = []
    for i in range(k):
        pool = by_label[labels[i % len(labels)]]
        if pool:
            shots.append(rng.choice(pool))
    rng.shuffle(shots)
    return shots


def evaluate_prompting(model_spec: str, data: str | Path, text_column: str = "text", label_column: str = "label",
                       shots: int = 0, balance: bool = False, split: tuple[float, float, float] = (0.7, 0.1, 0.2),
                       seed: int = 123, limit: int | None = None, test_limit: int | None = None, chat: bool = False,
                       progress: bool = True, dtype: str = "auto") -> dict:
    """Accuracy of zero-shot (``shots=0``) or k-shot prompting on the test split, split exactly as
    ``lmforge finetune classify`` splits the same file with the same seed. With ``chat``, the prompt is
    a user's message in the template the model answers in (the one it was tuned on, else its own)."""
    from tqdm import tqdm

    from .models import load_language_model

    from .finetune import KNOWN_COLUMNS, resolve_data

    if shots < 0:
        raise LmforgeError(f"--shots must be >= 0, got {shots}")
    if limit is not None and limit < 3 or test_limit is not None and test_limit < 1:
        raise LmforgeError("--limit must be at least 3 and --test_limit at least 1 (or left out: all)")
    if not valid_split(split):
        raise LmforgeError(f"--split must be {SPLIT_RULE_TEXT}, got {list(split)}")
    if (text_column, label_column) == ("text", "label") and str(data) in KNOWN_COLUMNS:
        text_column, label_column = KNOWN_COLUMNS[str(data)]
    rows = tasks.read_labelled(resolve_data(data), text_column, label_column)
    if balance:
        rows = tasks.balance(rows, seed)
    rows = tasks.subsample(rows, limit, seed)
    train_rows, _, test_rows = tasks.split(rows, split, seed)
    test_rows = test_rows[:test_limit] if test_limit is not None else test_rows
    labels = sorted({label for _, label in train_rows})
    if not test_rows:
        raise LmforgeError(f"the test split of {data} is empty; give more data or a larger test fraction")
    if shots > len(train_rows):  # examples are drawn from the training split, each at most once per prompt
        raise LmforgeError(f"--shots {shots} is more examples than the training split of {data} holds "
                           f"({len(train_rows)}); give at most {len(train_rows)}")
    model, tok = load_language_model(model_spec)
    model.eval()
    from .chat import answer_template

    template = answer_template(model_spec, tok) if chat else None
    if chat and template is None:
        raise LmforgeError(f"{model_spec} has no chat template and was not instruction-tuned; leave out --chat")
    from .precision import resolve_dtype

    compute = resolve_dtype(dtype, next(model.parameters()).device)  # bf16 where it is fast
    rng = random.Random(seed)
    preds, truth, truncated = [], [], 0
    window = model.config.context_length
    t0 = time.perf_counter()
    with torch.no_grad():
        for text, label in tqdm(test_rows, desc=f"{shots}-shot", disable=not progress, dynamic_ncols=True):
            if label not in labels:
                raise LmforgeError(f"label {label!r} of the test split does not occur in the training split")
            shown = _draw_shots(train_rows, labels, shots, rng)
            context, choices = prompt_ids(tok, text, labels, shown, template)
            # A prompt longer than the window loses its start (the instruction, the first examples):
            # counted and reported, as `eval choice` reports its cut contexts.
            truncated += len(context) + max(map(len, choices)) > window + 1
            scores = continuation_logprobs(model, context, choices, compute)  # the ids above, encoded once
            best = max(range(len(labels)), key=lambda i: scores[i])
            preds.append(best)
            truth.append(labels.index(label))
    metrics = classification_metrics(preds, truth, labels)
    return {"task": "prompt", "model": model_spec, "shots": shots, "chat": chat, "template": template,
            "dtype": str(compute).split(".")[-1], "context_length": window, "truncated": truncated,
            "seconds": time.perf_counter() - t0,
            "test": metrics}


__all__ = ["build_prompt", "evaluate_prompting", "predict_by_prompt", "prompt_ids"]
