import json
import random
import warnings

import pytest
import regex
from conftest import TEXT, shared_file
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge import tokenizer as tokenizer_module
from lmforge.config import ConfigError, TokenizerConfig
from lmforge.tokenizer import EOT, MAX_RUN, SimpleTokenizer, Tokenizer, TokenizerError, split_long_runs, valid_text


def test_known_answer_minbpe():
    tok = Tokenizer.train("aaabdaaabac", TokenizerConfig(vocab_size=259, special_tokens=()))
    assert tok.encode_reference("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]


@pytest.fixture(scope="module")
def trained():
    from lmforge.data import builtin_corpus

    docs = builtin_corpus()[:150]
    return Tokenizer.train(docs, TokenizerConfig(vocab_size=1024, special_tokens=(EOT, "<|pad|>"))), docs


def test_training_fills_vocab_and_is_deterministic(trained):
    tok, docs = trained
    assert tok.vocab_size == 1024
    assert tok.special_tokens == {EOT: 1022, "<|pad|>": 1023}
    again = Tokenizer.train(docs, TokenizerConfig(vocab_size=1024, special_tokens=(EOT, "<|pad|>")))
    assert again.fingerprint == tok.fingerprint


def test_fast_path_equals_reference_on_real_text(trained):
    tok, docs = trained
    for doc in docs[150:160] + docs[:5]:
        assert tok.encode(doc) == tok.encode_reference(doc)
    for name in ("austen.txt", "kjv.txt"):
        path = shared_file("corpora", name)
        text = path.read_text(encoding="utf-8")[:200_000]
        assert tok.encode(text) == tok.encode_reference(text)


def test_encode_batch_in_worker_processes_matches(trained):
    tok, docs = trained
    texts = docs[:12]
    assert tok.encode_batch(texts, workers=2, min_chars=0) == [tok.encode_ordinary(t) for t in texts]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_any_unicode(s):
    tok = _ROUNDTRIP_TOK
    assert tok.decode(tok.encode(s, disallowed_special=())) == s
    assert tok.decode(tok.encode_reference(s, disallowed_special=())) == s


_ROUNDTRIP_TOK = Tokenizer.train([TEXT * 5, "héllo wörld ☃ 日本語 🙂 " * 5], TokenizerConfig(vocab_size=400))


def test_special_tokens_follow_tiktoken_semantics(trained):
    tok, _ = trained
    text = f"end{EOT}start"
    with pytest.raises(TokenizerError, match="allowed_special"):
        tok.encode(text)
    with pytest.raises(TokenizerError):
        tok.encode_reference(text)
    as_special = tok.encode(text, allowed_special={EOT})
    assert tok.special_tokens[EOT] in as_special
    assert as_special == tok.encode_reference(text, allowed_special="all")
    as_text = tok.encode(text, disallowed_special=())
    assert tok.special_tokens[EOT] not in as_text
    assert as_text == tok.encode_reference(text, disallowed_special=())
    assert tok.decode(as_special) == tok.decode(as_text) == text


def test_save_load_roundtrip(tmp_path, trained):
    tok, docs = trained
    path = tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode(docs[3]) == tok.encode(docs[3])


def test_load_rejects_garbage(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TokenizerError, match="not an lmforge tokenizer"):
        Tokenizer.load(bad)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError):
        Tokenizer.load(bad)


def test_vocab_size_below_bytes_plus_specials_is_an_error():
    with pytest.raises(ConfigError, match="at least 256"):
        TokenizerConfig(vocab_size=256, special_tokens=(EOT,))


def test_gpt2_vocabulary_matches_tiktoken():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    enc_json, vocab_bpe = shared_file("gpt2", "encoder.json"), shared_file("gpt2", "vocab.bpe")
    tok = Tokenizer.from_gpt2_files(enc_json, vocab_bpe)
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.encode_reference("Hello, world") == [15496, 11, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(enc_json))
    ref = tiktoken.Encoding(name="gpt2-ref", pat_str=tok.pattern, mergeable_ranks=ranks,
                            special_tokens={EOT: 50256})
    for name in ("austen.txt", "kjv.txt", "sotu.txt"):
        text = shared_file("corpora", name).read_text(encoding="utf-8")
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text), name
        sample = text[:30_000]
        assert tok.encode_reference(sample) == ref.encode_ordinary(sample), name
    verdict = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    assert len(tok.encode(verdict)) == 5145
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == ref.encode("a<|endoftext|>b", allowed_special="all")


def test_tiktoken_rank_file(tmp_path, trained):
    import base64

    tok, docs = trained
    lines = [f"{base64.b64encode(t).decode()} {i}" for t, i in tok.ranks.items()]
    (tmp_path / "ranks.tiktoken").write_text("\n".join(lines))
    loaded = Tokenizer.from_tiktoken_file(tmp_path / "ranks.tiktoken", special_tokens=tok.special_tokens)
    assert loaded.encode(docs[0]) == tok.encode(docs[0])


def test_simple_tokenizer_from_the_book():
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    tok = SimpleTokenizer.from_text(text)
    assert len(tok.str_to_int) == 1132  # the book's chapter-2 vocabulary: 1,130 words + 2 specials
    ids = tok.encode('"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.')
    assert tok.decode(ids) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    assert tok.encode("Hello, do you like tea?")[0] == tok.str_to_int["<|unk|>"]


# ----------------------------------------------------------------- text that used to break the tokenizer
# Both paths cut a run of more than MAX_RUN characters of one class before the regex (split_long_runs)
# and replace lone surrogates as tiktoken does (valid_text): any text encodes, the same way on both.

@pytest.fixture(scope="module")
def ws_tok():
    """A tokenizer whose vocabulary merges long runs of spaces, line breaks and one letter."""
    runs = ["x" * 4096, " " * 300 + "a", "\r\n" * 100 + "b", "\n" * 64, "\t" * 40 + "c", "-" * 80]
    return Tokenizer.train([TEXT * 20, *runs], TokenizerConfig(vocab_size=400))


def _uncut(tok: Tokenizer):
    """tiktoken on the same ranks and pattern, without lmforge's cutting: the ids of normal text."""
    import tiktoken

    return tiktoken.Encoding(name="uncut", pat_str=tok.pattern, mergeable_ranks=tok.ranks, special_tokens={})


@pytest.mark.parametrize("unit", [" ", "\r\n"])
def test_10_mb_whitespace_run_encodes_on_both_paths(ws_tok, unit):
    text = "start" + unit * (10_000_000 // len(unit)) + "end"
    fast = ws_tok.encode_ordinary(text)  # raised a Rust PanicException near a million characters
    assert ws_tok.encode(text) == fast
    assert ws_tok.decode(fast) == text
    assert ws_tok.encode_reference(text) == fast
    assert len(fast) < len(text) // 3  # the whitespace merges are used, not one token per character


@pytest.mark.slow
def test_100_mb_of_one_line(ws_tok):
    # A single line of ordinary words: one 100 MB call into tiktoken. The unit starts with a letter and
    # ends with '.', where the regex splits anyway, so the line's ids are the unit's ids repeated.
    unit = " ".join(TEXT.split()) * 200
    copies = 100_000_000 // len(unit) + 1
    unit_ids = ws_tok.encode_ordinary(unit)
    ids = ws_tok.encode_ordinary(unit * copies)
    m = len(unit_ids)
    assert len(ids) == m * copies
    assert all(ids[i * m:(i + 1) * m] == unit_ids for i in range(copies))
    del ids
    # 100 MB that the regex would make one piece: one letter, no space.
    line = "x" * (MAX_RUN * 33_334)  # 100 MB, cut into runs of MAX_RUN
    ids = ws_tok.encode(line)
    assert ids == ws_tok.encode_ordinary("x" * MAX_RUN) * 33_334
    assert ws_tok.decode(ids) == line


def test_fast_and_reference_agree_on_long_runs_among_words(ws_tok):
    rng = random.Random(6)
    words = TEXT.split()
    parts = []
    for unit in [" ", "\n", "\r\n", "\t", "\u00a0", "-", "7", "x", "é", "日"]:
        for n in (1, MAX_RUN - 1, MAX_RUN, MAX_RUN + 1, 2 * MAX_RUN + 5):
            parts.append(" ".join(rng.choices(words, k=5)) + unit * (n // len(unit)))
    parts.append(" " * 200_000 + "and a word")  # a 200 KB run amid words
    text = "".join(parts)
    fast = ws_tok.encode(text)
    assert fast == ws_tok.encode_reference(text)
    assert ws_tok.decode(fast) == text


def test_normal_text_is_never_cut_and_keeps_its_ids(ws_tok):
    uncut = _uncut(ws_tok)
    for unit in (" ", "\n", "\r\n", "\t", "x", "-", "1"):
        sep = "" if unit.isspace() else " "  # so that the run is exactly unit * n
        for n in (1, 2, 3, 50, MAX_RUN // len(unit)):  # up to MAX_RUN characters of one class: no cut
            text = f"a word{sep}{unit * n}{sep}next.{sep}{unit * n}"
            assert split_long_runs(text) == [text]
            assert ws_tok.encode(text) == ws_tok.encode_reference(text) == uncut.encode_ordinary(text), (unit, n)


def test_a_cut_run_keeps_the_gpt2_whitespace_rule_at_its_end(ws_tok):
    # GPT-2's `\s+(?!\S)|\s+` gives a run before a word all its spaces but the last, which joins the word.
    text = "word" + " " * (3 * MAX_RUN + 10) + "next"
    chunks = split_long_runs(text)
    assert [len(c) for c in chunks] == [4 + MAX_RUN, MAX_RUN, MAX_RUN, 10 + 4]
    assert chunks[-1] == " " * 10 + "next"
    ids = ws_tok.encode(text)
    assert ids == [i for c in chunks for i in ws_tok.encode(c)]
    assert ids[-len(ws_tok.encode(" next")):] == ws_tok.encode(" next")


def test_cut_digit_runs_keep_gpt4_three_digit_pieces(ws_tok):
    tok = Tokenizer(ws_tok.ranks, pattern="gpt4")
    text = "pi 3." + "1415926535" * 1000 + " and more"  # a 10,000-digit run: cut every MAX_RUN digits
    assert len(split_long_runs(text)) == 4
    assert tok.encode(text) == tok.encode_reference(text) == _uncut(tok).encode_ordinary(text)


def _char_class(c: str) -> int:
    return next(k for k, p in enumerate((r"\s", r"\p{L}", r"\p{N}", r".")) if regex.fullmatch(p, c, flags=regex.S))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(" \n\tab1é-\u00a0"), st.integers(1, 20)), max_size=12))
def test_split_long_runs_cuts_exactly_the_long_runs(runs):
    text = "".join(c * n for c, n in runs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_module, "MAX_RUN", 6)  # small, so that random text has long runs
        chunks = split_long_runs(text)
    # The rule written out: every maximal run of one class longer than 6 is cut every 6 characters.
    expected_cuts, start = [], 0
    for i in range(1, len(text) + 1):
        if i == len(text) or _char_class(text[i]) != _char_class(text[start]):
            expected_cuts += range(start + 6, i, 6)
            start = i
    bounds = [0, *expected_cuts, len(text)] if text else [0, 0]
    assert chunks == [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(" \n\r\tab1é-\u00a0🙂\ud800\udc00\udfff"), max_size=60))
def test_paths_agree_on_random_text_with_runs_and_surrogates(s):
    tok = _ROUNDTRIP_TOK
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_module, "MAX_RUN", 6)
        fast = tok.encode(s, disallowed_special=())
        assert fast == tok.encode_reference(s, disallowed_special=())
    assert tok.decode(fast) == valid_text(s)


def test_surrogates_follow_tiktoken_on_both_paths(trained):
    tok, _ = trained
    lone = "a\ud800b\udfffc"
    assert tok.encode(lone) == tok.encode_reference(lone) == tok.encode("a\ufffdb\ufffdc")
    assert tok.decode(tok.encode(lone)) == "a\ufffdb\ufffdc"
    pair = "smile \ud83d\ude42"  # a surrogate pair is the character it stands for
    assert tok.encode(pair) == tok.encode_reference(pair) == tok.encode("smile 🙂")
    # tiktoken's own handling, which the policy copies
    assert tok.encode(lone) == tok._present(tok.tiktoken_encoding.encode_ordinary(lone))
    trained_on_it = Tokenizer.train([lone * 3, pair], TokenizerConfig(vocab_size=260))  # no UnicodeEncodeError
    assert trained_on_it.decode(trained_on_it.encode(lone)) == "a\ufffdb\ufffdc"


# ----------------------------------------------------------------- patterns and damaged files

def _state(tok: Tokenizer) -> dict:
    return json.loads(tok.to_json())


@pytest.mark.parametrize("pattern, says", [
    ("(", "missing )"),
    (r"\p{Nope}+", "not a valid regular expression"),
    ("gtp2", "unknown pattern name 'gtp2'"),
    (r"(?r)\w+|\s+", "not for tiktoken"),  # Python's regex module accepts it, tiktoken's engine does not
])
def test_bad_pattern_is_one_line_naming_it(tmp_path, trained, pattern, says):
    tok, _ = trained
    with pytest.raises(TokenizerError, match=regex.escape(says)) as err:
        Tokenizer.train("some text", TokenizerConfig(vocab_size=300, pattern=pattern))
    assert "\n" not in str(err.value) and "tokenizer config" in str(err.value)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({**_state(tok), "pattern": pattern}))
    with pytest.raises(TokenizerError, match=regex.escape(says)) as err:
        Tokenizer.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


DAMAGED = [
    ("not json", lambda s: "{nope", "not valid JSON"),
    ("deep nesting", lambda s: _deep(100_000), "not valid JSON"),
    ("a list", lambda s: [s], "not an lmforge tokenizer file"),
    ("hf file", lambda s: {"version": "1.0", "model": {"type": "BPE"}}, "Hugging Face"),
    ("version text", lambda s: {**s, "version": "1"}, "'version' must be a positive integer"),
    ("version newer", lambda s: {**s, "version": 99}, "newer lmforge"),
    ("no tokens", lambda s: {k: v for k, v in s.items() if k != "tokens"}, "'tokens' is missing"),
    ("no pattern", lambda s: {k: v for k, v in s.items() if k != "pattern"}, "'pattern' is missing"),
    ("tokens dict", lambda s: {**s, "tokens": {"a": 1}}, "'tokens' must be a non-empty list"),
    ("tokens empty", lambda s: {**s, "tokens": []}, "'tokens' must be a non-empty list"),
    ("token not base64", lambda s: {**s, "tokens": ["!!", *s["tokens"][1:]]}, "token 0 is '!!'"),
    ("token a number", lambda s: {**s, "tokens": [7, *s["tokens"][1:]]}, "token 0 is 7"),
    ("token empty", lambda s: {**s, "tokens": ["", *s["tokens"][1:]]}, "token 0 is ''"),
    ("token twice", lambda s: {**s, "tokens": [*s["tokens"], s["tokens"][97]]}, "tokens 97 and"),
    ("specials list", lambda s: {**s, "special_tokens": ["<|endoftext|>"]}, "'special_tokens' must map"),
    ("special id text", lambda s: {**s, "special_tokens": {EOT: "1"}}, "'special_tokens' must map"),
    ("special id true", lambda s: {**s, "special_tokens": {EOT: True}}, "'special_tokens' must map"),
    ("special id negative", lambda s: {**s, "special_tokens": {EOT: -1}}, "'special_tokens' must map"),
    ("special id huge", lambda s: {**s, "special_tokens": {EOT: 10**12}}, "'special_tokens' must map"),
    ("special clash", lambda s: {**s, "special_tokens": {EOT: 5}}, "regular token already uses"),
    ("pattern number", lambda s: {**s, "pattern": 3}, "'pattern' must be a string"),
    ("name number", lambda s: {**s, "name": 3}, "'name' must be a string"),
    ("template number", lambda s: {**s, "chat_template": 3}, "'chat_template' must be a string"),
    ("eos unknown id", lambda s: {**s, "eos_id": 10**6}, "'eos_id' 1000000 is not the id"),
    ("eos text", lambda s: {**s, "eos_id": "2"}, "'eos_id' '2' is not the id"),
]


@pytest.mark.parametrize("damage, says", [(d, says) for _, d, says in DAMAGED], ids=[n for n, _, _ in DAMAGED])
def test_damaged_or_foreign_tokenizer_file_is_one_line(tmp_path, trained, damage, says):
    tok, _ = trained
    content = damage(_state(tok))
    path = tmp_path / "tokenizer.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(TokenizerError, match=regex.escape(says)) as err:
        Tokenizer.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_tokenizer_file_without_version_or_optional_fields_still_loads(trained):
    tok, docs = trained
    state = {k: v for k, v in _state(tok).items() if k not in ("version", "name", "chat_template", "eos_id")}
    assert Tokenizer.from_json(json.dumps(state)).encode(docs[0]) == tok.encode(docs[0])


# ----------------------------------------------------------------- a vocabulary smaller than asked

def test_vocabulary_the_corpus_cannot_fill_is_announced(capsys):
    tok = Tokenizer.train(["aaab aaab"], TokenizerConfig(vocab_size=10_000_000), verbose=True)
    assert tok.vocab_size == 256 + 4 + 1  # merges aa, ab, aaab, " aaab"; then every word is one token; + EOT
    err = capsys.readouterr().err
    assert f"asked for 10,000,000 tokens but the corpus supports only {tok.vocab_size}" in err
    assert f"the tokenizer has {tok.vocab_size} tokens" in err
    with pytest.warns(UserWarning, match="asked for 10,000,000 tokens"):
        Tokenizer.train(["aaab aaab"], TokenizerConfig(vocab_size=10_000_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a vocabulary that is reached says nothing
        Tokenizer.train(["aaab aaab"], TokenizerConfig(vocab_size=tok.vocab_size))
    assert "asked for" not in capsys.readouterr().err


def test_cli_reports_small_vocabulary_and_bad_pattern(tmp_path, corpus_dir, capsys):
    from lmforge.cli import main

    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(corpus_dir), "--out", str(out),
                 "--tokenizer.vocab_size", "10000000"]) == 0
    vocab = Tokenizer.load(out).vocab_size
    assert f"lmforge: warning: asked for 10,000,000 tokens but the corpus supports only {vocab:,}" in \
        capsys.readouterr().err
    assert main(["tokenizer", "train", "--data", str(corpus_dir), "--out", str(tmp_path / "t2.json"),
                 "--tokenizer.pattern", "("]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'('" in err and "missing )" in err
