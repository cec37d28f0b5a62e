"""Byte-level BPE vocabularies in Hugging Face's ``tokenizer.json`` format, and in GGUF metadata.

Both spell token bytes with GPT-2's printable stand-in characters and list merges; both
are turned into lmforge's ``Tokenizer`` (token bytes -> id ranks, one pre-tokenization
regex, special tokens). The pre-tokenizer configurations used by GPT-2, SmolLM2 (digits
split one by one, then GPT-2's regex), Llama 3 and Qwen (one Split regex) are translated to
a single equivalent regex; others are refused with their name. No torch import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import atomic
from .tokenizer import GPT2_PATTERN, Tokenizer, TokenizerError, bytes_to_unicode

# GPT-2's regex after HF's Digits(individual_digits=True) pre-split: a digit is always a piece
# of its own, and whitespace before a digit ends a piece as it would at the end of the text.
GPT2_DIGITS_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+""")


def _pattern_of(pre: dict | None) -> str:
    if pre is None:
        raise TokenizerError("tokenizer.json has no pre_tokenizer; only byte-level BPE tokenizers are supported")
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PATTERN
    if kind == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return GPT2_DIGITS_PATTERN
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex and steps[0].get("behavior") == "Isolated":
                return regex
        raise TokenizerError(f"pre-tokenizer sequence {kinds} is not supported")
    raise TokenizerError(f"pre-tokenizer {kind!r} is not supported; lmforge reads byte-level BPE tokenizers")


def from_vocab_and_merges(vocab: dict[str, int], merges: list, specials: dict[str, int], pattern: str,
                          name: str, source: str) -> Tokenizer:
    """Build a Tokenizer from byte-level token strings and merges (HF / GGUF layout)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if tok in specials:
            continue
        try:
            ranks[bytes(byte_of[c] for c in tok)] = i
        except KeyError:
            raise TokenizerError(f"{source}: token {tok!r} (id {i}) is not byte-level BPE and not a special token") from None
    # lmforge (like tiktoken) merges by the rank of the merged token, HF by the merge's position:
    # the two agree when merged tokens' ids grow with merge order, which BPE trainers produce.
    last = -1
    for n, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merged = vocab.get(a + b)
        if merged is None:
            raise TokenizerError(f"{source}: merge #{n} ({a!r}, {b!r}) produces a token missing from the vocabulary")
        if merged <= last:
            raise TokenizerError(f"{source}: merge #{n} produces id {merged} after id {last}; vocabularies whose ids do "
                                 "not follow merge order are not supported")
        last = merged
    return Tokenizer(ranks, specials, pattern, name)


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from an HF ``tokenizer.json`` (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {path} as a tokenizer.json ({e})") from None
    try:
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{path}: model type {model.get('type')!r} is not supported (byte-level BPE only)")
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        tok = from_vocab_and_merges(model["vocab"], model.get("merges", []), specials,
                                    _pattern_of(data.get("pre_tokenizer")), path.parent.name or "hf", str(path))
    except TokenizerError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        # A damaged or hand-edited file: missing fields, wrong types. One line, not a traceback.
        raise TokenizerError(f"{path} is not a valid tokenizer.json ({type(e).__name__}: {e}); "
                             "restore it from its source") from None
    _read_tokenizer_config(tok, path.parent)
    return tok


def _read_tokenizer_config(tok: Tokenizer, folder: Path) -> None:
    """The chat template and end token that ``transformers`` keeps beside tokenizer.json: in
    tokenizer_config.json (``chat_template``: a string, or a list of named ones, "default" first) or in
    chat_template.jinja (transformers' newer layout), and ``eos_token``. A chat model's answer ends at
    that token (``<|im_end|>`` for SmolLM2-Instruct), not at ``<|endoftext|>``."""
    config_path = folder / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {config_path} ({e}); restore it from its source") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path} is not a JSON object; restore it from its source")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():  # as in transformers, the file comes before the config's entry
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {jinja} ({e}); restore it from its source") from None
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_path}: chat_template is not text; restore it from its source")
    tok.chat_template = template or None
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos  # an AddedToken written out
    if isinstance(eos, str) and eos in tok.special_tokens:
        tok.eos_id = tok.special_tokens[eos]


def _recover_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    """The merge list implied by ranks: each multi-byte token splits into the two parts that BPE,
    restricted to lower ranks, ends with (minbpe's recover_merges)."""
    u = bytes_to_unicode()
    spell = lambda b: "".join(u[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in sorted(tok.ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(((tok.ranks.get(parts[i] + parts[i + 1], 1 << 62), i) for i in range(len(parts) - 1)))
            if best[0] >= rank:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} cannot be expressed as one merge; this vocabulary has no HF form")
        merges.append((spell(parts[0]), spell(parts[1])))
    return merges


def save_hf_tokenizer(tok: Tokenizer, folder: str | os.PathLike, model_max_length: int | None = None) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` that ``AutoTokenizer`` loads, with the
    tokenizer's chat template and end token, and the model's context as ``model_max_length``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    u = bytes_to_unicode()
    vocab = {"".join(u[b] for b in t): i for t, i in tok.ranks.items()}
    data = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in sorted(tok.special_tokens.items(),
                                                                                    key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in _recover_merges(tok)]},
    }
    atomic.write_json(folder / "tokenizer.json", data)
    names = {i: t for t, i in tok.special_tokens.items()}
    eot = names.get(tok.eot_id) if tok.eot_id is not None else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length or 1 << 30,
              "bos_token": eot, "eos_token": names.get(tok.eos_id, eot), "unk_token": None,
              "clean_up_tokenization_spaces": False}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    atomic.write_json(folder / "tokenizer_config.json", config)
    return folder / "tokenizer.json"
