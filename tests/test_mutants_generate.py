"""Tests written to kill mutmut survivors in generate.py (docs/DEVELOPING.md, mutation testing).

Each one checks a behaviour a real bug would change: a flag that must be honoured, the range of
the fresh sampling seed, what an empty prompt starts from, and that the top-k / top-p filters
cost nothing when they would filter nothing (a full sort of the vocabulary per token)."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.generate import fresh_seed, sample_next
from lmforge.model import GPT


def _model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layer=2, n_head=4)).eval()


def test_fresh_seeds_span_the_whole_63_bit_range():
    seeds = [fresh_seed() for _ in range(200)]
    assert all(0 <= s < 2**63 for s in seeds)  # what torch.Generator.manual_seed accepts
    # Uniform over [0, 2**63): half of them lie in the top half. A seed space cut to 2**62 (or less)
    # would never reach it; a correct one misses it with probability 2**-200.
    assert max(seeds) >= 2**62
    assert len(set(seeds)) == len(seeds)
    torch.Generator().manual_seed(max(seeds))


class _BosTokenizer:
    """A tokenizer that puts a begin-of-sequence id in front of every encoding, as many Hugging
    Face tokenizers do (so even the empty string encodes to one id)."""
    eot_id = 3

    def encode(self, text, allowed_special=()):
        return [1] + list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()


def test_an_empty_prompt_starts_from_the_end_token_whatever_the_tokenizer():
    from lmforge.generate import prompt_ids

    assert prompt_ids(_BosTokenizer(), "") == [3]  # a new document, not the tokenizer's encoding of ""
    assert prompt_ids(_BosTokenizer(), "ab") == [1, 97, 98]  # a non-empty prompt goes through the tokenizer as it is


def test_filters_that_filter_nothing_are_skipped(monkeypatch):
    """top_k >= vocabulary size and top_p = 1 keep every token: no top-k or sort pass over the
    vocabulary for each generated token."""
    def refuse(*args, **kwargs):
        raise AssertionError("a filter pass that filters nothing")

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    with monkeypatch.context() as m:
        m.setattr(torch, "topk", refuse)
        m.setattr(torch, "sort", refuse)
        for kw in ({"top_k": 4}, {"top_k": 5}, {"top_p": 1.0}, {"top_k": 4, "top_p": 1.0}):
            draws = sample_next(logits, 1.0, generator=g, **kw)
            freq = (torch.bincount(draws, minlength=4).float() / 4000).tolist()
            expected = torch.softmax(logits[0], -1).tolist()
            assert freq == pytest.approx(expected, abs=0.03), kw  # every token still drawn at its rate
    # The filters do run when they would filter something.
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
