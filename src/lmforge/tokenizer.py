"""Byte-level BPE tokenizers: train, encode, decode, save, load.

A tokenizer is a table of *mergeable ranks* (token bytes -> id, where a lower id was
merged earlier), a pre-tokenization regex and a few special tokens. That one
representation covers tokenizers trained here, OpenAI's GPT-2 vocabulary
(``encoder.json`` + ``vocab.bpe``) and tiktoken rank files.

Encoding has two paths that must agree: ``encode_reference`` is the algorithm written
out in Python (split with the regex, then repeatedly merge the adjacent pair of lowest
rank); ``encode`` runs the same ranks through a ``tiktoken.Encoding`` built in memory.

Any text can be encoded, and both paths (and training) see it the same way first:

- lone surrogates (a ``str`` can hold them, UTF-8 cannot) become U+FFFD and a surrogate
  pair becomes the character it stands for, which is what tiktoken does (``valid_text``);
- the text is cut inside any run of more than ``MAX_RUN`` characters of one class
  (whitespace, letters, digits, anything else), every ``MAX_RUN`` characters, before the
  regex sees it (``split_long_runs``). Such runs are the only text the regexes turn into
  one enormous piece: tiktoken's regex engine overflows its stack on a whitespace run of
  about a million characters, and merging a piece takes time quadratic in its length.
  No normal text has a run that long, so its ids are the same as without the cut.

This module never imports torch: tokenizing is text work.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import heapq
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import regex

from . import atomic
from .config import LmforgeError, TokenizerConfig, is_whole

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
EOT = "<|endoftext|>"
FORMAT = "lmforge-bpe"
FORMAT_VERSION = 1


class TokenizerError(LmforgeError, ValueError):
    """Bad tokenizer input: a file, a vocabulary or a text that cannot be tokenized."""


class ChatTemplateError(TokenizerError):
    """A model's chat template that cannot be rendered (broken, or stopped by the sandbox). Its words
    name "this model" and the fix of `chat`; ``for_command`` names the model and another command's fix."""

    def __init__(self, cause: str, model: str = "this model",
                 fix: str = "use --template alpaca or phi3, or fix the template") -> None:
        self.cause = cause
        super().__init__(f"the chat template of {model} cannot be rendered ({cause}); {fix}")

    def for_command(self, model: str, fix: str) -> ChatTemplateError:
        return ChatTemplateError(self.cause, model, fix)


SpecialSet = Collection[str] | Literal["all"]
_ABSENT = 1 << 30

# Longest run of one character class that reaches the pre-tokenization regex uncut. Far longer
# than any run in normal text (whose ids must not change), far shorter than the whitespace run of
# 600,000 to 1,000,000 characters on which tiktoken's regex engine overflows its stack, and short
# enough that merging one piece, quadratic in its length, stays well under a second on either path.
# A multiple of 3, so that a digit run cut under the GPT-4 pattern (``\p{N}{1,3}``) keeps its
# three-digit pieces.
MAX_RUN = 3000
# The character classes of the GPT-2 / GPT-4 / Llama-3 patterns: a long run of one of them is what
# those patterns turn into one long piece. Group k matches a run of class k.
_ONE_CLASS = regex.compile(r"(\s++)|(\p{L}++)|(\p{N}++)|([^\s\p{L}\p{N}]++)")
_NOT_CLASS = {1: r"\S", 2: r"\P{L}", 3: r"\P{N}", 4: r"[\s\p{L}\p{N}]"}
_NEXT_OUTSIDE = {k: regex.compile(p) for k, p in _NOT_CLASS.items()}
_PREV_OUTSIDE = {k: regex.compile("(?r)" + p) for k, p in _NOT_CLASS.items()}  # (?r): search backwards


def valid_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD and surrogate pairs joined, as tiktoken does.

    A Python string can hold surrogate code points (from ``surrogateescape`` decoding or a
    careless JSON producer); UTF-8, and so byte-level BPE, cannot. Both encoding paths apply
    this one policy, so they agree on such text.
    """
    if text.isascii():  # constant time for an ASCII string, which cannot hold surrogates
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def split_long_runs(text: str) -> list[str]:
    r"""``text`` cut inside every run of more than ``MAX_RUN`` characters of one class, every ``MAX_RUN`` characters.

    The classes are whitespace, letters (``\p{L}``), digits (``\p{N}``) and everything
    else. Text without such a run comes back whole, so its pieces and ids are unchanged;
    a run of a million spaces is tokenized as runs of 3,000. The cut depends only on the
    text, never on where it sits in a larger document, so every caller cuts alike.
    """
    n = len(text)
    if n <= MAX_RUN:
        return [text]
    # Windows of `step` characters laid end to end: a run longer than MAX_RUN covers one of them
    # whole, so probing the windows finds every such run; normal text fails a probe within a few
    # characters. The run's own bounds are then searched for, so where the windows fall never
    # changes the cuts.
    step = MAX_RUN // 2
    cuts: list[int] = []
    pos = 0
    while pos + step <= n:
        probe = _ONE_CLASS.fullmatch(text, pos, pos + step)
        if probe is None:
            pos += step
            continue
        cls = probe.lastindex
        before = _PREV_OUTSIDE[cls].search(text, 0, pos)
        after = _NEXT_OUTSIDE[cls].search(text, pos + step)
        start, end = (before.end() if before else 0), (after.start() if after else n)
        cuts.extend(range(start + MAX_RUN, end, MAX_RUN))
        pos = end
    if not cuts:
        return [text]
    bounds = [0, *cuts, n]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# Letters, digits, punctuation, symbols, every kind of white space, accents (precomposed and
# combining), CJK, Devanagari, Arabic, Hangul, an emoji sequence joined by a ZWJ, a private-use
# character, control characters: a pre-tokenization pattern must split this into pieces that put it
# back together, or text is lost.
_COVERAGE_PROBE = ("Hello, world! It's 2024: naïve cafe\u0301, 東京 नमस्ते مرحبا 한국어 🙂 👩\u200d💻 x_y-z.\n\n\tA  b\r\n"
                   "$%^&*()[]{}<>?/\\|`~\"'+=; \u00a0\u2028\uf8ff\x00\x7f end  ")


def compile_pattern(pattern: str, source: str = "tokenizer", coverage: str = "error") -> "regex.Pattern[str]":
    """The pre-tokenization regex (a name in ``PATTERNS`` or a regular expression), or a one-line error.
    ``coverage``: what a pattern that does not cover all text gets: an "error" (a new tokenizer), a
    "warn"ing (one saved before lmforge checked this: it still loads) or nothing ("skip")."""
    pattern = PATTERNS.get(pattern, pattern)
    if not isinstance(pattern, str) or not pattern:
        raise TokenizerError(f"{source}: the pre-tokenization pattern must be a non-empty string, got {pattern!r}")
    if regex.fullmatch(r"[\w-]+", pattern):
        # A bare word is a literal regex that matches only itself: the rest of the text would be
        # dropped when encoding. It is a misspelt pattern name.
        raise TokenizerError(f"{source}: unknown pattern name {pattern!r}; use one of {', '.join(PATTERNS)} "
                             "or a regular expression")
    shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
    try:
        compiled = regex.compile(pattern)
    except (regex.error, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise TokenizerError(f"{source}: the pre-tokenization pattern {shown!r} is not a valid regular "
                             f"expression ({e}); use one of {', '.join(PATTERNS)} or fix the expression") from None
    problem = _tiktoken_rejects(pattern)
    if problem:
        raise TokenizerError(f"{source}: the pre-tokenization pattern {shown!r} is valid for Python's regex module "
                             f"but not for tiktoken's engine, which the fast path runs ({problem}); use one of "
                             f"{', '.join(PATTERNS)} or an expression both accept")
    if coverage == "skip":
        return compiled
    pieces = "".join(m.group(0) for m in compiled.finditer(_COVERAGE_PROBE))
    if pieces != _COVERAGE_PROBE:  # what no piece matches is dropped when encoding
        at = next((i for i, (x, y) in enumerate(zip(pieces, _COVERAGE_PROBE)) if x != y), len(pieces))
        message = (f"{source}: the pre-tokenization pattern {shown!r} does not match every character (it leaves "
                   f"out {_COVERAGE_PROBE[at]!r}, for one), so encoding would drop text; use one of "
                   f"{', '.join(PATTERNS)} or an expression whose pieces cover all text")
        if coverage == "error":
            raise TokenizerError(message)
        import warnings

        warnings.warn(message, stacklevel=3)
    return compiled


@functools.lru_cache(maxsize=64)
def _tiktoken_rejects(pattern: str) -> str | None:
    """Why tiktoken cannot compile ``pattern``, or None. Checked once per pattern, so a tokenizer
    whose fast path would fail is refused when it is trained or loaded, not at its first encode."""
    import tiktoken

    try:
        tiktoken.Encoding(name="pattern-check", pat_str=pattern, mergeable_ranks={bytes([b]): b for b in range(256)},
                          special_tokens={})
    except ValueError as e:
        return str(e)
    return None


def _digest(state: dict) -> str:
    """A short, stable digest of a JSON-ready state (keys sorted): what fingerprints are."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


class Tokenizer:
    """A byte-level BPE tokenizer defined by its mergeable ranks.

    ``ranks`` maps token bytes to ids; the ids must be 0..n-1 and every single byte must
    be a token, so any text can be encoded. Special tokens get ids of their own.
    """

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN, name: str = "lmforge", chat_template: str | None = None,
                 eos_id: int | None = None, *, pattern_coverage: str = "error") -> None:
        self.chat_template = chat_template
        self._eos_id = eos_id
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens or {})
        self._split = compile_pattern(pattern, coverage=pattern_coverage)
        self.pattern = PATTERNS.get(pattern, pattern)
        self.name = name
        if len(set(self.ranks.values())) != len(self.ranks):
            raise TokenizerError("two tokens share one id in the vocabulary")
        # Imported vocabularies may lack bytes that never occur in UTF-8 text (SmolLM2 lacks 21).
        # Such bytes get placeholder ids above every real id and are dropped from the output,
        # which is what Hugging Face's BPE does with characters outside its vocabulary.
        self._absent = {bytes([b]): _ABSENT + b for b in range(256) if bytes([b]) not in self.ranks}
        # Ids are usually 0..n-1 with specials after them, but imported vocabularies may put
        # specials first (SmolLM2: ids 0-16); any layout works as long as no id is used twice.
        self._decoder: dict[int, bytes] = {i: tok for tok, i in self.ranks.items()}
        clash = [s for s, i in self.special_tokens.items() if i in self._decoder]
        if clash:
            raise TokenizerError(f"special token {clash[0]!r} has id {self.special_tokens[clash[0]]}, which a "
                                 "regular token already uses")
        self._special_decoder = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._cache: dict[bytes, list[int]] = {}
        self._tiktoken = None

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids: regular tokens plus special tokens (the embedding size a model needs)."""
        return max([*self._decoder, *self.special_tokens.values()]) + 1

    @property
    def eot_id(self) -> int | None:
        """Id of ``<|endoftext|>``, the document separator, if the tokenizer has it."""
        return self.special_tokens.get(EOT)

    @property
    def eos_id(self) -> int | None:
        """Id that ends a generation: the model's own end token (e.g. <|im_end|> for chat models), else eot."""
        return self._eos_id if self._eos_id is not None else self.eot_id

    @eos_id.setter
    def eos_id(self, value: int | None) -> None:
        self._eos_id = value

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's Jinja chat template (as ``transformers`` does)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; it is not a chat model")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        inverse = {i: s for s, i in self.special_tokens.items()}
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                eos_token=inverse.get(self.eos_id, ""), bos_token="")
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError,
                RecursionError, ZeroDivisionError) as e:
            # A template from a model file: broken, or stopped by the sandbox (SecurityError, a range too big)
            raise ChatTemplateError(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None

    @property
    def fingerprint(self) -> str:
        """Short digest of the whole tokenizer file's state (name, chat template and end id included):
        shards and runs record it to catch mix-ups."""
        return _digest(self._state())

    @property
    def encoding_fingerprint(self) -> str:
        """Short digest of only what decides the ids of a text (vocabulary, pattern, specials): equal
        for a tokenizer and its copy in an exported model, which has another name and end id."""
        return _digest({k: v for k, v in self._state().items() if k in ("format", "pattern", "tokens", "special_tokens")})

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, specials={list(self.special_tokens)})"

    # ----------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: str | Iterable[str], config: TokenizerConfig = TokenizerConfig(),
              verbose: bool = False) -> "Tokenizer":
        """Learn merges from text until the vocabulary has ``config.vocab_size`` ids.

        Words (regex pieces) are counted once; pair counts are then updated only for the
        words a merge touches, and a heap finds the most frequent pair, so the corpus is
        never rescanned. Ties go to the smallest pair of ids, so training is deterministic.
        The text is prepared as encoding prepares it (``valid_text``, ``split_long_runs``),
        so training counts the very pieces that encoding will merge.

        If the corpus runs out of pairs before the vocabulary is full, the tokenizer is
        smaller than asked, and a warning says so (printed when ``verbose``, else a
        ``UserWarning``).
        """
        split = compile_pattern(config.pattern, "tokenizer config")
        pattern = PATTERNS.get(config.pattern, config.pattern)
        if isinstance(texts, str):
            texts = [texts]
        word_counts: Counter[bytes] = Counter()
        for text in texts:
            for chunk in split_long_runs(valid_text(text)):
                word_counts.update(w.encode("utf-8") for w in split.findall(chunk))
        n_merges = config.vocab_size - 256 - len(config.special_tokens)
        merges = _learn_merges(word_counts, n_merges, verbose=verbose)
        if len(merges) < n_merges:
            got = 256 + len(merges) + len(config.special_tokens)
            _warn(f"asked for {config.vocab_size:,} tokens but the corpus supports only {got:,}: every word of it "
                  f"is already a single token, so no pair is left to merge; the tokenizer has {got:,} tokens "
                  "(train on more text for a larger vocabulary)", verbose)
        ranks = {bytes([b]): b for b in range(256)}
        vocab = [bytes([b]) for b in range(256)]
        for a, b in merges:
            vocab.append(vocab[a] + vocab[b])
            ranks[vocab[-1]] = len(vocab) - 1
        specials = {s: len(ranks) + i for i, s in enumerate(config.special_tokens)}
        return cls(ranks, specials, pattern)

    # ----------------------------------------------------------------- encoding
    def _segments(self, text: str, allowed: set[str]) -> list[str | int]:
        """What both encoding paths encode: allowed special tokens as their ids, and the text
        between them made valid (``valid_text``) and cut (``split_long_runs``) for the regex."""
        text = valid_text(text)
        if allowed:
            # Longest first, so a special token that begins with another one wins.
            alternatives = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
            parts = regex.split(f"({alternatives})", text)
        else:
            parts = [text]
        out: list[str | int] = []
        for i, part in enumerate(parts):
            if i % 2:  # odd entries are the captured special tokens
                out.append(self.special_tokens[part])
            elif part:
                out.extend(split_long_runs(part))
        return out

    def _check_specials(self, text: str, allowed: SpecialSet, disallowed: SpecialSet) -> set[str]:
        allowed_set = set(self.special_tokens) if allowed == "all" else set(allowed)
        unknown = allowed_set - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"allowed_special names tokens this tokenizer lacks: {sorted(unknown)}")
        disallowed_set = set(self.special_tokens) - allowed_set if disallowed == "all" else set(disallowed)
        for s in disallowed_set:
            if s in text:
                raise TokenizerError(
                    f"text contains the special token {s!r}; pass allowed_special={{{s!r}}} (or 'all') to encode "
                    "it as a special token, or disallowed_special=() to encode it as plain text")
        return allowed_set

    def encode(self, text: str, allowed_special: SpecialSet = (), disallowed_special: SpecialSet = "all") -> list[int]:
        """Text to ids through tiktoken (fast path).

        Special-token strings follow tiktoken's rules: a special token is encoded as its id
        only if allowed; text containing a disallowed one is an error, never silently a
        special id; with ``disallowed_special=()`` it is encoded as plain text.
        """
        allowed = self._check_specials(text, allowed_special, disallowed_special)
        return self._encode_fast(text, allowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Text to ids with special-token strings treated as plain text."""
        return self._encode_fast(text, set())

    def _encode_fast(self, text: str, allowed: set[str]) -> list[int]:
        encoding = self.tiktoken_encoding
        segments = self._segments(text, allowed)
        if len(segments) == 1 and isinstance(segments[0], str):  # the usual case: one call, no copying
            return self._present(encoding.encode_ordinary(segments[0]))
        ids: list[int] = []
        seen: dict[str, list[int]] = {}  # a cut run repeats its chunks: encode each distinct one once
        for seg in segments:
            if isinstance(seg, int):
                ids.append(seg)
            else:
                if seg not in seen:
                    seen[seg] = encoding.encode_ordinary(seg)
                ids += seen[seg]
        return self._present(ids)

    def _present(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i < _ABSENT] if self._absent else ids

    def encode_reference(self, text: str, allowed_special: SpecialSet = (),
                         disallowed_special: SpecialSet = "all") -> list[int]:
        """Text to ids in plain Python: the algorithm that ``encode`` runs fast."""
        allowed = self._check_specials(text, allowed_special, disallowed_special)
        ids: list[int] = []
        for seg in self._segments(text, allowed):
            if isinstance(seg, int):
                ids.append(seg)
                continue
            for word in self._split.findall(seg):
                ids.extend(self._bpe(word.encode("utf-8")))
        return ids

    def _bpe(self, word: bytes) -> list[int]:
        """Merge the adjacent pair of lowest rank, leftmost first, until no pair is a token."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ranks, no_merge = self.ranks, 1 << 62
        parts = [word[i:i + 1] for i in range(len(word))]
        # pair_rank[i]: the rank of parts[i] + parts[i + 1] as one token (no_merge if it is none). A merge
        # changes only the two pairs beside it, so only those are looked up again.
        pair_rank = [ranks.get(a + b, no_merge) for a, b in zip(parts, parts[1:])]
        while pair_rank:
            best = min(pair_rank)
            if best == no_merge:
                break
            i = pair_rank.index(best)  # the leftmost pair of lowest rank
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair_rank[i]
            if i > 0:
                pair_rank[i - 1] = ranks.get(parts[i - 1] + parts[i], no_merge)
            if i < len(pair_rank):
                pair_rank[i] = ranks.get(parts[i] + parts[i + 1], no_merge)
        ids = [i for i in (self.ranks.get(p, _ABSENT) for p in parts) if i < _ABSENT]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode_batch(self, texts: Sequence[str], workers: int = 0, min_chars: int = 4_000_000) -> list[list[int]]:
        """Encode many documents as plain text (specials not recognised), in worker processes when large."""
        total = sum(len(t) for t in texts)
        workers = workers or (os.cpu_count() or 1)
        if workers <= 1 or total < min_chars:
            return [self.encode_ordinary(t) for t in texts]
        chunks = [list(texts[i::workers]) for i in range(workers)]  # interleave for even load
        from .workers import pool as worker_pool

        with worker_pool(workers, _worker_init, (self.to_json(),)) as pool:
            results = list(pool.map(_worker_encode, chunks))
        out: list[list[int]] = [[] for _ in texts]
        for w, res in enumerate(results):
            out[w::workers] = res
        return out

    @property
    def tiktoken_encoding(self):
        """A ``tiktoken.Encoding`` with exactly these ranks, built once on first use."""
        if self._tiktoken is None:
            import tiktoken

            self._tiktoken = tiktoken.Encoding(name=f"{self.name}-{self.fingerprint}", pat_str=self.pattern,
                                               mergeable_ranks={**self.ranks, **self._absent},
                                               special_tokens=self.special_tokens)
        return self._tiktoken

    # ----------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            tok = self._decoder.get(i)
            if tok is not None:
                out.append(tok)
            elif i in self._special_decoder:
                out.append(self._special_decoder[i])
            else:
                raise TokenizerError(f"token id {i} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1})")
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; a sequence cut inside a multi-byte character decodes with U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self.decode_bytes([i])

    # ----------------------------------------------------------------- save / load
    def _state(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "name": self.name, "pattern": self.pattern,
                "tokens": [None if (t := self._decoder.get(i)) is None else base64.b64encode(t).decode("ascii")
                           for i in range(max(self._decoder) + 1)],
                "special_tokens": self.special_tokens, "chat_template": self.chat_template, "eos_id": self._eos_id}

    def to_json(self) -> str:
        return json.dumps(self._state())

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (a directory gets the file inside it), atomically."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic.write_text(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "Tokenizer":
        """A tokenizer from the text of an lmforge ``tokenizer.json``; anything else is a one-line error.

        The file may come from anywhere, so every field is checked before use: a damaged or
        foreign file names its first problem instead of failing somewhere later.
        """
        try:
            state = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise TokenizerError(f"{source} is not a tokenizer file (not valid JSON: {e})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            hint = (" - it looks like a Hugging Face tokenizer.json, which lmforge reads as part of a model folder"
                    if isinstance(state, dict) and "model" in state else "")
            raise TokenizerError(f"{source} is not an lmforge tokenizer file (format {found!r}, expected "
                                 f"{FORMAT!r}){hint}")

        def invalid(problem: str) -> TokenizerError:
            return TokenizerError(f"{source} is not a valid lmforge tokenizer file: {problem}; "
                                  "re-create it with `lmforge tokenizer train`")

        version = state.get("version", FORMAT_VERSION)
        if not is_whole(version) or version < 1:
            raise invalid(f"'version' must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise TokenizerError(f"{source} was written by a newer lmforge (format version {version}); "
                                 "upgrade lmforge to read it")
        for key in ("tokens", "special_tokens", "pattern"):
            if key not in state:
                raise invalid(f"the field {key!r} is missing")
        tokens, specials = state["tokens"], state["special_tokens"]
        if not isinstance(tokens, list) or not any(t is not None for t in tokens):
            raise invalid("'tokens' must be a non-empty list of base64 strings (null for an unused id)")
        ranks: dict[bytes, int] = {}
        for i, t in enumerate(tokens):
            if t is None:
                continue
            try:
                tok = base64.b64decode(t, validate=True) if isinstance(t, str) else None
            except (binascii.Error, ValueError):
                tok = None
            if not tok:
                raise invalid(f"token {i} is {t!r}, not the base64 spelling of a non-empty byte string")
            if tok in ranks:
                raise invalid(f"tokens {ranks[tok]} and {i} are the same bytes {tok!r}")
            ranks[tok] = i
        if not isinstance(specials, dict) or not all(
                isinstance(k, str) and k and is_whole(v) and 0 <= v < _ABSENT for k, v in specials.items()):
            raise invalid(f"'special_tokens' must map non-empty strings to ids from 0 to {_ABSENT - 1}")
        name, template, eos = state.get("name", "lmforge"), state.get("chat_template"), state.get("eos_id")
        if not isinstance(name, str):
            raise invalid(f"'name' must be a string, got {name!r}")
        if template is not None and not isinstance(template, str):
            raise invalid("'chat_template' must be a string or null")
        if eos is not None and not (is_whole(eos) and (0 <= eos < len(tokens) and tokens[eos] is not None
                                                      or eos in specials.values())):
            raise invalid(f"'eos_id' {eos!r} is not the id of a token of this vocabulary")
        if not isinstance(state["pattern"], str):
            raise invalid(f"'pattern' must be a string, got {state['pattern']!r}")
        # Its own one-line error, naming the pattern; a saved pattern that drops text still loads (warned):
        # runs were made with it
        compile_pattern(state["pattern"], source, coverage="warn")
        try:
            return cls(ranks, specials, state["pattern"], name, template, eos, pattern_coverage="skip")
        except TokenizerError as e:
            raise invalid(str(e)) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a ``tokenizer.json`` written by lmforge (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer file at {path}; train one with `lmforge tokenizer train`")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(f"{path} is not a tokenizer file (not UTF-8 text)") from None
        except OSError as e:
            raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
        return cls.from_json(text, str(path))

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> "Tokenizer":
        """OpenAI's GPT-2 vocabulary from ``encoder.json`` and ``vocab.bpe``.

        Those files spell bytes with printable stand-in characters (``bytes_to_unicode``);
        the ids of ``encoder.json`` are kept, so the result is id-for-id GPT-2's encoding.
        """
        try:
            encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
            Path(vocab_bpe).read_text(encoding="utf-8")  # must exist and be text; merges are implied by the ranks
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read GPT-2 vocabulary files: {e}") from None
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for tok, i in encoder.items():
            if tok == EOT:
                specials[tok] = i
                continue
            try:
                ranks[bytes(byte_of[c] for c in tok)] = i
            except KeyError:
                raise TokenizerError(f"{encoder_json}: token {tok!r} uses characters outside GPT-2's byte alphabet") from None
        return cls(ranks, specials, GPT2_PATTERN, name="gpt2")

    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike, pattern: str = "gpt2",
                           special_tokens: dict[str, int] | None = None, name: str = "tiktoken") -> "Tokenizer":
        """A tiktoken rank file (lines of ``base64-token rank``)."""
        ranks: dict[bytes, int] = {}
        try:
            for n, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
                if line.strip():
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path} is not a tiktoken rank file ({e})") from None
        return cls(ranks, special_tokens, pattern, name)


def _warn(message: str, verbose: bool) -> None:
    """A warning on the console where verbose output goes (the command line), else a ``UserWarning``."""
    if verbose:
        print(f"lmforge: warning: {message}", file=sys.stderr, flush=True)
    else:
        warnings.warn(message, stacklevel=3)


def _learn_merges(word_counts: dict[bytes, int], n_merges: int, verbose: bool = False) -> list[tuple[int, int]]:
    """The BPE training core: the ``n_merges`` most frequent pairs, merged greedily."""
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, w in enumerate(words):
        c = counts[wi]
        for pair in zip(w, w[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + c
            where.setdefault(pair, set()).add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    progress = None
    if verbose:
        from tqdm import tqdm

        progress = tqdm(total=n_merges, desc="BPE merges", unit="merge")
    while len(merges) < n_merges and heap:
        negc, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negc or negc == 0:
            continue  # stale heap entry: the count changed since it was pushed
        new_id = 256 + len(merges)
        merges.append(pair)
        a, b = pair
        changed: set[tuple[int, int]] = set()
        for wi in where.pop(pair, ()):
            w = words[wi]
            # `where` may hold words that lost this pair to an earlier merge: skip them.
            if not any(w[i] == a and w[i + 1] == b for i in range(len(w) - 1)):
                continue
            c = counts[wi]
            for p in zip(w, w[1:]):
                pair_counts[p] -= c
                changed.add(p)
            merged, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[wi] = merged
            for p in zip(merged, merged[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + c
                changed.add(p)
                where.setdefault(p, set()).add(wi)
        for p in changed:
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_counts[p]
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    return merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, used to spell tokens in its files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_WORKER_TOKENIZER: Tokenizer | None = None


def _worker_init(state: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_json(state)


def _worker_encode(texts: list[str]) -> list[list[int]]:
    assert _WORKER_TOKENIZER is not None
    return [_WORKER_TOKENIZER.encode_ordinary(t) for t in texts]


class SimpleTokenizer:
    """The book's chapter-2 teaching tokenizer: split on punctuation and spaces, look words up.

    Words never seen in training map to ``<|unk|>``; documents are joined with
    ``<|endoftext|>``. Real models use BPE (``Tokenizer``), which has no unknown words.
    """

    SPLIT = r'([,.:;?_!"()\']|--|\s)'
    UNK, EOT = "<|unk|>", EOT

    def __init__(self, vocab: dict[str, int]) -> None:
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}

    @classmethod
    def from_text(cls, text: str) -> "SimpleTokenizer":
        words = sorted({w for w in cls._words(text)} | {cls.EOT, cls.UNK})
        return cls({w: i for i, w in enumerate(words)})

    @classmethod
    def _words(cls, text: str) -> list[str]:
        return [w.strip() for w in regex.split(cls.SPLIT, text) if w.strip()]

    def encode(self, text: str) -> list[int]:
        unk = self.str_to_int[self.UNK]
        return [self.str_to_int.get(w, unk) for w in self._words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        text = " ".join(self.int_to_str[i] for i in ids)
        return regex.sub(r'\s+([,.?!"()\'])', r"\1", text)  # no space before punctuation
