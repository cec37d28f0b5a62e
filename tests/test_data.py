import json

import numpy as np
import pytest
import torch
from conftest import TEXT

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data import (
    DataError,
    RandomWindows,
    ShardSet,
    SlidingWindows,
    builtin_corpus,
    eval_batches,
    prepare,
    read_documents,
    split_documents,
)
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 20], TokenizerConfig(vocab_size=300))


def test_builtin_corpus_is_real_english():
    docs = builtin_corpus()
    total = sum(map(len, docs))
    assert len(docs) > 300 and total > 1_000_000
    assert any("for" in d and "statement" in d for d in docs)


def test_a_folder_another_prepare_writes_in_is_refused(tmp_path, corpus_dir, tok):
    """Two prepares into one folder at once wrote the same temporary names: one's shards ended up beside
    the other's index (sizes and sha256 wrong), the second reported success, the first a false error."""
    from conftest import another_process_holding

    from lmforge.outputs import OutputError

    out = tmp_path / "data"
    prepare([str(corpus_dir)], out, tok, DataConfig(val_fraction=0.1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with another_process_holding(out):
        with pytest.raises(OutputError, match=f"^{out} is in use by another lmforge process that writes in it; "
                                              "wait until it ends, or choose another --out$"):
            prepare([str(corpus_dir)], out, tok, DataConfig(val_fraction=0.2))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert prepare([str(corpus_dir)], out, tok, DataConfig(val_fraction=0.2)).index["data_config"]["val_fraction"] == 0.2


def test_prepare_writes_shards_and_reuses_them(tmp_path, corpus_dir, tok, capsys):
    out = tmp_path / "data"
    shards = prepare([str(corpus_dir)], out, tok, DataConfig(val_fraction=0.1, seed=3))
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["tokenizer_fingerprint"] == tok.fingerprint
    # The documents the split rule holds out (by hash of seed and text), whole and in order.
    train_docs, val_docs = split_documents(read_documents([str(corpus_dir)]), DataConfig(val_fraction=0.1, seed=3))
    assert index["documents"] == {"train": len(train_docs), "val": len(val_docs)}
    assert len(train_docs) + len(val_docs) == 30
    train = shards.tokens("train")
    assert isinstance(train, np.memmap)
    assert int((train == tok.eot_id).sum()) == len(train_docs)  # one separator after each document
    assert tok.decode(shards.tokens("val").tolist()) == "".join(d + "<|endoftext|>" for d in val_docs)
    first_doc = train[: int(np.argmax(train == tok.eot_id))]
    assert tok.decode(first_doc.tolist()).startswith("Document")
    mtime = (out / "train.bin").stat().st_mtime_ns
    prepare([str(corpus_dir)], out, tok, DataConfig(val_fraction=0.1, seed=3))
    assert "reusing" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    # A shard changed in place at the same size (a bad copy, a flipped bit) is not reused: it is made again
    whole = (out / "val.bin").read_bytes()
    with open(out / "val.bin", "r+b") as f:
        f.seek(len(whole) // 2)
        f.write(bytes([whole[len(whole) // 2] ^ 1]))
    prepare([str(corpus_dir)], out, tok, DataConfig(val_fraction=0.1, seed=3))
    assert "val.bin is not what was written there (sha256 differs); preparing again" in capsys.readouterr().out
    assert (out / "val.bin").read_bytes() == whole


def test_split_is_by_document_and_seeded():
    docs = [f"doc {i}" for i in range(40)]
    a = split_documents(docs, DataConfig(val_fraction=0.1, seed=1))
    b = split_documents(docs, DataConfig(val_fraction=0.1, seed=1))
    c = split_documents(docs, DataConfig(val_fraction=0.1, seed=2))
    assert a == b and a != c
    assert 1 <= len(a[1]) <= 10 and sorted(a[0] + a[1]) == sorted(docs)  # about 10 % of 40, whole documents


def test_single_document_holds_out_its_tail():
    doc = "\n".join(f"line {i}" for i in range(100))
    train, val = split_documents([doc], DataConfig(val_fraction=0.1))
    assert train[0] + val[0] == doc and val[0].startswith("line 9")


def test_jsonl_documents(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "first doc"}\n\n{"text": "second doc", "id": 2}\n')
    assert read_documents([str(p)]) == ["first doc", "second doc"]
    with pytest.raises(DataError, match=r"has no field 'body' \(it has 'text'\)"):
        read_documents([str(p)], DataConfig(text_field="body"))
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"c.jsonl:2 is not valid JSON"):
        read_documents([str(p)])


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"  \n", "is empty"), (b"abc\x00\x01\x02", "binary"),
                                           (b"caf\xe9 au lait", "not valid UTF-8")])
def test_bad_corpus_files_name_the_file(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        read_documents([str(p)])
    assert "bad.txt" in str(e.value)


def test_non_utf8_with_explicit_replace(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"caf\xe9 au lait")
    assert read_documents([str(p)], DataConfig(errors="replace")) == ["caf\ufffd au lait"]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_documents([str(tmp_path / "nope.txt")])


def test_sliding_windows_match_the_book():
    tokens = np.arange(100, dtype=np.uint16)
    ds = SlidingWindows(tokens, context=4, stride=4, batch_size=2, seed=0, shuffle=False)
    x, y = ds.batch(0)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert ds.n_windows == 24  # GPTDatasetV1: range(0, len - max_length, stride)
    overlapping = SlidingWindows(tokens, context=4, stride=1, batch_size=1, shuffle=False)
    assert overlapping.batch(1)[0].tolist() == [[1, 2, 3, 4]]


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a = SlidingWindows(tokens, 8, 8, 4, seed=5)
    b = SlidingWindows(tokens, 8, 8, 4, seed=5)
    assert all(torch.equal(a.batch(k)[0], b.batch(k)[0]) for k in (0, 7, 30, 100))
    seen = torch.cat([a.batch(k)[0] for k in range(len(a))]).flatten().tolist()
    assert len(set(seen)) == len(seen)  # one epoch visits each window once
    r1, r2 = RandomWindows(tokens, 8, 4, seed=1), RandomWindows(tokens, 8, 4, seed=1)
    assert torch.equal(r2.batch(42)[0], r1.batch(42)[0])
    x, y = r1.batch(3)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_corpus_shorter_than_a_window_is_an_error():
    with pytest.raises(DataError, match="shorter than one context window"):
        SlidingWindows(np.arange(10, dtype=np.uint16), 16, 16, 1)
    with pytest.raises(DataError, match="fewer than one batch"):
        SlidingWindows(np.arange(40, dtype=np.uint16), 16, 16, 8)


def test_eval_batches_cover_a_short_split():
    batches = list(eval_batches(np.arange(10, dtype=np.uint16), context=64, batch_size=4, max_batches=5))
    assert len(batches) == 1 and batches[0][0].shape == (1, 9)


def test_truncated_shard_is_detected(tmp_path, corpus_dir, tok):
    out = tmp_path / "data"
    prepare([str(corpus_dir)], out, tok)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="truncated"):
        ShardSet.open(out).tokens("train")
