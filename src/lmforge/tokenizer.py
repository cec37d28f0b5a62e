"""Byte-level BPE tokenizers: train, encode, decode, save, load.

A tokenizer is a table of *mergeable ranks* (token bytes -> id, where a lower id was
merged earlier), a pre-tokenization regex and a few special tokens. That one
representation covers tokenizers trained here, OpenAI's GPT-2 vocabulary
(``encoder.json`` + ``vocab.bpe``) and tiktoken rank files.

Encoding has two paths that must agree: ``encode_reference`` is the algorithm written
out in Python (split with the regex, then repeatedly merge the adjacent pair of lowest
rank); ``encode`` runs the same ranks through a ``tiktoken.Encoding`` built in memory.

This module never imports torch: tokenizing is text work.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import regex

from . import atomic
from .config import LmforgeError, TokenizerConfig

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
EOT = "<|endoftext|>"
FORMAT = "lmforge-bpe"
FORMAT_VERSION = 1


class TokenizerError(LmforgeError, ValueError):
    """Bad tokenizer input: a file, a vocabulary or a text that cannot be tokenized."""


SpecialSet = Collection[str] | Literal["all"]
_ABSENT = 1 << 30


class Tokenizer:
    """A byte-level BPE tokenizer defined by its mergeable ranks.

    ``ranks`` maps token bytes to ids; the ids must be 0..n-1 and every single byte must
    be a token, so any text can be encoded. Special tokens get ids of their own.
    """

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN, name: str = "lmforge", chat_template: str | None = None,
                 eos_id: int | None = None) -> None:
        self.chat_template = chat_template
        self._eos_id = eos_id
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens or {})
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
        self._split = regex.compile(self.pattern)
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
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        inverse = {i: s for s, i in self.special_tokens.items()}
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=inverse.get(self.eos_id, ""), bos_token="")

    @property
    def fingerprint(self) -> str:
        """Short digest of the vocabulary, pattern and specials: shards record it to catch mix-ups."""
        return hashlib.sha256(json.dumps(self._state(), sort_keys=True).encode()).hexdigest()[:16]

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
        """
        pattern = PATTERNS.get(config.pattern, config.pattern)
        split = regex.compile(pattern)
        if isinstance(texts, str):
            texts = [texts]
        word_counts: Counter[bytes] = Counter()
        for text in texts:
            word_counts.update(w.encode("utf-8") for w in split.findall(text))
        n_merges = config.vocab_size - 256 - len(config.special_tokens)
        merges = _learn_merges(word_counts, n_merges, verbose=verbose)
        ranks = {bytes([b]): b for b in range(256)}
        vocab = [bytes([b]) for b in range(256)]
        for a, b in merges:
            vocab.append(vocab[a] + vocab[b])
            ranks[vocab[-1]] = len(vocab) - 1
        specials = {s: len(ranks) + i for i, s in enumerate(config.special_tokens)}
        return cls(ranks, specials, pattern)

    # ----------------------------------------------------------------- encoding
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
        return self._present(self.tiktoken_encoding.encode(text, allowed_special=allowed, disallowed_special=()))

    def encode_ordinary(self, text: str) -> list[int]:
        """Text to ids with special-token strings treated as plain text."""
        return self._present(self.tiktoken_encoding.encode_ordinary(text))

    def _present(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i < _ABSENT] if self._absent else ids

    def encode_reference(self, text: str, allowed_special: SpecialSet = (),
                         disallowed_special: SpecialSet = "all") -> list[int]:
        """Text to ids in plain Python: the algorithm that ``encode`` runs fast."""
        allowed = self._check_specials(text, allowed_special, disallowed_special)
        ids: list[int] = []
        if allowed:
            parts = regex.split("(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")",
                                text)
        else:
            parts = [text]
        for i, part in enumerate(parts):
            if i % 2:  # odd entries are the captured special tokens
                ids.append(self.special_tokens[part])
                continue
            for word in self._split.findall(part):
                ids.extend(self._bpe(word.encode("utf-8")))
        return ids

    def _bpe(self, word: bytes) -> list[int]:
        """Merge the adjacent pair of lowest rank, leftmost first, until no pair is a token."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [word[i:i + 1] for i in range(len(word))]
        while len(parts) > 1:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_rank is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
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
        with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(self.to_json(),)) as pool:
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
        try:
            state = json.loads(text)
            if state.get("format") != FORMAT:
                raise TokenizerError(f"{source} is not an lmforge tokenizer file (format {state.get('format')!r})")
            if state.get("version", 0) > FORMAT_VERSION:
                raise TokenizerError(f"{source} was written by a newer lmforge (format version {state['version']}); "
                                     "upgrade lmforge to read it")
            ranks = {base64.b64decode(t): i for i, t in enumerate(state["tokens"]) if t is not None}
            return cls(ranks, state["special_tokens"], state["pattern"], state.get("name", "lmforge"),
                       state.get("chat_template"), state.get("eos_id"))
        except TokenizerError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TokenizerError(f"{source} is not a valid tokenizer file ({type(e).__name__}: {e}); "
                                 "re-create it with `lmforge tokenizer train`") from None

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
