"""Text generation: a pure sampling function, a batched decoding loop with a KV cache, and text
streaming.

The engine (``Decoder``) knows nothing about tokenization: it maps token ids to token ids. The
prompts run once (prefill), then one token per row per step reuses the cached keys and values.
Prompts of different lengths share one batch left-padded: each row keeps its own positions and
attention skips its padding, so a row gets the ids it would get alone. ``TextStream`` turns one
row's ids into text deltas (never half a UTF-8 character, never the start of a stop string);
``stream_text`` and ``generate_text`` put the two together for one prompt.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .attention import KVCache
from .config import SampleConfig


def fresh_seed() -> int:
    """A new random seed for one generation (what `generate` uses unless --sample.seed is given)."""
    return int.from_bytes(os.urandom(8), "little") >> 1  # torch seeds are < 2**63


def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own for one generation: a fresh seed from the OS when ``seed`` is None,
    never torch.seed(), which would reseed the global generator that training draws from."""
    return torch.Generator(device=device).manual_seed(seed if seed is not None else fresh_seed())


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: a token already seen (``seen`` (B, V) bool) has its positive logit
    divided by ``penalty`` and its negative logit multiplied by it (both make it less likely)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                repetition_penalty: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 is greedy.

    A pure function of its arguments: the only randomness is ``generator``'s."""
    logits = logits.float()
    if seen is not None:
        logits = penalize_repeats(logits, seen, repetition_penalty)
    if temperature < GREEDY_BELOW:  # the limit of T -> 0 (and logits / 1e-39 would overflow to inf)
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep tokens until p is reached
        drop[..., 0] = False  # the most likely token always stays: a top_p too small for float32 drops nothing more
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Token:
    """One generated token of one row: its id, its log-probability under the model (before
    temperature and filtering) when asked for, the ``top`` most likely alternatives, and whether
    it is a stop id (which ends the row and is not part of the text)."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    stop: bool = False


class Decoder:
    """Generates for a batch of prompts, one step per iteration: each step yields, per row, the
    new ``Token`` or None for a row that has finished (``finish_reason[row]``: "stop" after a stop
    id, "length" after its ``max_new_tokens``, or what ``finish`` was told).

    ``config`` is one SampleConfig for every row or one per row; ``generator`` likewise (rows
    with their own generators sample exactly as they would alone; by default one generator
    seeded from the first config serves the whole batch). A prompt longer than the context keeps
    its end. When the cache is full the window slides: the oldest quarter of the context is
    dropped and the rest is run once more into the cache, so past the context a token costs one
    cached step, plus one prefill every context/4 tokens (not a full forward per token).

    ``compile=True`` runs each decode step through ``torch.compile`` over a static cache (fixed
    shapes: the cache length is rounded up to a power of two, so a few graphs serve every
    request); the prefill stays eager. The first generation of a shape pays the compilation.
    """

    def __init__(self, model: torch.nn.Module, prompts: torch.Tensor | Sequence[Sequence[int]],
                 config: SampleConfig | Sequence[SampleConfig] = SampleConfig(), stop_ids: Iterable[int] = (),
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, use_cache: bool = True,
                 logprobs: int | None = None, compile: bool = False) -> None:
        self.model = model.eval()
        self.step_model = compiled(model) if compile and use_cache else None
        self.device = next(model.parameters()).device
        self.ctx = model.config.context_length
        rows = [[int(t) for t in p][-self.ctx:] for p in (prompts.tolist() if torch.is_tensor(prompts) else prompts)]
        if any(not r for r in rows):
            raise ValueError("every prompt needs at least one token (start an empty one with the end-of-text id)")
        self.n = len(rows)
        self.configs = [config] * self.n if isinstance(config, SampleConfig) else list(config)
        if len(self.configs) != self.n:
            raise ValueError(f"{len(self.configs)} sample configs for {self.n} prompts")
        if generator is None:
            generator = seeded_generator(self.configs[0].seed if self.n else None, self.device)
        self.generators = generator if isinstance(generator, Sequence) else None
        self.generator = None if self.generators is not None else generator
        self.stop_ids = set(stop_ids)
        self.use_cache, self.logprobs = use_cache, logprobs
        self.finish_reason: list[str | None] = [None] * self.n
        self.n_new = [0] * self.n
        width = max((len(r) for r in rows), default=0)
        pad = [width - len(r) for r in rows]
        self.tokens = torch.tensor([[0] * p + r for p, r in zip(pad, rows)], dtype=torch.long, device=self.device)
        self.pad = torch.tensor(pad, device=self.device) if any(pad) else None
        self.seen = None  # (B, V) tokens each row has seen, for the repetition penalty
        if any(c.repetition_penalty != 1.0 for c in self.configs):
            self.seen = torch.zeros(self.n, model.config.vocab_size, dtype=torch.bool, device=self.device)
            for i, r in enumerate(rows):
                self.seen[i, r] = True
        # The cache starts with room for the prompts and some answer, and doubles while the answers
        # grow (a request allowed the whole context rarely uses it); its length is a power of two,
        # so a compiled decode step sees few shapes.
        longest = width + max((c.max_new_tokens for c in self.configs), default=0)
        self.cache_limit = min(self.ctx, longest)
        self.cache = None
        if use_cache and self.n:
            dtype = next(model.parameters()).dtype
            start = min(self.cache_limit, 1 << max(6, (width + 63).bit_length()))
            self.cache = KVCache(model.config, self.n, start, self.device,
                                 dtype if dtype.is_floating_point else torch.float32, self.pad)

    def finish(self, row: int, reason: str = "stop") -> None:
        """End a row from outside (a stop string was found, a client went away)."""
        if self.finish_reason[row] is None:
            self.finish_reason[row] = reason

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reason)

    def _forward(self, tokens: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """Last-position logits (B, V) of ``tokens``, into the cache when there is one."""
        if self.cache is not None:
            self.cache.reset(pad)
            logits = self.model(tokens, self.cache, last_only=True)[:, -1]
            if self.step_model is not None:
                self.cache.make_static()
            return logits
        return self.model(tokens, pad=pad, last_only=True)[:, -1]

    def _step(self, nxt: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after one more token per row, through the cache."""
        if self.step_model is None:
            return self.model(nxt[:, None], self.cache)[:, -1]
        logits = self.step_model(nxt[:, None], self.cache)[:, -1]
        self.cache.advance(1)  # outside the compiled graph: the column tensor moves in place
        return logits

    def _repack(self, limit: int, keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch again, each row's padding dropped first: a row of more than ``limit`` real
        tokens keeps its last ``keep``, a shorter one all of them, so that sharing a batch never
        costs a row its own context (a row is cut when it would be cut alone)."""
        pad = [0] * self.n if self.pad is None else self.pad.tolist()
        rows = [self.tokens[i, p:] for i, p in enumerate(pad)]
        rows = [r[-keep:] if r.numel() > limit else r for r in rows]
        width = max(r.numel() for r in rows)
        new_pad = [width - r.numel() for r in rows]
        self.tokens = torch.stack([torch.cat([r.new_zeros(p), r]) for p, r in zip(new_pad, rows)])
        self.pad = torch.tensor(new_pad, device=self.device) if any(new_pad) else None
        return self.tokens, self.pad

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.generators is None and all(c == self.configs[0] for c in self.configs):
            c = self.configs[0]  # one configuration and one generator: the whole batch at once
            return sample_next(logits, c.temperature, c.top_k, c.top_p, self.generator, c.repetition_penalty, self.seen)
        out = torch.zeros(self.n, dtype=torch.long, device=logits.device)
        for i, c in enumerate(self.configs):
            if self.finish_reason[i] is None:
                g = self.generators[i] if self.generators is not None else self.generator
                out[i] = sample_next(logits[i:i + 1], c.temperature, c.top_k, c.top_p, g, c.repetition_penalty,
                                     None if self.seen is None else self.seen[i:i + 1])[0]
        return out

    def _tokens(self, logits: torch.Tensor, nxt: torch.Tensor) -> list[Token | None]:
        ids = nxt.tolist()
        chosen = top = None
        if self.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            chosen = logp.gather(1, nxt[:, None])[:, 0].tolist()
            if self.logprobs > 0:
                top = torch.topk(logp, min(self.logprobs, logp.size(-1)), dim=-1)
        step: list[Token | None] = []
        for i, t in enumerate(ids):
            if self.finish_reason[i] is not None:
                step.append(None)
                continue
            tok = Token(t, None if chosen is None else chosen[i],
                        [] if top is None else list(zip(top.indices[i].tolist(), top.values[i].tolist())))
            self.n_new[i] += 1
            if t in self.stop_ids and self.configs[i].stop_at_eos:
                tok.stop = True
                self.finish_reason[i] = "stop"
            elif self.n_new[i] >= self.configs[i].max_new_tokens:
                self.finish_reason[i] = "length"
            step.append(tok)
        return step

    @torch.no_grad()
    def __iter__(self) -> Iterator[list[Token | None]]:
        for i, c in enumerate(self.configs):
            if c.max_new_tokens == 0:
                self.finish_reason[i] = "length"
        if self.done:
            return
        logits = self._forward(*self._repack(self.ctx, self.ctx))
        while True:
            nxt = self._sample(logits)
            step = self._tokens(logits, nxt)
            yield step
            if self.done:
                return
            self.tokens = torch.cat([self.tokens, nxt[:, None]], dim=1)
            if self.seen is not None:
                self.seen.scatter_(1, nxt[:, None], True)
            if self.cache is None:
                logits = self._forward(*self._repack(self.ctx, self.ctx))
            elif self.cache.pos < self.cache.max_len:
                logits = self._step(nxt)
            elif self.cache.max_len < self.cache_limit:  # room left in the context: a longer cache
                self.cache.grow(min(self.cache_limit, 2 * self.cache.max_len))
                logits = self._step(nxt)
            else:  # the context is full: the rows that filled it drop their oldest quarter, and the
                # batch runs into the cache again
                n = self.cache.max_len
                logits = self._forward(*self._repack(n, n - max(1, n // 4)))


def _weights_key(model: torch.nn.Module) -> tuple:
    """Which tensors the model holds and how often each was written in place: a frozen graph
    (below) must be rebuilt when a weight is replaced (quantize, a LoRA merge) or updated
    (training, load_state_dict)."""
    held = [*model.parameters(), *(b for m in model.modules() for name, b in m.named_buffers(recurse=False)
                                   if name not in m._non_persistent_buffers_set)]
    # Non-persistent buffers (the rotary tables) are derived and built on first use: not weights.
    return tuple((t.data_ptr(), t._version) for t in held)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward through torch.compile, made once per model and kept on it (in its
    __dict__, so it is neither a submodule nor in the state dict, and goes when the model goes).

    On the CPU the graph is frozen and wrapped in C++: freezing makes the weights constants, so
    Inductor folds them and lays the matrices out once for the CPU's matmul kernels (a copy of
    the weights, kept beside the model's), and the C++ wrapper calls the graph's kernels without
    a Python line per operation. A decode step is hundreds of small operations, so this is what
    turns per-operation overhead into time spent reading weights (benchmarks/decode_speed.py).
    A step of one row runs its linear layers as reductions (``gemv_linear``), which Inductor
    compiles into matrix-vector loops that read the weights at nearly the memory's speed.
    Because frozen weights are copies, a changed weight makes a new graph (``_weights_key``)."""
    key = _weights_key(model)
    entry = model.__dict__.get("_compiled_forward")
    if entry is None or entry[0] != key:
        if next(model.parameters()).device.type == "cpu":
            graph = _frozen_cpu(model)
        else:
            graph = torch.compile(model, dynamic=False)
        entry = (key, graph)
        model.__dict__["_compiled_forward"] = entry
    return entry[1]


def _frozen_cpu(model: torch.nn.Module) -> Callable:
    """The model through torch.compile with Inductor's freezing and C++ wrapper switched on while
    its calls run (and compile). They are set around the call, not given as torch.compile's
    ``options``, which reach only Inductor's part of the compilation: given that way, the same
    decode step ran at 40 tok/s against 52 for SmolLM2 in bf16 here (benchmarks/decode_speed.py).
    Each graph gets a backend of its own: Dynamo keeps compiled code per backend, and a graph
    whose weights are frozen constants must not be found again after the weights change."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):  # a new function per graph: Dynamo never reuses another's code
        _single_row_linears_as_reductions(gm)
        return compile_fx(gm, example_inputs)

    graph = torch.compile(model, backend=backend, dynamic=False)

    def call(*args, **kwargs):
        with inductor_config.patch(freezing=True, cpp_wrapper=True):
            return graph(*args, **kwargs)

    return call


def gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for an input of one row, written as what it is: each output is a row of the
    weight times x, summed (in fp32). Inductor turns this into one loop over the weight's rows,
    split across the threads, that reads each weight once: a matrix-vector product at the memory's
    speed, where the GEMM kernels that ``F.linear`` calls run one row at a third of it."""
    y = (weight * x[..., None, :]).sum(-1, dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _single_row_linears_as_reductions(gm: torch.fx.GraphModule) -> None:
    """Replace, in a traced decode step, every ``F.linear`` whose input is one row by ``gemv_linear``."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch._C._nn.linear:
            continue
        x = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
        if x is None or x.numel() != x.size(-1):
            continue
        node.target = gemv_linear
        changed += 1
    if changed:
        gm.recompile()


def generate(model: torch.nn.Module, idx: torch.Tensor, config: SampleConfig = SampleConfig(),
             eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Prompt ids (B, T) -> generated ids (B, n) (the prompt not included). A row that produced
    ``eos_id`` holds it until the longest row ends."""
    decoder = Decoder(model, idx, config, () if eos_id is None else (eos_id,), use_cache=use_cache)
    steps = [[eos_id if t is None else t.id for t in step] for step in decoder]
    if not steps:
        return torch.zeros(idx.size(0), 0, dtype=torch.long)
    return torch.tensor(steps, dtype=torch.long).T.contiguous()


class TextStream:
    """One row's token ids in, text deltas out. Bytes are decoded incrementally, so a multi-byte
    character split across tokens comes out whole; text that could be the start of a stop string
    is held back until it is known not to be one, and a stop string ends the stream (``stopped``)
    with nothing of it emitted."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _emit(self, final: bool) -> str:
        hits = [i for i in (self._held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = self._held[:min(hits)], "", True
        elif final:
            out, self._held = self._held, ""
        else:  # hold back the longest tail that a stop string starts with
            keep = max((next((k for k in range(min(len(s) - 1, len(self._held)), 0, -1)
                              if self._held.endswith(s[:k])), 0) for s in self.stop), default=0)
            out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        self.text += out
        return out

    def push(self, token_id: int) -> str:
        """The text this token completes ('' while a character or a possible stop string is pending)."""
        if self.stopped:
            return ""
        try:
            raw = self.tokenizer.decode_bytes([token_id])
        except ValueError:  # an id of the model's padded vocabulary that no token has: no text
            raw = b""
        self._held += self._utf8.decode(raw)
        return self._emit(final=False)

    def close(self) -> str:
        """What is still held back, at the end of the generation."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._emit(final=True)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids (special tokens allowed); an empty prompt starts a new document."""
    ids = tokenizer.encode(prompt, allowed_special="all") if prompt else []
    return ids or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]


def stream_text(model: torch.nn.Module, tokenizer, prompt: str | Sequence[int],
                config: SampleConfig = SampleConfig(), compile: bool = False) -> Iterator[str]:
    """Text deltas of one generation, as they are decided. It ends at the tokenizer's end id, a
    stop string of ``config.stop`` (not included) or after ``config.max_new_tokens``."""
    ids = prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    ends = {i for i in (tokenizer.eos_id, tokenizer.eot_id) if i is not None}
    text = TextStream(tokenizer, config.stop)
    for step in Decoder(model, [ids], config, ends, compile=compile):
        tok = step[0]
        if tok is None or tok.stop:
            break
        delta = text.push(tok.id)
        if delta:
            yield delta
        if text.stopped:
            return
    tail = text.close()
    if tail:
        yield tail


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, config: SampleConfig = SampleConfig()) -> str:
    """Prompt text -> continuation text (stops at the end token, which is not included)."""
    return "".join(stream_text(model, tokenizer, prompt, config))
