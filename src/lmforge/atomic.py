"""Atomic file writes: write a temporary file beside the target, flush it, rename it over.
(And ``sha256_file``, the one checksum of a file that checkpoints, shards and downloads use.)

A crash or a kill mid-write leaves the old file (or none), never half a file; a write that
fails (a full disk, a read-only folder) removes its temporary file and leaves the old one
untouched. No torch import, so the tokenizer can use it.

The primitive operations (``write_file``, ``replace``, ``fsync_dir``, ``symlink``,
``remove_tree``) are module functions so that checkpoint writing goes through them one by
one: the fault-injection tests make the k-th of them fail, or kill the process there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` and fsync it (not atomic by itself: callers rename it into place)."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink(missing_ok=True)  # never leave a partial file behind to fill a full disk further
        if e.filename is None:  # write() and fsync() name no file: say which one it was
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` over ``dst`` in one step (files, or a directory onto a name that is free)."""
    os.replace(src, dst)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a power cut after it must not undo it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms that cannot open directories (Windows) have no directory fsync
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def symlink(target: str, link: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` atomically, replacing a link that is there."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write_file(tmp, data)
    try:
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in blocks (files may be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
