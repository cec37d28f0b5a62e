import json

import pytest
from conftest import TEXT, shared_file
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.tokenizer import EOT, SimpleTokenizer, Tokenizer, TokenizerError


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
