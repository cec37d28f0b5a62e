"""The output layer fused with cross-entropy. The language-modelling loss is
next-token cross-entropy:

    loss = mean over positions of  -log softmax(h · Wᵀ)[target]

``cross_entropy_reference`` computes it the plain way: the full (N, vocab) logits tensor
(411 MB in fp32 for 8 × 256 tokens at GPT-2's vocabulary), then ``F.cross_entropy``.
``linear_cross_entropy`` is the fast path: it walks the rows in chunks, so the full
logits never exist, and computes the gradients of h and W during the forward pass while
each chunk's probabilities are at hand (softmax − one-hot), so backward costs nothing
extra. A test proves both paths agree in loss and gradients.

Both take an optional soft cap c on the logits (modded-nanogpt's head): the loss sees
c·tanh(z/c) instead of z = h · Wᵀ, so no logit grows past ±c.

Both gradients go to autograd like any other function's: every call owns its tensors, so a
tied, untied, frozen or LoRA-wrapped output layer, two losses summed, a retained graph and
DDP's gradient hooks all see what the plain reference would give them. On CPU, the speed of
reusing the same memory every step comes from the allocator (``precision.tune_cpu_allocator``,
which ``fit`` applies), not from buffers kept here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import matmul

IGNORE_INDEX = -100


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """c·tanh(z/c): close to z while |z| << c, never beyond ±c."""
    return cap * torch.tanh(logits / cap)


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX, cap: float | None = None) -> torch.Tensor:
    """Mean next-token loss from hidden states (..., d) and output weight (V, d), plainly
    (logits soft-capped at ``cap`` when given)."""
    logits = hidden @ weight.T
    if cap is not None:
        logits = softcap(logits, cap)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked pass. With P = softmax(h Wᵀ), s = 1/n_valid
    on valid rows (0 on ignored ones) and Y the one-hot targets:

        d loss / d h = s ⊙ (P W − W[y])        d loss / d W = Pᵀ (s ⊙ h) − Yᵀ (s ⊙ h)

    The one-hot terms are gathers and scatters of small (N, d) tensors, so the only passes
    over a (rows, V) chunk are: matmul, log-softmax, exp, and the two gradient matmuls.

    With a soft cap c the logits are ℓ = c·tanh(z/c), z = h Wᵀ, and the chain rule multiplies
    the softmax gradient by dℓ/dz = 1 − tanh²(z/c) = 1 − (ℓ/c)², elementwise (D):

        d loss / d h = s ⊙ ((P ⊙ D) W − D[y] W[y])    d loss / d W = (P ⊙ D)ᵀ (s ⊙ h) − Yᵀ (D[y] s ⊙ h)

    so the one-hot term is still a gather at the target column, scaled by that column's D.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, compute_dtype, cap=None):
        n, d = hidden.shape
        v = weight.size(0)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        scale = (valid.to(torch.float32) / n_valid)[:, None]            # (N, 1): d loss / d row loss
        safe_t = torch.where(valid, targets, 0)
        w = weight.detach().to(compute_dtype)
        h = hidden.detach().to(compute_dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty((n, d), dtype=torch.float32, device=hidden.device) if need_h else None
        # Pᵀ(s ⊙ h) accumulates over chunks in the compute dtype, as autocast's bf16 matmuls would.
        grad_w = torch.empty((v, d), dtype=compute_dtype, device=weight.device) if need_w else None
        scaled_h = hidden.detach().float() * scale if need_w else None  # s ⊙ h, (N, d) fp32
        sh_low = scaled_h.to(compute_dtype) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # D at each row's target column (the one-hot term's factor), when the logits are capped.
        target_slope = torch.empty((n, 1), dtype=torch.float32, device=hidden.device) if cap is not None else None
        rows = min(chunk_rows, n)
        # One log-prob buffer for all chunks (a shorter last chunk takes a slice); each chunk's
        # logits come fresh from ``matmul.linear`` (oneDNN writes its own output).
        logp_buf = torch.empty((rows, v), dtype=compute_dtype, device=hidden.device)
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            logits = slope = None  # the last chunk's logits go before this chunk's are made: one alive at a time
            logits = matmul.linear(h[s:e], w)
            if cap is not None:
                logits.div_(cap).tanh_().mul_(cap)  # ℓ = c·tanh(z/c), in place
            # Log-softmax math runs in fp32 inside the kernel either way; under bf16 its output is
            # stored in bf16, which rounds each row's loss by ~0.2 % (autocast rounds the logits alike).
            logp = logp_buf[: e - s]
            torch.log_softmax(logits, dim=-1, out=logp)
            total -= (logp.gather(1, safe_t[s:e, None]).float() * valid[s:e, None]).sum()
            if not (need_h or need_w):
                continue
            probs = logp.exp_()
            if cap is not None:
                slope = logits.div_(cap).square_().neg_().add_(1.0)  # D = 1 − (ℓ/c)², over ℓ (no longer needed)
                target_slope[s:e] = slope.gather(1, safe_t[s:e, None])
                probs.mul_(slope)  # P ⊙ D: every matmul below then sees the capped gradient
            if need_h:
                grad_h[s:e] = matmul.times_weight(probs, w)
            if need_w:
                if s == 0:
                    torch.mm(probs.T, sh_low[s:e], out=grad_w)  # the first chunk initialises the sum
                else:
                    grad_w.addmm_(probs.T, sh_low[s:e])
        saved = []
        if need_h:
            target_rows = weight.detach().float()[safe_t]
            if cap is not None:
                target_rows.mul_(target_slope)
            grad_h.sub_(target_rows).mul_(scale)
            saved.append(grad_h)
        if need_w:
            if n == 0:
                grad_w.zero_()  # no chunk ran to start the sum: an empty batch moves nothing
            # The one-hot term is subtracted exactly, in fp32.
            one_hot_h = scaled_h if cap is None else scaled_h * target_slope
            grad_w = grad_w.float().index_add_(0, safe_t, one_hot_h, alpha=-1.0).to(weight.dtype)
            saved.append(grad_w)
        ctx.save_for_backward(*saved)
        ctx.has = (need_h, need_w)
        ctx.hidden_dtype = hidden.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        # loss.backward() (grad_out 1): hand autograd the saved gradients themselves, no fresh
        # tensors. Autograd never changes a gradient it did not make in place while anything else
        # holds it (a retained graph does), so a second backward still finds them as they were.
        # Only on the CPU, and not in a compiled graph: reading a GPU scalar would stall the device,
        # and reading any scalar breaks a graph in two.
        unit = grad_out.device.type == "cpu" and not torch.compiler.is_compiling() and float(grad_out) == 1.0
        gh = gw = None
        if ctx.has[0]:
            g = saved.pop(0)
            gh = g.to(ctx.hidden_dtype) if unit else g.to(ctx.hidden_dtype, copy=True).mul_(grad_out)
        if ctx.has[1]:
            g = saved.pop(0)
            gw = g if unit else g * grad_out
        return gh, gw, None, None, None, None, None  # the last for ``cap`` (autograd drops it when not passed)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, compute_dtype: torch.dtype | None = None,
                         chunk_rows: int | None = None, cap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, without the full logits.

    hidden: (..., d); weight: (V, d); targets: (...) with ``ignore_index`` for masked positions.
    ``compute_dtype`` is the matmul precision (bf16 under autocast); log-softmax math is fp32.
    ``cap``: soft-cap the logits at ±cap (``softcap``) before the loss.
    """
    if compute_dtype is None:
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else hidden.dtype
    h2 = hidden.reshape(-1, hidden.size(-1))
    t2 = targets.reshape(-1)
    if h2.device.type == "cpu" and not torch.compiler.is_compiling():
        # The output layer only where there is a target: the prompt and padding positions of
        # fine-tuning batches (ignore_index) cost nothing; their rows of d loss / d hidden are 0
        # through the index's own backward. Not on a GPU, where finding them would wait for the device,
        # nor in a compiled graph, which a shape known only from the data would break in two.
        keep = (t2 != ignore_index).nonzero().squeeze(1)
        if 0 < keep.numel() < t2.numel():
            h2, t2 = h2[keep], t2[keep]
    # Logits per chunk: 128 MB on a CPU (few enough chunks for efficient matmuls, yet bounded memory),
    # 1 GB on a GPU (about twice that with the chunk's gradient buffer), where fewer, larger launches
    # win (gpt2-124m at 64 × 1024 on an H200: 10.6k rows per chunk train 5 % faster than 1.3k;
    # benchmarks/gpu_pretrain.py).
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    budget = 1 << 27 if hidden.device.type == "cpu" else 1 << 30
    rows = chunk_rows or max(64, min(h2.size(0), budget // (weight.size(0) * itemsize)))
    if not torch.is_grad_enabled():  # evaluation: no gradient buffers (the Function would still see requires_grad)
        h2, weight = h2.detach(), weight.detach()
    # The cap is passed only when set: without one, the kernel is called exactly as before caps existed.
    args = (h2, weight, t2, ignore_index, rows, compute_dtype) + ((cap,) if cap is not None else ())
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(*args)


__all__ = ["IGNORE_INDEX", "cross_entropy_reference", "linear_cross_entropy", "softcap"]
