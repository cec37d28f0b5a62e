"""Known answers for BPE training and encoding on corpora small enough to do by hand.

The rule (tokenizer.py, ``Tokenizer.train``): merge the most frequent adjacent pair; ties go
to the smallest pair of ids. minbpe breaks ties by first occurrence instead, so the corpora
below put the losing pair first, where the two rules disagree.
"""

from __future__ import annotations

import pytest

from lmforge.config import TokenizerConfig
from lmforge.tokenizer import Tokenizer

# One regex piece per whitespace-separated word, and the white space apart (a piece with no pairs): no
# leading-space pieces to reason about, and no text dropped (a pattern must cover all text)
WORDS = r"\S+|\s+"


def _merges(tok: Tokenizer) -> list[bytes]:
    return [t for t, i in sorted(tok.ranks.items(), key=lambda kv: kv[1]) if i >= 256]


def test_tie_goes_to_the_smallest_pair_of_ids_not_the_first_seen():
    tok = Tokenizer.train(["cd ab"], TokenizerConfig(vocab_size=259, pattern=WORDS))
    assert _merges(tok) == [b"ab", b"cd"]  # (97, 98) < (99, 100), though "cd" comes first


def test_more_frequent_pair_wins_over_a_smaller_one():
    tok = Tokenizer.train(["cd ab cd"], TokenizerConfig(vocab_size=258, pattern=WORDS))
    assert _merges(tok) == [b"cd"]


def test_merge_sequence_of_the_textbook_example():
    # "aaabdaaabac": aa (4) -> Z; then Za and ab tie at 2 and (97, 98) < (256, 97): ab -> Y;
    # ZY (2) -> X = aaab; then four pairs tie at 1, smallest ids first: ac (97, 99), then
    # d X (100, 258) = daaab.
    tok = Tokenizer.train(["aaabdaaabac"], TokenizerConfig(vocab_size=262, pattern=WORDS))
    assert _merges(tok) == [b"aa", b"ab", b"aaab", b"ac", b"daaab"]
    assert tok.ranks[b"aaab"] == 258 and tok.special_tokens == {"<|endoftext|>": 261}
    for encode in (tok.encode, tok.encode_reference):
        assert encode("aaabdaaabac") == [258, 260, 259]
        assert encode("aab") == [256, 98]  # aa (rank 256) is merged before ab (rank 257)


def test_overlapping_pairs_count_and_merge_left_to_right():
    # "aaaa" holds the pair (a, a) three times; merged left to right it becomes (aa)(aa).
    tok = Tokenizer.train(["aaaa"], TokenizerConfig(vocab_size=259, pattern=WORDS))
    assert _merges(tok) == [b"aa", b"aaaa"]
    assert tok.encode("aaa") == tok.encode_reference("aaa") == [256, 97]


def test_encoding_applies_merges_by_rank_not_by_position():
    # Ranks: "bc" before "ab". "abc" must become a + bc, although "ab" comes first in the text.
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"bc"] = 256
    ranks[b"ab"] = 257
    tok = Tokenizer(ranks, pattern=WORDS)
    assert tok.encode_reference("abc") == [97, 256]
    assert tok.encode("abc") == [97, 256]


def test_vocab_size_counts_specials():
    tok = Tokenizer.train(["aaabdaaabac"], TokenizerConfig(vocab_size=260, pattern=WORDS,
                                                           special_tokens=("<|endoftext|>", "<|pad|>")))
    assert len(_merges(tok)) == 2 and tok.vocab_size == 260
    assert tok.special_tokens == {"<|endoftext|>": 258, "<|pad|>": 259}
    with pytest.raises(ValueError, match="vocab_size must be at least 256 byte tokens \\+ 2 special token"):
        TokenizerConfig(vocab_size=257, special_tokens=("<|endoftext|>", "<|pad|>"))
