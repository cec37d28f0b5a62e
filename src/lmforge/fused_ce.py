"""The output layer fused with cross-entropy. The language-modelling loss is
next-token cross-entropy:

    loss = mean over positions of  -log softmax(h · Wᵀ)[target]

``cross_entropy_reference`` computes it the plain way: the full (N, vocab) logits tensor
(411 MB in fp32 for 8 × 256 tokens at GPT-2's vocabulary), then ``F.cross_entropy``.
``linear_cross_entropy`` is the fast path: it walks the rows in chunks, so the full
logits never exist, and computes the gradients of h and W during the forward pass while
each chunk's probabilities are at hand (softmax − one-hot), so backward costs nothing
extra. Its big work buffers are kept between calls, so every step reuses the same memory
instead of faulting in fresh pages. A test proves both paths agree in loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

_workspace: dict[tuple, torch.Tensor] = {}
_leased: set[tuple] = set()


class _Lease:
    """Holds a kept buffer for a graph that still needs it (saved for backward). Released
    when the graph lets go of it, after backward or when the graph is freed without one; a
    second forward before that (two losses summed, say) gets a fresh tensor instead."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        _leased.add(key)

    def __del__(self) -> None:
        _leased.discard(self.key)


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch tensor kept alive between calls (one per name, resized when the shape changes)."""
    key = (name, dtype, device)
    if key in _leased:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = _workspace.get(key)
    if buf is None or buf.shape != shape:
        buf = torch.empty(shape, dtype=dtype, device=device)
        _workspace[key] = buf
    return buf


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token loss from hidden states (..., d) and output weight (V, d), plainly."""
    logits = hidden @ weight.T
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked pass. With P = softmax(h Wᵀ), s = 1/n_valid
    on valid rows (0 on ignored ones) and Y the one-hot targets:

        d loss / d h = s ⊙ (P W − W[y])        d loss / d W = Pᵀ (s ⊙ h) − Yᵀ (s ⊙ h)

    The one-hot terms are gathers and scatters of small (N, d) tensors, so the only passes
    over a (rows, V) chunk are: matmul, log-softmax, exp, and the two gradient matmuls.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, compute_dtype, into_grad):
        n, d = hidden.shape
        v = weight.size(0)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        scale = (valid.to(torch.float32) / n_valid)[:, None]            # (N, 1): d loss / d row loss
        safe_t = torch.where(valid, targets, 0)
        low_precision = compute_dtype != torch.float32
        # Low-precision copies live in kept buffers: no fresh 40-150 MB allocation per step.
        w = (_buffer("w_low", tuple(weight.shape), compute_dtype, weight.device).copy_(weight.detach())
             if weight.dtype != compute_dtype else weight.detach())
        h = hidden.detach().to(compute_dtype)
        scaled_h = hidden.detach().float() * scale                     # s ⊙ h, (N, d) fp32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty((n, d), dtype=torch.float32, device=hidden.device) if need_h else None
        # Pᵀ(s ⊙ h) accumulates over chunks in the compute dtype, as autocast's bf16 matmuls would.
        grad_w = _buffer("grad_w", (v, d), compute_dtype, weight.device) if need_w else None
        sh_low = scaled_h.to(compute_dtype) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            # Buffers sized for a full chunk and sliced, so a shorter last chunk reuses them too.
            rows = min(chunk_rows, n)
            logits = _buffer("logits", (rows, v), compute_dtype, hidden.device)[: e - s]
            torch.mm(h[s:e], w.T, out=logits)
            # Log-softmax math runs in fp32 inside the kernel either way; under bf16 its output is
            # stored in bf16, which rounds each row's loss by ~0.2 % (autocast rounds the logits alike).
            logp = _buffer("logp", (rows, v), compute_dtype, hidden.device)[: e - s]
            torch.log_softmax(logits, dim=-1, out=logp)
            total -= (logp.gather(1, safe_t[s:e, None]).float() * valid[s:e, None]).sum()
            if not (need_h or need_w):
                continue
            probs = logp.exp_()
            if need_h:
                torch.mm(probs, w, out=grad_h[s:e]) if not low_precision else grad_h[s:e].copy_(probs @ w)
            if need_w:
                if s == 0:
                    torch.mm(probs.T, sh_low[s:e], out=grad_w)  # the first chunk initialises the kept buffer
                else:
                    grad_w.addmm_(probs.T, sh_low[s:e])
        if need_h:
            grad_h.sub_(weight.detach().float()[safe_t]).mul_(scale)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, scaled_h, safe_t) if x is not None))
        ctx.weight = weight if into_grad else None
        key = ("grad_w", compute_dtype, weight.device)
        if need_w and grad_w is _workspace.get(key):  # a fresh tensor (the buffer was leased) is this graph's own
            ctx.lease = _Lease(key)
        ctx.has = (need_h, need_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        gh = None
        if ctx.has[0]:
            g = saved.pop(0)
            if grad_out.device.type != "meta" and float(grad_out) == 1.0:  # loss.backward(): hand over the
                # saved gradient itself, no fresh (N, d) tensor (autograd never changes a returned gradient)
                gh = g.to(ctx.dtypes[0])
            else:  # a scaled copy, never the saved tensor scaled in place: a retained graph's second
                gh = g.to(ctx.dtypes[0], copy=True).mul_(grad_out)  # backward needs it as it was
        gw = None
        if ctx.has[1]:
            grad_w, scaled_h, safe_t = saved
            weight = ctx.weight
            if weight is not None:
                # Add straight into the leaf's .grad, as autograd's accumulation would, but
                # without a fresh (V, d) fp32 tensor per step (and its page faults).
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                if grad_w.dtype != weight.grad.dtype:  # convert in a kept buffer, not a fresh tensor
                    grad_w = _buffer("grad_w_full", tuple(grad_w.shape), weight.grad.dtype, grad_w.device).copy_(grad_w)
                weight.grad.add_(grad_w, alpha=float(grad_out))
                weight.grad.index_add_(0, safe_t, scaled_h.to(weight.grad.dtype), alpha=-float(grad_out))
            else:
                # The one-hot term is subtracted exactly, in fp32.
                gw = grad_w.to(torch.float32, copy=True).index_add_(0, safe_t, scaled_h, alpha=-1.0)
                gw = gw.to(ctx.dtypes[1]).mul_(grad_out)
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, compute_dtype: torch.dtype | None = None,
                         chunk_rows: int | None = None, grad_into_weight: bool = False) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, without the full logits.

    hidden: (..., d); weight: (V, d); targets: (...) with ``ignore_index`` for masked positions.
    ``compute_dtype`` is the matmul precision (bf16 under autocast); log-softmax math is fp32.
    ``grad_into_weight`` (for a leaf weight, in training) adds the weight's gradient straight
    into ``weight.grad`` during backward instead of handing autograd a new tensor.
    """
    if compute_dtype is None:
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else hidden.dtype
    h2 = hidden.reshape(-1, hidden.size(-1))
    t2 = targets.reshape(-1)
    # 128 MB of logits per chunk: few enough chunks for efficient matmuls, yet bounded memory.
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    rows = chunk_rows or max(64, min(h2.size(0), (1 << 27) // (weight.size(0) * itemsize)))
    with torch.autocast(hidden.device.type, enabled=False):
        into = grad_into_weight and weight.is_leaf and weight.requires_grad
        return _LinearCrossEntropy.apply(h2, weight, t2, ignore_index, rows, compute_dtype, into)


__all__ = ["IGNORE_INDEX", "cross_entropy_reference", "linear_cross_entropy"]
