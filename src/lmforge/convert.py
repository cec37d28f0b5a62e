"""Weights in and out: key tables between lmforge and Hugging Face GPT-2 / Llama checkpoints.

A conversion is a key map, a list of tensors to transpose (GPT-2's Conv1D layers store
weights as (in, out)) and, for Llama, the separate q/k/v projections joined into
lmforge's fused QKV. Loading is strict: every tensor of the file is used or knowingly
skipped, every parameter of the model is filled, every shape checked.

The model is built on the meta device and the tensors are assigned into it, so loading
needs about one model's worth of memory, not two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import atomic, checkpoint
from .checkpoint import CheckpointError, load_weights, model_state
from .config import ConfigError, ModelConfig, malformed
from .model import GPT

GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_SKIP = ("attn.bias", "attn.masked_bias")  # causal-mask buffers of old checkpoints, not weights


class ConvertError(CheckpointError):
    """A checkpoint that cannot be converted."""


# --------------------------------------------------------------------------- configs
def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (GPT-2 or Llama family)."""
    kind = hf.get("model_type")
    damaged = (lambda e: ConvertError(f"config.json of this {kind} model has a value of the wrong type or range ({e}); "
                                      "it is damaged or hand-edited"))
    with malformed(damaged):  # "400" for 400, null, 0 heads, "abc" for a number
        try:
            if kind == "gpt2":
                return ModelConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"],
                                   d_model=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                                   d_ff=hf.get("n_inner"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                                   tie_embeddings=hf.get("tie_word_embeddings", True))
            if kind in ("llama", "mistral", "qwen2"):
                if hf.get("rope_scaling"):
                    raise ConvertError(f"rope_scaling {hf['rope_scaling']} is not supported yet; "
                                       "only plain RoPE models load")
                d, nh = hf["hidden_size"], hf["num_attention_heads"]
                if hf.get("head_dim") not in (None, d // nh):
                    raise ConvertError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                                       "is not supported")
                attn_bias = hf.get("attention_bias", kind == "qwen2")
                return ModelConfig(vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], d_model=d,
                                   n_layer=hf["num_hidden_layers"], n_head=nh,
                                   n_kv_head=hf.get("num_key_value_heads") or nh, d_ff=hf["intermediate_size"],
                                   bias=bool(hf.get("mlp_bias", False)), qkv_bias=bool(attn_bias),
                                   norm="rmsnorm", mlp="swiglu", positions="rope",
                                   rope_theta=float(hf.get("rope_theta", 10000.0)),
                                   norm_eps=hf.get("rms_norm_eps", 1e-6),
                                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise ConvertError(f"config.json lacks {e.args[0]!r}, which a {kind} config must have") from None
        except ConfigError as e:
            raise damaged(e) from None
    raise ConvertError(f"model_type {kind!r} is not supported; lmforge reads gpt2 and llama-family checkpoints")


def family(config: ModelConfig) -> str:
    recipe = [name for name, on in (("qk_norm", config.qk_norm), ("mlp='relu2'", config.mlp == "relu2"),
                                    ("logit_softcap", config.logit_softcap is not None)) if on]
    if recipe:
        raise ConvertError(f"this model uses {', '.join(recipe)}, which neither Hugging Face's GPT-2/Llama "
                           "nor GGUF can express; it stays an lmforge run directory")
    gpt2_like = config.norm == "layernorm" and config.mlp == "gelu" and config.positions == "learned"
    llama_like = config.norm == "rmsnorm" and config.mlp == "swiglu" and config.positions == "rope"
    if gpt2_like:
        return "gpt2"
    if llama_like:
        return "llama"
    raise ConvertError("this model mixes GPT-2 and Llama components; no Hugging Face architecture matches it")


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    if family(config) == "gpt2":
        if not (config.bias and config.qkv_bias):
            raise ConvertError("HF GPT-2 always has biases; export a model trained with bias and qkv_bias")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
                "n_positions": config.context_length, "n_ctx": config.context_length, "n_embd": config.d_model,
                "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
                "tie_word_embeddings": config.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "torch_dtype": "float32"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "max_position_embeddings": config.context_length, "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads, "intermediate_size": config.ff_dim,
            "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "hidden_act": "silu",
            "attention_bias": config.qkv_bias, "mlp_bias": config.bias, "tie_word_embeddings": config.tie_embeddings,
            "torch_dtype": "float32"}


# --------------------------------------------------------------------------- tensors
def from_hf_state(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor names and layouts -> lmforge's."""
    out: dict[str, torch.Tensor] = {}
    if family(config) == "gpt2":
        for key, t in tensors.items():
            name = key.removeprefix("transformer.")
            skip = name.startswith("h.") and name.split(".", 2)[2] in GPT2_SKIP
            if skip or (name == "lm_head.weight" and config.tie_embeddings):
                continue
            out[name] = t.t() if name.endswith(GPT2_CONV1D) else t
        return out
    for key, t in tensors.items():
        name = key.removeprefix("model.")
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            prefix = f"h.{i}."
            if rest.startswith("self_attn.") and rest[len("self_attn."):len("self_attn.") + 6] in ("q_proj", "k_proj", "v_proj"):
                if not (i.isdigit() and int(i) < config.n_layer):  # the join below covers the declared layers only
                    raise ConvertError(f"tensor {key!r} belongs to no layer of the {config.n_layer} the config "
                                       "declares")
                continue  # joined below
            mapped = {"input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
                      "self_attn.o_proj.weight": "attn.c_proj.weight", "self_attn.o_proj.bias": "attn.c_proj.bias",
                      "mlp.gate_proj.weight": "mlp.c_gate.weight", "mlp.up_proj.weight": "mlp.c_fc.weight",
                      "mlp.down_proj.weight": "mlp.c_proj.weight", "mlp.gate_proj.bias": "mlp.c_gate.bias",
                      "mlp.up_proj.bias": "mlp.c_fc.bias", "mlp.down_proj.bias": "mlp.c_proj.bias"}.get(rest)
            if mapped is None:
                raise ConvertError(f"unexpected tensor {key!r} in a Llama checkpoint")
            out[prefix + mapped] = t
        else:
            mapped = {"embed_tokens.weight": "wte.weight", "norm.weight": "ln_f.weight",
                      "lm_head.weight": "lm_head.weight"}.get(name)
            if mapped is None:
                raise ConvertError(f"unexpected tensor {key!r} in a Llama checkpoint")
            out[mapped] = t
    for i in range(config.n_layer):
        p = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            parts = [tensors.get(f"{p}{n}_proj.{kind}") for n in "qkv"]
            if all(x is not None for x in parts):
                out[f"h.{i}.attn.c_attn.{kind}"] = torch.cat(parts, dim=0)
            elif any(x is not None for x in parts) or kind == "weight":
                raise ConvertError(f"layer {i} lacks some of q_proj/k_proj/v_proj.{kind}")
    return out


def to_hf_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge tensor names and layouts -> HF's."""
    out: dict[str, torch.Tensor] = {}
    if family(config) == "gpt2":
        for name, t in state.items():
            out["transformer." + name if name != "lm_head.weight" else name] = (
                t.t().contiguous() if name.endswith(GPT2_CONV1D) else t)
        return out
    q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    rename = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
              "attn.c_proj.weight": "self_attn.o_proj.weight", "attn.c_proj.bias": "self_attn.o_proj.bias",
              "mlp.c_gate.weight": "mlp.gate_proj.weight", "mlp.c_fc.weight": "mlp.up_proj.weight",
              "mlp.c_proj.weight": "mlp.down_proj.weight", "mlp.c_gate.bias": "mlp.gate_proj.bias",
              "mlp.c_fc.bias": "mlp.up_proj.bias", "mlp.c_proj.bias": "mlp.down_proj.bias"}
    for name, t in state.items():
        if name.startswith("h."):
            _, i, rest = name.split(".", 2)
            p = f"model.layers.{i}."
            if rest.startswith("attn.c_attn."):
                kind = rest.rsplit(".", 1)[1]
                for n, part in zip("qkv", t.split([q, kv, kv], dim=0)):
                    out[f"{p}self_attn.{n}_proj.{kind}"] = part.contiguous()
            else:
                out[p + rename[rest]] = t
        else:
            out[{"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}[name]] = t
    return out


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], source: str,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    return checkpoint.build_model(config, state, source, device, dtype, error=ConvertError)


# --------------------------------------------------------------------------- files
def load_hf(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """A model from an HF folder (config.json + model.safetensors, or sharded safetensors)."""
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except ValueError:
        raise ConvertError(f"{cfg_path} is not valid JSON") from None
    if not isinstance(hf_cfg, dict):
        raise ConvertError(f"{cfg_path} is not a JSON object (a model's settings); restore it from the model's source")
    config = from_hf_config(hf_cfg)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        hint = f" ({bins[0].name} is a pickle, which lmforge never loads from files it did not write)" if bins else ""
        raise ConvertError(f"{folder} has no .safetensors weights{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_weights(f)[0])
    return build_model(config, from_hf_state(tensors, config), str(folder), device, dtype)


# What an export writes; config.json carries EXPORT_MARK so a later export recognises the folder as its own.
HF_EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json")
HF_OVERRIDING_FILES = ("chat_template.jinja", "special_tokens_map.json", "added_tokens.json")
EXPORT_MARK = "lmforge_export"


def is_hf_export(folder: Path) -> bool:
    """A folder an earlier ``export_hf`` wrote (its config.json carries lmforge's mark)."""
    from .outputs import read_json_head

    cfg = read_json_head(folder / "config.json")
    return cfg is not None and EXPORT_MARK in cfg


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """bos / eos ids for the HF configs: the tokenizer's own (GPT-2 style: <|endoftext|> starts and
    ends a document), never GPT-2's 50256 by default, which lies outside a smaller vocabulary."""
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None}
    return {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eos_id}


def export_hf(model: GPT, out: str | os.PathLike, tokenizer=None) -> Path:
    """Write config.json + generation_config.json + model.safetensors (+ tokenizer files) that
    ``transformers`` loads. All files are written first and moved into ``out`` together, so a
    failure (a full disk) leaves an earlier export there as it was."""
    from safetensors.torch import save

    from .outputs import staged_folder, write_error

    folder = Path(out)
    config = model.config
    state = to_hf_state(model_state(model), config)
    ids = special_token_ids(tokenizer)
    hf_config = {**to_hf_config(config), **ids, EXPORT_MARK: {"version": 1}}
    try:
        # A chat_template.jinja comes before tokenizer_config.json's template, and a special-token
        # map or added-tokens file before tokenizer.json's: stale ones would change what is exported
        with staged_folder(folder, replaces=HF_OVERRIDING_FILES) as stage:
            atomic.write_file(stage / "model.safetensors", save({k: v.contiguous() for k, v in state.items()},
                                                                 metadata={"format": "pt"}))
            atomic.write_file(stage / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
            atomic.write_file(stage / "generation_config.json", (json.dumps(ids, indent=2) + "\n").encode())
            if tokenizer is not None:
                from .hf_tokenizer import save_hf_tokenizer

                save_hf_tokenizer(tokenizer, stage, model_max_length=config.context_length)
    except OSError as e:
        raise write_error(folder, e) from None
    return folder
