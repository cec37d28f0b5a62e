"""A table of bad inputs across every command: each gets one line on stderr, exit code 2, no
traceback, the error it should get (not some other one), and no file changes anywhere in
the test's folder. File-system failures (a full disk, a read-only folder) are in the table
too, through monkeypatched writes, and must leave no temporary files behind."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import TEXT

from lmforge.cli import main

TINY_LLAMA = ["--preset", "llama-micro", "--model.context_length", "32", "--train.batch_size", "4",
              "--train.max_steps", "2", "--train.eval_batches", "1", "--train.dtype", "float32", "--prompts", "[]"]


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """Good artefacts made once (tokenizer, shards, a tiny trained run, its exports) and bad ones beside them."""
    import torch

    from lmforge.config import ModelConfig
    from lmforge.convert import export_hf
    from lmforge.gguf_io import export_gguf
    from lmforge.model import GPT
    from lmforge.models import load_any
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("bad")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i}. " + TEXT * (3 + i % 4), encoding="utf-8")
    ok = lambda args: main(args) == 0  # noqa: E731
    assert ok(["tokenizer", "train", "--data", str(corpus), "--out", str(root / "tok.json"),
               "--tokenizer.vocab_size", "300"])
    assert ok(["prepare", "--data", str(corpus), "--tokenizer", str(root / "tok.json"), "--out", str(root / "data")])
    assert ok(["pretrain", "--data", str(root / "data"), "--out", str(root / "run"), *TINY_LLAMA])
    assert ok(["export", str(root / "run"), "--to", "hf", "--out", str(root / "hf")])
    assert ok(["export", str(root / "run"), "--to", "gguf", "--out", str(root / "m.gguf"), "--dtype", "f32"])
    model, tok = load_any(str(root / "run"))
    tok.chat_template = "{{ [].append(1) }}"  # the Jinja sandbox stops this: SecurityError
    export_gguf(model, tok, root / "chat.gguf", "f32")
    torch.manual_seed(0)
    export_hf(GPT(ModelConfig.from_preset("gpt-nano", vocab_size=tok.vocab_size, context_length=32)),
              root / "hf-gpt", tok)

    b = root / "bad"
    b.mkdir()
    (b / "empty.txt").write_text("")
    (b / "blob.txt").write_bytes(bytes(range(256)) * 4)
    (b / "latin.txt").write_bytes("café au lait ".encode("latin-1") * 50)
    (b / "one.txt").write_text("a")
    (b / "short.txt").write_text("just a few words")
    (b / "notes.txt").write_text("my own notes, not a tokenizer\n")
    (b / "foreign.json").write_text('{"name": "something else"}\n')
    (b / "damaged-tok.json").write_text('{"format": "lmforge-bpe", "tokens": [')
    (b / "emptydir").mkdir()
    (b / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (b / "nofield.jsonl").write_text('{"body": "no text field"}\n')
    (b / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    (b / "foreign-hf").mkdir()
    (b / "foreign-hf" / "config.json").write_text('{"a": 1}\n')
    (b / "pickle-hf").mkdir()
    (b / "pickle-hf" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_positions": 8,
                                                             "n_embd": 8, "n_layer": 1, "n_head": 1}))
    (b / "pickle-hf" / "pytorch_model.bin").write_bytes(b"not really")
    shutil.copy(root / "hf" / "tokenizer.json", b / "pickle-hf" / "tokenizer.json")
    (b / "tok-hf").mkdir()
    (b / "tok-hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copy(root / "hf" / "tokenizer.json", b / "tok-hf" / "tokenizer.json")
    shutil.copytree(root / "hf", b / "damaged-hf")
    weights = (b / "damaged-hf" / "model.safetensors").read_bytes()
    (b / "damaged-hf" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(root / "hf", b / "notok-hf")
    (b / "notok-hf" / "tokenizer.json").unlink()
    index = json.loads((root / "data" / "index.json").read_text())
    for name, change in (("dtype", {"dtype": "float128"}), ("tokens", {"tokens": {"train": "many"}}),
                         ("fingerprint", {"tokenizer_fingerprint": None})):
        shutil.copytree(root / "data", b / f"data-{name}")
        (b / f"data-{name}" / "index.json").write_text(json.dumps({**index, **change}))
    shutil.copytree(root / "data", b / "data-notjson")
    (b / "data-notjson" / "index.json").write_text("{")
    shutil.copytree(root / "data", b / "data-trunc")
    with open(b / "data-trunc" / "train.bin", "r+b") as f:
        f.truncate(10)
    other = Tokenizer.train([TEXT * 20], _tok_config(280))
    other.save(b / "other-tok.json")
    assert ok(["prepare", "--data", str(corpus), "--tokenizer", str(b / "other-tok.json"), "--out",
               str(b / "data-other")])
    assert ok(["prepare", "--data", str(b / "short.txt"), "--tokenizer", str(root / "tok.json"), "--out",
               str(b / "data-short")])
    c = root / "configs"
    c.mkdir()
    (c / "list.yaml").write_text("- a\n- b\n")
    (c / "syntax.yaml").write_text("data: [unclosed\n")
    (c / "unknown.yaml").write_text(f"data: {root / 'data'}\nout: {root / 'new-run'}\nlearning_rate: 3\n")
    (c / "type.yaml").write_text(f"data: {root / 'data'}\nout: {root / 'new-run'}\ntrain:\n  max_steps: many\n")
    (c / "model.yaml").write_text(f"data: {root / 'data'}\nout: {root / 'new-run'}\nmodel:\n  d_model: 32\n")
    (c / "binary.yaml").write_bytes(bytes(range(256)))
    (c / "prepare-self.yaml").write_text(f"data: [{corpus}]\ntokenizer: {root / 'tok.json'}\nout: {corpus}\n")
    (c / "dir.yaml").mkdir()
    return root


def _tok_config(vocab: int):
    from lmforge.config import TokenizerConfig

    return TokenizerConfig(vocab_size=vocab)


# --------------------------------------------------------------------------- file-system faults
class _FullDisk:
    """A file opened for writing that fails with ENOSPC on its first write (the file exists, empty)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _writing(mode) -> bool:
    return isinstance(mode, str) and any(c in mode for c in "wax+")


def full_disk(monkeypatch) -> None:
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f) if _writing(mode) else f

    monkeypatch.setattr(builtins, "open", fake_open)


def read_only(monkeypatch) -> None:
    """A read-only file system: opening for writing and making folders fail with EROFS."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        if _writing(mode):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


FAULTS = {"full_disk": full_disk, "read_only": read_only}

# --------------------------------------------------------------------------- the table
# (id, argv with {root}/{bad}/{cfg} placeholders, words the error must contain, fault)
R, B, C = "{root}", "{root}/bad", "{root}/configs"
CASES = [
    # unknown commands and flags
    ("unknown-command", ["talk"], "unknown command 'talk'; known commands: run, tokenizer", None),
    ("typo-command", ["pretrian", "--data", "x"], "unknown command 'pretrian'", None),
    ("unknown-flag", ["--bogus"], "unrecognized arguments: --bogus", None),
    ("tokenizer-no-action", ["tokenizer"], "give one of train, encode, decode", None),
    ("tokenizer-bad-action", ["tokenizer", "chat"], "invalid choice: 'chat'", None),
    ("download-unknown", ["download", "nope"], "unknown name 'nope'", None),
    ("download-two-names", ["download", "a", "b"], "unrecognized arguments", None),
    # tokenizer train
    ("tt-missing-args", ["tokenizer", "train"], "required", None),
    ("tt-into-shards", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/data/tokenizer.json"],
     "prepared data folder", None),
    ("tt-into-shards-overwrite", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/data/tokenizer.json",
                                  "--overwrite", "true"], "prepared data folder", None),
    ("tt-missing-file", ["tokenizer", "train", "--data", f"{B}/nope.txt", "--out", f"{R}/t.json"], "no such file", None),
    ("tt-empty-file", ["tokenizer", "train", "--data", f"{B}/empty.txt", "--out", f"{R}/t.json"], "is empty", None),
    ("tt-binary", ["tokenizer", "train", "--data", f"{B}/blob.txt", "--out", f"{R}/t.json"], "looks binary", None),
    ("tt-latin1", ["tokenizer", "train", "--data", f"{B}/latin.txt", "--out", f"{R}/t.json"], "not valid UTF-8", None),
    ("tt-empty-dir", ["tokenizer", "train", "--data", f"{B}/emptydir", "--out", f"{R}/t.json"], "holds no .txt", None),
    ("tt-bad-jsonl", ["tokenizer", "train", "--data", f"{B}/bad.jsonl", "--out", f"{R}/t.json"], "not valid JSON",
     None),
    ("tt-jsonl-no-field", ["tokenizer", "train", "--data", f"{B}/nofield.jsonl", "--out", f"{R}/t.json"],
     "--text.text_field", None),
    ("tt-vocab-small", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/t.json",
                        "--tokenizer.vocab_size", "100"], "at least 256", None),
    ("tt-vocab-word", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/t.json",
                       "--tokenizer.vocab_size", "many"], "tokenizer.vocab_size", None),
    ("tt-dup-specials", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/t.json",
                         "--tokenizer.special_tokens", "[a,a]"], "duplicates", None),
    ("tt-val-fraction", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/t.json",
                         "--text.val_fraction", "1.5"], "val_fraction", None),
    ("tt-errors-mode", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/t.json",
                        "--text.errors", "ignore"], "text.errors", None),
    ("tt-workers", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/t.json",
                    "--text.workers", "-1"], "workers", None),
    ("tt-out-is-input", ["tokenizer", "train", "--data", f"{B}/notes.txt", f"{R}/corpus/doc00.txt", "--out",
                         f"{B}/notes.txt"], "is also an input", None),
    ("tt-out-is-input-overwrite", ["tokenizer", "train", "--data", f"{B}/notes.txt", "--out", f"{B}/notes.txt",
                                   "--overwrite", "true"], "is also an input", None),
    ("tt-out-in-input-dir", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/corpus/tok.json"],
     "inside the input folder", None),
    ("tt-out-input-dir", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/corpus"],
     "inside the input folder", None),
    ("tt-out-foreign", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{B}/foreign.json"],
     "not an lmforge tokenizer file", None),
    ("tt-out-foreign-text", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{B}/notes.txt"],
     "--overwrite", None),
    ("tt-out-in-run", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/run/tokenizer.json"],
     "training run directory", None),
    ("tt-out-run-dir", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/run", "--overwrite", "true"],
     "training run directory", None),
    ("tt-out-under-file", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{B}/notes.txt/t.json"],
     "is a file, so nothing can be created inside it", None),
    ("tt-full-disk-new", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/t.json",
                          "--tokenizer.vocab_size", "300"], "No space left on device", "full_disk"),
    ("tt-full-disk-replace", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/tok.json",
                              "--tokenizer.vocab_size", "290"], "the disk is full", "full_disk"),
    ("tt-read-only", ["tokenizer", "train", "--data", f"{R}/corpus", "--out", f"{R}/new/t.json",
                      "--tokenizer.vocab_size", "300"], "read-only", "read_only"),
    # tokenizer encode / decode
    ("enc-missing", ["tokenizer", "encode", "--tokenizer", f"{B}/nope.json", "--text", "hi"], "no tokenizer file", None),
    ("enc-text-file", ["tokenizer", "encode", "--tokenizer", f"{B}/notes.txt", "--text", "hi"],
     "is not a tokenizer file", None),
    ("enc-foreign-json", ["tokenizer", "encode", "--tokenizer", f"{B}/foreign.json", "--text", "hi"],
     "not an lmforge tokenizer file", None),
    ("enc-damaged", ["tokenizer", "encode", "--tokenizer", f"{B}/damaged-tok.json", "--text", "hi"],
     "tokenizer file", None),
    ("enc-binary", ["tokenizer", "encode", "--tokenizer", f"{B}/blob.txt", "--text", "hi"], "not UTF-8", None),
    ("enc-empty-dir", ["tokenizer", "encode", "--tokenizer", f"{B}/emptydir", "--text", "hi"], "no tokenizer file",
     None),
    ("dec-not-int", ["tokenizer", "decode", "--tokenizer", f"{R}/tok.json", "--ids", "1 x"], "must be integers", None),
    ("dec-float", ["tokenizer", "decode", "--tokenizer", f"{R}/tok.json", "--ids", "1.5"], "must be integers", None),
    ("dec-empty-item", ["tokenizer", "decode", "--tokenizer", f"{R}/tok.json", "--ids", "1,,2"],
     "empty item between commas", None),  # once decoded as "1,2"
    ("dec-out-of-range", ["tokenizer", "decode", "--tokenizer", f"{R}/tok.json", "--ids", "99999"],
     "outside this tokenizer's vocabulary", None),
    ("dec-negative", ["tokenizer", "decode", "--tokenizer", f"{R}/tok.json", "--ids", "-1"], "-1", None),
    ("dec-missing-tok", ["tokenizer", "decode", "--tokenizer", f"{B}/nope.json", "--ids", "1"], "no tokenizer file",
     None),
    # prepare
    ("prep-missing-args", ["prepare", "--data", f"{R}/corpus"], "required", None),
    ("prep-missing-data", ["prepare", "--data", f"{B}/nope.txt", "--tokenizer", f"{R}/tok.json", "--out", f"{R}/d2"],
     "no such file", None),
    ("prep-empty", ["prepare", "--data", f"{B}/empty.txt", "--tokenizer", f"{R}/tok.json", "--out", f"{R}/d2"],
     "is empty", None),
    ("prep-binary", ["prepare", "--data", f"{B}/blob.txt", "--tokenizer", f"{R}/tok.json", "--out", f"{R}/d2"],
     "looks binary", None),
    ("prep-latin1", ["prepare", "--data", f"{B}/latin.txt", "--tokenizer", f"{R}/tok.json", "--out", f"{R}/d2"],
     "--text.errors replace", None),
    ("prep-bad-tokenizer", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{B}/foreign.json", "--out",
                            f"{R}/d2"], "not an lmforge tokenizer", None),
    ("prep-missing-tokenizer", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{B}/nope.json", "--out",
                                f"{R}/d2"], "no tokenizer file", None),
    ("prep-out-is-data-file", ["prepare", "--data", f"{B}/notes.txt", "--tokenizer", f"{R}/tok.json", "--out",
                               f"{B}/notes.txt"], "is also an input", None),
    ("prep-out-is-data-dir", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out",
                              f"{R}/corpus", "--overwrite", "true"], "is also an input", None),
    ("prep-out-in-data-dir", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out",
                              f"{R}/corpus/shards"], "inside the input folder", None),
    ("prep-out-is-file", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out",
                          f"{B}/foreign.json"], "is a file, but this command writes a folder", None),
    ("prep-out-foreign-dir", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out",
                              f"{B}/foreign-hf"], "not a folder of token shards", None),
    ("prep-out-run", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out", f"{R}/run",
                      "--overwrite", "true"], "training run directory", None),
    ("prep-out-under-file", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out",
                             f"{B}/notes.txt/d"], "is a file, so nothing can be created", None),
    ("prep-val-fraction", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out", f"{R}/d2",
                           "--text.val_fraction", "-0.1"], "val_fraction", None),
    ("prep-full-disk-new", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out", f"{R}/d2"],
     "No space left", "full_disk"),
    ("prep-full-disk-rebuild", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out",
                                f"{R}/data", "--force", "true"], "the disk is full", "full_disk"),
    ("prep-read-only", ["prepare", "--data", f"{R}/corpus", "--tokenizer", f"{R}/tok.json", "--out", f"{R}/d2"],
     "read-only", "read_only"),
    # pretrain (what is checked before anything is written; resume cases live with the checkpoint tests)
    ("pt-missing-data", ["pretrain", "--data", f"{B}/nope", "--out", f"{R}/new-run", *TINY_LLAMA],
     "not a prepared data directory", None),
    ("pt-data-not-prepared", ["pretrain", "--data", f"{R}/corpus", "--out", f"{R}/new-run", *TINY_LLAMA],
     "not a prepared data directory", None),
    ("pt-index-not-json", ["pretrain", "--data", f"{B}/data-notjson", "--out", f"{R}/new-run", *TINY_LLAMA],
     "is damaged", None),
    ("pt-index-dtype", ["pretrain", "--data", f"{B}/data-dtype", "--out", f"{R}/new-run", *TINY_LLAMA],
     "dtype 'float128'", None),
    ("pt-index-tokens", ["pretrain", "--data", f"{B}/data-tokens", "--out", f"{R}/new-run", *TINY_LLAMA],
     "token counts", None),
    ("pt-index-fingerprint", ["pretrain", "--data", f"{B}/data-fingerprint", "--out", f"{R}/new-run", *TINY_LLAMA],
     "fingerprint", None),
    ("pt-truncated-shard", ["pretrain", "--data", f"{B}/data-trunc", "--out", f"{R}/new-run", *TINY_LLAMA],
     "truncated", None),
    ("pt-short-data", ["pretrain", "--data", f"{B}/data-short", "--out", f"{R}/new-run", *TINY_LLAMA],
     "shorter than one context window", None),
    ("pt-d-model", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", *TINY_LLAMA, "--model.d_model", "32"],
     "divisible by n_head", None),
    ("pt-d-model-word", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", "--model.d_model", "wide"],
     "model.d_model", None),
    ("pt-preset", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", "--preset", "gpt-huge"],
     "unknown model preset 'gpt-huge'", None),
    ("pt-norm", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", "--model.norm", "batchnorm"],
     "model.norm", None),
    ("pt-lr", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", *TINY_LLAMA, "--train.lr", "-1"],
     "lr must be > 0", None),
    ("pt-batch", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", *TINY_LLAMA, "--train.batch_size", "0"],
     "batch_size must be", None),
    ("pt-dtype", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", "--train.dtype", "float8"],
     "train.dtype", None),
    ("pt-kv-heads", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", *TINY_LLAMA, "--model.n_kv_head",
                     "4"], "n_kv_head (4) must divide n_head (6)", None),
    ("pt-dropout", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", *TINY_LLAMA, "--model.dropout", "1"],
     "dropout", None),
    ("pt-bogus-flag", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", "--train.learning_rate", "1"],
     "train.learning_rate", None),
    ("pt-existing-run", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/run", *TINY_LLAMA], "--resume", None),
    ("pt-resume-lr", ["pretrain", "--out", f"{R}/run", "--resume", "true", "--train.max_steps", "99", "--train.lr",
                      "0.5"], "--allow_changes", None),
    ("pt-resume-model", ["pretrain", "--out", f"{R}/run", "--resume", "true", "--train.max_steps", "99",
                         "--model.dropout", "0.5"], "model.dropout", None),
    ("pt-resume-done", ["pretrain", "--out", f"{R}/run", "--resume", "true"], "already finished", None),
    ("pt-resume-nothing", ["pretrain", "--out", f"{R}/new-run", "--resume", "true"], "not a run directory", None),
    ("pt-resume-corpus", ["pretrain", "--out", f"{R}/corpus", "--resume", "true"], "not a run directory", None),
    ("pt-out-is-data", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/data", *TINY_LLAMA], "overlap", None),
    ("pt-out-foreign", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/corpus", *TINY_LLAMA],
     "not an lmforge run directory", None),
    ("pt-no-data", ["pretrain", "--out", f"{R}/new-run", *TINY_LLAMA], "--data is required", None),
    # required flags named as typed, with the help of the very subcommand (once "finetune.classify.base")
    ("prep-nothing", ["prepare"], "--data, --tokenizer, --out are required. See `lmforge prepare --help`", None),
    ("ft-no-out", ["finetune", "instruct", "--base", "x"], "--out is required. See `lmforge finetune instruct --help`",
     None),
    ("ft-no-task", ["finetune"], "give one of classify, instruct, dpo", None),
    ("pt-prompts-type", ["pretrain", "--data", f"{R}/data", "--out", f"{R}/new-run", "--prompts", "{a: 1}"],
     "prompts", None),
    # bad YAML configs
    ("cfg-missing", ["pretrain", "--config", f"{C}/nope.yaml"], "nope.yaml", None),
    ("cfg-list", ["pretrain", "--config", f"{C}/list.yaml"], "", None),
    ("cfg-syntax", ["pretrain", "--config", f"{C}/syntax.yaml"], "", None),
    ("cfg-unknown-key", ["pretrain", "--config", f"{C}/unknown.yaml"], "learning_rate", None),
    ("cfg-wrong-type", ["pretrain", "--config", f"{C}/type.yaml"], "max_steps", None),
    ("cfg-bad-model", ["pretrain", "--config", f"{C}/model.yaml", *TINY_LLAMA[2:]], "divisible by n_head", None),
    ("cfg-binary", ["pretrain", "--config", f"{C}/binary.yaml"], "", None),
    ("cfg-directory", ["pretrain", "--config", f"{C}/dir.yaml"], "", None),
    ("cfg-prepare-into-input", ["prepare", "--config", f"{C}/prepare-self.yaml"], "is also an input", None),
    ("cfg-tokenizer-train", ["tokenizer", "train", "--config", f"{C}/list.yaml"], "", None),
    # generate
    ("gen-missing", ["generate", f"{B}/nope"], "not a known model", None),
    ("gen-dataset-name", ["generate", "the-verdict"], "is a data set, not a model", None),
    ("gen-plain-dir", ["generate", f"{B}/emptydir"], "is not a model", None),
    ("gen-text-file", ["generate", f"{B}/notes.txt"], "is not a model", None),
    ("gen-foreign-config", ["generate", f"{B}/foreign-hf"], "is not a model", None),
    ("gen-unknown-arch", ["generate", f"{B}/tok-hf"], "model_type 'bert' is not supported", None),
    ("gen-pickle-only", ["generate", f"{B}/pickle-hf"], "never loads", None),
    ("gen-damaged-weights", ["generate", f"{B}/damaged-hf"], "truncated or corrupted", None),
    ("gen-no-tokenizer", ["generate", f"{B}/notok-hf"], "no tokenizer.json", None),
    ("gen-damaged-gguf", ["generate", f"{B}/bad.gguf"], "not a readable GGUF", None),
    ("gen-temperature", ["generate", f"{R}/hf", "--sample.temperature", "-1"], "temperature must be >= 0", None),
    ("gen-top-k", ["generate", f"{R}/hf", "--sample.top_k", "0"], "top_k must be >= 1", None),
    ("gen-repetition-tiny", ["generate", f"{R}/hf", "--sample.repetition_penalty", "1e-300"],
     "repetition_penalty must be between 0.001 and 1000", None),  # once inf logits, an internal error in sampling
    ("gen-top-p", ["generate", f"{R}/hf", "--sample.top_p", "2"], "top_p must be in (0, 1]", None),
    ("gen-max-new", ["generate", f"{R}/hf", "--sample.max_new_tokens", "-3"], "max_new_tokens", None),
    ("gen-seed-word", ["generate", f"{R}/hf", "--sample.seed", "lucky"], "sample.seed", None),
    ("gen-seed-huge", ["generate", f"{R}/hf", "--sample.seed=18446744073709551616"],
     "seed must be between -2^63 and 2^64 - 1", None),  # once an internal error from torch.Generator
    ("gen-seed-low", ["generate", f"{R}/hf", "--sample.seed=-9223372036854775809"], "seed must be between", None),
    ("gen-chat-no-template", ["generate", f"{R}/run", "--chat", "true"], "no chat template", None),
    ("gen-chat-sandbox", ["generate", f"{R}/chat.gguf", "--chat", "true"], "chat template of", None),
    ("gen-no-run", ["generate"], "the model (RUN, the first argument) is required", None),  # once "generate.run"
    ("gen-dtype", ["generate", f"{R}/run", "--dtype", "float8"], "dtype must be float32, bfloat16 or auto", None),
    ("gen-quantize", ["generate", f"{R}/run", "--quantize", "int4"], "--quantize must be one of int8", None),
    ("chat-missing", ["chat", f"{B}/nope"], "not a known model", None),
    ("chat-template", ["chat", f"{R}/run", "--template", "vicuna"], "unknown template 'vicuna'", None),
    ("chat-no-chat-template", ["chat", f"{R}/run", "--template", "chat"], "has no chat template", None),
    ("chat-dtype", ["chat", f"{R}/run", "--dtype", "half"], "dtype must be float32, bfloat16 or auto", None),
    # eval
    ("eval-nothing", ["eval", f"{R}/run"], "give --data", None),
    ("judge-timeout-huge", ["eval", "judge", f"{R}/run/config.json", "--url", "http://127.0.0.1:9/v1", "--timeout",
                            "1e308"], "--timeout between 0 and 86400 seconds", None),  # once an OverflowError
    ("eval-batch-zero", ["eval", f"{R}/run", "--data", f"{R}/data", "--batch_size", "0"], "--batch_size must be", None),
    ("eval-batch-negative", ["eval", f"{R}/run", "--data", f"{R}/data", "--batch_size", "-2"], "--batch_size", None),
    ("eval-max-batches", ["eval", f"{R}/run", "--data", f"{R}/data", "--max_batches", "0"], "--max_batches", None),
    ("eval-context-zero", ["eval", f"{R}/run", "--data", f"{R}/data", "--context", "0"], "--context must be >= 1",
     None),
    ("eval-context-long", ["eval", f"{R}/run", "--data", f"{R}/data", "--context", "4096"], "longer than the model's",
     None),
    ("eval-dtype", ["eval", f"{R}/run", "--data", f"{R}/data", "--dtype", "float8"], "--dtype must be one of", None),
    ("eval-dtype-text", ["eval", f"{R}/run", "--text", f"{R}/corpus/doc00.txt", "--dtype", "fp16"],
     "--dtype must be one of", None),
    ("eval-split", ["eval", f"{R}/run", "--data", f"{R}/data", "--split", "test"], "'train' or 'val'", None),
    ("eval-not-prepared", ["eval", f"{R}/run", "--data", f"{R}/corpus"], "not a prepared data directory", None),
    ("eval-other-tokenizer", ["eval", f"{R}/run", "--data", f"{B}/data-other"], "different tokenizer", None),
    ("eval-index-dtype", ["eval", f"{R}/run", "--data", f"{B}/data-dtype"], "dtype 'float128'", None),
    ("eval-truncated", ["eval", f"{R}/run", "--data", f"{B}/data-trunc", "--split", "train"], "truncated", None),
    ("eval-text-missing", ["eval", f"{R}/run", "--text", f"{B}/nope.txt"], "no such file", None),
    ("eval-text-one-token", ["eval", f"{R}/run", "--text", f"{B}/one.txt"], "too little text", None),
    ("eval-text-binary", ["eval", f"{R}/run", "--text", f"{B}/blob.txt"], "looks binary", None),
    # once "or pass --text.errors replace": prepare's flag, which eval does not have
    ("eval-text-latin1", ["eval", f"{R}/run", "--text", f"{B}/latin.txt"], "(byte 3: b'\\xe9'); convert it to UTF-8$",
     None),
    ("eval-batch-word", ["eval", f"{R}/run", "--data", f"{R}/data", "--batch_size", "eight"], "batch_size", None),
    ("eval-bad-model", ["eval", f"{B}/damaged-hf", "--text", f"{R}/corpus/doc00.txt"], "truncated or corrupted",
     None),
    # export
    ("exp-to", ["export", f"{R}/run", "--to", "onnx", "--out", f"{R}/x"], "--to must be 'hf' or 'gguf'", None),
    ("exp-hf-dtype", ["export", f"{R}/run", "--to", "hf", "--out", f"{R}/x", "--dtype", "q4_0"], "always float32",
     None),
    ("exp-gguf-dtype", ["export", f"{R}/run", "--to", "gguf", "--out", f"{R}/x.gguf", "--dtype", "q9"],
     "--dtype must be one of", None),
    ("exp-into-itself", ["export", f"{R}/run", "--to", "hf", "--out", f"{R}/run"], "is also an input", None),
    ("exp-into-itself-overwrite", ["export", f"{R}/run", "--to", "hf", "--out", f"{R}/run", "--overwrite", "true"],
     "is also an input", None),
    ("exp-inside-run", ["export", f"{R}/run", "--to", "hf", "--out", f"{R}/run/hf"], "inside the input folder", None),
    ("exp-into-other-run", ["export", f"{R}/hf", "--to", "hf", "--out", f"{R}/run", "--overwrite", "true"],
     "training run directory", None),
    ("exp-hf-into-hf-input", ["export", f"{R}/hf", "--to", "hf", "--out", f"{R}/hf"], "is also an input", None),
    ("exp-foreign-folder", ["export", f"{R}/run", "--to", "hf", "--out", f"{B}/foreign-hf"],
     "not a Hugging Face folder written by `lmforge export`", None),
    ("exp-hf-to-file", ["export", f"{R}/run", "--to", "hf", "--out", f"{B}/notes.txt"], "is a file", None),
    ("exp-gguf-foreign-file", ["export", f"{R}/run", "--to", "gguf", "--out", f"{B}/notes.txt"],
     "not a GGUF file written by `lmforge export`", None),
    ("exp-gguf-to-folder", ["export", f"{R}/run", "--to", "gguf", "--out", f"{B}/emptydir"], "is a folder", None),
    ("exp-gguf-into-input", ["export", f"{R}/m.gguf", "--to", "gguf", "--out", f"{R}/m.gguf"], "is also an input",
     None),
    ("exp-gguf-in-run", ["export", f"{R}/hf", "--to", "gguf", "--out", f"{R}/run/m.gguf"], "training run directory",
     None),
    ("exp-gguf-under-file", ["export", f"{R}/run", "--to", "gguf", "--out", f"{B}/notes.txt/m.gguf"],
     "is a file, so nothing", None),
    ("exp-gpt-to-gguf", ["export", f"{R}/hf-gpt", "--to", "gguf", "--out", f"{R}/x.gguf"], "Llama-family", None),
    ("exp-missing-model", ["export", f"{B}/nope", "--out", f"{R}/x"], "not a known model", None),
    ("exp-damaged-model", ["export", f"{B}/damaged-hf", "--out", f"{R}/x"], "truncated or corrupted", None),
    ("exp-hf-full-disk", ["export", f"{R}/run", "--to", "hf", "--out", f"{R}/hf"], "the disk is full", "full_disk"),
    ("exp-hf-full-disk-new", ["export", f"{R}/run", "--to", "hf", "--out", f"{R}/hf2"], "No space left", "full_disk"),
    ("exp-gguf-full-disk", ["export", f"{R}/run", "--to", "gguf", "--out", f"{R}/m.gguf", "--dtype", "f32"],
     "the disk is full", "full_disk"),
    ("exp-hf-read-only", ["export", f"{R}/run", "--to", "hf", "--out", f"{R}/hf2"], "read-only", "read_only"),
    ("exp-gguf-read-only", ["export", f"{R}/run", "--to", "gguf", "--out", f"{R}/m2.gguf"], "read-only",
     "read_only"),
    # the default run (checked before it writes anything)
    ("run-vocab", ["run", "--out", f"{R}/default", "--vocab_size", "10"], "vocab_size", None),
    ("run-bogus", ["run", "--out", f"{R}/default", "--bogus"], "unrecognized arguments", None),
    ("run-vocab-word", ["run", "--out", f"{R}/default", "--vocab_size", "big"], "vocab_size", None),
    ("run-data-missing", ["run", "--out", f"{R}/default", "--data", f"{B}/nope.txt", "--vocab_size", "300"],
     "no such file", None),
    ("run-preset", ["run", "--out", f"{R}/default", "--data", f"{R}/corpus", "--vocab_size", "300", "--preset",
                    "nope"], "unknown model preset 'nope'", None),
    ("run-steps", ["run", "--out", f"{R}/default", "--data", f"{R}/corpus", "--vocab_size", "300", "--steps", "0"],
     "--steps must be at least 1, got 0", None),
    ("run-guard", ["run", "--out", f"{R}/default", "--data", f"{R}/corpus", "--vocab_size", "300", "--max_minutes",
                   "-1"], "max_minutes must be > 0", None),
    ("run-fourway", ["run", "--out", f"{R}/default", "--fourway_limit", "5"],
     "--fourway_limit must be 0 (leave the stage out) or 20 to 1284 texts", None),
    ("run-fourway-more", ["run", "--out", f"{R}/default", "--fourway_limit", "5000"],  # once "5000 of the 1,284"
     "--fourway_limit must be 0 (leave the stage out) or 20 to 1284 texts", None),
]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file, folder and link under root with its content hash: any change shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def test_the_table_is_large_enough():
    ids = [_case_id(c) for c in CASES]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)
    commands = {(c.values if hasattr(c, "values") else c)[1][0] for c in CASES}
    assert {"tokenizer", "prepare", "pretrain", "generate", "eval", "export", "download", "run"} <= commands


@pytest.mark.parametrize("name,argv,expected,fault", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input(name, argv, expected, fault, w, capsys, monkeypatch):
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    monkeypatch.setenv("LMFORGE_CACHE", str(w / "cache"))
    args = [a.replace("{root}", str(w)) for a in argv]
    before = tree_digest(w)
    capsys.readouterr()
    if fault:
        FAULTS[fault](monkeypatch)
    try:
        code = main(args)
    finally:
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    # Progress bars (tqdm, before the failure) are progress, not messages: the rest is one line.
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.search(r"\d+%\|", ln)]
    assert len(lines) == 1 and lines[0].startswith("lmforge: error:"), err
    assert lines[0].endswith(expected[:-1]) if expected.endswith("$") else expected in lines[0], lines[0]
    assert tree_digest(w) == before, f"{name} changed files"


# --------------------------------------------------------------------------- what still works
def _digest_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_outputs_of_their_own_kind_are_rewritten(w, tmp_path, capsys):
    corpus, run = str(w / "corpus"), str(w / "run")
    tok = tmp_path / "tok.json"
    for vocab in ("300", "290"):  # a tokenizer file replaces a tokenizer file
        assert main(["tokenizer", "train", "--data", corpus, "--out", str(tok), "--tokenizer.vocab_size", vocab]) == 0
    assert json.loads(tok.read_text())["format"] == "lmforge-bpe" and len(json.loads(tok.read_text())["tokens"]) == 289
    for _ in range(2):  # a folder that holds just a tokenizer is no run directory
        assert main(["tokenizer", "train", "--data", corpus, "--out", str(tmp_path / "tk"),
                     "--tokenizer.vocab_size", "300"]) == 0
    assert [p.name for p in (tmp_path / "tk").iterdir()] == ["tokenizer.json"]
    data = tmp_path / "data"
    for extra in ([], ["--force", "true"]):  # a shard folder is reused, or rebuilt
        assert main(["prepare", "--data", corpus, "--tokenizer", str(tok), "--out", str(data), *extra]) == 0
    # the shard folder's own tokenizer may prepare it again (it is read, not rewritten)
    assert main(["prepare", "--data", f"{corpus}/doc01.txt", "--tokenizer", str(data / "tokenizer.json"), "--out",
                 str(data)]) == 0
    assert json.loads((data / "index.json").read_text())["documents"] == {"train": 1, "val": 1}
    for _ in range(2):  # an earlier export is replaced by a new one
        assert main(["export", run, "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
        assert main(["export", run, "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (w / "hf" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf", "m.gguf", "tk", "tok.json"]  # no temp files


def test_overwrite_writes_beside_unrelated_files(w, tmp_path, capsys):
    corpus, run = str(w / "corpus"), str(w / "run")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    assert main(["tokenizer", "train", "--data", corpus, "--out", str(notes), "--tokenizer.vocab_size", "300",
                 "--overwrite", "true"]) == 0
    assert json.loads(notes.read_text())["format"] == "lmforge-bpe"
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "README.md").write_text("keep me")
    (folder / "config.json").write_text('{"a": 1}')
    assert main(["export", run, "--to", "hf", "--out", str(folder), "--overwrite", "true"]) == 0
    assert (folder / "README.md").read_text() == "keep me" and "lmforge_export" in (folder / "config.json").read_text()
    assert main(["prepare", "--data", corpus, "--tokenizer", str(notes), "--out", str(folder), "--overwrite",
                 "true"]) == 0
    assert (folder / "README.md").read_text() == "keep me" and (folder / "train.bin").stat().st_size > 0


# --------------------------------------------------------------------------- generate: seeds and pipes
def test_generate_draws_a_fresh_seed_unless_given(w, monkeypatch, capsys):
    import torch

    import lmforge.generate as gen

    calls = []
    real = gen.fresh_seed
    monkeypatch.setattr(gen, "fresh_seed", lambda: calls.append(1) or real())
    args = ["generate", str(w / "run"), "--prompt", "Document", "--sample.max_new_tokens", "12",
            "--sample.temperature", "2", "--sample.top_k", "null", "--sample.stop_at_eos", "false"]
    state = torch.random.get_rng_state()
    assert main(args) == 0 and main(args) == 0
    assert len(calls) == 2  # a new seed each time...
    assert torch.equal(torch.random.get_rng_state(), state)  # ...without reseeding torch's global generator
    capsys.readouterr()
    outs = []
    for _ in range(2):
        assert main([*args, "--sample.seed", "7"]) == 0
        outs.append(capsys.readouterr().out)
    assert len(calls) == 2 and outs[0] == outs[1] and len(outs[0]) > len("Document\n")  # a given seed reproduces


class _ClosedPipe:
    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_closed_pipe_ends_quietly_in_process(w, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    code = main(["generate", str(w / "run"), "--sample.max_new_tokens", "5"])
    monkeypatch.undo()
    assert code == 141 and capsys.readouterr().err == ""


def test_closed_pipe_ends_quietly(w):
    """`lmforge generate ... | head -c 1`: exit 141 (as for SIGPIPE), nothing on stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "generate", str(w / "run"), "--sample.max_new_tokens",
                             "3000", "--sample.stop_at_eos", "false"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


# --------------------------------------------------------------------------- the file system, for real
def test_read_only_folder(w, tmp_path, capsys, monkeypatch):
    """A folder without write permission; as root (where chmod does not stop writes) the same
    failure is injected instead."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            read_only(monkeypatch)  # root: simulate what the permission would have done
        except PermissionError:
            pass
        code = main(["tokenizer", "train", "--data", str(w / "corpus"), "--out", str(locked / "tok.json"),
                     "--tokenizer.vocab_size", "300"])
        monkeypatch.undo()
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
        assert code == 2 and err.startswith("lmforge: error: could not write")
        assert "tok.json" in err and ("Permission denied" in err or "Read-only" in err)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_any_os_error_is_one_line(monkeypatch, capsys):
    import lmforge.pipeline as pipeline

    def fail(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/models/x")

    monkeypatch.setattr(pipeline, "export", fail)
    assert main(["export", "some-run", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "lmforge: error: Permission denied: /srv/models/x (no permission: choose a folder you can write " \
                  "to, or change its permissions)\n"


@pytest.mark.slow
def test_generate_reads_its_prompt_from_standard_input(w):
    """`echo PROMPT | lmforge generate RUN`: the piped text is the prompt (echoed first); bytes that
    are not UTF-8 are one line, exit code 2."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lmforge", "generate", str(w / "run"), "--sample.max_new_tokens", "4",
           "--sample.seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, input=b"Document 3.\n", capture_output=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.decode().startswith("Document 3."), r.stderr
    r = subprocess.run(cmd, input=b"caf\xe9", capture_output=True, env=env, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 2 and "not UTF-8 text (byte 3)" in err and len(err.strip().splitlines()) == 1, err
