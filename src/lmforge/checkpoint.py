"""Run directories: what training writes and every other command reads.

    run/
      config.json         model config (+ format version, train config, metadata)
      model.safetensors   weights (tied tensors stored once)
      tokenizer.json      the tokenizer
      trainer_state.pt    optimizer state, step, counters; read with weights_only=True
      metrics.jsonl       one JSON record per log / eval event
      loss.png            the loss curve

Each file is written to a temporary name and renamed, so a crash never leaves a
half-written file where a good one was. The weights and the trainer state carry the
same step number, and loading checks that they match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from . import atomic
from .config import CONFIG_FORMAT_VERSION, ConfigError, LmforgeError, ModelConfig
from .model import GPT
from .tokenizer import Tokenizer

CONFIG, WEIGHTS, TOKENIZER, STATE, METRICS = "config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "metrics.jsonl"


class CheckpointError(LmforgeError, ValueError):
    """A run directory or weights file that cannot be used."""


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied output weight dropped (safetensors stores each tensor once)."""
    model = getattr(model, "_orig_mod", model)  # save the model, not a torch.compile wrapper
    sd = model.state_dict()
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_model(run_dir: str | os.PathLike, model: GPT, step: int = 0, extra_config: dict | None = None) -> None:
    from safetensors.torch import save

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    config = {"format": "lmforge-run", "version": CONFIG_FORMAT_VERSION, "model": model.config.to_dict(),
              **(extra_config or {})}
    atomic.write_bytes(run / WEIGHTS, save(model_state(model), metadata={"format": "pt", "step": str(step)}))
    atomic.write_json(run / CONFIG, config)


def save_checkpoint(run_dir: str | os.PathLike, model: GPT, optimizer: torch.optim.Optimizer, step: int,
                    state: dict, extra_config: dict | None = None) -> None:
    """Weights, config and trainer state for resuming at ``step`` (the next step to run)."""
    import io

    save_model(run_dir, model, step, extra_config)
    buf = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict(), **state}, buf)
    atomic.write_bytes(Path(run_dir) / STATE, buf.getvalue())


def read_run_config(run_dir: str | os.PathLike) -> dict:
    run = Path(run_dir)
    path = run / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run} is not a run directory (no {CONFIG}); give the --out folder of `lmforge pretrain`")
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is damaged (not JSON); restore it or train again") from None
    if not isinstance(cfg, dict) or cfg.get("format") != "lmforge-run" or "model" not in cfg:
        raise CheckpointError(f"{path} is not an lmforge run config")
    if cfg.get("version", 0) > CONFIG_FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer lmforge (format {cfg['version']}); upgrade lmforge")
    return cfg


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a damaged file is a CheckpointError, never a crash."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({str(e).splitlines()[0][:120]}); "
                              "restore it or train again") from None
    return tensors, meta


def check_state(model: GPT, tensors: dict[str, torch.Tensor], source: str,
                error: type[CheckpointError] = CheckpointError) -> None:
    """Strict: every key accounted for, every shape equal, the first mismatch named."""
    expected = model_state(model)
    for k, v in expected.items():
        if k not in tensors:
            raise error(f"{source} lacks tensor {k!r}; it does not match this model config")
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise error(f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                        f"the model config needs {tuple(v.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise error(f"{source} has tensors this model lacks, e.g. {extra[0]!r}")


def load_state_into(model: GPT, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy checked tensors into an existing model (resuming a run)."""
    check_state(model, tensors, source)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name])


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                error: type[CheckpointError] = CheckpointError) -> GPT:
    """A model built on the meta device and filled by assigning the checked tensors: loading
    takes one model's worth of memory, not two (build, then copy in)."""
    with torch.device("meta"):
        model = GPT(config)
    check_state(model, tensors, source, error)
    target = dtype or torch.float32
    model.load_state_dict({k: v.to(device=device, dtype=target) for k, v in tensors.items()}, strict=False,
                          assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model.eval()


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The model of a run directory (and its config dict), weights loaded strictly."""
    run = Path(run_dir)
    cfg = read_run_config(run)
    try:
        mcfg = ModelConfig.from_dict(cfg["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{run / CONFIG}: {e}") from None
    tensors, meta = load_weights(run / WEIGHTS)
    model = build_model(mcfg, tensors, str(run / WEIGHTS), device)
    cfg["step"] = int(meta.get("step", 0))
    return model, cfg


def load_tokenizer(run_dir: str | os.PathLike) -> Tokenizer:
    run = Path(run_dir)
    if not (run / TOKENIZER).is_file():
        read_run_config(run)  # a clearer message when it is not a run at all
        raise CheckpointError(f"{run} has no {TOKENIZER}")
    return Tokenizer.load(run / TOKENIZER)


def load_trainer_state(run_dir: str | os.PathLike, weights_step: int) -> dict:
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: nothing to resume from; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip / pickle
        raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}); "
                              "start the run again without --resume") from None
    if state.get("step") != weights_step:
        raise CheckpointError(f"{path} is for step {state.get('step')} but the weights are for step {weights_step} "
                              "(the checkpoint was interrupted mid-write); start again without --resume")
    return state
