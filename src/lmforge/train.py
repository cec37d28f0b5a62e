"""The one training loop.

``fit`` is parameterised by a task: a batch source (``batches(k)``, micro-batch k as any
structure of tensors, a pure function of k) and a loss function (``loss_fn(model, batch) ->
(loss, metrics)``, metrics a dict of numbers or 0-dim tensors to log beside the loss), so pretraining and every
fine-tuning task share it. It owns the optimiser step, gradient accumulation and clipping,
the learning-rate schedule, mixed precision, periodic evaluation and samples, the run's
logs (``metrics.jsonl``, and TensorBoard / W&B when asked: ``logger.RunLogger``), checkpoints
and resuming. ``train_step`` is one optimiser step of it.

Resuming is exact: batches depend only on the micro-batch index, dropout is seeded by
it, and the optimiser state is restored, so a resumed run — also one killed with
SIGKILL between checkpoints — reproduces the losses of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import (
    STATE,
    WEIGHTS,
    all_finite,
    find_checkpoint,
    is_own_temp_file,
    load_state_into,
    load_trainer_state,
    load_weights,
    read_run_config,
    save_checkpoint,
)
from .config import LmforgeError, Terminated, TrainConfig, config_dict, one_line

# MetricsLog and _step_of are imported for the callers and tests that reach them here.
from .logger import MetricsLog, RunLogger, _step_of, describe_hardware, mfu  # noqa: F401
from .model import GPT
from .optim import batch_rows_at, lr_at, make_optimizer
from .precision import autocast, resolve_dtype, tune_cpu_allocator

Batch = Any  # a tensor, or a tuple / list / dict of tensors: whatever the task's loss function takes
Batches = Callable[[int], Batch]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]

# Settings that only extend or observe a run. Changing them on resume is announced and allowed;
# changing anything else (learning rate, batch, model, data...) would make the result differ from
# an uninterrupted run, so it is refused unless asked for with allow_changes.
RESUMABLE = frozenset({"train.max_steps", "train.max_minutes", "train.eval_interval", "train.eval_batches",
                       "train.sample_interval", "train.save_interval", "train.log_interval",
                       "train.keep_checkpoints", "train.compile", "train.tensorboard", "train.wandb",
                       "train.wandb_project", "train.peak_flops", "train.strategy", "train.dist_timeout",
                       "data_path", "base.spec"})  # a task adds its own (fit's ``resumable``); the base's
# place may change (a moved folder): its digest and tokenizer still say whether it is the same model


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """The batch with ``fn`` applied to every tensor in it (through tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor in it moved to ``device``. To a GPU, host tensors go through
    pinned memory: a copy from ordinary (pageable) memory first waits for all the work queued on
    the GPU, so every micro-batch would stall the device while Python prepares the next one."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()  # the copy's pinned block is not reused before the copy is done
        return t.to(device, non_blocking=True)
    return map_tensors(batch, move)


def first_rows(batch: Batch, n: int) -> Batch:
    """The batch with every tensor in it cut to its first ``n`` rows (dim 0)."""
    return map_tensors(batch, lambda t: t[:n] if t.dim() else t)


def _first_tensor(batch: Batch) -> torch.Tensor | None:
    """A batch's first non-empty tensor with rows (the input ids), searched through tuples, lists and
    dicts; a 0-d tensor (a scale, a flag) is passed over."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() and batch.numel() else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        if (t := _first_tensor(v)) is not None:
            return t
    return None


def batch_tokens(batch: Batch) -> int:
    """Tokens in a batch, for throughput: the size of its first tensor (the input ids)."""
    t = _first_tensor(batch)
    return 0 if t is None else t.numel()


def batch_width(batch: Batch) -> int:
    """Sequence length of a batch: the last dimension of its first tensor (the input ids)."""
    t = _first_tensor(batch)
    return 0 if t is None else t.size(-1)


@dataclass
class StepResult:
    """One optimiser step's numbers. As ``train_step`` returns them, ``loss``, the metrics and
    ``grad_norm`` may still be tensors on the training device: reading a GPU value waits for
    the GPU to finish, so the loop reads them only when it logs, evaluates or saves
    (``resolve_steps``), and the GPU never idles between steps while Python catches up."""

    loss: float | torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    grad_norm: float | torch.Tensor | None = None
    tokens: int = 0
    seq_len: int = 0  # the longest micro-batch's sequence length (attention's FLOPs depend on it)
    step: int = 0  # its index from 0: the step logged, saved and shown as step + 1
    reduced_precision: bool = True  # computed under bf16 / fp16 autocast (what to advise when it fails)

    def resolved(self) -> StepResult:
        """This result with plain floats (see ``resolve_steps``)."""
        return resolve_steps([self])[0]


def resolve_steps(results: list[StepResult]) -> list[StepResult]:
    """The results with their tensors read as floats, in one transfer from the device; a non-finite
    loss raises, naming the first step that had one (before anything saves that step's weights)."""
    values = [v for r in results for v in (r.loss, *r.metrics.values(), r.grad_norm) if isinstance(v, torch.Tensor)]
    read = iter(torch.stack([v.detach().reshape(()).float() for v in values]).tolist() if values else [])

    def plain(v: float | torch.Tensor | None) -> float | None:
        return next(read) if isinstance(v, torch.Tensor) else v

    out = []
    for r in results:
        loss, metrics, grad_norm = plain(r.loss), {k: plain(v) for k, v in r.metrics.items()}, plain(r.grad_norm)
        if not math.isfinite(loss):  # named as the log and the progress bar count it
            raise LmforgeError(f"loss became {loss} at step {r.step + 1}; lower --train.lr"
                               + (" or use --train.dtype float32" if r.reduced_precision else ""))
        out.append(dataclasses.replace(r, loss=loss, metrics=metrics, grad_norm=grad_norm))
    return out


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, loss_fn: LossFn,
               step: int, config: TrainConfig, device: torch.device, dtype: torch.dtype, read: bool = True
               ) -> StepResult:
    """One optimiser step: set the learning rate, accumulate ``grad_accum`` micro-batches, clip, step.

    ``model`` is what trains: the model, or its DDP / FSDP2 wrapping (``distributed.wrap``); then
    ``batches`` gives this rank's rows, gradients are averaged over the ranks on the last
    micro-batch only, and the losses returned are the means over all ranks.

    The result holds floats, and a non-finite loss raises. With ``read=False`` its numbers stay on
    the device and the host does not wait for the step to finish; a non-finite loss then raises
    when they are read (``resolve_steps``), which ``fit`` does before it logs or saves anything."""
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices follow the schedule at their own scale
    ranks = distributed.current()
    # Sums stay on the device (no .item() per micro-batch: each would make the host wait for the GPU).
    loss_sum: torch.Tensor | float = 0.0
    tokens, width, sums = 0, 0, {}
    for micro in range(config.grad_accum):
        k = step * config.grad_accum + micro
        batch = batches(k)
        if step < config.batch_warmup_steps:  # batch-size warm-up: only the first rows, a pure function of the step
            if (first := _first_tensor(batch)) is None:
                raise LmforgeError("batch-size warm-up needs batches with rows, and this batch has no non-empty "
                                   "tensor with a batch dimension; drop --train.batch_warmup_steps")
            batch = first_rows(batch, batch_rows_at(step, first.size(0), config))
        batch = to_device(batch, device)
        # Dropout depends on (k, rank) alone: resume is exact, and ranks draw different masks.
        torch.manual_seed(config.seed * 1_000_003 + k * ranks.world_size + ranks.rank)
        with distributed.gradient_sync(model, sync=micro == config.grad_accum - 1):
            with autocast(device, dtype):
                loss, metrics = loss_fn(model, batch)
            (loss / config.grad_accum).backward()
        loss_sum = loss_sum + loss.detach().float()
        tokens += batch_tokens(batch)
        width = max(width, batch_width(batch))
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + (value.detach().float() if isinstance(value, torch.Tensor) else value)
    if ranks.active:  # what the whole global batch scored, the same on every rank
        names = sorted(sums)
        loss_sum, *means = distributed.mean_over_ranks([loss_sum, *(sums[n] for n in names)], device)
        sums = dict(zip(names, means))
        tokens *= ranks.world_size
    grad_norm = None
    if config.grad_clip is not None:
        grad_norm = distributed.gradient_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: no re-allocation per step
    result = StepResult(loss=loss_sum / config.grad_accum, grad_norm=grad_norm, tokens=tokens, seq_len=width,
                        step=step, metrics={name: v / config.grad_accum for name, v in sums.items()},
                        reduced_precision=dtype != torch.float32)
    return result.resolved() if read else result


class _Silent:
    """The logger of ranks other than 0: they train and evaluate, rank 0 alone writes."""

    def log(self, step: int, **metrics) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class FitResult:
    step: int
    last_loss: float
    tokens: int
    seconds: float
    stopped_early: bool


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every setting in ``new`` whose value differs from ``old``. A key the
    old config lacks (written by an lmforge that did not have the setting) is not a difference."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), v) for k, v in b.items() if k in a and a[k] != v]


def _check_resume(run: Path, stored: dict, current: dict, config: TrainConfig, start: int,
                  allow_changes: bool, resumable: frozenset[str] = frozenset()) -> list[str]:
    """Refuse changes that would make the result differ from an uninterrupted run (unless
    ``allow_changes``); return the lines that announce the others. ``resumable``: the task's own
    settings that may change too, beside RESUMABLE."""
    diff = settings_diff(stored, current)
    allowed = RESUMABLE | resumable
    refused = [d for d in diff if d[0] not in allowed]

    def brief(v: object) -> str:  # a list of every trained tensor's name would fill the screen
        text = repr(v)
        if len(text) <= 60:
            return text
        if isinstance(v, str) and all(c in "0123456789abcdef" for c in v):
            return repr(v[:16] + "…")  # a digest: its start tells them apart
        if isinstance(v, str):
            return repr("…" + v[-45:])  # a path: its end tells them apart
        return f"{text[:40]}... ({len(v)} items)" if isinstance(v, list) else text[:57] + "..."

    shown = lambda ds: ", ".join(f"{k} {brief(o)} -> {brief(n)}" for k, o, n in ds)  # noqa: E731
    if refused and not allow_changes:
        # What the run reads (its data, its base model) changed on disk, not a setting typed again
        inputs = [d for d in refused if d[0].split(".")[0] in ("data", "base")]
        if inputs and len(inputs) == len(refused):
            what = " and ".join(sorted({"the base model" if k.startswith("base") else "the data" for k, _, _ in inputs}))
            raise LmforgeError(f"{what} of {run} changed since it started ({shown(inputs)}); resuming on them would "
                               f"not give the run you started. Restore {'them' if ' and ' in what else 'it'} (or give "
                               "where the original now is), or pass --allow_changes true to continue anyway")
        raise LmforgeError(f"{run} was trained with other settings ({shown(refused)}); resuming with them would not "
                           "give the run you started. Leave them out (a resumed run keeps its own settings) or pass "
                           "--allow_changes true to continue with them anyway")
    lines = [f"changed on resume: {shown(diff)}"] if diff else []
    try:
        old_train = TrainConfig(**stored["train"])
    except (TypeError, KeyError, LmforgeError):
        old_train = None  # a config from another version: nothing to compare the schedule with
    if old_train is not None and start < config.max_steps and lr_at(start, old_train) != lr_at(start, config):
        lines.append(f"the learning-rate schedule now spans {config.max_steps} steps: at step {start} it is "
                     f"{lr_at(start, config):.3g} (was {lr_at(start, old_train):.3g})")
    return lines


def remove_stale_temp_files(run: Path) -> None:
    """Temp files of atomic writes at the top of a run that a kill interrupted (checkpoint temp
    folders are swept by the next checkpoint)."""
    for stale in run.glob("*.tmp[0-9]*"):
        if stale.is_file() and is_own_temp_file(stale.name):
            stale.unlink(missing_ok=True)


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


def _training_device(model: GPT) -> torch.device:
    """Where this job trains: this rank's device under torchrun (the model may still be in host memory,
    or only shapes, until ``distributed.wrap`` shards it), else where the model lies."""
    ranks = distributed.current()
    return distributed.device_of(ranks) if ranks.active else next(model.parameters()).device


def ready_to_train(model: GPT, config: TrainConfig) -> torch.nn.Module:
    """The module that trains ``model`` in this job, made once: on one process the model itself,
    prepared (``prepare_for_training``); under torchrun wrapped by DDP or sharded in place by FSDP2
    (``distributed.wrap``); with ``config.compile``, each block compiled first. ``fit`` calls it;
    fine-tuning calls it earlier under FSDP2, before its first evaluation, so that the base model
    is never whole on a device."""
    if not distributed.current().active:  # sparse embedding gradients and kept buffers: one process only
        prepare_for_training(model)
    if config.compile:
        # Compile each block in place (regional compilation): parameter names stay unprefixed for
        # checkpoints, and the fused loss (a custom autograd function) stays outside the graphs.
        for block in model.h:
            block.compile()
    return distributed.wrap(model, config.strategy, resolve_dtype(config.dtype, _training_device(model)))


def fit(model: GPT, batches: Batches, loss_fn: LossFn, config: TrainConfig, run_dir: str | Path,
        evaluate: Callable[[GPT, torch.dtype], dict[str, float]] | None = None,
        sample: Callable[[GPT, int], list[dict] | None] | None = None, resume: bool = False,
        extra_config: dict | None = None, progress: bool = True, allow_changes: bool = False,
        task: str = "pretrain", finished_ok: bool = False, resumable: frozenset[str] = frozenset()) -> FitResult:
    """Train ``model`` in place for ``config.max_steps`` optimiser steps, writing to ``run_dir``.

    ``evaluate(model, dtype)`` returns any metrics (logged as ``val_<name>``); ``sample(model, step)``
    may return its texts (``[{"prompt", "text"}]``, logged as one ``samples`` record); ``task`` names
    the run in its config and on the progress bar. Each log record holds the loss, the task's
    metrics, learning rate, gradient norm (when clipping is on), tokens seen, tokens/s, MFU and the
    elapsed time; the run's config records the hardware and the peak FLOP/s of its MFU.

    On the CPU, ``fit`` sets the process's allocator to keep freed memory for reuse
    (``precision.tune_cpu_allocator``): steps then fault in no new pages, and the process keeps
    its peak memory until it exits.

    With ``resume``, the newest complete checkpoint of ``run_dir`` is loaded and training goes on
    from its step; settings that differ from the stored ones are announced, and those that would
    change the result (anything but RESUMABLE and the task's ``resumable``, names of ``extra_config``)
    are refused unless ``allow_changes``. Resuming a run
    that already took all its steps is an error, or with ``finished_ok`` (fine-tuning, whose results
    are written after training: a kill may have come between) returns at once with its weights loaded.

    While it trains, this process holds ``run_dir`` (``outputs.run_lock``): another lmforge process
    that would train there at the same time is refused.
    """
    from .outputs import run_lock

    with run_lock(run_dir, active=distributed.writer()):
        return _fit(model, batches, loss_fn, config, run_dir, evaluate=evaluate, sample=sample, resume=resume,
                    extra_config=extra_config, progress=progress, allow_changes=allow_changes, task=task,
                    finished_ok=finished_ok, resumable=resumable)


def _fit(model: GPT, batches: Batches, loss_fn: LossFn, config: TrainConfig, run_dir: str | Path, *,
         evaluate: Callable[[GPT, torch.dtype], dict[str, float]] | None,
         sample: Callable[[GPT, int], list[dict] | None] | None, resume: bool, extra_config: dict | None,
         progress: bool, allow_changes: bool, task: str, finished_ok: bool, resumable: frozenset[str]) -> FitResult:
    from tqdm import tqdm

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ranks = distributed.current()
    device = _training_device(model)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu":
        tune_cpu_allocator()
    extra_config = {**(extra_config or {}), "task": task, "train": config_dict(config)}
    start, tokens, elapsed, state = 0, 0, 0.0, None
    if ranks.main:
        remove_stale_temp_files(run)
    if resume:
        folder = find_checkpoint(run)
        stored = read_run_config(folder)
        # Compared before anything is loaded: a different model is a settings difference, not a shape error.
        changes = _check_resume(run, stored, {"model": model.config.to_dict(), **extra_config}, config,
                                int(stored.get("step", 0)), allow_changes, resumable)
        if not (folder / STATE).is_file():
            raise LmforgeError(f"{folder} holds weights but no trainer state, so it cannot be resumed; "
                               "start without --resume")
        # Whole weights, into the whole model or (fine-tuning under FSDP2) its shards: a checkpoint of
        # any number of ranks loads alike.
        # A rank that holds only shapes (FSDP2, not rank 0) reads no weights: wrap sends it rank 0's.
        if distributed.on_meta(model):
            _, meta = load_weights(folder / WEIGHTS, tensors=False)
        else:
            tensors, meta = load_weights(folder / WEIGHTS)
            load_state_into(model, tensors, str(folder / WEIGHTS),
                            trained_only=extra_config.get("weights") == "trained")
            del tensors
        state = load_trainer_state(folder, int(meta.get("step", -1)))
        start, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        if start >= config.max_steps and finished_ok:
            print(f"{run} already took all its {start} steps; finishing what comes after training")
            for line in changes:
                print(line)
            return FitResult(step=start, last_loss=float("nan"), tokens=tokens, seconds=elapsed, stopped_early=False)
        if start >= config.max_steps:
            raise LmforgeError(f"{run} already finished {start} of {config.max_steps} steps; raise --train.max_steps "
                               "to train further")
        print(f"resuming {run} from step {start} of {config.max_steps} ({folder.name})")
        for line in changes:
            print(line)
    # What the run trains on, recorded in its config (after the resume check: another machine is no
    # settings change) and the peak its MFU is measured against. flops_per_token: 6N + attention (PaLM).
    hardware = describe_hardware(device, dtype, config.peak_flops)
    flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else None
    extra_config["hardware"] = {**hardware, "flops_per_token": flops_per_token, "devices": ranks.world_size}
    trained = model if distributed.is_sharded(model) else ready_to_train(model, config)
    distributed.reshard(model)  # fine-tuning scored the untuned model sharded: the optimiser must get the shards
    optimizer = make_optimizer(model, config)  # after wrapping: FSDP2 replaces the parameters by their shards
    if state is not None:
        try:
            distributed.load_optimizer_state(model, optimizer, state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:  # other groups or shapes (--allow_changes let it through)
            raise LmforgeError(f"the optimizer state saved in {folder} does not fit this run's optimizer "
                               f"({config.optimizer}, {len(optimizer.param_groups)} parameter groups: "
                               f"{one_line(str(e))[:120]}); resume with the optimizer and trained parameters the run "
                               "was started with") from None
    saved = start if resume else -1

    def checkpoint(step: int) -> None:
        nonlocal saved
        if step == saved:
            return
        weights, opt_state = distributed.full_state(model, optimizer)  # gathered from the shards under FSDP2
        distributed.on_main(lambda: save_checkpoint(run, model, opt_state, step, {"tokens": tokens, "elapsed": elapsed},
                                                    extra_config, keep=config.keep_checkpoints, weights=weights), device)
        saved = step

    def run_eval(step: int) -> None:
        if evaluate is not None:
            res = evaluate(model, dtype)
            if not res:  # nothing to evaluate on (an empty validation split)
                return
            log.log(step, **{f"val_{k}": v for k, v in res.items()}, tokens=tokens)
            bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in res.items() if k != "tokens"))

    model.train()
    bar = tqdm(total=config.max_steps, initial=start, desc=task, unit="step", disable=not (progress and ranks.main),
               dynamic_ncols=True)

    def run_sample(step: int) -> None:
        if sample is not None:
            log_samples(step, sample(model, step))  # generation switches to eval mode
            model.train()

    def log_samples(step: int, samples: list[dict] | None) -> None:
        if samples:  # a sampler that returns its texts has them kept in metrics.jsonl (for the report)
            log.log_samples(step, samples)

    # done: optimiser steps completed; tokens counts only completed steps (a step is added whole)
    done, loss_value, stopped_early = start, float("nan"), False
    pending: list[StepResult] = []  # steps whose numbers are still on the device

    def read_pending() -> StepResult | None:
        """Read the steps taken since the last read (raising on a non-finite loss); the newest."""
        newest = resolve_steps(pending)[-1] if pending else None
        pending.clear()
        return newest

    log = RunLogger(run, start if resume else None, tensorboard=config.tensorboard,
                    wandb_project=config.wandb_project if config.wandb else None,
                    config={"model": model.config.to_dict(), **extra_config}) if ranks.main else _Silent()
    try:  # from here on, the loggers are closed (flushed) however training ends
        if start == 0:  # the untrained model: the curves start where learning starts
            run_eval(0)
            run_sample(0)
        t_start = time.perf_counter() - elapsed  # elapsed counts every invocation of this run
        t_invocation = time.perf_counter()  # the time cap counts only this one
        window_t, window_tokens = time.perf_counter(), 0
        for step in range(start, config.max_steps):
            pending.append(train_step(trained, optimizer, batches, loss_fn, step, config, device, dtype, read=False))
            done = step + 1
            tokens += pending[-1].tokens
            window_tokens += pending[-1].tokens
            last = done == config.max_steps
            logs = done % config.log_interval == 0 or last
            evals = done % config.eval_interval == 0 or last
            samples = bool(config.sample_interval) and done % config.sample_interval == 0 and not last
            saves = done % config.save_interval == 0 or last
            # The steps' numbers are read (and a non-finite loss raises) before anything is logged,
            # evaluated or saved, and before the clock: then the device has finished the steps timed.
            if logs or evals or samples or saves:
                result = read_pending()
            now = time.perf_counter()
            out_of_time = config.max_minutes is not None and now - t_invocation >= config.max_minutes * 60
            if config.max_minutes is not None and ranks.active:  # the ranks' clocks differ: stop together
                out_of_time = not distributed.all_ok(not out_of_time, device)
            if out_of_time:
                evals = saves = True
                if pending:
                    result = read_pending()
            if not pending:  # this step's numbers were read
                loss_value = result.loss
            elapsed = now - t_start
            if logs:
                tps = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                # attention's FLOPs at this batch's length: fine-tuning batches are far shorter than the context
                step_flops = model.flops_per_token(result.seq_len or None) if flops_per_token else None
                utilisation = mfu(tps / ranks.world_size, step_flops, hardware["peak_flops"])  # per device
                # Muon's matrices follow the same schedule at their own peak (muon_lr): logged beside AdamW's
                rates = {"lr": lr_at(step, config)}
                if config.optimizer == "muon":
                    rates["muon_lr"] = rates["lr"] * config.muon_lr / config.lr
                log.log(done, loss=loss_value, **result.metrics, **rates, grad_norm=result.grad_norm,
                        tokens=tokens, tokens_per_s=tps, **({} if utilisation is None else {"mfu": utilisation}),
                        elapsed_s=elapsed)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            paused = False  # evaluation, samples and checkpoints are not training: tokens/s leaves them out
            if evals:
                run_eval(done)
                paused = evaluate is not None
            if samples:
                run_sample(done)
                paused = paused or sample is not None
            if saves:
                checkpoint(done)
                paused = True
            if paused and not last:  # the throughput window starts again after the pause
                window_t, window_tokens = time.perf_counter(), 0
            if out_of_time and not last:
                bar.write(f"stopped by the time cap ({config.max_minutes:g} min) at step {done} of "
                          f"{config.max_steps}; checkpoint saved")
                stopped_early = True
                break
        model.eval()
        if sample is not None:
            log_samples(done, sample(model, done))
    except (KeyboardInterrupt, Terminated):
        if not ranks.active:  # ranks interrupted at different points cannot meet to gather a checkpoint
            read_pending()  # a non-finite loss since the last read: an error, and nothing saved
            # An interrupt inside the first bad step, after its update and before its numbers were kept,
            # leaves no loss to read: the weights themselves tell.
            if not all(all_finite(p.detach()) for p in model.parameters()):
                raise LmforgeError(f"interrupted after step {done} with non-finite weights (a loss became nan or "
                                   "inf); nothing was saved: resume from the last checkpoint with a lower --train.lr "
                                   "or --train.dtype float32") from None
            bar.write(f"interrupted: saving a checkpoint at step {done}")
            checkpoint(done)  # weights after `done` steps; a half-accumulated step is simply redone on resume
        raise
    finally:
        bar.close()
        log.close()  # TensorBoard and W&B flush what they hold, also when training stops on an error
    return FitResult(step=done, last_loss=loss_value, tokens=tokens, seconds=elapsed, stopped_early=stopped_early)


__all__ = [
    "RESUMABLE",
    "FitResult",
    "StepResult",
    "batch_tokens",
    "batch_width",
    "first_rows",
    "map_tensors",
    "fit",
    "prepare_for_training",
    "ready_to_train",
    "resolve_steps",
    "settings_diff",
    "to_device",
    "train_step",
]
