"""LoRA: low-rank adaptation (Hu et al., 2021; the book's appendix E).

A frozen weight W (out × in) is adapted by a trainable low-rank product:

    y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ          A: (r × in), B: (out × r)

A starts random and B at zero, so at initialisation the layer computes exactly what W did.
Only A and B train: r · (in + out) numbers per layer instead of in · out. ``LoRALinear`` is
an ``nn.Linear`` (same ``weight`` and ``bias`` names, so base checkpoints load unchanged)
with the two extra matrices; ``merge_lora`` folds α/r · B A into W and turns it back into a
plain ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import matmul
from .config import ConfigError

# What --lora.targets may name: the Linear layers of a block (by their attribute names) and the output layer.
TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"),
           "mlp": ("mlp.c_fc", "mlp.c_gate", "mlp.c_proj"),
           "head": ("lm_head",)}


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a trainable low-rank update; the base weight and bias are frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's own tensors are taken over, not made anew
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=dev, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as nn.Linear initialises its weight (Kaiming-uniform), B zero: the update starts at 0."""
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def weight_delta(self) -> torch.Tensor:
        """α/r · B A, the (out × in) change this layer makes to its weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_d = self.lora_dropout(x) if self.training and self.lora_dropout.p > 0 else None
        return lora_linear(x, x_d, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def lora_linear_reference(x: torch.Tensor, x_d: torch.Tensor | None, weight: torch.Tensor,
                          bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float) -> torch.Tensor:
    """The LoRA layer as written above, op by op: x Wᵀ + b + s · (x_d Aᵀ) Bᵀ, x_d = dropout(x)
    (``None``: no dropout, x itself)."""
    return F.linear(x, weight, bias) + ((x if x_d is None else x_d) @ lora_A.T @ lora_B.T) * scaling


class _LoRALinear(torch.autograd.Function):
    """``lora_linear_reference`` with its (N, out) temporaries gone, on rows (x: N × in). Written op
    by op, the update (x_d Aᵀ) Bᵀ is a fresh (N, out) tensor that is then scaled and added to x Wᵀ:
    three passes over the layer's whole output forward and two more backward. Here the update is
    accumulated into x Wᵀ by the matmul itself (``addmm_``, scaled by s), and backward, with
    g = d loss / d y and h = x_d Aᵀ (N × r, saved):

        d/dB = s gᵀ h     d/dh = s g B     d/dA = (d/dh)ᵀ x_d     d/dx = g W  (+ (d/dh) A, accumulated likewise)
    """

    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_A, lora_B, scaling):
        xd = x if x_d is None else x_d
        h = xd @ lora_A.T
        y = matmul.linear(x, weight, bias).addmm_(h, lora_B.T, alpha=scaling)
        ctx.scaling, ctx.dropout = scaling, x_d is not None
        # x is needed only for a trained base weight's gradient (it is x_d, which A's needs, without dropout)
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, xd, weight, lora_A, lora_B, h)
        return y

    @staticmethod
    def backward(ctx, g):
        x, xd, weight, lora_A, lora_B, h = ctx.saved_tensors
        need_x, need_xd, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        s = ctx.scaling
        grad_h = (g @ lora_B).mul_(s)
        grad_x = grad_xd = grad_w = grad_b = grad_a = grad_bb = None
        if need_x:
            grad_x = matmul.times_weight(g, weight)
            if not ctx.dropout:  # x_d is x: both paths' gradients land in one tensor
                grad_x.addmm_(grad_h, lora_A)
        if need_xd:
            grad_xd = grad_h @ lora_A
        if need_w:
            grad_w = g.T @ x
        if need_b:
            grad_b = g.sum(0)
        if need_a:
            grad_a = grad_h.T @ xd
        if need_bb:
            grad_bb = (g.T @ h).mul_(s)
        return grad_x, grad_xd, grad_w, grad_b, grad_a, grad_bb, None


def lora_linear(x: torch.Tensor, x_d: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x Wᵀ + b + s · (x_d Aᵀ) Bᵀ, equal to ``lora_linear_reference`` in value and gradients;
    ``x_d=None`` when there is no dropout. Under autocast the inputs are cast as autocast casts a
    linear layer's, and the products run in that dtype."""
    device, shape = x.device.type, x.shape
    args = [x.reshape(-1, shape[-1]), None if x_d is None else x_d.reshape(-1, shape[-1]), weight, bias, lora_A, lora_B]
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        args = [None if t is None else t.to(dtype) for t in args]
        with torch.autocast(device, enabled=False):
            y = _LoRALinear.apply(*args, scaling)
    else:
        y = _LoRALinear.apply(*args, scaling)
    return y.view(*shape[:-1], y.size(-1))  # a view made outside the Function: in-place changes stay allowed


def _is_target(name: str, target: str) -> bool:
    """Whether the layer called ``name`` (``h.3.attn.c_attn``, ``lm_head``) is one that ``target`` names."""
    return any(name == s or name.endswith("." + s) for s in TARGETS[target])


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and any(_is_target(name, t) for t in targets)]


def targets_of(layers: list[str]) -> tuple[str, ...]:
    """The targets (``TARGETS``' keys) that the adapted layers named in ``lora_config`` belong to."""
    return tuple(t for t in TARGETS if any(_is_target(name, t) for name in layers))


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] = ("attn", "mlp")) -> list[str]:
    """Freeze every parameter of ``model``, then swap the target Linear layers for LoRA layers
    (only their A and B train). Returns the names of the swapped layers."""
    if not (isinstance(rank, int) and rank >= 1):
        raise ConfigError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if alpha <= 0:
        raise ConfigError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    names = _targets(model, targets)
    if not names:
        raise ConfigError(f"no Linear layer of this model matches the LoRA targets {', '.join(targets)}")
    widths = {name: min(model.get_submodule(name).in_features, model.get_submodule(name).out_features)
              for name in names}
    narrowest = min(widths, key=widths.get)
    if rank > widths[narrowest]:  # B·A has rank at most min(in, out): more only costs memory
        raise ConfigError(f"LoRA rank {rank} is larger than the layer {narrowest} is wide ({widths[narrowest]}); a "
                          f"rank above min(in, out) adds parameters and nothing else: give --lora.rank "
                          f"{widths[narrowest]} or less")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    return names


def lora_parameter_count(model: nn.Module) -> int:
    """r · (in + out) summed over the LoRA layers: what trains."""
    return sum(m.rank * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer into its weight (W + α/r · B A) and put a plain ``nn.Linear`` back.
    A weight tied to another (the output layer to the embedding) is untied first, so the
    embedding keeps its own values. Returns the number of layers merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        plain = matmul.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(module.weight + module.weight_delta().to(module.weight.dtype))
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, plain)
        merged += 1
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False) and model.lm_head.weight is not model.wte.weight:
        model.config = config.replace(tie_embeddings=False)  # the merged head is a weight of its own now
    return merged


def lora_config(model: nn.Module) -> dict | None:
    """Rank, alpha, dropout and layer names of the model's LoRA layers (None without any)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        return None
    _, first = layers[0]
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.lora_dropout.p, "layers": [n for n, _ in layers]}


def apply_lora_layers(model: nn.Module, config: dict) -> None:
    """Rebuild the LoRA layers that ``lora_config`` described (loading a LoRA run)."""
    for name in config["layers"]:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRA layer {name!r} is not a Linear layer of this model")
        setattr(parent, attr, LoRALinear(base, config["rank"], config["alpha"], config["dropout"]))


__all__ = ["LoRALinear", "TARGETS", "apply_lora", "apply_lora_layers", "lora_config", "lora_parameter_count",
           "merge_lora", "targets_of"]
