"""Optimisers, the learning-rate schedule and the batch-size warm-up.

AdamW (the default) with two parameter groups: matrices (embeddings and linear weights) get
weight decay, vectors (biases, norm scales) do not, since shrinking them toward zero has no
regularising meaning. The fused kernel is used where PyTorch has one for the device.

Muon (``optimizer="muon"``; Jordan et al., modded-nanogpt) updates the hidden matrices of the
transformer blocks — the attention and MLP weights — by the orthogonalised momentum: for a
gradient whose singular value decomposition is U S Vᵀ it steps along U Vᵀ, every direction of
the matrix moved by the same amount, however small its gradient was. Newton–Schulz
iterations approximate U Vᵀ with a few matrix products. Embeddings, the output layer, norms
and biases are not linear maps between hidden states (or are not matrices at all), so AdamW
keeps them. Both live in one optimiser (``MuonAdamW``): one state dict, one checkpoint, and
one schedule drives both, through each group's ``lr_scale``.

Schedules are pure functions of the step, so a resumed run continues exactly: ``lr_at``
(warm-up, then cosine, constant or warm-up–stable–decay) and ``batch_rows_at`` (how many rows of
each micro-batch a step uses while the batch size warms up).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .precision import resolve_dtype

# The quintic Newton–Schulz coefficients of modded-nanogpt: chosen for the steepest growth of
# small singular values, not for convergence to exactly 1 (they end in about [0.7, 1.2]).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STACK_BYTES = 64 * 2**20  # the most fp32 bytes of matrices orthogonalised together in one batched product


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # a tied tensor is yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` names: AdamW over ``param_groups`` (``fused=None`` picks the
    fused kernel when available), or ``MuonAdamW`` over ``muon_param_groups``."""
    if config.optimizer == "muon":
        device = next(model.parameters()).device
        return MuonAdamW(muon_param_groups(model, config), lr=config.lr, betas=(config.beta1, config.beta2),
                         momentum=config.muon_momentum, ns_dtype=resolve_dtype(config.dtype, device))
    groups = param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)
    if fused is None:
        fused = True
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused kernel for this device or dtype: the foreach one is next best
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


# --------------------------------------------------------------------------- Muon
def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates: the 2-D weights inside the transformer blocks (``model.h``) that
    train, embedding tables excepted (a lookup table is no linear map, and modded-nanogpt keeps its
    value embeddings in Adam)."""
    blocks = getattr(model, "h", None)
    if blocks is None:
        return []
    tables = {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Embedding)}
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in tables]


def muon_param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW's two groups without the hidden matrices, and a third, Muon's, with them.

    The Muon group's ``lr_scale`` (muon_lr / lr) makes the one schedule give it ``muon_lr`` at its
    peak. Its weight decay is divided by the same factor, so that decoupled decay (p ← p·(1 − lr·wd))
    shrinks a hidden matrix as much per step as AdamW would: ``weight_decay`` means the same
    whichever optimiser updates the matrix."""
    hidden = hidden_matrices(model)
    if not hidden:  # a wrapped model (pass the model itself), or only a head that trains
        raise ConfigError("optimizer 'muon' found no trainable 2-D weights in the model's transformer blocks "
                          "(model.h); use --train.optimizer adamw")
    muon_ids = {id(p) for p in hidden}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in muon_ids:
            (decay if p.dim() >= 2 else no_decay).append(p)
    scale = config.muon_lr / config.lr
    return [{"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": hidden, "muon": True, "lr": config.muon_lr, "lr_scale": scale,
             "weight_decay": config.weight_decay / scale}]


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximation of U Vᵀ, for the matrix ``g`` = U S Vᵀ: the same singular vectors, every
    singular value about 1 (the quintic iteration leaves them in about [0.7, 1.2]). ``g`` may be a
    stack of matrices of one shape (n, rows, cols): each is orthogonalised on its own, in one batched
    product per step instead of one per matrix.

    Each step maps X to a·X + b·(X Xᵀ) X + c·(X Xᵀ)² X, a polynomial in the singular values that
    pushes every one in (0, 1] toward 1 while keeping the singular vectors. Dividing by the Frobenius
    norm first (an upper bound of the largest singular value) brings them all into (0, 1]. A tall
    matrix is iterated transposed, so that X Xᵀ is the smaller of the two products.

    ``dtype`` is the precision of the iteration: bf16 (what modded-nanogpt uses) lands in the same
    range and was 1.4-1.9x faster on a CPU with fast bf16 (gpt-micro's matrices); fp32 is the reference."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # each matrix by its own norm
    for _ in range(steps):
        gram = x @ x.mT
        # b·G + c·G², then a·X + (b·G + c·G²)·X: two fused multiply-adds, rounded once each in bf16
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    if tall:
        x = x.mT
    return (x[0] if single else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked ``muon=True``, AdamW for the others, in one optimiser.

    Muon, per matrix W (rows × cols) with gradient G:
        m ← β·m + (1 − β)·G                  momentum
        u ← NS((1 − β)·G + β·m)              Nesterov: the gradient looked at through the new momentum
        W ← W·(1 − lr·wd) − lr·√max(1, rows/cols)·u
    An orthogonalised rows × cols update has entries of RMS 1/√max(rows, cols); the √max(1, rows/cols)
    factor makes it 1/√cols for every matrix, tall ones included: the step size is set by the fan-in alone.

    AdamW is written out here (the same arithmetic as ``torch.optim.AdamW``'s single-tensor path) so
    that the state of both kinds lives in this one optimiser's ``state_dict``. ``ns_dtype``: the
    precision of the Newton–Schulz iteration (``make_optimizer`` picks the training's)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, muon=False, lr_scale=1.0,
                        momentum=momentum, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # how to compute, not state: kept out of the state dict
        shapes = [tuple(p.shape) for g in self.param_groups if g["muon"] for p in g["params"] if p.dim() != 2]
        if shapes:  # orthogonalising needs a matrix: a bias or a norm scale has no singular vectors
            raise ConfigError(f"Muon updates matrices only; its group holds tensors of shape {shapes}: "
                              "give vectors (biases, norms) and other tensors to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(params, group)
            else:
                for p in params:
                    self._adamw(p, p.grad, group)
        return loss

    def _muon(self, params: list[torch.Tensor], group: dict) -> None:
        """The Muon step of a group's matrices; those of one shape are orthogonalised together."""
        if not params:
            return
        beta = group["momentum"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - beta)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        for (rows, cols), idx in by_shape.items():
            # Stacks of at most NS_STACK_BYTES: the iteration's copies of a large model's matrices, all at
            # once, would cost gigabytes; one matrix alone may exceed the budget
            per_stack = max(1, NS_STACK_BYTES // (rows * cols * 4))
            for k in range(0, len(idx), per_stack):
                part = idx[k:k + per_stack]
                # the gradient seen through the new momentum (Nesterov), for each matrix of the stack
                g = torch.stack([grads[i] for i in part]).lerp_(torch.stack([bufs[i] for i in part]), beta)
                u = newton_schulz(g, group["ns_steps"], dtype=self.ns_dtype)
                torch._foreach_add_([params[i] for i in part], list(u.unbind(0)),
                                    alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)

    def _adamw(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))


# --------------------------------------------------------------------------- schedules
def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then: cosine decay to ``lr * min_lr_ratio`` at ``max_steps``; or the
    constant ``lr``; or (``wsd``) ``lr`` until the last ``config.decay_steps`` steps, which decay it
    linearly to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    min_lr = config.lr * config.min_lr_ratio
    if config.schedule == "wsd":
        decay_start = config.max_steps - config.decay_steps
        progress = min(1.0, max(0.0, (step - decay_start) / config.decay_steps))
        return config.lr - (config.lr - min_lr) * progress
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return min_lr + 0.5 * (config.lr - min_lr) * (1 + math.cos(math.pi * progress))


def batch_rows_at(step: int, rows: int, config: TrainConfig) -> int:
    """Rows of a micro-batch of ``rows`` rows that ``step`` trains on: during the first
    ``batch_warmup_steps`` steps the first ceil(f·rows), f growing linearly from ``batch_warmup_start``
    to 1; all of them after. Early steps need less gradient precision, so small batches spend fewer
    tokens on them."""
    if step >= config.batch_warmup_steps:
        return rows
    start = config.batch_warmup_start
    fraction = start + (1 - start) * step / config.batch_warmup_steps
    # A hair below the ceiling: 60 % of 5 rows comes out as 3.0000000000000004 in floating point, and means 3.
    return max(1, min(rows, math.ceil(fraction * rows - 1e-9)))


__all__ = ["NS_COEFFICIENTS", "MuonAdamW", "batch_rows_at", "hidden_matrices", "lr_at", "make_optimizer",
           "muon_param_groups", "newton_schulz", "param_groups"]
