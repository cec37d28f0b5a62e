"""The one logger of a training run: ``metrics.jsonl`` always, TensorBoard and Weights & Biases when asked.

    log = RunLogger(run_dir, resume_step=None, tensorboard=True, wandb_project="lmforge")
    log.log(step, loss=2.31, lr=6e-4)                          # the same numbers reach every backend
    log.log_samples(step, [{"prompt": "The", "text": " cat sat"}])
    log.close()

``metrics.jsonl`` is the record the rest of lmforge reads (the report, the default run's summary,
resume); TensorBoard and W&B are views of it for people who use those tools. Both are optional
extras (``pip install 'lmforge[tensorboard]'``, ``'lmforge[wandb]'``), imported only when asked for.
W&B runs offline with ``WANDB_MODE=offline`` (``wandb sync`` uploads later).

On resume the events after the checkpoint are dropped everywhere they can be: from metrics.jsonl
(rewritten atomically), from TensorBoard's view (``purge_step``); a W&B run is continued under
its id, and W&B itself ignores steps it has already seen.

This module also says what the run ran on: ``describe_hardware`` names the device and the peak
FLOP/s that model FLOPs utilisation (MFU) is measured against.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from . import atomic
from .config import LmforgeError, is_number

METRICS = "metrics.jsonl"  # the same name as checkpoint.METRICS (this module does not import checkpoint)
TENSORBOARD = "tensorboard"  # TensorBoard's event files: tensorboard --logdir RUN/tensorboard
WANDB = "wandb"  # W&B's local folder; it also keeps the id that a resumed run continues
WANDB_ID = "lmforge-run-id"


# ---------------------------------------------------------------- metrics.jsonl

def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a kill mid-write


class MetricsLog:
    """Append-only JSONL of training events. On resume, the events after the checkpoint are
    dropped (those steps run again) and every event up to it is kept; the file is rewritten
    atomically, so a kill during the rewrite loses nothing."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        keep: list[str] = []
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines()
                    if (s := _step_of(ln)) is not None and s <= resume_step]
        atomic.write_text(path, "".join(ln + "\n" for ln in keep))

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- the logger

def _scalars(metrics: dict) -> dict[str, float]:
    """The numbers among ``metrics`` (a gradient norm is None when clipping is off: nothing to plot)."""
    return {k: float(v) for k, v in metrics.items()
            if is_number(v)}


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LmforgeError("TensorBoard logging needs the tensorboard package: pip install 'lmforge[tensorboard]' "
                           "(or leave out --train.tensorboard)") from None
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise LmforgeError("Weights & Biases logging needs the wandb package: pip install 'lmforge[wandb]' "
                           "(or leave out --train.wandb)") from None
    return wandb


def check_loggers(tensorboard: bool, wandb: bool) -> None:
    """The optional loggers asked for can be imported: checked before a command clears or writes
    anything (--overwrite must not cost an old run for a missing package)."""
    if tensorboard:
        _import_summary_writer()
    if wandb:
        _import_wandb()


class RunLogger:
    """Writes each event of a run to ``metrics.jsonl`` and, when asked, to TensorBoard
    (``RUN/tensorboard``) and Weights & Biases (project ``wandb_project``, local files in ``RUN/wandb``).

    ``resume_step``: None starts the logs afresh; a step continues a run from its checkpoint at that
    step. ``config`` is the run's configuration, shown by W&B beside its curves.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, *, tensorboard: bool = False,
                 wandb_project: str | None = None, config: dict | None = None) -> None:
        run = Path(run_dir)
        # Both imports come first: a missing package is reported before any file is touched.
        SummaryWriter = _import_summary_writer() if tensorboard else None
        wandb = _import_wandb() if wandb_project else None
        self.jsonl = MetricsLog(run / METRICS, resume_step)
        self.tb = None
        self.wandb_run = None
        self._wandb = wandb
        self._closed = False
        if SummaryWriter is not None:
            folder = run / TENSORBOARD
            if resume_step is None:  # a fresh start: the event files of an earlier start would mix with its curves
                for old in folder.glob("events.out.tfevents.*"):
                    old.unlink()
            # purge_step: TensorBoard hides what an earlier invocation logged after the checkpoint
            self.tb = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)
        if wandb is not None:
            try:
                self.wandb_run = _start_wandb(wandb, run, wandb_project, resume_step, config or {})
            except BaseException:
                self.close()
                raise

    def log(self, step: int, **metrics) -> None:
        """One record: ``step`` and the metrics, in metrics.jsonl as given, numbers to the others."""
        self.jsonl.write(step=step, **metrics)
        scalars = _scalars(metrics)
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb_run is not None and scalars:
            self.wandb_run.log(scalars, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Generated texts (``{"prompt": ..., "text": ...}`` each): one record ``{"step", "samples"}``."""
        samples = [{"prompt": str(s.get("prompt", "")), "text": str(s.get("text", ""))} for s in samples]
        self.jsonl.write(step=step, samples=samples)
        if self.tb is not None:
            # TensorBoard renders text as Markdown: indented lines show as they are, nothing is interpreted.
            shown = "\n\n".join("    " + (s["prompt"] + s["text"]).replace("\n", "\n    ") for s in samples)
            self.tb.add_text("samples", shown, step)
        if self.wandb_run is not None:
            table = self._wandb.Table(columns=["prompt", "text"], data=[[s["prompt"], s["text"]] for s in samples])
            self.wandb_run.log({"samples": table}, step=step)

    def close(self) -> None:
        """Flush and close every backend (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_wandb(wandb, run: Path, project: str, resume_step: int | None, config: dict):
    """A W&B run for ``run``: a new one on a fresh start, the same one (by its stored id) on resume."""
    folder = run / WANDB
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / WANDB_ID
    run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
    kwargs = {"project": project, "dir": str(run), "name": run.resolve().name, "config": config}
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    try:
        wb_run = wandb.init(**kwargs)
    except Exception as e:  # no login and not offline, a network failure: W&B's own errors are many
        raise LmforgeError(f"Weights & Biases could not start a run ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}); run `wandb login`, or set WANDB_MODE=offline "
                           "to log locally and `wandb sync` later") from None
    atomic.write_text(id_file, str(wb_run.id) + "\n")
    return wb_run


# ---------------------------------------------------------------- hardware and MFU

# Dense peak FLOP/s from NVIDIA's data sheets (no 2:4 sparsity): (bf16, tf32, fp32). Matched as
# words in torch.cuda.get_device_name(); the more specific names come first (L40S before L4).
GPU_PEAKS: tuple[tuple[str, tuple[float | None, float | None, float]], ...] = (
    ("GH200", (989e12, 494e12, 67e12)),
    ("H200", (989e12, 494e12, 67e12)),
    ("H100 NVL", (835e12, 418e12, 60e12)),
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100", (989e12, 494e12, 67e12)),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", (312e12, 156e12, 19.5e12)),
    ("L40S", (362e12, 183e12, 91.6e12)),
    ("L4", (121e12, 60e12, 30.3e12)),
    ("A10", (125e12, 62.5e12, 31.2e12)),
    ("RTX 4090", (165e12, 82.6e12, 82.6e12)),
    ("V100", (None, None, 15.7e12)),  # no bf16
    ("T4", (None, None, 8.1e12)),
)


def gpu_peak_flops(name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """The data-sheet peak of a known GPU for matmuls in ``dtype`` (fp32 on tensor cores when ``tf32``);
    None for a GPU not in the table, or a precision it has no fast path for."""
    for key, (bf16, tf, fp32) in GPU_PEAKS:
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key) + r"(?![A-Za-z0-9])", name):
            if dtype == torch.bfloat16:
                return bf16
            return tf if tf32 and tf is not None else fp32
    return None


@functools.cache
def measured_peak_flops(device: str, dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of a 1024 × 1024 matmul in ``dtype`` on ``device``, the best of a few timings;
    measured once per process (``threads``: the CPU threads torch uses, part of the key).

    Timed with a clock of its own (perf_counter_ns), so the run's own timing is undisturbed."""
    n = 1024
    g = torch.Generator().manual_seed(0)  # its own generator: the run's random stream stays untouched
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(reps: int) -> float:
        sync()
        t0 = time.perf_counter_ns()
        for _ in range(reps):
            a @ b
        sync()
        return max(time.perf_counter_ns() - t0, 1) / 1e9

    timed(1)  # warm-up: the first matmul loads kernels and packs weights
    reps = max(1, min(50, int(0.03 / timed(1))))  # about 30 ms a timing, however fast the device
    return max(reps * 2 * n**3 / timed(reps) for _ in range(3))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_hardware(device: torch.device | str, dtype: torch.dtype, peak_flops: float | None = None) -> dict:
    """What a run trains on, and the peak FLOP/s its MFU is measured against.

    The peak is, in this order: ``peak_flops`` when given (--train.peak_flops); the data-sheet
    dense peak of a known GPU (GPU_PEAKS) for ``dtype``; else a 1024³ matmul timed on this device
    (``measured_peak_flops``), which makes MFU a fraction of what this machine's matmuls reach."""
    device = torch.device(device)
    info: dict = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__}
    peak, source = peak_flops, "given (--train.peak_flops)"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(name=torch.cuda.get_device_name(index), gpus=torch.cuda.device_count())
        tf32 = torch.get_float32_matmul_precision() != "highest"
        if peak is None and (peak := gpu_peak_flops(info["name"], dtype, tf32)) is not None:
            kind = info["dtype"] if dtype == torch.bfloat16 else ("tf32" if tf32 else "fp32")
            source = f"data sheet: {info['name']}, dense {kind}"
    else:
        info.update(name=_cpu_name() if device.type == "cpu" else device.type, threads=torch.get_num_threads())
    if peak is None:
        peak = measured_peak_flops(str(device), dtype, torch.get_num_threads())
        source = f"measured: 1024³ {info['dtype']} matmul on this {device.type}" + (
            f", {info['threads']} threads" if "threads" in info else "")
    info.update(peak_flops=float(peak), peak_source=source)
    return info


def mfu(tokens_per_s: float, flops_per_token: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOP/s the model's arithmetic needs at this throughput, as a
    fraction of the hardware's peak (PaLM, appendix B). None when either number is unknown."""
    if not flops_per_token or not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


__all__ = ["GPU_PEAKS", "METRICS", "MetricsLog", "RunLogger", "describe_hardware", "gpu_peak_flops",
           "measured_peak_flops", "mfu"]
