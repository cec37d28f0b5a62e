"""Tests written to kill mutmut survivors in data.py (docs/DEVELOPING.md, mutation testing).

Each one checks a behaviour a real bug would change: which files a directory yields, the exact
train/validation cut, when shards are rebuilt or reused, what index.json holds, the shard dtype
at the uint16 boundary, the exact windows and batches, and the exact error messages."""

import json

import numpy as np
import pytest
import torch
from conftest import TEXT

import lmforge.data as data_mod
from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data import (
    DataError,
    RandomWindows,
    ShardSet,
    SlidingWindows,
    eval_batches,
    expand_paths,
    is_shard_dir,
    prepare,
    read_documents,
    split_documents,
)
from lmforge.outputs import OutputError
from lmforge.tokenizer import EOT, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 20], TokenizerConfig(vocab_size=300))


def _corpus(tmp_path, n=5):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(n):
        (d / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT, encoding="utf-8")
    return d


# --- reading text -----------------------------------------------------------------------------------

def test_not_utf8_message_is_exact(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError) as e:
        read_documents([str(p)])
    assert str(e.value) == (f"{p} is not valid UTF-8 (byte 3: b'\\xe9'); convert it to UTF-8, or pass "
                            "--text.errors replace to substitute U+FFFD for bad bytes")


def test_an_unreadable_path_is_named(tmp_path):
    with pytest.raises(DataError) as e:
        data_mod._read_text(tmp_path, "strict")  # a folder where a file was expected
    assert str(e.value) == f"cannot read {tmp_path}: Is a directory"


def test_jsonl_honours_errors_replace(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "caf\xe9"}\n')
    assert read_documents([str(p)], DataConfig(errors="replace")) == ["caf\ufffd"]


def test_a_directory_yields_its_text_files_only_sorted(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "folder.txt").mkdir()  # a directory with a text suffix is not a file
    for name in ("b.md", "a.txt", "c.jsonl", "d.text", "e.bin", "f.py", "sub/g.txt"):
        (d / name).write_text("x")
    assert expand_paths([str(d)]) == [d / "a.txt", d / "b.md", d / "c.jsonl", d / "d.text", d / "sub" / "g.txt"]


def test_an_empty_directory_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        expand_paths([str(tmp_path / "empty")])
    assert str(e.value) == f"directory {tmp_path / 'empty'} holds no .txt, .md or .jsonl files"


# --- the split ----------------------------------------------------------------------------------------

def test_no_validation_split_when_the_fraction_is_zero():
    assert split_documents(["a", "b", "c"], DataConfig(val_fraction=0)) == (["a", "b", "c"], [])


def test_documents_are_held_out_whole_from_two_over_the_fraction():
    docs = [f"doc {i}\nsecond line" for i in range(20)]  # exactly 2 / 0.1 documents
    train, val = split_documents(docs, DataConfig(val_fraction=0.1, seed=4))
    assert val and set(val) <= set(docs) and len(train) + len(val) == 20  # whole documents, not tails
    assert split_documents(docs[:19], DataConfig(val_fraction=0.1, seed=4))[1] == ["second line"] * 19  # 19: tails


def test_fewer_documents_each_hold_out_their_tail():
    docs = [f"doc {i}\n" + "word " * 50 for i in range(5)]
    train, val = split_documents(docs, DataConfig(val_fraction=0.1))
    assert len(train) == len(val) == 5 and all(t + v == d for t, v, d in zip(train, val, docs))


def test_the_tail_cut_falls_at_the_last_line_break_before_the_fraction():
    doc = "\n".join(f"line {i}" for i in range(100))  # 789 characters; 90 % is 710
    train, val = split_documents([doc], DataConfig(val_fraction=0.1))
    assert val == ["\n".join(f"line {i}" for i in range(90, 100))]
    assert train == [doc[:len(doc) - len(val[0])]]


def test_the_tail_cut_without_a_usable_line_break_is_at_the_fraction():
    assert split_documents(["abcdefghij" * 10], DataConfig(val_fraction=0.1)) == (["abcdefghij" * 9], ["abcdefghij"])
    # A line break at the very start is no place to cut (it would hold out nearly everything).
    assert split_documents(["\n" + "x" * 99], DataConfig(val_fraction=0.1))[1] == ["x" * 10]
    assert split_documents(["a\n" + "x" * 98], DataConfig(val_fraction=0.1))[1] == ["x" * 98]


# --- shards: open -------------------------------------------------------------------------------------

@pytest.fixture
def shards(tmp_path, tok):
    out = tmp_path / "data"
    prepare([str(_corpus(tmp_path))], out, tok, DataConfig(val_fraction=0), quiet=True)
    return out


def _rewrite_index(out, **changes):
    index = json.loads((out / "index.json").read_text())
    index.update(changes)
    (out / "index.json").write_text(json.dumps(index))


def test_open_without_an_index_is_named(tmp_path):
    with pytest.raises(DataError) as e:
        ShardSet.open(tmp_path)
    assert str(e.value) == (f"{tmp_path} is not a prepared data directory (no index.json); "
                            "run `lmforge prepare` first")


@pytest.mark.parametrize("content,why", [
    ("{not json", "not JSON"), ("[1, 2]", "not a JSON object"),
])
def test_an_unreadable_index_is_named_exactly(shards, content, why):
    (shards / "index.json").write_text(content)
    with pytest.raises(DataError) as e:
        ShardSet.open(shards)
    assert str(e.value) == f"{shards / 'index.json'} is damaged; run `lmforge prepare` again with --force true ({why})"


@pytest.mark.parametrize("changes,why", [
    ({"dtype": "float32"}, "dtype 'float32'; shards are uint16 or uint32"),
    ({"tokens": [1, 2]}, "token counts missing or not whole numbers"),
    ({"tokens": {"train": -1, "val": 0}}, "token counts missing or not whole numbers"),
    ({"tokens": {"train": "12", "val": 0}}, "token counts missing or not whole numbers"),
    ({"tokens": {"train": True, "val": 0}}, "token counts missing or not whole numbers"),
    ({"tokenizer_fingerprint": None}, "no tokenizer fingerprint"),
])
def test_a_damaged_index_field_is_named_exactly(shards, changes, why):
    _rewrite_index(shards, **changes)
    with pytest.raises(DataError) as e:
        ShardSet.open(shards)
    assert str(e.value) == f"{shards / 'index.json'} is damaged; run `lmforge prepare` again with --force true ({why})"


def test_an_empty_split_opens_as_an_empty_array_of_the_shard_dtype(shards):
    val = ShardSet.open(shards).tokens("val")
    assert val.shape == (0,) and val.dtype == np.uint16


def test_shards_are_opened_read_only(shards):
    train = ShardSet.open(shards).tokens("train")
    with pytest.raises(ValueError):
        train[0] = 1


# --- prepare: reuse and rebuild ----------------------------------------------------------------------

def test_prepare_rebuilds_when_a_file_or_the_config_changes_and_ignores_workers(tmp_path, tok, capsys):
    corpus = _corpus(tmp_path)
    out = tmp_path / "data"
    prepare([str(corpus)], out, tok, DataConfig(seed=1))
    capsys.readouterr()
    prepare([str(corpus)], out, tok, DataConfig(seed=1, workers=1))
    assert "reusing" in capsys.readouterr().out  # how many processes encode changes nothing
    prepare([str(corpus)], out, tok, DataConfig(seed=2))
    assert "reusing" not in capsys.readouterr().out
    (corpus / "doc0.txt").write_text("A changed document, longer than before. " + TEXT * 2)
    shards = prepare([str(corpus)], out, tok, DataConfig(seed=2))
    assert "reusing" not in capsys.readouterr().out
    text = tok.decode(np.concatenate([shards.tokens("train"), shards.tokens("val")]).tolist())
    assert "A changed document" in text


def test_force_rebuilds_unchanged_inputs(tmp_path, tok, capsys):
    corpus = _corpus(tmp_path)
    out = tmp_path / "data"
    prepare([str(corpus)], out, tok)
    capsys.readouterr()
    prepare([str(corpus)], out, tok, force=True)
    assert capsys.readouterr().out.startswith("wrote ")


def test_the_builtin_corpus_signature_follows_the_python_version(tok, monkeypatch):
    first = data_mod._input_signature(["builtin"], DataConfig(), tok)
    monkeypatch.setattr(data_mod.sysconfig, "get_python_version", lambda: "9.99")
    assert data_mod._input_signature(["builtin"], DataConfig(), tok) != first


def test_tokenizer_is_saved_only_when_asked_also_on_reuse(tmp_path, tok, capsys):
    corpus = _corpus(tmp_path)
    out = tmp_path / "data"
    prepare([str(corpus)], out, tok, quiet=True)
    assert not (out / "tokenizer.json").exists()
    prepare([str(corpus)], out, tok, quiet=True)  # reused, still not asked
    assert not (out / "tokenizer.json").exists()
    prepare([str(corpus)], out, tok, save_tokenizer=True)
    assert "reusing" in capsys.readouterr().out
    assert Tokenizer.load(out / "tokenizer.json").fingerprint == tok.fingerprint
    inode = (out / "tokenizer.json").stat().st_ino
    prepare([str(corpus)], out, tok, save_tokenizer=True, quiet=True)  # already there: left alone
    assert (out / "tokenizer.json").stat().st_ino == inode
    other = tmp_path / "other"
    prepare([str(corpus)], other, tok, save_tokenizer=True, quiet=True)
    assert (other / "tokenizer.json").read_text() == tok.to_json()
    assert sorted(p.name for p in other.iterdir()) == ["index.json", "tokenizer.json", "train.bin", "val.bin"]


def test_a_failed_tokenizer_write_on_reuse_is_named(tmp_path, tok, monkeypatch):
    corpus = _corpus(tmp_path)
    out = tmp_path / "data"
    prepare([str(corpus)], out, tok, quiet=True)

    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tokenizer, "save", full_disk)
    with pytest.raises(OutputError) as e:
        prepare([str(corpus)], out, tok, save_tokenizer=True, quiet=True)
    assert str(e.value).startswith(f"could not write {out / 'tokenizer.json'}: No space left on device; ")


def test_a_failed_encode_names_the_folder_and_removes_only_a_folder_it_made(tmp_path, tok, monkeypatch):
    corpus = _corpus(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tokenizer, "encode_batch", full_disk)
    new = tmp_path / "new"
    with pytest.raises(OutputError) as e:
        prepare([str(corpus)], new, tok, quiet=True)
    assert str(e.value).startswith(f"could not write {new}: No space left on device; ")
    assert not new.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(OutputError):
        prepare([str(corpus)], kept, tok, quiet=True)
    assert kept.is_dir() and list(kept.iterdir()) == []


def test_prepare_makes_nested_folders_and_fills_existing_ones(tmp_path, tok):
    corpus = _corpus(tmp_path)
    assert prepare([str(corpus)], tmp_path / "a" / "b" / "data", tok, quiet=True).tokens("train").size > 0
    (tmp_path / "empty").mkdir()
    assert prepare([str(corpus)], tmp_path / "empty", tok, quiet=True).tokens("train").size > 0


def test_prepare_reads_jsonl_with_the_configured_field(tmp_path, tok):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"body": f"record {i}. {TEXT}"}) + "\n" for i in range(3)))
    shards = prepare([str(p)], tmp_path / "data", tok, DataConfig(text_field="body", val_fraction=0), quiet=True)
    assert shards.index["documents"] == {"train": 3, "val": 0}


def test_prepare_errors_are_exact(tmp_path, tok):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "  "}\n')
    b.write_text('{"text": ""}\n')
    with pytest.raises(DataError) as e:
        prepare([str(a), str(b)], tmp_path / "data", tok)
    assert str(e.value) == f"no text found in {a}, {b}"
    no_eot = Tokenizer({bytes([i]): i for i in range(256)})
    with pytest.raises(DataError) as e:
        prepare([str(_corpus(tmp_path))], tmp_path / "data", no_eot)
    assert str(e.value) == ("the tokenizer has no <|endoftext|> token to separate documents; "
                            "train it with that special token")


def test_the_index_holds_every_field_and_is_indented(tmp_path, tok):
    corpus = _corpus(tmp_path)
    out = tmp_path / "data"
    config = DataConfig(val_fraction=0, seed=9)
    shards = prepare([str(corpus)], out, tok, config, quiet=True)
    text = (out / "index.json").read_text()
    index = json.loads(text)
    assert text == json.dumps(index, indent=2) + "\n"
    assert {k: index[k] for k in ("format", "version", "dtype", "vocab_size", "eot_id", "sources")} == {
        "format": "lmforge-shards", "version": 1, "dtype": "uint16", "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id, "sources": [str(corpus)]}
    assert index["sha256"] == {s: data_mod.atomic.sha256_file(out / f"{s}.bin") for s in ("train", "val")}
    assert index["data_config"]["seed"] == 9 and index["tokens"]["train"] == shards.tokens("train").size


@pytest.mark.parametrize("eot_id,dtype", [(65535, "uint16"), (65536, "uint32")])
def test_shards_are_uint16_up_to_65536_ids(tmp_path, eot_id, dtype):
    big = Tokenizer({bytes([i]): i for i in range(256)}, {EOT: eot_id})
    p = tmp_path / "a.txt"
    p.write_text("hi")
    shards = prepare([str(p)], tmp_path / "data", big, DataConfig(val_fraction=0), quiet=True)
    assert shards.index["dtype"] == dtype and shards.tokens("train").tolist() == [104, 105, eot_id]


def test_prepare_reports_counts_unless_quiet(tmp_path, tok, capsys):
    corpus = _corpus(tmp_path, n=3)
    (corpus / "doc0.txt").write_text(TEXT * 15)
    out = tmp_path / "data"
    shards = prepare([str(corpus)], out, tok, DataConfig(val_fraction=0.1))
    n_train, n_val = shards.index["tokens"]["train"], shards.index["tokens"]["val"]
    assert n_train > 1000 and n_val not in (3, n_train)  # thousands separated; a swapped count would show
    assert capsys.readouterr().out == (f"wrote {n_train:,} train and {n_val:,} val tokens "
                                       f"(3 + 3 documents, uint16) to {out}\n")
    prepare([str(corpus)], tmp_path / "quiet", tok, quiet=True)
    assert capsys.readouterr().out == ""


# --- is_shard_dir -------------------------------------------------------------------------------------

@pytest.mark.parametrize("files,expected", [
    ({"index.json": '{"format": "lmforge-shards"}', "notes.txt": "mine"}, True),  # the index says so
    # A prepare killed before its renames leaves only .tmp files: running it again must be allowed.
    ({"train.bin.tmp": ""}, True),
    ({"val.bin.tmp": ""}, True),
    ({"train.bin.tmp": "", "val.bin.tmp": "", "index.json.tmp": "{"}, True),
    ({"tokenizer.json.tmp": "{}"}, False),
    ({"train.bin": "", "val.bin.tmp": "", "tokenizer.json": "{}", "index.json.tmp": "{"}, True),  # killed mid-renames
    # nanoGPT's layout, or a user's files: no lmforge index and no lmforge leftovers, so not ours to replace
    ({"train.bin": "", "tokenizer.json": "{}"}, False),
    ({"train.bin": "", "val.bin": ""}, False),
    ({"val.bin": "", "tokenizer.json": "{}"}, False),
    ({"train.bin": "", "notes.txt": "mine"}, False),
    ({"tokenizer.json": "{}"}, False),
    ({"index.json": '{"format": "other"}'}, False),
    ({}, False),
])
def test_is_shard_dir(tmp_path, files, expected):
    d = tmp_path / "d"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    assert is_shard_dir(d) is expected


def test_a_missing_folder_is_not_a_shard_dir(tmp_path):
    assert is_shard_dir(tmp_path / "absent") is False


# --- windows and batches ------------------------------------------------------------------------------

def test_a_split_of_exactly_one_window_is_enough():
    ds = SlidingWindows(np.arange(5, dtype=np.uint16), context=4, stride=4, batch_size=1)
    assert ds.n_windows == 1 and ds.batch(0)[1].tolist() == [[1, 2, 3, 4]]
    assert RandomWindows(np.arange(5, dtype=np.uint16), 4, 2).batch(0)[0].tolist() == [[0, 1, 2, 3]] * 2


def test_a_split_one_token_short_names_the_training_split():
    for make in (lambda t: SlidingWindows(t, 4, 4, 1), lambda t: RandomWindows(t, 4, 1)):
        with pytest.raises(DataError) as e:
            make(np.arange(4, dtype=np.uint16))
        assert str(e.value) == ("the training split has 4 tokens, shorter than one context window (4 + 1 tokens); "
                                "give more text or a shorter context (--model.context_length)")


def test_the_last_window_may_end_on_the_last_token():
    ds = SlidingWindows(np.arange(9, dtype=np.uint16), context=4, stride=4, batch_size=2, shuffle=False)
    x, y = ds.batch(0)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_batches_are_int64_whatever_the_shard_dtype():
    tokens = np.arange(64, dtype=np.uint16)
    for x, y in (SlidingWindows(tokens, 4, 4, 2).batch(0), RandomWindows(tokens, 4, 2).batch(0),
                 next(eval_batches(tokens, 4, 2, 1))):
        assert x.dtype == y.dtype == torch.int64


def test_default_seed_is_zero_and_epochs_are_shuffled():
    tokens = np.arange(200, dtype=np.uint16)
    default, zero = SlidingWindows(tokens, 4, 4, 2), SlidingWindows(tokens, 4, 4, 2, seed=0)
    assert torch.equal(default.batch(3)[0], zero.batch(3)[0])
    assert torch.equal(RandomWindows(tokens, 4, 2).batch(3)[0], RandomWindows(tokens, 4, 2, seed=0).batch(3)[0])
    first_epoch = torch.cat([default.batch(k)[0][:, 0] for k in range(len(default))]).tolist()
    assert first_epoch != sorted(first_epoch) and len(set(first_epoch)) == len(first_epoch) == 48


def test_each_epoch_has_its_own_order_also_after_an_earlier_epoch():
    tokens = np.arange(200, dtype=np.uint16)
    walked = SlidingWindows(tokens, 4, 4, 2, seed=3)
    walked.batch(0)
    fresh = SlidingWindows(tokens, 4, 4, 2, seed=3)
    assert torch.equal(walked.batch(len(walked))[0], fresh.batch(len(fresh))[0])
    assert not torch.equal(walked.batch(len(walked))[0], walked.batch(0)[0])


def test_random_windows_start_anywhere_from_the_first_token_to_the_last_window():
    tokens = np.arange(10, dtype=np.uint16)
    x, y = RandomWindows(tokens, 4, 64, seed=0).batch(0)
    assert x.shape == y.shape == (64, 4) and torch.equal(x[:, 1:], y[:, :-1])
    assert set(x[:, 0].tolist()) == set(range(6))  # every start 0..5 (a window needs 5 tokens)


def test_eval_batches_are_consecutive_windows_in_order():
    batches = list(eval_batches(np.arange(17, dtype=np.uint16), context=4, batch_size=2, max_batches=5))
    assert [(x.tolist(), y.tolist()) for x, y in batches] == [
        ([[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 8]]),
        ([[8, 9, 10, 11], [12, 13, 14, 15]], [[9, 10, 11, 12], [13, 14, 15, 16]]),
    ]
    assert [x.tolist() for x, _ in eval_batches(np.arange(11, dtype=np.uint16), 4, 4, 5)] == [
        [[0, 1, 2, 3], [4, 5, 6, 7]]]


def test_eval_batches_of_two_tokens_is_one_pair():
    assert [(x.tolist(), y.tolist()) for x, y in eval_batches(np.arange(2, dtype=np.uint16), 64, 4, 5)] == [
        ([[0]], [[1]])]
    assert list(eval_batches(np.arange(1, dtype=np.uint16), 64, 4, 5)) == []


@pytest.mark.parametrize("theirs", [("train.bin", "val.bin"), ("train.bin",), ("val.bin", "tokenizer.json")])
def test_prepare_never_replaces_another_tools_shards_unasked(tmp_path, tok, theirs):
    """nanoGPT keeps its tokens in train.bin / val.bin too: without lmforge's index they are a user's data."""
    from lmforge.config import LmforgeError
    from lmforge.pipeline import prepare_shards

    tok_path, corpus = tok.save(tmp_path / "tok.json"), str(_corpus(tmp_path))
    out = tmp_path / "nano"
    out.mkdir()
    for name in theirs:
        (out / name).write_bytes(name.encode() * 100)
    with pytest.raises(LmforgeError, match="already exists and is not a folder of token shards.*--overwrite"):
        prepare_shards([corpus], tok_path, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {n: n.encode() * 100 for n in theirs}
    shards = prepare_shards([corpus], tok_path, out, overwrite=True)  # asked for: replaced
    assert shards.tokens("train").size > 0


def test_a_reused_shard_folder_loses_what_a_prepare_killed_outright_left(tmp_path, tok):
    from lmforge.pipeline import prepare_shards

    tok_path, corpus = tok.save(tmp_path / "tok.json"), str(_corpus(tmp_path))
    out = tmp_path / "data"
    prepare_shards([corpus], tok_path, out)
    (out / "train.bin.tmp").write_bytes(b"\0\0" * 10)  # SIGKILL mid-way through a second prepare
    (out / "index.json.tmp").write_text("{")
    prepare_shards([corpus], tok_path, out)  # the inputs are unchanged: reused
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "tokenizer.json", "train.bin", "val.bin"]


def test_prepare_runs_again_into_the_folder_a_killed_prepare_left(tmp_path, tok):
    """A kill (not an exception, which cleans up) between writing and renaming leaves .tmp files only."""
    from lmforge.pipeline import prepare_shards

    tok_path = tok.save(tmp_path / "tok.json")
    out = tmp_path / "data"
    out.mkdir()
    (out / "train.bin.tmp").write_bytes(b"\0\0" * 10)
    shards = prepare_shards([str(_corpus(tmp_path))], tok_path, out)
    assert shards.tokens("train").size > 0 and not any(p.suffix == ".tmp" for p in out.iterdir())
