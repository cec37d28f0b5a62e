"""Shared fixtures: tiny corpora and runs made in tmp_path; ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "A stitch in time saves nine. Where there is a will, there is a way. "
    "All that glitters is not gold; the early bird catches the worm.\n"
)


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder beside the project is not here)")
    return path


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """Thirty small documents of English-like text."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(f"Document {i}. " + TEXT * (3 + i % 4), encoding="utf-8")
    return d


@pytest.fixture
def prepared(tmp_path, corpus_dir):
    """A trained 300-token tokenizer and prepared shards of corpus_dir: (tmp_path, tokenizer path, data dir)."""
    from lmforge.cli import main

    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(corpus_dir), "--out", str(tok), "--tokenizer.vocab_size",
                 "300"]) == 0
    data = tmp_path / "data"
    assert main(["prepare", "--data", str(corpus_dir), "--tokenizer", str(tok), "--out", str(data)]) == 0
    return tmp_path, tok, data
