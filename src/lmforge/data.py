"""Data: text files -> token shards on disk -> (x, y) training batches.

``prepare`` streams a corpus of any size through bounded memory:

1. ``iter_documents`` yields one document at a time: a text file is one document (one over
   ``BIG_TEXT_BYTES`` is read in blocks and cut into pieces of about ``PIECE_CHARS`` at blank
   lines, each piece a document), a JSONL file one document per line, read line by line; the
   name ``builtin`` stands for the English that ships inside Python.
2. Each document goes to validation or training by a hash of (seed, its text), so the split
   needs no view of the whole corpus, and a document lands on the same side whatever else the
   corpus holds. A corpus of too few documents to split (a single book, say) holds out the
   last lines of each document instead; a corpus where no hash falls under the fraction holds
   out the one document nearest to it, so validation is never empty.
3. Documents are grouped into chunks of about ``CHUNK_CHARS`` characters and encoded (each
   followed by ``<|endoftext|>``) in one pool of worker processes that lives for the whole
   corpus, a few chunks in flight at a time. The ids are appended to ``train.bin.tmp`` /
   ``val.bin.tmp`` in corpus order, so the shards are the same whatever the worker count.
4. ``index.json`` (tokenizer fingerprint, dtype, token and document counts, sha256 of each
   shard) is written last and everything is renamed into place only once it is all on disk:
   a failure or a kill leaves the previous shards as they were and no ``.tmp`` files.

Batches are a pure function of (seed, step, rank): ``SlidingWindows`` walks the corpus in
shuffled epochs (the book's ``GPTDatasetV1`` with a stride), ``RandomWindows`` samples
window starts (large corpora). Both draw the global batch and hand each rank its contiguous
share of rows, so resuming at step s, or running on more processes, sees exactly the
windows an uninterrupted single-process run would. Shards are read with ``np.memmap``, so
they may exceed memory.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import functools
import hashlib
import json
import os
import sysconfig
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import atomic
from .config import DataConfig, LmforgeError, config_dict, is_whole
from .outputs import read_json_head, remove_quietly, run_lock, write_error
from .workers import pool as worker_pool
from .tokenizer import Tokenizer

SHARD_FORMAT_VERSION = 1
SHARD_FORMAT = "lmforge-shards"
SHARD_DTYPES = ("uint16", "uint32")
# What `prepare` writes into its folder; a folder holding only these is a shard folder.
SHARD_FILES = ("train.bin", "val.bin", "index.json", "tokenizer.json")
BUILTIN = "builtin"
# Which documents go to validation; part of every shard set's input signature, so shards
# written by an earlier rule are rebuilt, never reused. Change it whenever the rule, or
# where documents begin and end, changes.
SPLIT_RULE = "blake2b-seed-text/1"

# A text file larger than this is not one document but a stream of pieces: encoding one
# document holds about 36 bytes per token (Python ints) in one process, ~9x the text.
BIG_TEXT_BYTES = 16 << 20
PIECE_CHARS = 1 << 20  # the size a big text file's pieces are cut at (at a blank line where there is one)
READ_BYTES = 1 << 20  # how much of a big text file is read at a time
CHUNK_CHARS = 1 << 20  # characters sent to a worker at a time (it holds ~14 bytes a character while encoding)
POOL_MIN_BYTES = 4_000_000  # smaller corpora are encoded in this process (starting workers costs more)
SNIFF_BYTES = 65536  # how far into a file to look for NUL bytes (binary files)


class DataError(LmforgeError, ValueError):
    """A corpus or shard problem the user can fix."""


# --------------------------------------------------------------------------- reading text
_REPLACE_HINT = ", or pass --text.errors replace to substitute U+FFFD for bad bytes"  # prepare's, tokenizer train's


def _not_utf8(path: Path, offset: int, byte: bytes) -> DataError:
    return DataError(f"{path} is not valid UTF-8 (byte {offset}: {byte!r}); convert it to UTF-8{_REPLACE_HINT}")


def _binary(path: Path) -> DataError:
    return DataError(f"{path} looks binary (it contains NUL bytes), not text; give a UTF-8 text file")


def _empty(path: Path) -> DataError:
    return DataError(f"{path} is empty; give a file with text in it")


def _cannot_read(path: Path, e: OSError) -> DataError:
    return DataError(f"cannot read {path}: {e.strerror}")


def _read_text(path: Path, errors: str) -> str:
    """A whole (small) text file, checked: readable, not empty, not binary, UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _cannot_read(path, e) from None
    if not raw.strip():
        raise _empty(path)
    if b"\x00" in raw[:SNIFF_BYTES]:
        raise _binary(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "replace":
            return raw.decode("utf-8", errors="replace")
        raise _not_utf8(path, e.start, raw[e.start:e.start + 1]) from None


@contextlib.contextmanager
def _open_checked(path: Path) -> Iterator:
    """``path`` opened for reading in binary, after a look at its head for NUL bytes."""
    try:
        with open(path, "rb") as f:
            if b"\x00" in f.read(SNIFF_BYTES):
                raise _binary(path)
            f.seek(0)
            yield f
    except OSError as e:
        raise _cannot_read(path, e) from None


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {dict: "object", list: "list", str: "string", int: "number", float: "number"}.get(type(value), "value")


def _jsonl_documents(path: Path, field: str, errors: str) -> Iterator[tuple[str, int]]:
    """(text, bytes read since the previous document) for each record, reading one line at a time."""
    offset = unread = 0
    blank = True
    with _open_checked(path) as f:
        for n, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            unread += len(raw)
            if not raw.strip():
                continue
            blank = False
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, start + e.start, raw[e.start:e.start + 1]) from None
            if start == 0:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some Windows editors save UTF-8
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); "
                                "JSONL needs one JSON object per line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n} is a JSON {_json_kind(rec)}, not an object; JSONL needs one object per "
                                f"line, its text in a field (--text.text_field, now {field!r})")
            if field not in rec:
                raise DataError(f"{path}:{n} has no field {field!r} (it has {', '.join(map(repr, list(rec)[:5]))}"
                                f"{', ...' if len(rec) > 5 else ''}); name the text field with --text.text_field")
            if not isinstance(rec[field], str):
                raise DataError(f"{path}:{n}: field {field!r} is {_json_kind(rec[field])}, not text; give each "
                                "record its text as a JSON string")
            if rec[field].strip():
                yield rec[field], unread
                unread = 0
    if blank:
        raise _empty(path)


def _piece_end(text: str) -> int:
    """Where the next piece of a big text file ends: the last blank line in the second half of
    ``PIECE_CHARS``, else the last line break there, else ``PIECE_CHARS`` (a very long line)."""
    for sep in ("\n\n", "\n"):
        i = text.rfind(sep, PIECE_CHARS // 2, PIECE_CHARS)
        if i >= 0:
            return i + len(sep)
    return PIECE_CHARS


def _text_pieces(path: Path, errors: str) -> Iterator[tuple[str, int]]:
    """(piece, bytes read since the previous piece) of a text file too big to be one document."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = unread = 0
    buffered = ""
    blank = True

    def decode(block: bytes, final: bool = False) -> str:
        held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
        try:
            return decoder.decode(block, final)
        except UnicodeDecodeError as e:  # e.start counts from the held bytes
            raise _not_utf8(path, offset - held + e.start, e.object[e.start:e.start + 1]) from None

    with _open_checked(path) as f:
        while block := f.read(READ_BYTES):
            buffered += decode(block)
            offset += len(block)
            unread += len(block)
            while len(buffered) >= PIECE_CHARS:
                cut = _piece_end(buffered)
                piece, buffered = buffered[:cut], buffered[cut:]
                if piece.strip():
                    blank = False
                    yield piece, unread
                    unread = 0
        buffered += decode(b"", final=True)
    if buffered.strip():
        yield buffered, unread
    elif blank:
        raise _empty(path)


def _text_documents(path: Path, errors: str) -> Iterator[tuple[str, int]]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise _cannot_read(path, e) from None
    if size > BIG_TEXT_BYTES:
        yield from _text_pieces(path, errors)
    else:
        yield _read_text(path, errors), size


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named directly, and every .txt/.md/.jsonl file under named directories, sorted; a file
    named twice (itself and through its folder, or the folder twice) is read once."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".jsonl", ".text"))
            if not found:
                raise DataError(f"directory {p} holds no .txt, .md or .jsonl files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise DataError(f"{p} is not a regular file (a device, a pipe or a socket); give text files or folders")
        else:
            raise DataError(f"no such file or directory: {p}")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def _sized_documents(paths: list[str], config: DataConfig) -> Iterator[tuple[str, int]]:
    """(document, input bytes it accounts for): what the progress bar counts."""
    if paths == [BUILTIN]:
        yield from ((d, len(d)) for d in _builtin_corpus())
        return
    for path in expand_paths(paths):
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, config.text_field, config.errors)
        else:
            yield from _text_documents(path, config.errors)


def _input_bytes(paths: list[str]) -> int:
    if paths == [BUILTIN]:
        return sum(map(len, _builtin_corpus()))
    return sum(p.stat().st_size for p in expand_paths(paths))


def iter_documents(paths: list[str], config: DataConfig = DataConfig()) -> Iterator[str]:
    """Documents from files, one at a time: a text file is one document (one larger than
    ``BIG_TEXT_BYTES`` is cut into pieces at blank lines), a JSONL line is one document.
    Records whose text is blank are skipped. The name ``builtin`` stands for the corpus that
    ships inside Python itself."""
    return (text for text, _ in _sized_documents(paths, config))


def read_documents(paths: list[str], config: DataConfig = DataConfig()) -> list[str]:
    """All documents of ``iter_documents`` in a list, for callers with small corpora."""
    if paths == [BUILTIN]:
        return builtin_corpus()
    return list(iter_documents(paths, config))


def read_text_files(paths: list[str]) -> str:
    """The documents of ``paths`` as one text (blank lines between them), read strictly: what
    evaluations measure bits per byte on. They have no --text.errors flag, so no error names it."""
    try:
        return "\n\n".join(read_documents(paths))
    except DataError as e:
        raise DataError(str(e).replace(_REPLACE_HINT, "")) from None


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


# --------------------------------------------------------------------------- the split
def split_key(text: str, seed: int) -> float:
    """A document's place in [0, 1) for the train/validation split: a hash of (seed, text).
    The document is held out when its key is below ``val_fraction``."""
    h = hashlib.blake2b(f"{seed}\0".encode(), digest_size=8)
    h.update(text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little") / 2 ** 64


def _min_documents_to_split(val_fraction: float) -> int:
    """Fewer documents than this hold out their tails instead of whole documents."""
    return max(2, round(2 / val_fraction)) if val_fraction > 0 else 1


def _tail_split(doc: str, val_fraction: float) -> tuple[str, str]:
    cut = int(len(doc) * (1 - val_fraction))
    nl = doc.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut  # cut at a line break where there is one
    return doc[:cut], doc[cut:]


def split_documents(docs: Sequence[str], config: DataConfig) -> tuple[list[str], list[str]]:
    """Train and validation documents by the rule ``prepare`` follows (see the module docstring):
    held out when ``split_key(doc, seed) < val_fraction``; if none is, the one of lowest key; with
    too few documents to split, the last lines of each document."""
    f = config.val_fraction
    if f == 0:
        return list(docs), []
    if len(docs) < _min_documents_to_split(f):
        pairs = [_tail_split(d, f) for d in docs]
        return [t for t, _ in pairs], [v for _, v in pairs]
    keys = [split_key(d, config.seed) for d in docs]
    held = [k < f for k in keys]
    if not any(held):
        held[int(np.argmin(keys))] = True
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


class _Doc(NamedTuple):
    text: str
    held_out: bool
    key: float  # split_key, or 1.0 where the split is not by hash
    nbytes: int  # input bytes read for it (progress)


def _labelled_documents(paths: list[str], config: DataConfig, few: bool) -> Iterator[_Doc]:
    """The corpus in order, each document marked for training or validation."""
    f = config.val_fraction
    for text, nbytes in _sized_documents(paths, config):
        if f == 0:
            yield _Doc(text, False, 1.0, nbytes)
        elif few:
            head, tail = _tail_split(text, f)
            yield _Doc(head, False, 1.0, nbytes)
            yield _Doc(tail, True, 1.0, 0)
        else:
            key = split_key(text, config.seed)
            yield _Doc(text, key < f, key, nbytes)


# --------------------------------------------------------------------------- encoding
def _chunks(docs: Iterator[_Doc], max_chars: int) -> Iterator[list[_Doc]]:
    """Consecutive documents, about ``max_chars`` characters at a time (a longer document alone)."""
    chunk: list[_Doc] = []
    size = 0
    for doc in docs:
        if chunk and size + len(doc.text) > max_chars:
            yield chunk
            chunk, size = [], 0
        chunk.append(doc)
        size += len(doc.text)
    if chunk:
        yield chunk


def _encode_texts(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The ids of ``texts``, each followed by <|endoftext|>, end to end; and each one's length."""
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, doc in enumerate(tokenizer.encode_batch(texts, workers=1)):
        doc.append(tokenizer.eot_id)
        lengths[i] = len(doc)
        ids += doc
    return np.array(ids, dtype=dtype), lengths


_POOL_STATE: tuple[Tokenizer, np.dtype] | None = None


def _pool_init(tokenizer_json: str, dtype: str) -> None:
    global _POOL_STATE
    _POOL_STATE = (Tokenizer.from_json(tokenizer_json), np.dtype(dtype))


def _pool_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _POOL_STATE is not None, "_pool_init runs first in every worker"
    return _encode_texts(_POOL_STATE[0], texts, _POOL_STATE[1])


def _encoded_chunks(chunks: Iterator[list[_Doc]], tokenizer: Tokenizer, dtype: np.dtype, workers: int
                    ) -> Iterator[tuple[list[_Doc], np.ndarray, np.ndarray]]:
    """(documents, ids, lengths) per chunk, in corpus order; with ``workers`` > 1 encoded by one
    pool of processes, at most two chunks per worker in flight (which bounds memory)."""
    if workers <= 1:
        for docs in chunks:
            yield docs, *_encode_texts(tokenizer, [d.text for d in docs], dtype)
        return
    pool = worker_pool(workers, _pool_init, (tokenizer.to_json(), dtype.str))
    try:
        pending: deque = deque()
        for docs in chunks:
            pending.append((docs, pool.submit(_pool_encode, [d.text for d in docs])))
            if len(pending) >= 2 * workers:
                docs, future = pending.popleft()
                yield docs, *future.result()
        while pending:
            docs, future = pending.popleft()
            yield docs, *future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ShardWriter:
    """Appends encoded documents to the train and validation files, counting tokens and documents,
    and remembers the training document of lowest split key (held out if no other is)."""

    def __init__(self, paths: dict[str, Path], dtype: np.dtype) -> None:
        self.paths, self.dtype = paths, dtype
        self.files = {s: open(p, "wb") for s, p in paths.items()}
        self.tokens = {"train": 0, "val": 0}
        self.documents = {"train": 0, "val": 0}
        self.nearest: tuple[float, int, int] | None = None  # (key, first token, end) in train.bin

    def add(self, docs: list[_Doc], ids: np.ndarray, lengths: np.ndarray) -> None:
        held = np.fromiter((d.held_out for d in docs), dtype=bool, count=len(docs))
        ends = self.tokens["train"] + np.cumsum(np.where(held, 0, lengths))
        for doc, end, n in zip(docs, ends.tolist(), lengths.tolist()):
            if not doc.held_out and (self.nearest is None or doc.key < self.nearest[0]):
                self.nearest = (doc.key, end - n, end)
        mask = np.repeat(held, lengths)
        for split, part in (("train", ids[~mask]), ("val", ids[mask])):
            self.files[split].write(part.tobytes())
            self.tokens[split] += part.size
        self.documents["val"] += int(held.sum())
        self.documents["train"] += len(docs) - int(held.sum())

    def sync(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def hold_out_nearest(self) -> None:
        """Move the recorded training document to the (empty) validation file; after ``close``."""
        assert self.nearest is not None and self.tokens["val"] == 0
        _, start, end = self.nearest
        size = self.dtype.itemsize
        with open(self.paths["train"], "r+b") as train, open(self.paths["val"], "wb") as val:
            train.seek(start * size)
            val.write(train.read((end - start) * size))
            # Shift the rest of train.bin down over the moved document, a block at a time.
            read_at, write_at = end * size, start * size
            while True:
                train.seek(read_at)
                block = train.read(1 << 24)
                if not block:
                    break
                train.seek(write_at)
                train.write(block)
                read_at, write_at = read_at + len(block), write_at + len(block)
            train.truncate(write_at)
            for f in (train, val):
                f.flush()
                os.fsync(f.fileno())
        self.tokens = {"train": self.tokens["train"] - (end - start), "val": end - start}
        self.documents = {"train": self.documents["train"] - 1, "val": 1}


def _write_shards(paths: list[str], config: DataConfig, tokenizer: Tokenizer, dtype: np.dtype,
                  files: dict[str, Path], few: bool) -> _ShardWriter:
    """Stream the corpus through the encoder into ``files`` (train and val)."""
    from tqdm import tqdm

    workers = config.workers or (os.cpu_count() or 1)
    total = _input_bytes(paths)
    if total < POOL_MIN_BYTES:
        workers = 1
    chunks = _chunks(_labelled_documents(paths, config, few), CHUNK_CHARS)
    writer = _ShardWriter(files, dtype)
    try:
        with (tqdm(total=total, desc="encoding", unit="B", unit_scale=True, leave=False, disable=None) as bar,
              contextlib.closing(_encoded_chunks(chunks, tokenizer, dtype, workers)) as encoded):
            for docs, ids, lengths in encoded:
                writer.add(docs, ids, lengths)
                bar.update(sum(d.nbytes for d in docs))
        writer.sync()
    finally:
        writer.close()
    if config.val_fraction > 0 and not few and writer.documents["val"] == 0:
        writer.hold_out_nearest()
    return writer


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
        if not (isinstance(tokens, dict) and all(is_whole(tokens.get(s)) and tokens[s] >= 0
                                                 for s in ("train", "val"))):
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

    def made_with(self, tokenizer: Tokenizer) -> bool:
        """Whether ``tokenizer`` gives these shards' ids: the very tokenizer, or one that encodes
        alike (the same vocabulary under an exported model's name; shards prepared before
        ``tokenizer_encoding`` was recorded need the very tokenizer)."""
        return tokenizer.fingerprint == self.fingerprint or \
            self.index.get("tokenizer_encoding") == tokenizer.encoding_fingerprint

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
    # How documents are cut and split: shards made by another rule are rebuilt.
    h.update(f"{SPLIT_RULE}:{BIG_TEXT_BYTES}:{PIECE_CHARS}".encode())
    if paths == [BUILTIN]:
        h.update(f"builtin:{sysconfig.get_python_version()}".encode())
    else:
        for p in expand_paths(paths):
            st = p.stat()
            h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def is_shard_dir(path: Path) -> bool:
    """A folder `prepare` wrote (its lmforge index), or began to write: a prepare killed before or
    during its renames leaves shard files and their temporary names (train.bin.tmp, index.json.tmp,
    ...) and nothing else. A train.bin / val.bin with neither is not ours: it is nanoGPT's layout,
    a user's data."""
    index = read_json_head(path / "index.json")
    if index is not None and index.get("format") == SHARD_FORMAT:
        return True
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    leftovers = {f"{name}.tmp" for name in ("train.bin", "val.bin", "index.json")}  # no other tool's names
    return bool(names & leftovers) and all(n.removesuffix(".tmp") in SHARD_FILES for n in names)


def _reuse(out: Path, signature: str, tokenizer: Tokenizer, save_tokenizer: bool, quiet: bool) -> ShardSet | None:
    """The shards already in ``out`` if they were made from these very inputs, else None."""
    if not (out / "index.json").is_file():
        return None
    try:
        existing = ShardSet.open(out)
        if existing.index.get("input_signature") != signature:
            return None
        existing.tokens("train"), existing.tokens("val")  # both files present and whole
    except DataError:
        return None  # damaged or stale: rebuild
    # Same size is not same content (a bad copy, a flipped bit, a file edited in place): hashing costs
    # far less than preparing, and a reused set is then what was written.
    recorded = existing.index.get("sha256")
    if isinstance(recorded, dict):
        size = sum((out / f"{s}.bin").stat().st_size for s in ("train", "val"))
        if size > 1 << 30 and not quiet:
            print(f"checking the {size / 2**30:.1f} GiB of shards in {out} against their sha256", flush=True)
        changed = [s for s in ("train", "val") if recorded.get(s) != atomic.sha256_file(out / f"{s}.bin")]
        if changed:
            if not quiet:
                print(f"{out / (changed[0] + '.bin')} is not what was written there (sha256 differs); preparing again")
            return None
    if save_tokenizer and not (out / "tokenizer.json").is_file():
        try:
            tokenizer.save(out / "tokenizer.json")
        except OSError as e:
            raise write_error(out / "tokenizer.json", e) from None
    # What a prepare killed outright (SIGKILL: no clean-up) left beside the shards it did not replace
    remove_quietly(*(out / f"{name}.tmp" for name in SHARD_FILES))
    if not quiet:
        print(f"reusing token shards in {out} (inputs unchanged)")
    return existing


def prepare(paths: list[str], out_dir: str | os.PathLike, tokenizer: Tokenizer,
            config: DataConfig = DataConfig(), force: bool = False, quiet: bool = False,
            save_tokenizer: bool = False) -> ShardSet:
    """Tokenize a corpus into ``out_dir``; reuse what is there if the inputs are unchanged.

    With ``save_tokenizer``, ``tokenizer.json`` is written beside the shards in the same
    commit, so the folder never pairs new shards with an old tokenizer."""
    out = Path(out_dir)
    signature = _input_signature(paths, config, tokenizer)
    # Two prepares into one folder would write the same temporary names and rename each other's
    # shards beside their own index: the folder is held, the second refused.
    with run_lock(out, doing="writes in it"):
        return _prepare(paths, out, tokenizer, config, force, quiet, save_tokenizer, signature)


def _prepare(paths: list[str], out: Path, tokenizer: Tokenizer, config: DataConfig, force: bool, quiet: bool,
             save_tokenizer: bool, signature: str) -> ShardSet:
    if not force and (existing := _reuse(out, signature, tokenizer, save_tokenizer, quiet)) is not None:
        return existing
    # Count documents only as far as the split rule needs: whole documents, or tails of few.
    enough = _min_documents_to_split(config.val_fraction)
    n_docs = sum(1 for _ in zip(range(enough), iter_documents(paths, config)))
    if n_docs == 0:
        raise DataError(f"no text found in {', '.join(paths)}")
    if tokenizer.eot_id is None:
        raise DataError("the tokenizer has no <|endoftext|> token to separate documents; train it with that special token")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    names = ["train.bin", "val.bin", *(["tokenizer.json"] if save_tokenizer else []), "index.json"]
    tmps = {name: out / f"{name}.tmp" for name in names}
    # Everything is written under temporary names first and renamed only once all of it is on
    # disk: a full disk or a kill leaves the previous shards as they were, and no .tmp files.
    # index.json goes last, so a reader never sees an index that names shards not yet in place.
    created = not out.exists()  # (where run_lock could lock, it made the folder and removes it if left empty)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = _write_shards(paths, config, tokenizer, dtype,
                                {"train": tmps["train.bin"], "val": tmps["val.bin"]}, few=n_docs < enough)
        if save_tokenizer:
            atomic.write_file(tmps["tokenizer.json"], tokenizer.to_json().encode("utf-8"))
        index = {
            "format": SHARD_FORMAT, "version": SHARD_FORMAT_VERSION, "dtype": dtype.name,
            "tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_encoding": tokenizer.encoding_fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id, "tokens": written.tokens, "documents": written.documents,
            "sources": paths, "input_signature": signature, "split_rule": SPLIT_RULE,
            # What the shards hold, so that a run resumed on other data is caught even at equal sizes.
            "sha256": {s: atomic.sha256_file(tmps[f"{s}.bin"]) for s in ("train", "val")},
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
        t, d = written.tokens, written.documents
        print(f"wrote {t['train']:,} train and {t['val']:,} val tokens "
              f"({d['train']} + {d['val']} documents, {dtype.name}) to {out}")
    return ShardSet(out, index)


# --------------------------------------------------------------------------- batches
def _check_length(tokens: np.ndarray, context: int, what: str) -> None:
    if len(tokens) < context + 1:
        raise DataError(f"the {what} split has {len(tokens)} tokens, shorter than one context window "
                        f"({context} + 1 tokens); give more text or a shorter context (--model.context_length)")


def _rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous rows of a global batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not one of the {world_size} processes (0 to {world_size - 1}); "
                        "check RANK and WORLD_SIZE")
    if batch_size % world_size:
        raise DataError(f"the global batch of {batch_size} sequences does not divide among {world_size} processes; "
                        f"pick a --train.batch_size that is a multiple of {world_size}")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


class SlidingWindows:
    """Windows of ``context`` tokens every ``stride`` tokens; targets are inputs shifted by one.

    Batches walk the windows in epochs, each epoch in a seeded random order, dropping
    the last incomplete batch (as the book's ``create_dataloader_v1``). ``batch_size`` is the
    global batch; with ``world_size`` > 1, ``batch`` returns rank ``rank``'s rows of it.
    """

    def __init__(self, tokens: np.ndarray, context: int, stride: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, *, rank: int = 0, world_size: int = 1) -> None:
        _check_length(tokens, context, "training")
        self.rows = _rank_rows(batch_size, rank, world_size)
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
        """This rank's rows of the k-th global batch of the whole run (k counts micro-batches from 0)."""
        epoch, b = divmod(k, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_windows) if self.shuffle
                     else np.arange(self.n_windows))
            self._order = (epoch, order)
        ids = self._order[1][b * self.batch_size:(b + 1) * self.batch_size][self.rows]
        xs, ys = zip(*(self.window(int(i)) for i in ids))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


class RandomWindows:
    """Batches of windows starting at random offsets: global batch k is drawn from a generator seeded
    by (seed, k); with ``world_size`` > 1, ``batch`` returns rank ``rank``'s rows of it."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int = 0, *,
                 rank: int = 0, world_size: int = 1) -> None:
        _check_length(tokens, context, "training")
        self.rows = _rank_rows(batch_size, rank, world_size)
        self.tokens, self.context, self.batch_size, self.seed = tokens, context, batch_size, seed

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.random.default_rng([self.seed, k]).integers(0, len(self.tokens) - self.context, self.batch_size)
        chunks = np.stack([np.asarray(self.tokens[s:s + self.context + 1], dtype=np.int64)
                           for s in starts[self.rows]])
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
