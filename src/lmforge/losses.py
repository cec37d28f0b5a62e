"""Losses. The language-modelling loss is next-token cross-entropy:

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


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch tensor kept alive between calls (one per name, resized when the shape changes)."""
    key = (name, dtype, device)
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
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, compute_dtype):
        n, d = hidden.shape
        v = weight.size(0)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        scale = valid.to(torch.float32) / n_valid                      # d loss / d row-loss
        w = weight.detach().to(compute_dtype)
        h = hidden.detach().to(compute_dtype)
        need_grad_h, need_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty((n, d), dtype=compute_dtype, device=hidden.device) if need_grad_h else None
        # grad W accumulates over chunks in the compute dtype, as autocast's own bf16 matmuls do.
        grad_w = torch.zeros((v, d), dtype=compute_dtype, device=weight.device) if need_grad_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            hc, tc = h[s:e], targets[s:e]
            logits = _buffer("logits", (e - s, v), torch.float32, hidden.device)
            if compute_dtype == torch.float32:
                torch.mm(hc, w.T, out=logits)
            else:
                low = _buffer("logits_low", (e - s, v), compute_dtype, hidden.device)
                torch.mm(hc, w.T, out=low)
                logits.copy_(low)
            lse = torch.logsumexp(logits, dim=-1)                       # (c,)
            safe_t = tc.clamp(min=0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - target_logit) * valid[s:e]).sum()
            if grad_h is None and grad_w is None:
                continue
            # d loss / d logits = (softmax - onehot) * scale, computed in place in the buffer
            probs = logits.sub_(lse[:, None]).exp_()
            probs.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
            probs.mul_(scale[s:e, None])
            if compute_dtype == torch.float32:
                g = probs
            else:
                g = low.copy_(probs)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[s:e])
            if grad_w is not None:
                grad_w.addmm_(g.T, hc)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0).to(ctx.dtypes[0]) * grad_out if ctx.has[0] else None
        gw = saved.pop(0).to(ctx.dtypes[1]) * grad_out if ctx.has[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, compute_dtype: torch.dtype | None = None,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, without the full logits.

    hidden: (..., d); weight: (V, d); targets: (...) with ``ignore_index`` for masked positions.
    ``compute_dtype`` is the matmul precision (bf16 under autocast); softmax is always fp32.
    """
    if compute_dtype is None:
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else hidden.dtype
    h2 = hidden.reshape(-1, hidden.size(-1))
    t2 = targets.reshape(-1)
    # ~16M logits per chunk (64 MB in fp32): big enough for fast matmuls, small enough for cache and RAM.
    rows = chunk_rows or max(64, min(h2.size(0), (1 << 24) // weight.size(0)))
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h2, weight, t2, ignore_index, rows, compute_dtype)


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """The pretraining loss: predict y[t] (= x[t+1]) from x[:t+1]."""
    hidden = model.hidden_states(x)
    if fused:
        return linear_cross_entropy(hidden, model.output_weight, y)
    return cross_entropy_reference(hidden, model.output_weight, y)
