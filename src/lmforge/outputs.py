"""Where commands write: an output never destroys an input or a file lmforge did not make.

Every command that writes (``tokenizer train``, ``prepare``, ``export``) calls
``check_output`` before it does any work, so a refusal costs nothing:

- an output that is one of the inputs, lies inside an input folder, or would replace an
  input file is always refused;
- nothing but training writes into a run directory (its checkpoints must stay resumable);
- an existing output of the command's own kind (a tokenizer file, a shard folder, an
  earlier export) is replaced as before; anything else is refused unless ``--overwrite``;
- a file where a folder is needed, or a folder where a file is needed, is named.

``staged_folder`` writes a set of files so that a failure (a full disk, a kill) leaves
the previous files as they were and no temporary files behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .config import LmforgeError


class OutputError(LmforgeError, ValueError):
    """An output path that would destroy something, or that cannot be written."""


OVERWRITE_HINT = "choose another --out, or pass --overwrite true to write there anyway"


def read_json_head(path: Path, limit: int = 1 << 20) -> dict | None:
    """The JSON object in a small file, or None (missing, too big, not JSON, not an object)."""
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def holds_a_run(path: Path) -> bool:
    """A training run with something to lose: its run config, trainer state or checkpoints.

    Narrower than ``checkpoint.is_run_dir`` on purpose: a folder holding just a tokenizer.json
    (or config.json + tokenizer.json) must stay a valid place to write a tokenizer or an export.
    """
    if not path.is_dir():
        return False
    cfg = read_json_head(path / "config.json")
    if cfg is not None and cfg.get("format") == "lmforge-run":
        return True
    return (path / "trainer_state.pt").exists() or (path / "checkpoints" / "latest").exists()


def inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or below it (both resolved)."""
    return child == parent or parent in child.parents


def is_data_file(path: Path) -> bool:
    """One of the files of a folder `lmforge prepare` wrote (its shards, index or tokenizer)."""
    from .data import SHARD_FILES, is_shard_dir

    return path.name in SHARD_FILES and path.parent.is_dir() and is_shard_dir(path.parent)


def input_paths(specs: Iterable[str | os.PathLike]) -> list[tuple[Path, Path | None]]:
    """The existing paths among command inputs (names such as 'builtin' or a known model are skipped),
    each with None, and the base models a fine-tuning run among them reads, each with that run: one
    that saved only what it trained (LoRA adapters, a head) is unusable once its base is written over
    (an export of it onto its base was)."""
    paths, seen = [], set()
    for spec in specs:
        path, reader = Path(spec), None
        while path.exists() and path.resolve() not in seen:
            seen.add(path.resolve())
            paths.append((path, reader))
            base = _base_read_by(path)
            if not base:
                break
            path, reader = Path(base), path
    return paths


def _base_read_by(path: Path) -> str | None:
    """The base model a run that saved only its trained weights loads beneath them, else None. Read from
    the run's config.json (its newest checkpoint's) alone: checking an output must not hash the weights."""
    cfg = read_json_head(path / "config.json") if path.is_dir() else None
    if cfg is None or cfg.get("format") != "lmforge-run":
        return None
    base = cfg.get("base") if cfg.get("weights") == "trained" else None
    spec = base.get("spec") if isinstance(base, dict) else None
    return spec if isinstance(spec, str) and spec else None


def check_output(out: str | os.PathLike, *, kind: str, what: str, own_kind: Callable[[Path], bool],
                 inputs: Iterable[str | os.PathLike] = (), writes: Iterable[str] = (), overwrite: bool = False,
                 flag: str = "--out", example: str = "results.json") -> Path:
    """Refuse ``out`` (a 'file' or a 'folder') if writing it could destroy an input or unrelated data.

    ``what`` names the artefact ("a tokenizer file"), ``own_kind`` recognises an existing one,
    ``writes`` lists the file names a folder output receives, ``example`` is a file name to suggest
    for a file output given as a folder. Returns ``out`` as a Path.
    """
    if kind == "file" and str(out).endswith(("/", os.sep)):  # Path() would drop the slash and write a file there
        raise OutputError(f"{flag} {out} names a folder, but this command writes a file; give a file path such as "
                          f"{Path(out) / example}")
    out = Path(out)
    target = out.resolve()
    written = [target / name for name in writes] if kind == "folder" else [target]
    for given, reader in input_paths(inputs):
        src = given.resolve()
        if target == src and reader is not None:
            raise OutputError(f"{flag} {out} is the base model {reader} reads beneath its fine-tuned weights; "
                              "writing it would leave that run unusable. Choose another path")
        if target == src:
            raise OutputError(f"{flag} {out} is also an input of this command; writing it would destroy the "
                              "input. Choose another path")
        if src.is_dir() and inside(target, src):
            raise OutputError(f"{flag} {out} is inside the input folder {given}; write outside the folders "
                              "being read")
        if any(w == src for w in written):
            raise OutputError(f"{flag} {out} would replace the input {given}; choose another path")
    folder = target if kind == "folder" else target.parent
    if kind == "file" and is_data_file(target):
        # The shards' tokenizer.json (or index) must stay the one they were made with.
        raise OutputError(f"{flag} {out} is a file of the prepared data folder {folder}, which only "
                          "`lmforge prepare` writes; choose another path")
    if kind == "folder" and not own_kind(target):
        from .data import is_shard_dir

        if is_shard_dir(target):  # even with --overwrite: its shards and tokenizer belong together
            raise OutputError(f"{flag} {out} is a prepared data folder, which only `lmforge prepare` writes; "
                              "choose another path")
    if holds_a_run(folder):
        raise OutputError(f"{flag} {out} is {'' if kind == 'folder' else 'in '}a training run directory, which "
                          "only `lmforge pretrain` writes (its checkpoints must stay resumable); choose another path")
    # The nearest existing ancestor must be a folder, or nothing can be created below it.
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag} {out}: {parent} is a file, so nothing can be created inside it; "
                                  "choose another path")
            break
    if out.exists():
        if kind == "folder" and not out.is_dir():
            raise OutputError(f"{flag} {out} is a file, but this command writes a folder; choose a folder path")
        if kind == "file" and out.is_dir():
            raise OutputError(f"{flag} {out} is a folder, but this command writes a file; give a file path")
        empty_folder = kind == "folder" and not any(out.iterdir())
        if not empty_folder and not own_kind(out) and not overwrite:
            raise OutputError(f"{flag} {out} already exists and is not {what}; {OVERWRITE_HINT}")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process: alive; a number that is no process id: not ours to judge
    return True


def remove_dead_temps(out: Path) -> None:
    """Remove what a process killed outright (kill -9, a power cut) left while writing ``out``: its
    temporaries beside it, ``.NAME.tmpPID`` (a file) and ``.NAME.PID.*.tmp`` (a staged folder), whose
    process is gone. A living process's are its own; other names are never touched."""
    import re

    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp(\d+)|(\d+)\.[\w-]+\.tmp)$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m and not _alive(int(m.group(1) or m.group(2))):
            if (entry / ".replaced").is_dir() and any((entry / ".replaced").iterdir()):
                continue  # killed while swapping in: it holds the only copy of files that were in out
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


@contextlib.contextmanager
def staged_folder(out: Path, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; on success its files move into ``out``.

    The files are renamed into place only after all of them were written, so a failure
    midway (a full disk) leaves ``out`` exactly as it was; the temporary folder is always removed,
    and so are the folders above ``out`` made for it, when it fails. The files it replaces, and those
    named in ``replaces`` (which would change the meaning of what is written, as a stale
    chat_template.jinja beside an export), are set aside first and put back if a rename fails, so
    ``out`` never holds part of the old and part of the new.
    """
    made = [p for p in out.parents if not p.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        names = sorted(f.name for f in stage.iterdir())
        in_way = [n for n in names if (stage / n).is_file() and (out / n).is_dir() and not (out / n).is_symlink()]
        if in_way:
            raise OutputError(f"{out / in_way[0]} is a folder where a file goes; move it away, or choose another "
                              "--out")
        _swap_in(stage, out, names, [n for n in replaces if n not in names])
        made = []
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(made)


def _swap_in(stage: Path, out: Path, names: list[str], stale: list[str]) -> None:
    """Move ``names`` from ``stage`` into ``out`` and the ``stale`` ones out of it: all, or (on an
    error) none; what was replaced is deleted only once the new files are all in place."""
    old = stage / ".replaced"
    old.mkdir()
    set_aside, moved_in = [], []
    try:
        for n in [*names, *stale]:
            if (out / n).exists() or (out / n).is_symlink():
                os.replace(out / n, old / n)
                set_aside.append(n)
        for n in names:
            os.replace(stage / n, out / n)
            moved_in.append(n)
    except BaseException:
        for n in moved_in:
            with contextlib.suppress(OSError):
                os.replace(out / n, stage / n)
        for n in set_aside:
            with contextlib.suppress(OSError):
                os.replace(old / n, out / n)
        if any(old.iterdir()):  # one could not be put back: kept, not deleted with the stage
            keep = out.parent / f"{out.name}.replaced-{os.getpid()}"
            with contextlib.suppress(OSError):
                os.replace(old, keep)
                raise OutputError(f"writing {out} failed and some of its earlier files could not be put back: "
                                  f"they are in {keep}")
        raise


# Run folders this process holds: resolved path -> the open folder descriptor that holds the lock.
_HELD: dict[str, int] = {}


@contextlib.contextmanager
def run_lock(run: str | os.PathLike, active: bool = True, doing: str = "trains in it") -> Iterator[None]:
    """Hold the run folder ``run`` while this process trains in it: another lmforge process that
    would train, resume or start over there is refused, instead of mixing its checkpoints and logs
    with this one's (and so for a folder of token shards while `prepare` writes it: ``doing`` says
    what the holder does). The lock is the OS's (``flock`` on the folder), so a process that dies, even
    by kill -9, holds nothing. Nested holds of one folder by one process are fine. A folder made
    here is removed again if the work fails before writing anything into it. ``active=False`` (the
    ranks other than 0, which do not write) holds nothing; so does a file system without locks
    (with a warning)."""
    run = Path(run)
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock, as before
        fcntl = None
    key = str(run.resolve())
    if not active or fcntl is None or (run.exists() and not run.is_dir()) or key in _HELD:
        yield  # a file in the way is the caller's error to report; a nested hold is already held
        return
    made = [p for p in (run, *run.parents) if not p.exists()]
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            _remove_empty(made)
            os.close(fd)
            raise OutputError(f"{run} is in use by another lmforge process that {doing}; wait until it ends, "
                              "or choose another --out") from None
        import warnings

        warnings.warn(f"{run} cannot be locked on this file system ({e.strerror}); nothing stops a second "
                      "lmforge process from writing in it at the same time", stacklevel=3)
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        _remove_empty(made)  # before the lock goes: no other process may take a folder about to vanish
        os.close(fd)  # closing the descriptor releases the lock


def _remove_empty(made: list[Path]) -> None:
    """The folders made for an output (innermost first), each only while it is still empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break


_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "no permission: choose a folder you can write to, or change its permissions",
    errno.EPERM: "not permitted: choose a folder you can write to, or change its permissions",
    errno.EEXIST: "a file is in the way where a folder is needed: choose another path",
    errno.ENOTDIR: "a file is in the way where a folder is needed: choose another path",
    errno.EISDIR: "a folder is in the way where a file is needed: choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
}


def fs_hint(e: OSError) -> str:
    """How to fix a file-system error, in a few words."""
    if e.errno is None and "requested and" in str(e) and "written" in str(e):
        return _HINTS[errno.ENOSPC]  # numpy's short write ("16384 requested and 10112 written"): the disk filled
    return _HINTS.get(e.errno, "check the path and the disk, then try again")


def write_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """A failed write as a one-line answer naming the output, the cause and the fix."""
    return OutputError(f"could not write {path}: {e.strerror or e}; {fs_hint(e)} (files that were there before "
                       "are unchanged)")


def remove_quietly(*paths: Path) -> None:
    """Delete temporary files after a failure; a file that is already gone is fine."""
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


__all__ = ["OutputError", "check_output", "fs_hint", "holds_a_run", "input_paths", "inside", "is_data_file",
           "read_json_head", "remove_quietly", "run_lock", "staged_folder", "write_error"]
