"""Causal self-attention, from first principles and through PyTorch's fused kernel.

``attention_reference`` is the formula written out:

    softmax(Q Kᵀ / √d + causal mask) · V      (with dropout on the weights)

``attention`` computes the same thing with ``torch.nn.functional.scaled_dot_product_attention``
(flash / memory-efficient kernels, no T×T matrix kept for backward), except for sequences up to
1024 tokens on the CPU, where ``ChunkedCausalAttention`` (the formula as batched products over
chunks of queries, the weights kept for backward) is faster. Tests prove them equal in outputs and gradients;
``MultiHeadAttention`` picks the reference or the fast path by its ``fast`` flag.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .matmul import Linear


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where attention is allowed.

    Queries are the last ``t_q`` positions of the ``t_k`` keys (the rest came from a KV
    cache), so query i sees keys 0 .. (t_k - t_q + i).
    """
    offset = t_k - t_q
    q = torch.arange(t_q, device=device)[:, None]
    k = torch.arange(t_k, device=device)[None, :]
    return k <= q + offset


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hs) -> (B, n_kv * n_rep, T, hs): each KV head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                        training: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention spelled out. q: (B, nh, Tq, hs); k, v: (B, nkv, Tk, hs) -> (B, nh, Tq, hs).
    ``mask`` (B, 1, Tq, Tk), True where allowed, replaces the causal mask (padded rows)."""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))            # (B, nh, Tq, Tk)
    if mask is None:
        mask = causal_mask(q.size(-2), k.size(-2), q.device)
    scores = scores.masked_fill(~mask, float("-inf"))                    # no peeking at the future
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v                                                   # (B, nh, Tq, hs)


# The longest sequence ChunkedCausalAttention serves (CPU, fp32 and bf16), and its chunk of queries.
# In chunks of 128 it was measured faster than the flash kernel at every length from 128 to 2048
# tokens (AMD EPYC host, 2 threads); the limit is its memory, B · heads · T²/2 weights per layer,
# which at 1024 tokens is about half of what a GPT-2 layer keeps for backward anyway.
CHUNKED_ATTENTION_MAX = 1024
ATTENTION_CHUNK = 128


def chunk_spans(t: int, chunk: int = ATTENTION_CHUNK) -> list[tuple[int, int]]:
    """The query chunks [start, end) of ``t`` positions; chunk [start, end) sees keys 0 .. end-1."""
    return [(start, min(t, start + chunk)) for start in range(0, t, chunk)]


def _chunk_bias(start: int, end: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(group * (end - start), end): the causal mask of the queries at positions start .. end-1 over
    keys 0 .. end-1 as an additive bias (0 where allowed, -inf for a later key), repeated for each
    query head of a group."""
    hidden = ~causal_mask(end - start, end, device)  # queries are the last end - start of end positions
    bias = torch.zeros(end - start, end, dtype=dtype, device=device).masked_fill(hidden, float("-inf"))
    return bias.repeat(group, 1)


# Full chunks' biases are kept: a training run asks for the same few at every layer of every step.
# A last, partial chunk (any prompt length) is built each time, so the cache cannot grow with lengths.
_full_chunk_bias = functools.lru_cache(maxsize=32)(_chunk_bias)


class ChunkedCausalAttention(torch.autograd.Function):
    """Causal attention as batched products over chunks of queries, the attention weights kept
    for backward. Per chunk of query positions [a, e), which can only see keys 0 .. e-1:

        forward:   S = Q Kᵀ/√d + causal bias     P = softmax(S)     O = P V
        backward:  dV += Pᵀ dO    dP = dO Vᵀ    dS = P ⊙ (dP − rowsum(dO ⊙ O))
                   dQ = dS K/√d    dK += dSᵀ Q/√d

    (rowsum(dP ⊙ P) = rowsum(dO ⊙ O), the softmax backward's row term.) The query heads that share
    a key/value head are stacked into one (group · chunk, hs) matrix, so each key/value head takes
    one product of that height instead of ``group`` small ones; the chunks skip the keys a causal
    mask would hide (37 % fewer products at 512 tokens in chunks of 128).

    On the CPU this is about 2× faster than PyTorch's CPU flash kernel at 256-512 tokens, forward
    and backward (``benchmarks/attention_speed.py``): the products are large enough to run near
    the CPU's matmul peak. Its price is memory: P, about B · heads · T²/2 values per layer, which
    is why ``attention`` uses it only up to ``CHUNKED_ATTENTION_MAX`` tokens (without gradients,
    one chunk's P at a time). In bf16 the products round their outputs (S, dP) to bf16, as the
    formula's products do under autocast; the flash kernel keeps S in fp32, so at large logits
    its bf16 results are closer to exact (mean error 1.3-1.8× lower). The softmax's sums, the
    row sums and the dK, dV sums over chunks are fp32. First derivatives only.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                chunk: int = ATTENTION_CHUNK, keep: bool = True) -> torch.Tensor:
        """``keep``: keep what backward needs. False (no gradient will be asked for: prefill,
        evaluation) frees each chunk's weights before the next chunk's are made."""
        b, nh, t, hs = q.shape
        n_kv = k.size(1)
        group = nh // n_kv
        q4 = q.reshape(b * n_kv, group, t, hs)                 # the query heads of each key/value head
        k3, v3 = k.reshape(b * n_kv, t, hs), v.reshape(b * n_kv, t, hs)
        out = q.new_empty(b * n_kv, group, t, hs)
        saved = []
        with torch.autocast(q.device.type, enabled=False):  # the inputs already have the dtype to use
            for start, end in chunk_spans(t, chunk):
                q_c = q4[:, :, start:end].reshape(b * n_kv, group * (end - start), hs)
                # (in a compiled graph the bias is built in the graph: Dynamo would skip the cache and warn)
                cached = end - start == chunk and not torch.compiler.is_compiling()
                bias = (_full_chunk_bias if cached else _chunk_bias)(start, end, group, q.dtype, q.device)
                weights = torch.softmax(torch.baddbmm(bias, q_c, k3[:, :end].transpose(1, 2), alpha=hs ** -0.5),
                                        dim=-1)
                out[:, :, start:end] = torch.bmm(weights, v3[:, :end]).view(b * n_kv, group, end - start, hs)
                if keep:
                    saved += [q_c, weights]
                del weights  # without ``keep``, gone before the next chunk's are made
        if keep:
            ctx.save_for_backward(k3, v3, out, *saved)
            ctx.shapes, ctx.chunk = (q.shape, k.shape), chunk
        return out.view(b, nh, t, hs)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward is not itself differentiable: say so
    def backward(ctx, d_out: torch.Tensor):  # type: ignore[override]
        k3, v3, out, *saved = ctx.saved_tensors
        (b, nh, t, hs), kv_shape = ctx.shapes
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        n_kv, dtype = kv_shape[1], k3.dtype
        group, scale, acc = nh // n_kv, hs ** -0.5, torch.promote_types(k3.dtype, torch.float32)
        d_out4 = d_out.to(dtype).reshape(b * n_kv, group, t, hs)
        rows = (d_out4.to(acc) * out.to(acc)).sum(-1, keepdim=True)      # rowsum(dO ⊙ O), (B·kv, group, T, 1)
        d_q = torch.empty(b * n_kv, group, t, hs, dtype=dtype, device=k3.device) if need_q else None
        d_k = torch.zeros(b * n_kv, t, hs, dtype=acc, device=k3.device) if need_k else None
        d_v = torch.zeros(b * n_kv, t, hs, dtype=acc, device=k3.device) if need_v else None
        with torch.autocast(k3.device.type, enabled=False):
            for i, (start, end) in enumerate(chunk_spans(t, ctx.chunk)):
                q_c, weights = saved[2 * i: 2 * i + 2]
                d_out_c = d_out4[:, :, start:end].reshape(q_c.shape)
                if need_v:
                    d_v[:, :end] += torch.bmm(weights.transpose(1, 2), d_out_c)
                if not (need_q or need_k):
                    continue
                d_weights = torch.bmm(d_out_c, v3[:, :end].transpose(1, 2))
                row = rows[:, :, start:end].reshape(q_c.shape[0], -1, 1)
                d_scores = torch.sub(d_weights, row).mul_(weights).to(dtype)
                if need_q:
                    d_q[:, :, start:end] = torch.bmm(d_scores, k3[:, :end]).mul_(scale).view(
                        b * n_kv, group, end - start, hs)
                if need_k:
                    d_k[:, :end] += torch.bmm(d_scores.transpose(1, 2), q_c)
        return (d_q.view(b, nh, t, hs) if need_q else None,
                d_k.mul_(scale).to(dtype).view(kv_shape) if need_k else None,
                d_v.to(dtype).view(kv_shape) if need_v else None, None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              training: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same as ``attention_reference``: on the CPU up to ``CHUNKED_ATTENTION_MAX`` tokens (causal,
    no mask, no dropout) through ``ChunkedCausalAttention``, otherwise through PyTorch's fused kernel.
    Grouped-query heads are shared inside either (``enable_gqa``): no repeated copy of the keys and
    values."""
    t_q, t_k = q.size(-2), k.size(-2)
    p = dropout_p if training else 0.0
    gqa = q.size(1) != k.size(1)
    if (mask is None and t_q == t_k <= CHUNKED_ATTENTION_MAX and p == 0.0 and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.bfloat16)):
        keep = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return ChunkedCausalAttention.apply(q, k, v, ATTENTION_CHUNK, keep)
    if mask is not None:  # padded rows: the mask holds causality and padding together
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
    if t_q == 1:  # one new token sees every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device), dropout_p=p,
                                          enable_gqa=gqa)


def padded_positions_and_mask(pad: torch.Tensor, cols: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, t) and the attention mask (B, 1, t, n_keys) of the query columns ``cols`` (t,)
    of left-padded rows, ``pad[b]`` padding columns at the start of row b: a row's positions count
    from its first real token, and a query sees the keys at or before it that are not padding. A
    padding query sees itself, so that no softmax row is empty; what it computes is never used."""
    q = cols[:, None]                                                   # (t, 1) query columns
    k = torch.arange(n_keys, device=cols.device)[None, :]               # (1, Tk) key columns
    allowed = (k <= q) & ((k >= pad[:, None, None]) | (k == q))         # (B, t, Tk)
    return (cols[None] - pad[:, None]).clamp(min=0), allowed[:, None]


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoPE): rotate each (x_i, x_{i+d/2}) pair of a query or key
    by an angle proportional to its position, so q·k depends on the distance between them.
    This is the "rotate half" layout of HF Llama checkpoints."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    FIRST = 1 << 15  # positions tabled at first: a long-context model's (128k+) table grows only if used

    def _table(self, need: int, device: torch.device) -> None:
        """cos and sin for at least positions 0..need-1 (as far as max_len) on ``device``, built lazily:
        also right after a meta-device model is materialised."""
        have = self.cos.size(0) if self.cos.numel() and self.cos.device == device else 0
        if have >= need:
            return
        length = min(self.max_len, max(need, 2 * have, self.FIRST))
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)  # (T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)                                  # (T, hs)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, start: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self._table(start + t, device)
        return self.cos[start:start + t], self.sin[start:start + t]

    def at(self, positions: torch.Tensor, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, hs) for per-row positions (B, T): rows of a left-padded batch; ``bound``,
        where the caller knows one, is above every position (the keys' count)."""
        if bound is None and self.max_len > self.FIRST:  # (reading the largest waits for the device: rare)
            bound = int(positions.max()) + 1
        self._table(min(self.max_len, max(bound or 0, self.FIRST)), positions.device)
        return self.cos[positions][:, None], self.sin[positions][:, None]


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, computed in fp32: each head's q and k (B, nh, T, hs) for
    QK-norm, and RMSNorm before its gain."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hs); cos, sin: (T, hs), or (B, 1, T, hs) for per-row positions."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Keys and values of past positions, per layer, so generation feeds one token at a time.

    The model is stateless: the cache is created by the caller and passed into ``forward``.
    It is allocated once (grouped-query models store only their KV heads) and written in place.
    Rows of different lengths share it left-padded: ``pad[b]`` columns at the start of row b are
    padding, so its positions are its columns minus ``pad[b]`` and attention skips those columns.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 pad: torch.Tensor | None = None) -> None:
        self.max_len = max_len or config.context_length
        shape = (batch_size, config.kv_heads, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # number of columns already stored
        self.pad = pad  # (B,) left-padding per row, or None when no row is padded
        # Static mode (for a compiled decode step): the column to write is a tensor and attention
        # always spans the whole cache, masked, so every step has the same shapes and no Python
        # number that changes (which a compiled graph would have to be rebuilt for).
        self.static = False
        self.col = torch.zeros(1, dtype=torch.long, device=device)

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Empty the cache (keeping its memory) for a new prefill."""
        self.pos, self.pad, self.static = 0, pad, False

    def grow(self, max_len: int) -> None:
        """A longer cache holding what this one holds (the columns written so far are copied)."""
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = old.new_zeros(*old.shape[:2], max_len, old.size(3))
                new[:, :, :self.pos] = old[:, :, :self.pos]
                store[i] = new
        self.max_len = max_len

    def make_static(self) -> None:
        """Switch to static mode after a prefill; ``advance`` then moves ``col`` in place."""
        self.static = True
        self.col.fill_(self.pos)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v for ``layer``; return all keys and values so far (in static
        mode: the whole cache, which the mask limits)."""
        if self.static:
            cols = self.col + torch.arange(k.size(2), device=self.col.device)
            self.k[layer].index_copy_(2, cols, k)
            self.v[layer].index_copy_(2, cols, v)
            return self.k[layer], self.v[layer]
        t = k.size(2)
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache is full ({self.max_len} positions); start a new cache or crop the context")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t
        if self.static:
            self.col.add_(t)


class MultiHeadAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with one fused QKV projection
    (rows: n_head query heads, then n_kv_head key heads, then n_kv_head value heads). With
    ``config.qk_norm`` each head's q and k are RMS-normalised before rotary positions (and before
    the KV cache stores k)."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.hs = config.n_head, config.kv_heads, config.head_dim
        self.c_attn = Linear(config.d_model, (self.n_head + 2 * self.n_kv) * self.hs, bias=config.qkv_bias)
        self.c_proj = Linear(config.d_model, config.d_model, bias=config.bias)
        self.c_proj.residual_projection = True  # writes into the residual stream: GPT.init_weights scales it
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)
        self.fast = True  # False runs attention_reference: same numbers, slower
        self.qk_norm, self.norm_eps = config.qk_norm, config.norm_eps

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.hs, self.n_kv * self.hs, self.n_kv * self.hs], dim=-1)
        q = q.view(b, t, self.n_head, self.hs).transpose(1, 2)                # (B, nh, T, hs)
        k = k.view(b, t, self.n_kv, self.hs).transpose(1, 2)                  # (B, nkv, T, hs)
        v = v.view(b, t, self.n_kv, self.hs).transpose(1, 2)
        if self.qk_norm:
            # Unit RMS per head (no learned scale): |q·k|/√hs ≤ √hs, so no score can blow up the softmax.
            q, k = rms_normalize(q, self.norm_eps), rms_normalize(k, self.norm_eps)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k.to(kv_cache.k[0].dtype), v.to(kv_cache.v[0].dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        attend = attention if self.fast else attention_reference
        y = attend(q, k, v, dropout_p=self.dropout, training=self.training, mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.hs)
        return self.resid_drop(self.c_proj(y))
