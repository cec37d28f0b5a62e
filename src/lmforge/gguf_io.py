"""GGUF files (llama.cpp's format) in and out, through the ``gguf`` package.

Reading: metadata -> ModelConfig, tensors dequantized to fp32 (F32, F16, BF16, Q8_0,
Q4_0, Q4_1 and the K-quants ``gguf`` can dequantize), llama.cpp names mapped to HF
Llama names, and the rotary row permutation of Q and K undone (llama.cpp stores their
rows interleaved for its rotary kernel; HF and lmforge use the "rotate half" layout).
The vocabulary, merges, special tokens and chat template come from the metadata.

Writing: an F32 or F16 GGUF of a Llama-family model, tokenizer included.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .config import GGUF_EXPORT_TYPES, ModelConfig, malformed
from .convert import ConvertError, build_model, from_hf_state, to_hf_state
from .model import GPT
from .outputs import remove_dead_temps, write_error
from .tokenizer import GPT2_PATTERN, Tokenizer, TokenizerError

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
EXPORT_MARK = "lmforge.export_version"  # metadata key that marks files lmforge wrote

NAMES = {  # llama.cpp name -> HF Llama name ({i} = layer)
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _permute_back(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of Q / K rows (one head's rows: pairs -> halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _open(path: str | os.PathLike):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"no GGUF file at {path}")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors / numpy errors on bad files
        raise ConvertError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:100]})") from None


def _f32(x) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.9999997e-06; recover the written decimal."""
    return float(f"{float(x):.7g}")


def gguf_config(reader) -> ModelConfig:
    with malformed(lambda e: ConvertError(f"this GGUF file's model metadata is missing or malformed "
                                          f"({type(e).__name__}: {str(e)[:100]})")):
        return _gguf_config(reader)  # a missing count (None), 0 heads, a text for a number


def _gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConvertError(f"GGUF architecture {arch!r} is not supported; lmforge reads llama-architecture GGUF files")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    p = "llama."
    n_head = int(_field(reader, p + "attention.head_count"))
    d = int(_field(reader, p + "embedding_length"))
    if int(_field(reader, p + "rope.dimension_count", d // n_head)) != d // n_head:
        raise ConvertError("partial rotary embeddings (rope.dimension_count < head size) are not supported")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig(vocab_size=int(_field(reader, p + "vocab_size", len(tokens))),
                       context_length=int(_field(reader, p + "context_length")), d_model=d,
                       n_layer=int(_field(reader, p + "block_count")), n_head=n_head,
                       n_kv_head=int(_field(reader, p + "attention.head_count_kv", n_head)),
                       d_ff=int(_field(reader, p + "feed_forward_length")), bias=False, qkv_bias=False,
                       norm="rmsnorm", mlp="swiglu", positions="rope",
                       rope_theta=_f32(_field(reader, p + "rope.freq_base", 10000.0)),
                       norm_eps=_f32(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
                       tie_embeddings=not has_output)


def gguf_tokenizer(reader, source: str = "gguf") -> Tokenizer:
    with malformed(lambda e: TokenizerError(f"{source}: the tokenizer metadata is missing or malformed "
                                            f"({type(e).__name__}: {str(e)[:100]})"), (TypeError, ValueError)):
        return _gguf_tokenizer(reader, source)  # no token list, a count that is not a number


def _gguf_tokenizer(reader, source: str) -> Tokenizer:
    from .hf_tokenizer import GPT2_DIGITS_PATTERN, from_vocab_and_merges

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"{source}: tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' only)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    patterns = {"default": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "smollm": GPT2_DIGITS_PATTERN,
                "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN}
    if pre not in patterns:
        raise TokenizerError(f"{source}: pre-tokenizer {pre!r} is not supported (known: {', '.join(patterns)})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    merges = list(_field(reader, "tokenizer.ggml.merges", []))
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
    tok = from_vocab_and_merges({t: i for i, t in enumerate(tokens)}, merges, specials, patterns[pre],
                                Path(source).stem, source)
    tok.chat_template = _field(reader, "tokenizer.chat_template")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is not None:
        tok.eos_id = int(eos)
    return tok


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """Model and tokenizer from a GGUF file; quantized tensors are dequantized to fp32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = _open(path)
    config = gguf_config(reader)
    hf: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = t.name
        layer = None
        if name.startswith("blk."):
            layer = name.split(".")[1]
            name = name.replace(f"blk.{layer}.", "blk.{i}.", 1)
        target = NAMES.get(name)
        if target is None:
            if name in ("rope_freqs.weight",):
                raise ConvertError(f"{path}: {t.name} (rope scaling) is not supported")
            raise ConvertError(f"{path}: unexpected tensor {t.name!r}")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConvertError(f"{path}: tensor {t.name} uses quantization type "
                               f"{GGMLQuantizationType(t.tensor_type).name}, which gguf cannot dequantize") from None
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dimensions innermost first
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        w = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).reshape(shape)  # F32 data is a read-only mmap
        if name == "blk.{i}.attn_q.weight":
            w = _permute_back(w, config.n_head)
        elif name == "blk.{i}.attn_k.weight":
            w = _permute_back(w, config.kv_heads)
        hf[target.format(i=layer)] = w
    model = build_model(config, from_hf_state(hf, config), str(path), device, dtype)
    return model, gguf_tokenizer(reader, str(path))


def export_gguf(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write a Llama-family model (and its tokenizer) as a GGUF file: matrices in ``dtype``
    (f32, f16, bf16 or one of llama.cpp's block quantizations), norms in f32."""
    import gguf

    from .convert import family

    config = model.config
    if family(config) != "llama":
        raise ConvertError("GGUF export supports Llama-family models (rmsnorm, swiglu, rope); export GPT-2-style "
                           "runs with --to hf")
    if config.bias or config.qkv_bias:
        raise ConvertError("GGUF export supports Llama models without biases")
    if dtype not in GGUF_EXPORT_TYPES:
        raise ConvertError(f"GGUF export dtype must be one of {', '.join(GGUF_EXPORT_TYPES)}, got {dtype!r}")
    qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for width in {config.d_model, config.ff_dim}:
        if width % block:
            raise ConvertError(f"{dtype} stores rows in blocks of {block} values, but this model has rows of {width}; "
                               "use f16 or f32")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(out)  # what an export killed outright left (hundreds of MB)
        _write_gguf(gguf, model, tokenizer, tmp, out.stem, dtype, qtype)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(out, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file must not stay behind (it may fill a full disk)
        raise
    return out


def is_gguf_export(path: Path) -> bool:
    """A GGUF file an earlier ``export_gguf`` wrote (its metadata carries lmforge's mark)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        return EXPORT_MARK in GGUFReader(str(path)).fields
    except Exception:  # unreadable or damaged: not recognisably ours
        return False


def _write_gguf(gguf, model: GPT, tokenizer: Tokenizer, tmp: Path, name: str, dtype: str, qtype) -> None:
    from .tokenizer import bytes_to_unicode

    config = model.config
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_uint32(EXPORT_MARK, 1)
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.ff_dim)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_dimension_count(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else getattr(gguf.LlamaFileType,
                                                                               f"MOSTLY_{dtype.upper()}"))
    from .hf_tokenizer import GPT2_DIGITS_PATTERN, _recover_merges

    u = bytes_to_unicode()
    tokens, types = [], []
    specials = {i: s for s, i in tokenizer.special_tokens.items()}
    for i in range(config.vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(TOKEN_CONTROL)
        elif (b := tokenizer._decoder.get(i)) is not None:
            tokens.append("".join(u[x] for x in b))
            types.append(TOKEN_NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    pre = {GPT2_PATTERN: "gpt2", GPT2_DIGITS_PATTERN: "smollm", LLAMA3_PATTERN: "llama-bpe"}.get(tokenizer.pattern)
    if pre is None:
        raise ConvertError("the tokenizer's pre-tokenization regex has no GGUF name (gpt2, smollm or llama-bpe)")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in _recover_merges(tokenizer)])
    if tokenizer.eot_id is not None:
        w.add_eos_token_id(tokenizer.eot_id)
        w.add_bos_token_id(tokenizer.eot_id)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
    inverse = {v: k for k, v in NAMES.items()}
    from gguf.quants import quantize
    for name, t in to_hf_state({k: v.detach().float() for k, v in model.state_dict().items()
                                if not (k == "lm_head.weight" and config.tie_embeddings)}, config).items():
        layer = None
        key = name
        if name.startswith("model.layers."):
            layer = name.split(".")[2]
            key = name.replace(f"model.layers.{layer}.", "model.layers.{i}.", 1)
        gname = inverse[key].format(i=layer)
        if key.endswith("q_proj.weight"):
            t = _permute(t, config.n_head)
        elif key.endswith("k_proj.weight"):
            t = _permute(t, config.kv_heads)
        arr = t.numpy().astype(np.float32)
        if t.dim() == 1 or dtype == "f32":  # norms stay f32, as llama.cpp keeps them
            w.add_tensor(gname, arr)
        elif dtype == "f16":
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
