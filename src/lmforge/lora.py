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
        return F.linear(x, self.weight, self.bias) + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    suffixes = tuple(s for t in targets for s in TARGETS[t])
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
            and (name in suffixes or name.endswith(tuple("." + s for s in suffixes)))]


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
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
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
           "merge_lora"]
