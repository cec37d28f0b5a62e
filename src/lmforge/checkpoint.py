"""Run directories: what training writes and every other command reads.

    run/
      config.json          -> checkpoints/latest/config.json        model config, train config, metadata
      model.safetensors    -> checkpoints/latest/model.safetensors  weights (tied tensors stored once)
      trainer_state.pt     -> checkpoints/latest/trainer_state.pt   optimizer, step, counters (weights_only)
      tokenizer.json       the tokenizer
      metrics.jsonl        one JSON record per log / eval event
      loss.png             the loss curve
      checkpoints/
        latest -> step-00000400
        step-00000400/     config.json, model.safetensors, trainer_state.pt, manifest.json (sha256 of each)
        step-00000200/     the one before (the newest ``keep`` are kept)

A checkpoint is one unit, complete or absent: its files are written into a temporary
folder, fsynced, listed with their checksums in ``manifest.json``, and the folder is renamed
into place in one step; only then does the ``latest`` link move. A kill or a full disk at
any instant leaves the previous checkpoints as they were. Readers take the newest
checkpoint whose checksums hold, and say so when they have to skip a damaged one. The
top-level names are links through ``latest``, so the run still reads as three files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from . import atomic
from .config import CONFIG_FORMAT_VERSION, ConfigError, LmforgeError, ModelConfig
from .model import GPT
from .tokenizer import Tokenizer

CONFIG, WEIGHTS, TOKENIZER, STATE, METRICS = "config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "metrics.jsonl"
CHECKPOINTS, LATEST, MANIFEST = "checkpoints", "latest", "manifest.json"
_STEP_DIR = re.compile(r"step-(\d{8,})")
_warned: set[tuple] = set()


class CheckpointError(LmforgeError, ValueError):
    """A run directory or weights file that cannot be used."""


def model_state(model: nn.Module, trained_only: bool = False,
                state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict with a tied output weight dropped (safetensors stores each tensor once);
    with ``trained_only``, only the parameters that train (a fine-tuned head, LoRA adapters,
    the last blocks): the rest is the base model's, named in the run's config. ``state``: the
    model's full state gathered from its shards (FSDP), instead of its own state dict."""
    model = getattr(model, "_orig_mod", model)  # save the model, not a torch.compile wrapper
    sd = dict(model.state_dict() if state is None else state)
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if trained_only:
        trained = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in trained}
    return {k: v.detach().contiguous() for k, v in sd.items()}


def weights_digest(model: nn.Module) -> str:
    """sha256 of every tensor of the model (names and bytes): what a fine-tuning run records of its
    base, so that loading it over changed weights (a base run trained further, a re-downloaded
    folder) is caught, not silently accepted."""
    h = hashlib.sha256()
    for name, t in sorted(model_state(model).items()):
        h.update(name.encode() + b"\0")
        h.update(t.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _checkpoint_error(step: int, folder: Path, e: OSError) -> CheckpointError:
    where = e.filename or folder
    error = CheckpointError(f"could not write the checkpoint of step {step} to {where}: {e.strerror or e} "
                            "(the previous checkpoints are untouched; free space or fix permissions, then resume "
                            "with --resume true)")
    error.os_error = e  # for a writer that is not a training run (merge-lora) to say it in its own words
    return error


def write_checkpoint(run_dir: str | os.PathLike, step: int, files: dict[str, bytes], keep: int = 2) -> Path:
    """Write ``files`` as the checkpoint of ``step``, as one unit; returns its folder.

    Temporary folder -> files, each fsynced -> manifest with their sha256 -> rename into
    place -> fsync -> move ``latest`` -> drop all but the newest ``keep``. A failure removes
    the temporary folder and raises CheckpointError; the earlier checkpoints stay as they were.
    """
    run = Path(run_dir)
    root = run / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic.remove_tree(tmp)
        tmp.mkdir()
        manifest = {"format": "lmforge-checkpoint", "step": step, "files": {}}
        for name, data in files.items():
            atomic.write_file(tmp / name, data)
            manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic.write_file(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        atomic.fsync_dir(tmp)
        if final.exists():
            # The same step saved again (Ctrl-C right after a periodic save, or a resume that
            # ends where it began): move the old one aside first so a name is never half-replaced.
            old = root / f".step-{step:08d}.old{os.getpid()}"
            atomic.replace(final, old)
            atomic.replace(tmp, final)
            atomic.remove_tree(old)
        else:
            atomic.replace(tmp, final)
    except OSError as e:
        atomic.remove_tree(tmp)
        raise _checkpoint_error(step, tmp, e) from None
    except BaseException:
        atomic.remove_tree(tmp)
        raise
    # The rename above is the commit point: from here on the checkpoint is complete, and what
    # fails (durability of the rename, the `latest` link, pruning) cannot undo it.
    try:
        atomic.fsync_dir(root)
        if (root / LATEST).is_dir() and not (root / LATEST).is_symlink():
            atomic.remove_tree(root / LATEST)  # a copy that followed links made it a folder: stale
        atomic.symlink(final.name, root / LATEST)
        for name in files:  # the top-level view: links that always go through `latest`
            link, target = run / name, str(Path(CHECKPOINTS) / LATEST / name)
            if not (link.is_symlink() and os.readlink(link) == target) and not link.is_dir():
                atomic.symlink(target, link)  # also replaces a stale copy (cp -rL, an old-layout file)
    except OSError:
        pass  # no symlinks here (some Windows set-ups): readers go through checkpoints/ anyway
    try:
        _prune(root, keep)
    except OSError:
        pass  # an old checkpoint left over costs disk, not correctness; the next save prunes again
    return final


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders (renamed into place), newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _prune(root: Path, keep: int) -> None:
    for _, path in _step_dirs(root)[max(1, keep):]:
        atomic.remove_tree(path)
    for path in root.iterdir():  # leftovers of writes that were killed: .step-N.tmpPID, .latest.tmpPID
        if path.name.startswith(".") and path.is_symlink():
            path.unlink(missing_ok=True)  # rmtree refuses links (silently, with ignore_errors)
        elif path.name.startswith("."):
            atomic.remove_tree(path)


def save_model(run_dir: str | os.PathLike, model: GPT, step: int = 0, extra_config: dict | None = None,
               extra_files: dict[str, bytes] | None = None, keep: int = 2,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """Weights and config (and any ``extra_files``) as the checkpoint of ``step``; ``state``: see model_state."""
    from safetensors.torch import save

    config = {"format": "lmforge-run", "version": CONFIG_FORMAT_VERSION, "step": step,
              "model": model.config.to_dict(), **(extra_config or {})}
    trained_only = config.get("weights") == "trained"
    files = {WEIGHTS: save(model_state(model, trained_only, state), metadata={"format": "pt", "step": str(step)}),
             CONFIG: (json.dumps(config, indent=2) + "\n").encode(), **(extra_files or {})}
    return write_checkpoint(run_dir, step, files, keep)


def save_checkpoint(run_dir: str | os.PathLike, model: GPT, optimizer: torch.optim.Optimizer | dict, step: int,
                    state: dict, extra_config: dict | None = None, keep: int = 2,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Weights, config and trainer state for resuming at ``step`` (the next step to run), as one unit.
    ``optimizer``: the optimiser or its state dict; ``weights``: the gathered full state of a sharded model."""
    buf = io.BytesIO()
    opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    torch.save({"step": step, "optimizer": opt_state, **state}, buf)
    return save_model(run_dir, model, step, extra_config, {STATE: buf.getvalue()}, keep, weights)


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest, else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"its {MANIFEST} is missing or damaged"
    for name, want in files.items():
        path = folder / name
        try:
            if path.stat().st_size != want["bytes"]:
                return f"{name} has {path.stat().st_size:,} bytes, the manifest says {want['bytes']:,}"
            digest = atomic.sha256_file(path)
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
        if digest != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


# Written only at the end of a fine-tuning run (scores after, answers, the confusion matrix): never among
# what a kill in its first seconds leaves, and names a user's own folder may hold (an evaluation's
# results.json beside a tokenizer.json).
_END_FILES = frozenset({"results.json", "responses.json", "confusion.png"})

# What lmforge writes at the top of a run: training's files, the loggers' folders and the report, and
# fine-tuning's scores before training and its end files.
RUN_FILES = frozenset({CONFIG, WEIGHTS, STATE, TOKENIZER, METRICS, CHECKPOINTS, "loss.png", "tensorboard", "wandb",
                       "report.html", "report-plots", "evaluations.json", "before.json"}) | _END_FILES


def is_own_temp_file(name: str) -> bool:
    """The temp file of an atomic write of a run's own file (``metrics.jsonl.tmp123``)."""
    return ".tmp" in name and name.split(".tmp")[0] in RUN_FILES


def _own_file(name: str) -> bool:
    """A name training writes at the top of a run before its first checkpoint, or the temp file of one."""
    return (name in RUN_FILES and name not in _END_FILES) or is_own_temp_file(name)


def _not_a_run(run: Path) -> str:
    return (f"{run} is not a run directory (no {CONFIG}); give the --out folder of `lmforge pretrain` or "
            "`lmforge finetune`")


def is_unstarted_run(path: str | os.PathLike) -> bool:
    """A run stopped before its first checkpoint (Ctrl-C in its first second): only lmforge's own
    files, no config yet. Nothing in it can be lost, so a fresh start may take it over."""
    p = Path(path)
    if not p.is_dir() or (p / CONFIG).exists() or _step_dirs(p / CHECKPOINTS):
        return False
    names = [c.name for c in p.iterdir()]
    return bool(names) and TOKENIZER in names and all(_own_file(n) for n in names)


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an lmforge run directory (with or without a checkpoint yet)."""
    p = Path(path)
    if (p / CHECKPOINTS).is_dir() or is_unstarted_run(p):
        return True
    try:
        return json.loads((p / CONFIG).read_text()).get("format") == "lmforge-run"
    except (OSError, ValueError, AttributeError):
        return False


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    run = Path(run_dir)
    return bool(_step_dirs(run / CHECKPOINTS)) or (run / WEIGHTS).is_file()


def find_checkpoint(run_dir: str | os.PathLike, warn: bool = True) -> Path:
    """The folder of the newest complete, undamaged checkpoint of a run.

    A damaged newest checkpoint is reported on stderr and the one before it used. Runs
    written before checkpoints were folders keep their files at the top level; that folder
    is returned for them.
    """
    run = Path(run_dir)
    if (run / CHECKPOINTS).exists() and not (run / CHECKPOINTS).is_dir():
        raise CheckpointError(f"{run / CHECKPOINTS} is a file, where lmforge keeps a run's checkpoints; move it away")
    problems = []
    for step, folder in _step_dirs(run / CHECKPOINTS):
        problem = verify_checkpoint(folder)
        if problem is None:
            if problems and warn and (str(folder), tuple(problems)) not in _warned:
                _warned.add((str(folder), tuple(problems)))  # once per process, however many readers ask
                print(f"lmforge: warning: skipped damaged checkpoint(s) of {run}: {'; '.join(problems)}; "
                      f"using step {step}", file=sys.stderr)
            return folder
        problems.append(f"step {step}: {problem}")
    if problems:
        raise CheckpointError(f"every checkpoint of {run} is damaged ({'; '.join(problems)}); train again with "
                              "--overwrite true (it replaces them)")
    if (run / CONFIG).is_file() and not (run / CONFIG).is_symlink():
        return run  # the layout of lmforge 0.1: three files at the top level
    if is_unstarted_run(run):
        raise CheckpointError(f"{run} has no checkpoint yet (training stopped before its first save); "
                              "start it again: the same command without --resume")
    raise CheckpointError(_not_a_run(run))


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The config of a run's newest checkpoint (or of a checkpoint folder itself)."""
    run = Path(run_dir)
    folder = run if (run / MANIFEST).is_file() else find_checkpoint(run)
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(_not_a_run(run))
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is damaged (not JSON); restore it or train again") from None
    if not isinstance(cfg, dict) or cfg.get("format") != "lmforge-run" or "model" not in cfg:
        raise CheckpointError(f"{path} is not an lmforge run config")
    if cfg.get("version", 0) > CONFIG_FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer lmforge (format {cfg['version']}); upgrade lmforge")
    cfg["checkpoint"] = str(folder)
    return cfg


def load_weights(path: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (``tensors=False``: the metadata alone, no tensor
    read); a damaged file is a CheckpointError, never a crash."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            values = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({str(e).splitlines()[0][:120]}); "
                              "restore it or train again") from None
    return values, meta


def check_state(model: GPT, tensors: dict[str, torch.Tensor], source: str,
                error: type[CheckpointError] = CheckpointError, trained_only: bool = False) -> None:
    """Strict: every key accounted for, every shape equal, the first mismatch named."""
    expected = model_state(model, trained_only)
    for k, v in expected.items():
        if k not in tensors:
            raise error(f"{source} lacks tensor {k!r}; it does not match this model config")
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise error(f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                        f"the model config needs {tuple(v.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise error(f"{source} has tensors this model lacks, e.g. {extra[0]!r}")
    for k in expected:  # weights relabelled as integers, or NaN from a damaged file, would load and compute garbage
        t = tensors[k]
        if not t.is_floating_point():
            raise error(f"{source}: tensor {k!r} is {str(t.dtype).removeprefix('torch.')}, not floating point; "
                        "the file is damaged or was not written for this model")
        if not all_finite(t):
            raise error(f"{source}: tensor {k!r} holds NaN or infinite values; the file is damaged (or was saved "
                        "from a run that diverged)")


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN and no infinity."""
    try:
        return bool(torch.isfinite(t).all())
    except (NotImplementedError, RuntimeError):  # float8 and other types isfinite has no kernel for
        return bool(torch.isfinite(t.float()).all())


def load_state_into(model: GPT, tensors: dict[str, torch.Tensor], source: str, trained_only: bool = False) -> None:
    """Copy checked tensors into an existing model (resuming a run; with ``trained_only``, the
    parameters that train, over a base model), whole or sharded by FSDP2 (each rank keeps its part)."""
    check_state(model, tensors, source, trained_only=trained_only)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in tensors:
                continue
            t = tensors[name]
            if hasattr(p, "device_mesh"):  # an FSDP2 shard (a DTensor): this rank's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
                p = p.to_local()
            p.copy_(t)


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


def restore_structure(model: GPT, cfg: dict) -> None:
    """Give a freshly built model the shape a fine-tuning run gave it: a classification head
    (``head``), LoRA layers (``lora``), and which parameters train (``trained``)."""
    from .lora import apply_lora_layers

    head = cfg.get("head")
    if head is not None:
        model.replace_head(len(head["labels"]))
    if cfg.get("lora"):
        apply_lora_layers(model, cfg["lora"])
    if "trained" in cfg:
        trained = set(cfg["trained"])
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)


def load_base(cfg: dict, source: Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The base model a fine-tuning run that saved only what it trained was tuned from, checked
    to be the same model (its parameter count and tokenizer)."""
    from .lora import merge_lora
    from .models import load_any

    base = cfg["base"]
    try:
        model, tok = load_any(base["spec"], device)
        merge_lora(model)  # a fine-tuned run as base: its adapters are part of what was tuned from
    except LmforgeError as e:
        raise CheckpointError(f"{source} holds only the fine-tuned weights; its base model {base['spec']!r} cannot "
                              f"be loaded ({e})") from None
    if model.num_params() != base.get("params") or tok.fingerprint != base.get("tokenizer") or (
            "digest" in base and weights_digest(model) != base["digest"]):
        raise CheckpointError(f"{base['spec']} is not the base model {source} was fine-tuned from (its weights or "
                              "tokenizer differ); restore that model there")
    return model, tok


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The model of a run's newest complete checkpoint (and its config dict), weights loaded strictly.
    A fine-tuning run that saved only what it trained is laid over its base model."""
    cfg = read_run_config(run_dir)
    folder = Path(cfg["checkpoint"])
    try:
        mcfg = ModelConfig.from_dict(cfg["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: {e}") from None
    tensors, meta = load_weights(folder / WEIGHTS)
    source = str(folder / WEIGHTS)
    if cfg.get("weights") == "trained":
        model, _ = load_base(cfg, folder, device)
        restore_structure(model, cfg)
        load_state_into(model, tensors, source, trained_only=True)
    elif cfg.get("head") or cfg.get("lora"):
        with torch.device("meta"):
            model = GPT(mcfg)
        restore_structure(model, cfg)
        check_state(model, tensors, source)
        model.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()},
                              strict=False, assign=True)
        if model.config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        model.eval()
    else:
        model = build_model(mcfg, tensors, source, device)
    cfg["step"] = int(meta.get("step", 0))
    return model.eval(), cfg


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Model and tokenizer of a run, checked to belong together (the run recorded its tokenizer)."""
    model, cfg = load_model(run_dir, device)
    tok = load_tokenizer(run_dir)
    want = (cfg.get("data") or {}).get("fingerprint") if isinstance(cfg.get("data"), dict) else None
    if want is not None and tok.fingerprint != want:
        raise CheckpointError(f"{Path(run_dir) / TOKENIZER} is not the tokenizer this run was trained with; "
                              "restore it (the run's data folder holds a copy)")
    return model, tok


def load_tokenizer(run_dir: str | os.PathLike) -> Tokenizer:
    run = Path(run_dir)
    if not (run / TOKENIZER).is_file():
        read_run_config(run)  # a clearer message when it is not a run at all
        raise CheckpointError(f"{run} has no {TOKENIZER}")
    return Tokenizer.load(run / TOKENIZER)


def load_trainer_state(folder: str | os.PathLike, weights_step: int) -> dict:
    """The trainer state of a checkpoint folder, read with ``weights_only=True`` (no code runs)."""
    path = Path(folder) / STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint holds weights only and cannot be resumed; "
                              "start without --resume")
    try:
        with warnings.catch_warnings():  # a file torch finds odd warns first; the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip / pickle
        raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}); "
                              "start the run again without --resume") from None
    if not isinstance(state, dict) or state.get("step") != weights_step:
        raise CheckpointError(f"{path} is for step {state.get('step') if isinstance(state, dict) else '?'} but the "
                              f"weights are for step {weights_step}; start again without --resume")
    return state
