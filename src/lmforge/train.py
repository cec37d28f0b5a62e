"""The one training loop.

``fit`` is parameterised by a batch source (``batches(k) -> (x, y)`` for micro-batch k,
a pure function of k) and a loss function (``loss_fn(model, x, y) -> scalar``), so
pretraining and every later fine-tuning task share it. It owns the optimiser step,
gradient accumulation and clipping, the learning-rate schedule, mixed precision,
periodic evaluation and samples, ``metrics.jsonl``, checkpoints and resuming.

Resuming is exact: batches depend only on the micro-batch index, dropout is seeded by
it, and the optimiser state is restored, so a resumed run — also one killed with
SIGKILL between checkpoints — reproduces the losses of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    METRICS,
    WEIGHTS,
    load_state_into,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from .config import LmforgeError, TrainConfig, config_dict
from .model import GPT
from .optim import lr_at, make_optimizer
from .precision import autocast, resolve_dtype, tune_cpu_allocator

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    step: int
    last_loss: float
    tokens: int
    seconds: float
    stopped_early: bool


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a kill mid-write


class MetricsLog:
    """Append-only JSONL of training events; on resume, events after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [ln for ln in path.read_text().splitlines() if _step_of(ln) is not None and _step_of(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def prepare_for_training(model: GPT) -> None:
    """Training-only speed-ups applied from outside the model.

    The token embedding's gradient becomes sparse (only the rows of tokens in the batch),
    added into dense gradient buffers that exist from the start and are zeroed in place
    each step: no (vocab × d) tensor is allocated, filled and freed per step.
    """
    model.wte.sparse = True
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def fit(model: GPT, batches: Batches, loss_fn: LossFn, config: TrainConfig, run_dir: str | Path,
        evaluate: Callable[[GPT, torch.dtype], dict[str, float]] | None = None,
        sample: Callable[[GPT, int], None] | None = None, resume: bool = False,
        extra_config: dict | None = None, progress: bool = True) -> FitResult:
    """Train ``model`` in place for ``config.max_steps`` optimiser steps, writing to ``run_dir``."""
    from tqdm import tqdm

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu":
        tune_cpu_allocator()
    extra_config = {**(extra_config or {}), "train": config_dict(config)}
    optimizer = make_optimizer(model, config)
    start, tokens, elapsed = 0, 0, 0.0
    if resume:
        tensors, meta = load_weights(run / WEIGHTS)
        load_state_into(model, tensors, str(run / WEIGHTS))
        state = load_trainer_state(run, int(meta.get("step", -1)))
        optimizer.load_state_dict(state["optimizer"])
        start, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        if start >= config.max_steps:
            raise LmforgeError(f"{run} already finished {start} of {config.max_steps} steps; raise --train.max_steps "
                               "to train further")
    log = MetricsLog(run / METRICS, start if resume else None)
    prepare_for_training(model)
    if config.compile:
        # Compile each block in place (regional compilation): the loss calls hidden_states, not
        # forward, and parameter names stay unprefixed for checkpoints.
        for block in model.h:
            block.compile()

    def checkpoint(step: int) -> None:
        save_checkpoint(run, model, optimizer, step, {"tokens": tokens_done, "elapsed": elapsed}, extra_config)

    def run_eval(step: int) -> None:
        if evaluate is not None:
            res = evaluate(model, dtype)
            log.write(step=step, val_loss=res["loss"], val_perplexity=res["perplexity"], tokens=tokens)
            bar.write(f"step {step}: val loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f}")

    model.train()
    bar = tqdm(total=config.max_steps, initial=start, desc="pretrain", unit="step", disable=not progress,
               dynamic_ncols=True)
    def run_sample(step: int) -> None:
        if sample is not None:
            sample(model, step)  # generation switches to eval mode
            model.train()

    if start == 0:  # the untrained model: the curves start where learning starts
        run_eval(0)
        run_sample(0)
    t_start = time.perf_counter() - elapsed
    done, loss_value, stopped_early = start, float("nan"), False  # done: optimiser steps completed
    tokens_done = tokens
    window_t, window_tokens = time.perf_counter(), 0
    try:
        for step in range(start, config.max_steps):
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                k = step * config.grad_accum + micro
                x, y = batches(k)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                torch.manual_seed(config.seed * 1_000_003 + k)  # dropout depends on k alone: resume is exact
                with autocast(device, dtype):
                    loss = loss_fn(model, x, y)
                (loss / config.grad_accum).backward()
                loss_sum += loss.item()
                tokens += x.numel()
                window_tokens += x.numel()
            if not math.isfinite(loss_sum):
                raise LmforgeError(f"loss became {loss_sum} at step {step}; lower --train.lr or use --train.dtype float32")
            grad_norm = None
            if config.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            optimizer.step()
            done, tokens_done = step + 1, tokens
            optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: no re-allocation per step
            loss_value = loss_sum / config.grad_accum
            elapsed = time.perf_counter() - t_start
            if done % config.log_interval == 0 or done == config.max_steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                log.write(step=done, loss=loss_value, lr=lr, grad_norm=grad_norm, tokens=tokens, tokens_per_s=tps,
                          elapsed_s=elapsed)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            last = done == config.max_steps
            out_of_time = config.max_minutes is not None and elapsed >= config.max_minutes * 60
            if done % config.eval_interval == 0 or last or out_of_time:
                run_eval(done)
            if config.sample_interval and done % config.sample_interval == 0 and not last:
                run_sample(done)
            if done % config.save_interval == 0 or last or out_of_time:
                checkpoint(done)
            if out_of_time and not last:
                bar.write(f"stopping after {config.max_minutes} minutes at step {done} (checkpoint saved)")
                stopped_early = True
                break
    except KeyboardInterrupt:
        bar.write(f"interrupted: saving a checkpoint at step {done}")
        checkpoint(done)  # weights after `done` steps; a half-accumulated step is simply redone on resume
        raise
    finally:
        bar.close()
    model.eval()
    if sample is not None:
        sample(model, done)
    return FitResult(step=done, last_loss=loss_value, tokens=tokens_done, seconds=elapsed, stopped_early=stopped_early)


__all__ = ["FitResult", "fit", "prepare_for_training"]
