"""Text generation: a pure sampling function and a decoding loop with a KV cache.

The engine knows nothing about tokenization: it maps token ids to token ids. The
prompt is run once (prefill), then one token at a time reuses the cached keys and values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from .attention import KVCache
from .config import SampleConfig


def fresh_seed() -> int:
    """A new random seed for one generation (what `generate` uses unless --sample.seed is given)."""
    return int.from_bytes(os.urandom(8), "little") >> 1  # torch seeds are < 2**63


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep tokens until p is reached
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model: torch.nn.Module, idx: torch.Tensor, config: SampleConfig = SampleConfig(),
           eos_id: int | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time. Rows that produced ``eos_id`` keep
    yielding it; the loop ends when every row has, or after ``max_new_tokens``."""
    model.eval()
    device = next(model.parameters()).device
    ctx = model.config.context_length
    gen = torch.Generator(device=device)
    # A fresh seed from the OS, not torch.seed(): that would reseed the global generator as a side
    # effect and change what training (dropout, initialisation) draws next.
    gen.manual_seed(config.seed if config.seed is not None else fresh_seed())
    idx = idx.to(device)[:, -ctx:]  # a prompt longer than the context keeps its end
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=device)
    cache = KVCache(model.config, idx.size(0), device=device) if use_cache else None
    logits = model(idx, cache)[:, -1]
    for _ in range(config.max_new_tokens):
        nxt = sample_next(logits, config.temperature, config.top_k, config.top_p, gen)
        if eos_id is not None and config.stop_at_eos:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        yield nxt
        if bool(done.all()):
            return
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if cache is not None and cache.pos < ctx:
            logits = model(nxt[:, None], cache)[:, -1]
        else:  # context full: slide the window and recompute (positions are absolute)
            idx = idx[:, -ctx:]
            cache = None
            logits = model(idx)[:, -1]


def generate(model: torch.nn.Module, idx: torch.Tensor, config: SampleConfig = SampleConfig(),
             eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Prompt ids (B, T) -> generated ids (B, n) (the prompt not included)."""
    steps = list(stream(model, idx, config, eos_id, use_cache))
    if not steps:
        return torch.zeros(idx.size(0), 0, dtype=torch.long)
    return torch.stack(steps, dim=1).cpu()


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, config: SampleConfig = SampleConfig()) -> str:
    """Prompt text -> continuation text (stops at <|endoftext|>, which is not included)."""
    ids = tokenizer.encode(prompt, allowed_special="all") if prompt else []
    if not ids:
        ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]  # an empty prompt starts a new document
    out = generate(model, torch.tensor([ids]), config, tokenizer.eot_id)[0].tolist()
    if tokenizer.eot_id in out:
        out = out[:out.index(tokenizer.eot_id)]
    return tokenizer.decode(out)
