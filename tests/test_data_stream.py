"""Data at scale: streamed reading, the per-document hash split, encoding in a pool of workers with
bounded memory, crash safety, and each rank's share of the global batch."""

import contextlib
import json
import os
import multiprocessing
import random
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import TEXT

import lmforge.data as dm
from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data import (
    DataError,
    RandomWindows,
    SlidingWindows,
    builtin_corpus,
    iter_documents,
    prepare,
    read_documents,
    split_documents,
    split_key,
)
from lmforge.tokenizer import Tokenizer

WORDS = ("the of and to in is was for on that with by as at from his her it an are were be this which "
         "river stone winter garden letter mountain window morning").split()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 20], TokenizerConfig(vocab_size=300))


def _sentences(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """About 3 MB of JSONL, 8,000 records."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("big") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(8000):
            f.write(json.dumps({"text": _sentences(rng, rng.randint(50, 150))}) + "\n")
    return path


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: {_sentences(rng, 12)}" for i in range(n)]


# --- the split ----------------------------------------------------------------------------------------


def _with_peak_memory(fn):
    """fn()'s result and the peak of Python allocations while it ran (bytes)."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

def test_a_document_lands_on_the_same_side_whatever_else_the_corpus_holds():
    docs = _docs(300)
    config = DataConfig(val_fraction=0.2, seed=7)
    _, val = split_documents(docs, config)
    shuffled = docs[150:] + _docs(100, seed=1) + docs[:150][::-1]
    _, val_shuffled = split_documents(shuffled, config)
    assert set(val) == set(val_shuffled) & set(docs) and val
    _, val_other_seed = split_documents(docs, DataConfig(val_fraction=0.2, seed=8))
    assert set(val_other_seed) != set(val)


def test_the_held_out_fraction_is_about_the_asked_one_on_2000_documents():
    docs = _docs(2000)
    for fraction in (0.1, 0.3):
        _, val = split_documents(docs, DataConfig(val_fraction=fraction))
        assert abs(len(val) / 2000 - fraction) < 0.03  # three standard deviations at 0.3 is 0.031


def test_a_corpus_with_no_key_under_the_fraction_holds_out_the_nearest_document(tmp_path, tok):
    docs = _docs(20)
    seed = next(s for s in range(1000) if min(split_key(d, s) for d in docs) >= 0.1)
    config = DataConfig(val_fraction=0.1, seed=seed)
    nearest = min(docs, key=lambda d: split_key(d, seed))
    train, val = split_documents(docs, config)
    assert val == [nearest] and train == [d for d in docs if d != nearest]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shards = prepare([str(path)], tmp_path / "data", tok, config, quiet=True)
    assert shards.index["documents"] == {"train": 19, "val": 1}
    assert tok.decode(shards.tokens("val").tolist()) == nearest + "<|endoftext|>"
    assert tok.decode(shards.tokens("train").tolist()) == "".join(d + "<|endoftext|>" for d in train)
    assert shards.index["sha256"]["train"] == dm.atomic.sha256_file(tmp_path / "data" / "train.bin")


def test_the_builtin_corpus_holds_out_about_a_tenth_by_default():
    docs = builtin_corpus()
    train, val = split_documents(docs, DataConfig())
    assert 0.05 < len(val) / len(docs) < 0.15 and len(train) + len(val) == len(docs)


def test_shards_of_an_earlier_split_rule_are_rebuilt(tmp_path, tok, monkeypatch, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(30)))
    shards = prepare([str(path)], tmp_path / "data", tok)
    assert shards.index["split_rule"] == dm.SPLIT_RULE
    monkeypatch.setattr(dm, "SPLIT_RULE", "an older rule")
    capsys.readouterr()
    prepare([str(path)], tmp_path / "data", tok)
    assert capsys.readouterr().out.startswith("wrote ")


# --- reading ------------------------------------------------------------------------------------------

def test_jsonl_is_read_lazily_one_line_at_a_time(tmp_path, big_jsonl):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "first"}\n{"text": "second"}\nnot json\n')
    docs = iter_documents([str(path)])
    assert next(docs) == "first" and next(docs) == "second"  # before the bad third line is read
    with pytest.raises(DataError, match="c.jsonl:3 is not valid JSON"):
        next(docs)
    n, peak = _with_peak_memory(lambda: sum(1 for _ in iter_documents([str(big_jsonl)])))
    assert n == 8000 and peak < big_jsonl.stat().st_size / 10


@pytest.fixture
def small_pieces(monkeypatch):
    """Big-text handling at a size a test can afford: files over 10 kB are cut into pieces of 1,000 characters."""
    monkeypatch.setattr(dm, "BIG_TEXT_BYTES", 10_000)
    monkeypatch.setattr(dm, "PIECE_CHARS", 1000)
    monkeypatch.setattr(dm, "READ_BYTES", 701)  # blocks that cut characters and lines in two


def test_a_big_text_file_is_cut_into_pieces_at_blank_lines(tmp_path, small_pieces):
    rng = random.Random(0)
    text = "".join(f"Café {i}. {_sentences(rng, rng.randint(5, 30))}\n\n" for i in range(300))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(dm._sized_documents([str(path)], DataConfig()))
    assert "".join(p for p, _ in pieces) == text and sum(n for _, n in pieces) == path.stat().st_size
    assert len(pieces) > 10 and all(500 <= len(p) <= 1000 and p.endswith("\n\n") for p, _ in pieces[:-1])
    small = tmp_path / "small.txt"
    small.write_text(text[:9000], encoding="utf-8")
    assert read_documents([str(small)]) == [text[:9000]]  # under the bound: one document


def test_a_big_text_file_without_line_breaks_is_cut_at_the_piece_size(tmp_path, small_pieces):
    path = tmp_path / "one_line.txt"
    path.write_text("x" * 12_345)
    assert [len(p) for p in read_documents([str(path)])] == [1000] * 12 + [345]


def test_a_big_text_file_is_read_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "BIG_TEXT_BYTES", 100_000)
    monkeypatch.setattr(dm, "PIECE_CHARS", 32_000)
    monkeypatch.setattr(dm, "READ_BYTES", 16_000)
    rng = random.Random(1)
    path = tmp_path / "book.txt"
    with open(path, "w") as f:
        for _ in range(6000):
            f.write(_sentences(rng, 60) + "\n\n")
    pieces, peak = _with_peak_memory(lambda: sum(1 for _ in iter_documents([str(path)])))
    # A piece and a block or two at a time (strings of ASCII text take a byte a character), not 1.7 MB.
    assert pieces > 40 and peak < 8 * dm.PIECE_CHARS < path.stat().st_size / 6


@pytest.mark.parametrize("content,offset", [
    ("é" * 350 + "x" * 10_000 + "\udce9", 350 * 2 + 10_000),  # a bad byte far into the file
    ("x" * 700 + "é" + "x" * 10_000 + "\udcc3", 702 + 10_000),  # é crosses a block boundary; cut at the end
])
def test_a_big_text_file_that_is_not_utf8_names_the_byte(tmp_path, small_pieces, content, offset):
    raw = content.encode("utf-8", "surrogateescape")
    path = tmp_path / "big.txt"
    path.write_bytes(raw)
    with pytest.raises(DataError) as e:
        read_documents([str(path)])
    assert str(e.value) == (f"{path} is not valid UTF-8 (byte {offset}: {raw[offset:offset + 1]!r}); convert it "
                            "to UTF-8, or pass --text.errors replace to substitute U+FFFD for bad bytes")
    assert "".join(read_documents([str(path)], DataConfig(errors="replace"))) == raw.decode("utf-8", "replace")


def test_big_text_files_that_are_blank_or_binary_are_named(tmp_path, small_pieces):
    blank, binary = tmp_path / "blank.txt", tmp_path / "binary.txt"
    blank.write_text(" \n" * 20_000)
    binary.write_bytes(b"x" * 20_000 + b"\x00")
    with pytest.raises(DataError, match=f"^{blank} is empty; give a file with text in it$"):
        read_documents([str(blank)])
    with pytest.raises(DataError, match="looks binary"):
        read_documents([str(binary)])


@pytest.mark.parametrize("name,content,message", [
    ("a.jsonl", b'{"text": "ok"}\n{oops\n', ("{p}:2 is not valid JSON (Expecting property name enclosed in double "
                                               "quotes); JSONL needs one JSON object per line")),
    ("a.jsonl", b'{"text": "ok"}\n{"body": "x"}\n',
     "{p}:2 has no field 'text' (it has 'body'); name the text field with --text.text_field"),
    ("a.jsonl", b'{"text": 123}\n', "{p}:1: field 'text' is number, not text; give each record its text as a JSON string"),
    ("a.jsonl", b'{"text": null}\n', "{p}:1: field 'text' is null, not text; give each record its text as a JSON string"),
    ("a.jsonl", b'["text"]\n', ("{p}:1 is a JSON list, not an object; JSONL needs one object per line, its text in a "
                                 "field (--text.text_field, now 'text')")),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
     ("{p} is not valid UTF-8 (byte 28: b'\\xe9'); convert it to UTF-8, or pass --text.errors replace to substitute "
      "U+FFFD for bad bytes")),
    ("a.jsonl", b'{"text": "ok"}\n\x00\x01\n',
     "{p} looks binary (it contains NUL bytes), not text; give a UTF-8 text file"),
    ("a.jsonl", b"\n   \n", "{p} is empty; give a file with text in it"),
    ("a.txt", b"", "{p} is empty; give a file with text in it"),
])
def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path, tok, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        prepare([str(path)], tmp_path / "data", tok, quiet=True)
    assert str(e.value) == message.format(p=path)
    assert not (tmp_path / "data").exists()


def test_a_byte_order_mark_before_the_first_record_is_no_error(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')  # UTF-8 as Windows' Notepad saves it
    assert read_documents([str(path)]) == ["one", "two"]


def test_a_file_named_twice_is_read_once_and_a_device_is_not_a_missing_file(tmp_path, tok):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha")
    (corpus / "b.txt").write_text("beta")
    assert read_documents([str(corpus), str(corpus / "a.txt"), str(corpus)]) == ["alpha", "beta"]
    with pytest.raises(DataError, match="^/dev/null is not a regular file .*; give text files or folders$"):
        read_documents(["/dev/null"])


def test_missing_paths_and_folders_without_text_are_one_line_errors(tmp_path, tok):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG")
    for path, message in ((tmp_path / "nope.jsonl", f"no such file or directory: {tmp_path / 'nope.jsonl'}"),
                          (tmp_path / "images", f"directory {tmp_path / 'images'} holds no .txt, .md or .jsonl files")):
        with pytest.raises(DataError) as e:
            prepare([str(path)], tmp_path / "data", tok, quiet=True)
        assert str(e.value) == message


# --- encoding -----------------------------------------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 20,000 characters and a pool even for a small corpus, so that the pool really runs."""
    monkeypatch.setattr(dm, "CHUNK_CHARS", 20_000)
    monkeypatch.setattr(dm, "POOL_MIN_BYTES", 0)
    pools, real = [], dm.worker_pool

    def counted(*args, **kwargs):
        pools.append(real(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(dm, "worker_pool", counted)
    return pools


def test_shards_are_the_same_with_one_worker_and_two(tmp_path, tok, small_chunks):
    rng = random.Random(2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": _sentences(rng, rng.randint(5, 200))}) + "\n"
                                            for _ in range(600)))
    (corpus / "b.txt").write_text(TEXT * 100)
    index = {}
    for workers in (1, 2):
        shards = prepare([str(corpus)], tmp_path / f"w{workers}", tok, DataConfig(workers=workers), quiet=True)
        index[workers] = {k: shards.index[k] for k in ("tokens", "documents", "sha256")}
        assert len(small_chunks) == workers - 1  # one pool for all the chunks, none for one worker
    assert index[1] == index[2] and index[1]["documents"]["val"] > 0
    assert sum(f.stat().st_size for f in corpus.iterdir()) > 5 * dm.CHUNK_CHARS  # several chunks in the pool
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_encoding_holds_a_chunk_in_memory_not_the_corpus(tmp_path, tok, big_jsonl, monkeypatch):
    monkeypatch.setattr(dm, "CHUNK_CHARS", 16_000)
    tok.encode_ordinary("warm up")  # the tiktoken tables are built once, outside the measurement
    files = {"train": tmp_path / "train.bin", "val": tmp_path / "val.bin"}
    tracemalloc.start()
    try:
        written = dm._write_shards([str(big_jsonl)], DataConfig(workers=1), tok, np.dtype(np.uint16), files, False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written.documents["train"] + written.documents["val"] == 8000
    # The corpus is 3 MB of text and would be ~30 MB as Python ids; a chunk is 16 kB.
    assert peak < 1_000_000


@pytest.mark.parametrize("workers", [1, 2])
def test_a_kill_mid_encoding_leaves_the_previous_shards_and_no_tmp_files(tmp_path, tok, small_chunks, monkeypatch,
                                                                         workers):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(3000)))
    out = tmp_path / "data"
    prepare([str(path)], out, tok, DataConfig(seed=1), quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    add, calls = dm._ShardWriter.add, []

    def killed_on_the_second_chunk(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        add(self, *args)

    monkeypatch.setattr(dm._ShardWriter, "add", killed_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(path)], out, tok, DataConfig(seed=2, workers=workers), quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert multiprocessing.active_children() == []  # the pool is shut down too


# --- windows per rank ---------------------------------------------------------------------------------

class RecordedTokens:
    """A token array that records where each slice read from it starts."""

    def __init__(self, tokens):
        self.tokens, self.starts = tokens, []

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, s):
        self.starts.append(s.start)
        return self.tokens[s]


def _windows(kind, tokens, world_size=1, rank=0):
    if kind == "sliding":
        return SlidingWindows(tokens, 8, 8, 8, seed=3, rank=rank, world_size=world_size)
    return RandomWindows(tokens, 8, 8, seed=3, rank=rank, world_size=world_size)


@pytest.mark.parametrize("kind", ["sliding", "random"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_the_ranks_batches_put_together_are_the_single_process_batch(kind, world_size):
    tokens = np.arange(1000, dtype=np.uint16)  # 124 windows: 15 batches of 8 per epoch
    whole = _windows(kind, tokens)
    ranks = [_windows(kind, tokens, world_size, r) for r in range(world_size)]
    for k in (0, 7, 14, 15, 16, 29, 30, 44):  # across epoch boundaries
        x, y = whole.batch(k)
        parts = [r.batch(k) for r in ranks]
        assert parts[0][0].shape == (8 // world_size, 8)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


@pytest.mark.parametrize("kind", ["sliding", "random"])
def test_a_rank_reads_only_its_own_windows(kind):
    tokens = RecordedTokens(np.arange(1000, dtype=np.uint16))
    whole = _windows(kind, np.arange(1000, dtype=np.uint16))
    rank = _windows(kind, tokens, world_size=4, rank=3)
    x, _ = rank.batch(5)
    assert sorted(tokens.starts) == sorted(x[:, 0].tolist()) == sorted(whole.batch(5)[0][6:, 0].tolist())


def test_a_batch_that_does_not_divide_among_the_ranks_is_a_one_line_error():
    tokens = np.arange(1000, dtype=np.uint16)
    for make in (lambda: SlidingWindows(tokens, 8, 8, 6, world_size=4),
                 lambda: RandomWindows(tokens, 8, 6, world_size=4)):
        with pytest.raises(DataError) as e:
            make()
        assert str(e.value) == ("the global batch of 6 sequences does not divide among 4 processes; "
                                "pick a --train.batch_size that is a multiple of 4")
    with pytest.raises(DataError, match="rank 4 is not one of the 4 processes"):
        SlidingWindows(tokens, 8, 8, 8, rank=4, world_size=4)


ORPHAN = textwrap.dedent("""
    import os, sys, time
    from lmforge.cli import _terminate_as_exception
    from lmforge.workers import pool

    def nothing():
        pass

    with _terminate_as_exception():  # as a command runs: SIGTERM raises Terminated in lmforge's process
        with pool(2, nothing) as p:
            futures = [p.submit(time.sleep, 600) for _ in range(2)]
            time.sleep(1)
            print(" ".join(str(pid) for pid in p._processes), flush=True)
            time.sleep(600)
""")


@pytest.mark.parametrize("kill", ["parent", "worker"])
def test_workers_end_with_lmforge_even_when_it_is_killed_outright(tmp_path, kill):
    """A SIGKILL of lmforge leaves no worker encoding for ever; a worker takes SIGTERM's default action
    (lmforge's own handler, which turns SIGTERM into Terminated, is not inherited)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        if kill == "parent":
            proc.kill()
            proc.wait()
            gone = pids
        else:
            os.kill(pids[0], signal.SIGTERM)
            gone = pids[:1]
        deadline = time.monotonic() + 20
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in gone):
            assert time.monotonic() < deadline, "a worker outlived what should have ended it"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
        for p in pids if "pids" in locals() else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(p).kill()
