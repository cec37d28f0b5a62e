"""Data: text files -> token shards on disk -> (x, y) training batches.

``prepare`` reads documents (text files, directories of them, JSONL records, or the
built-in corpus), encodes them with a tokenizer, separates documents with
``<|endoftext|>``, splits train/validation by document with a seed, and writes
``train.bin`` / ``val.bin`` (flat uint16 or uint32 arrays) plus ``index.json``.

Batches are a pure function of (seed, step): ``SlidingWindows`` walks the corpus in
shuffled epochs (the book's ``GPTDatasetV1`` with a stride), ``RandomWindows`` samples
window starts (large corpora). Either way, resuming at step s sees exactly the batches an
uninterrupted run would. Shards are read with ``np.memmap``, so they may exceed memory.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .config import DataConfig, LmforgeError, config_dict
from .outputs import read_json_head, remove_quietly, write_error
from .tokenizer import Tokenizer

SHARD_FORMAT_VERSION = 1
SHARD_FORMAT = "lmforge-shards"
SHARD_DTYPES = ("uint16", "uint32")
# What `prepare` writes into its folder; a folder holding only these is a shard folder.
SHARD_FILES = ("train.bin", "val.bin", "index.json", "tokenizer.json")
BUILTIN = "builtin"


class DataError(LmforgeError, ValueError):
    """A corpus or shard problem the user can fix."""


# --------------------------------------------------------------------------- reading text
def _read_text(path: Path, errors: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not raw.strip():
        raise DataError(f"{path} is empty; give a file with text in it")
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path} looks binary (it contains NUL bytes), not text; give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "replace":
            return raw.decode("utf-8", errors="replace")
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); convert it to "
                        "UTF-8, or pass --text.errors replace to substitute U+FFFD for bad bytes") from None


def _jsonl_documents(path: Path, field: str, errors: str) -> Iterator[str]:
    for n, line in enumerate(_read_text(path, errors).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); JSONL needs one JSON object per line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise DataError(f"{path}:{n} has no string field {field!r}; name the text field with --text.text_field")
        if rec[field].strip():
            yield rec[field]


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named directly, and every .txt/.md/.jsonl file under named directories, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".jsonl", ".text"))
            if not found:
                raise DataError(f"directory {p} holds no .txt, .md or .jsonl files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"no such file or directory: {p}")
    return out


def read_documents(paths: list[str], config: DataConfig = DataConfig()) -> list[str]:
    """Documents from files: a text file is one document, a JSONL line is one document.

    The name ``builtin`` stands for the corpus that ships inside Python itself.
    """
    if paths == [BUILTIN]:
        return builtin_corpus()
    docs: list[str] = []
    for path in expand_paths(paths):
        if path.suffix == ".jsonl":
            docs.extend(_jsonl_documents(path, config.text_field, config.errors))
        else:
            docs.append(_read_text(path, config.errors))
    return docs


def builtin_corpus() -> list[str]:
    """About 1.5 MB of English that every Python installation carries, so the default run needs no download:
    the language reference topics of ``pydoc_data`` and the docstrings of the standard library (one
    document per topic and per module)."""
    return list(_builtin_corpus())


@functools.lru_cache(maxsize=1)
def _builtin_corpus() -> tuple[str, ...]:
    # Parsing the standard library takes seconds; the default run reads the corpus three times.
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip",
            "pydoc_data", "__pycache__"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, f).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    d = ast.get_docstring(node)
                    if d and len(d) >= 120:  # short docstrings are mostly signatures, not prose
                        parts.append(d.strip())
            if parts:
                docs.append("\n\n".join(parts))
    return tuple(docs)


# --------------------------------------------------------------------------- shards
@dataclass
class ShardSet:
    """A prepared data directory: train and validation token arrays plus their index."""

    directory: Path
    index: dict

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ShardSet":
        directory = Path(directory)
        index_path = directory / "index.json"
        if not index_path.is_file():
            raise DataError(f"{directory} is not a prepared data directory (no index.json); run `lmforge prepare` first")
        damaged = f"{index_path} is damaged; run `lmforge prepare` again with --force true"
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise DataError(damaged + " (not JSON)") from None
        if not isinstance(index, dict):
            raise DataError(damaged + " (not a JSON object)")
        # Check every field readers use, so a hand-edited or foreign index is an answer, not a crash later.
        if index.get("dtype") not in SHARD_DTYPES:
            raise DataError(f"{damaged} (dtype {index.get('dtype')!r}; shards are {' or '.join(SHARD_DTYPES)})")
        tokens = index.get("tokens")
        if not (isinstance(tokens, dict) and all(isinstance(tokens.get(s), int) and not isinstance(tokens.get(s), bool)
                                                 and tokens[s] >= 0 for s in ("train", "val"))):
            raise DataError(damaged + " (token counts missing or not whole numbers)")
        if not isinstance(index.get("tokenizer_fingerprint"), str):
            raise DataError(damaged + " (no tokenizer fingerprint)")
        return cls(directory, index)

    def tokens(self, split: str) -> np.ndarray:
        n = int(self.index["tokens"][split])
        path = self.directory / f"{split}.bin"
        dtype = np.dtype(self.index["dtype"])
        if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            raise DataError(f"{path} is missing or truncated (index says {n} tokens); run `lmforge prepare` again")
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(n,))

    @property
    def fingerprint(self) -> str:
        return self.index["tokenizer_fingerprint"]

    @property
    def identity(self) -> dict:
        """What a run trained on these shards records of them: tokenizer, sizes and content."""
        ident = {"fingerprint": self.fingerprint, "train_tokens": int(self.index["tokens"]["train"]),
                 "val_tokens": int(self.index["tokens"]["val"])}
        if isinstance(self.index.get("sha256"), dict):  # shards prepared before content hashes lack it
            ident["sha256"] = dict(self.index["sha256"])
        return ident


def _input_signature(paths: list[str], config: DataConfig, tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.fingerprint.encode())
    h.update(json.dumps(config_dict(config) | {"workers": 0}, sort_keys=True).encode())
    if paths == [BUILTIN]:
        h.update(f"builtin:{sysconfig.get_python_version()}".encode())
    else:
        for p in expand_paths(paths):
            st = p.stat()
            h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def split_documents(docs: list[str], config: DataConfig) -> tuple[list[str], list[str]]:
    """Hold out documents for validation, chosen by seed. With too few documents to split
    (a single book, say), hold out the last lines of each document instead."""
    if config.val_fraction == 0:
        return docs, []
    if len(docs) >= max(2, round(2 / config.val_fraction)):
        rng = np.random.default_rng(config.seed)
        n_val = max(1, round(len(docs) * config.val_fraction))
        val_ids = set(rng.permutation(len(docs))[:n_val].tolist())
        return [d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids]
    train, val = [], []
    for d in docs:
        cut = int(len(d) * (1 - config.val_fraction))
        nl = d.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut  # cut at a line break where there is one
        train.append(d[:cut])
        val.append(d[cut:])
    return train, val


def _write_tokens(path: Path, docs: list[str], tokenizer: Tokenizer, dtype: np.dtype, workers: int,
                  desc: str) -> tuple[int, int]:
    """Encode documents (each followed by <|endoftext|>) straight into a file; returns (tokens, documents)."""
    from tqdm import tqdm

    eot = tokenizer.eot_id
    n_tokens = 0
    batch_chars = 32_000_000  # encode in batches, so a corpus larger than memory streams through
    with open(path, "wb") as f, tqdm(total=sum(len(d) for d in docs), desc=desc, unit="char", unit_scale=True,
                                     leave=False, disable=None) as bar:
        i = 0
        while i < len(docs):
            j, size = i, 0
            while j < len(docs) and (size == 0 or size + len(docs[j]) <= batch_chars):
                size += len(docs[j])
                j += 1
            for ids in tokenizer.encode_batch(docs[i:j], workers=workers):
                if eot is not None:
                    ids.append(eot)
                arr = np.asarray(ids, dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += arr.size
            bar.update(size)
            i = j
    return n_tokens, len(docs)


def is_shard_dir(path: Path) -> bool:
    """A folder `prepare` wrote (or began to write): an lmforge index, or nothing but shard files."""
    index = read_json_head(path / "index.json")
    if index is not None and index.get("format") == SHARD_FORMAT:
        return True
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    ours = {n for n in names if n in SHARD_FILES or n.removesuffix(".tmp") in SHARD_FILES}
    # A prepare killed before its renames leaves only train.bin.tmp / val.bin.tmp: still ours.
    shards = {n.removesuffix(".tmp") for n in names} & {"train.bin", "val.bin"}
    return bool(names) and names == ours and bool(shards)


def prepare(paths: list[str], out_dir: str | os.PathLike, tokenizer: Tokenizer,
            config: DataConfig = DataConfig(), force: bool = False, quiet: bool = False,
            save_tokenizer: bool = False) -> ShardSet:
    """Tokenize a corpus into ``out_dir``; reuse what is there if the inputs are unchanged.

    With ``save_tokenizer``, ``tokenizer.json`` is written beside the shards in the same
    commit, so the folder never pairs new shards with an old tokenizer."""
    out = Path(out_dir)
    signature = _input_signature(paths, config, tokenizer)
    if not force and (out / "index.json").is_file():
        try:
            existing = ShardSet.open(out)
            if existing.index.get("input_signature") == signature:
                existing.tokens("train"), existing.tokens("val")  # both files present and whole
                if save_tokenizer and not (out / "tokenizer.json").is_file():
                    try:
                        tokenizer.save(out / "tokenizer.json")
                    except OSError as e:
                        raise write_error(out / "tokenizer.json", e) from None
                if not quiet:
                    print(f"reusing token shards in {out} (inputs unchanged)")
                return existing
        except DataError:
            pass  # damaged or stale: rebuild
    docs = read_documents(paths, config)
    if not docs:
        raise DataError(f"no text found in {', '.join(paths)}")
    if tokenizer.eot_id is None:
        raise DataError("the tokenizer has no <|endoftext|> token to separate documents; train it with that special token")
    train_docs, val_docs = split_documents(docs, config)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    counts = {}
    names = ["train.bin", "val.bin", *(["tokenizer.json"] if save_tokenizer else []), "index.json"]
    tmps = {name: out / f"{name}.tmp" for name in names}
    # Everything is written under temporary names first and renamed only once all of it is on
    # disk: a full disk or a kill leaves the previous shards as they were, and no .tmp files.
    # index.json goes last, so a reader never sees an index that names shards not yet in place.
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            counts[split] = _write_tokens(tmps[f"{split}.bin"], split_docs, tokenizer, dtype, config.workers,
                                          f"encoding {split}")
        if save_tokenizer:
            atomic.write_file(tmps["tokenizer.json"], tokenizer.to_json().encode("utf-8"))
        index = {
            "format": SHARD_FORMAT, "version": SHARD_FORMAT_VERSION, "dtype": dtype.name,
            "tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id, "tokens": {s: counts[s][0] for s in counts},
            "documents": {s: counts[s][1] for s in counts}, "sources": paths, "input_signature": signature,
            # What the shards hold, so that a run resumed on other data is caught even at equal sizes.
            "sha256": {s: atomic.sha256_file(tmps[f"{s}.bin"]) for s in counts},
            "data_config": config_dict(config),
        }
        atomic.write_file(tmps["index.json"], (json.dumps(index, indent=2) + "\n").encode("utf-8"))
        for name in names:
            os.replace(tmps[name], out / name)
    except BaseException as e:
        remove_quietly(*tmps.values())
        if created:  # a folder this call made, left empty by the failure
            with contextlib.suppress(OSError):
                out.rmdir()
        if isinstance(e, OSError):
            raise write_error(out, e) from None
        raise
    if not quiet:
        print(f"wrote {counts['train'][0]:,} train and {counts['val'][0]:,} val tokens "
              f"({counts['train'][1]} + {counts['val'][1]} documents, {dtype.name}) to {out}")
    return ShardSet(out, index)


# --------------------------------------------------------------------------- batches
def _check_length(tokens: np.ndarray, context: int, what: str) -> None:
    if len(tokens) < context + 1:
        raise DataError(f"the {what} split has {len(tokens)} tokens, shorter than one context window "
                        f"({context} + 1 tokens); give more text or a shorter context (--model.context_length)")


class SlidingWindows:
    """Windows of ``context`` tokens every ``stride`` tokens; targets are inputs shifted by one.

    Batches walk the windows in epochs, each epoch in a seeded random order, dropping
    the last incomplete batch (as the book's ``create_dataloader_v1``).
    """

    def __init__(self, tokens: np.ndarray, context: int, stride: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        _check_length(tokens, context, "training")
        self.tokens, self.context, self.stride = tokens, context, stride
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.n_windows = (len(tokens) - context - 1) // stride + 1
        if self.n_windows < batch_size:
            raise DataError(f"the corpus yields {self.n_windows} windows of {context} tokens (stride {stride}), fewer "
                            f"than one batch of {batch_size}; lower --train.batch_size or the stride, or add text")
        self.batches_per_epoch = self.n_windows // batch_size
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = i * self.stride
        chunk = np.asarray(self.tokens[s:s + self.context + 1], dtype=np.int64)
        return chunk[:-1], chunk[1:]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k-th batch of the whole run (k counts micro-batches from 0)."""
        epoch, b = divmod(k, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_windows) if self.shuffle
                     else np.arange(self.n_windows))
            self._order = (epoch, order)
        ids = self._order[1][b * self.batch_size:(b + 1) * self.batch_size]
        xs, ys = zip(*(self.window(int(i)) for i in ids))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


class RandomWindows:
    """Batches of windows starting at random offsets: batch k is drawn from a generator seeded by (seed, k)."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int = 0) -> None:
        _check_length(tokens, context, "training")
        self.tokens, self.context, self.batch_size, self.seed = tokens, context, batch_size, seed

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.random.default_rng([self.seed, k]).integers(0, len(self.tokens) - self.context, self.batch_size)
        chunks = np.stack([np.asarray(self.tokens[s:s + self.context + 1], dtype=np.int64) for s in starts])
        return torch.from_numpy(chunks[:, :-1]), torch.from_numpy(chunks[:, 1:])


def eval_batches(tokens: np.ndarray, context: int, batch_size: int, max_batches: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows from the start of a split, the same every time (for comparable losses).
    A split shorter than one window is evaluated as one shorter sequence."""
    if len(tokens) < 2:
        return
    context = min(context, len(tokens) - 1)
    n_windows = (len(tokens) - 1) // context
    for b in range(min(max_batches, (n_windows + batch_size - 1) // batch_size)):
        idx = range(b * batch_size, min(n_windows, (b + 1) * batch_size))
        chunks = np.stack([np.asarray(tokens[i * context:i * context + context + 1], dtype=np.int64) for i in idx])
        yield torch.from_numpy(chunks[:, :-1]), torch.from_numpy(chunks[:, 1:])
