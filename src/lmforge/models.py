"""One way to name a model: a known name, a run directory, a Hugging Face folder or a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import LmforgeError
from .model import GPT
from .tokenizer import Tokenizer


def load_any(spec: str, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Model and tokenizer from whatever ``spec`` names."""
    from . import hub

    path = Path(spec)
    if not path.exists() and spec in hub.REGISTRY:
        entry = hub.REGISTRY[spec]
        if entry.kind != "model":
            raise LmforgeError(f"{spec!r} is a data set, not a model")
        path = hub.fetch(spec)
        if path.suffix != ".gguf":
            path = path.parent
    if path.is_file() and path.suffix.lower() == ".gguf":  # (MODEL.GGUF as well)
        from .gguf_io import load_gguf

        return load_gguf(path, device)
    if path.is_dir():
        from .checkpoint import is_run_dir, load_run

        if is_run_dir(path):  # the newest complete checkpoint, a damaged one skipped
            return load_run(path, device)
    if path.is_dir() and (path / "config.json").is_file():
        try:
            cfg = json.loads((path / "config.json").read_text())
        except ValueError:
            raise LmforgeError(f"{path / 'config.json'} is not valid JSON") from None
        if not isinstance(cfg, dict):  # null, a list: once an internal error
            raise LmforgeError(f"{path / 'config.json'} is not a JSON object (a model's settings); restore it from "
                               "the model's source")
        if "model_type" in cfg:
            from .convert import load_hf
            from .hf_tokenizer import load_hf_tokenizer

            if not (path / "tokenizer.json").is_file():
                raise LmforgeError(f"{path} has no tokenizer.json (lmforge reads fast, byte-level BPE tokenizers)")
            return load_hf(path, device), load_hf_tokenizer(path)
    if path.exists():
        raise LmforgeError(f"{spec} is not a model: expected a run directory, a Hugging Face folder (config.json + "
                           "*.safetensors) or a .gguf file")
    raise _unknown(spec)


def _unknown(spec: str) -> LmforgeError:
    from .hub import REGISTRY

    known = ", ".join(n for n, e in REGISTRY.items() if e.kind == "model")
    return LmforgeError(f"no model named {spec!r}: not a path, and not a known model ({known})")


def check_language_models(specs: list[str]) -> None:
    """What can be told of ``specs`` without loading them, before a long job loads the first: each
    names a path or a known model, none twice, and no run directory among them is a classifier."""
    from . import hub
    from .checkpoint import is_run_dir, read_run_config

    seen: dict[str, str] = {}
    for spec in specs:
        path = Path(spec)
        if not path.exists() and spec not in hub.REGISTRY:
            raise _unknown(spec)
        if not path.exists() and hub.REGISTRY[spec].kind != "model":
            raise LmforgeError(f"{spec!r} is a data set, not a model")
        key = str(path.resolve()) if path.exists() else spec
        if key in seen:
            raise LmforgeError(f"{spec} is the model {seen[key]} again; give each model once")
        seen[key] = spec
        if path.is_dir() and is_run_dir(path) and read_run_config(path).get("head"):
            raise LmforgeError(f"{spec} is a classifier, not a language model; leave it out")


def load_language_model(spec: str, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """A model that predicts tokens, for generating, scoring and exporting: LoRA adapters are
    folded into the weights (exact, and faster to run); a classifier is refused."""
    from .lora import merge_lora

    model, tok = load_any(spec, device)
    if model.lm_head.out_features != model.config.vocab_size:
        raise LmforgeError(f"{spec} is a classifier ({model.lm_head.out_features} classes), not a language model; "
                           f"label texts with: lmforge classify {spec} TEXT")
    merge_lora(model)
    return model, tok
