"""The GPT model: token (+ position) embeddings, a stack of transformer blocks, a final
norm and an output layer. Parameter names follow OpenAI's GPT-2 (``wte``, ``h.0.attn.c_attn``,
...), so loading GPT-2 weights is a key-for-key copy.

    x = wte[idx] (+ wpe[pos])
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) · Wᵀ            (W = wte when embeddings are tied)

The same classes build Llama-family models: the config picks the norm (LayerNorm or
RMSNorm), the MLP (GELU or SwiGLU) and the positions (learned table or rotary), each one
small component chosen at construction. The speedrun recipe's options (modded-nanogpt) are
config fields too: QK-norm (in attention), a ReLU² MLP, zero-initialised output projections
and soft-capped logits, ``c·tanh(z/c)``, from an untied head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (
    KVCache,
    MultiHeadAttention,
    RotaryEmbedding,
    padded_positions_and_mask,
    rms_normalize,
)
from .config import LmforgeError, ModelConfig
from .fused_ce import (
    IGNORE_INDEX,
    cross_entropy_reference,
    linear_cross_entropy,
    softcap,
)
from .matmul import Linear


class RMSNorm(nn.Module):
    """x / rms(x) · g: LayerNorm without centring or bias (Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class SwiGLU(nn.Module):
    """Gated feed-forward (Llama): down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_gate = Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.c_fc = Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.c_proj = Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.c_proj.residual_projection = True  # writes into the residual stream: GPT.init_weights scales it
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


class MLP(nn.Module):
    """Position-wise feed-forward: expand, GELU (tanh approximation, as GPT-2) or relu(x)²
    (mlp='relu2', modded-nanogpt: as cheap as ReLU, smooth at 0 and sparse), project back."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.c_proj = Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.c_proj.residual_projection = True  # writes into the residual stream: GPT.init_weights scales it
        self.drop = nn.Dropout(config.dropout)
        self.relu2 = config.mlp == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)                                                  # (B, T, ff)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.drop(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: two residual branches."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = MultiHeadAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, rope, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def init_module_weights(root: nn.Module, n_layer: int, seed: int | None = None, std: float = 0.02,
                        zero_residual: bool = False) -> None:
    """Initialise every parameter below ``root`` by the type of the module that owns it.
    ``zero_residual``: residual projections start at zero instead (config.zero_init_proj)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    seen: set[int] = set()  # a tied tensor (embedding = output layer) is initialised once
    for module in root.modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen and p.device.type != "meta"]
        seen.update(id(p) for p in module.parameters(recurse=False))
        if not params:
            continue
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * n_layer) if getattr(module, "residual_projection", False) else 1.0
                if any(p is module.weight for p in params):
                    module.weight.normal_(0.0, std * scale, generator=gen)
                    if zero_residual and getattr(module, "residual_projection", False):
                        # Drawn first all the same, so every other weight is what it would be without
                        # the option (a fair ablation); the branch adds nothing until training moves it.
                        module.weight.zero_()
                if getattr(module, "bias", None) is not None and any(p is module.bias for p in params):
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()  # a module that knows its own initialisation (LoRA: A random, B zero)
            else:
                for p in params:  # a parameter of a module type not listed above: zero is the safe start
                    p.zero_()


class GPT(nn.Module):
    """A GPT-2-style decoder-only transformer. ``forward(idx) -> logits``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.context_length, config.d_model)
        else:
            self.rotary = RotaryEmbedding(config.head_dim, config.context_length, config.rope_theta)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation, chosen by module type: linear and embedding weights N(0, 0.02),
        residual projections (marked ``residual_projection``) scaled by 1/√(2·n_layer) so the
        residual stream's variance does not grow with depth; zero biases; norms start as the identity.
        With ``zero_init_proj`` the residual projections start at zero, so each block starts as the
        identity (modded-nanogpt). Any module added later (a classification head, LoRA layers) is
        initialised by what it is."""
        init_module_weights(self, self.config.n_layer, seed, zero_residual=self.config.zero_init_proj)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                      pad: torch.Tensor | None = None, layout: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model): everything but the output layer. ``pad`` (B,)
        counts the padding columns at the start of each row of a left-padded batch (a cache
        carries its own). ``layout`` = (positions (B, T), mask (B, 1, T, T), True where a query may
        see a key) lays rows out as the caller likes, without a cache: several sequences that share
        a prefix packed into one row (multiple-choice scoring)."""
        b, t = idx.shape
        if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
            # An id past the table would be an IndexError deep in the embedding (on a GPU, a device assert);
            # on the CPU the check costs nothing next to the model.
            low, top = (int(v) for v in torch.aminmax(idx))
            if top >= self.config.vocab_size or low < 0:
                bad = top if top >= self.config.vocab_size else low
                raise LmforgeError(f"token id {bad} is outside this model's vocabulary of {self.config.vocab_size} "
                                   "ids: the ids were made with another tokenizer, or their data files are damaged "
                                   "(prepare them again)")
        static = kv_cache is not None and kv_cache.static
        start = kv_cache.pos if kv_cache is not None and not static else 0
        positions = mask = None
        if layout is not None:
            positions, mask = layout
            if kv_cache is not None or pad is not None or positions.shape != idx.shape or \
                    mask.shape != (b, 1, t, t) or mask.dtype != torch.bool:
                raise ValueError(f"a layout for ids {(b, t)} takes positions {(b, t)}, a boolean mask "
                                 f"{(b, 1, t, t)}, and no cache or padding (the layout holds them)")
            if int(positions.max()) >= self.config.context_length:
                raise ValueError(f"position {int(positions.max())} is beyond the model's context length "
                                 f"({self.config.context_length}); crop the input")
        elif start + t > self.config.context_length:
            raise ValueError(f"sequence of {start + t} tokens is longer than the model's context length "
                             f"({self.config.context_length}); crop the input")
        if pad is None and kv_cache is not None:
            pad = kv_cache.pad
        bound = None
        if layout is None and (static or pad is not None):
            # Per-row positions and a mask: left-padded rows, or a compiled decode step, whose
            # columns come from the cache's column tensor and whose keys span the whole cache.
            if static:
                cols, n_keys = kv_cache.col + torch.arange(t, device=idx.device), kv_cache.max_len
                pad = pad if pad is not None else torch.zeros(b, dtype=torch.long, device=idx.device)
            else:
                cols, n_keys = torch.arange(start, start + t, device=idx.device), start + t
            positions, mask = padded_positions_and_mask(pad, cols, n_keys)
            bound = n_keys  # no position reaches the keys' count: the rotary table needs no more
        x = self.wte(idx)                                                 # (B, T, d)
        rope = None
        if positions is not None:
            if self.config.positions == "learned":
                x = x + self.wpe(positions)
            else:
                rope = self.rotary.at(positions, bound)
        elif self.config.positions == "learned":  # every row starts at column 0: positions are the columns
            x = x + self.wpe(torch.arange(start, start + t, device=idx.device))
        else:
            rope = self.rotary(start, t, idx.device)
        x = self.drop(x)
        for block in self.h:
            x = block(x, kv_cache, rope, mask)
        if kv_cache is not None and not static:  # a static cache is advanced by its caller, outside the graph
            kv_cache.advance(t)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None, targets: torch.Tensor | None = None,
                fused: bool = True, pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size); with ``targets`` (B, T), the mean
        cross-entropy instead (positions marked IGNORE_INDEX left out). The loss path never builds
        the whole logits tensor: the output layer and the loss run fused, chunk by chunk
        (``fused=False`` computes the plain reference). ``pad``: see ``hidden_states``.
        ``last_only``: logits (B, 1, V) of the last position alone (generation needs no others; for a
        long prompt the output layer over every position would be most of the prefill)."""
        hidden = self.hidden_states(idx, kv_cache, pad)
        if targets is None:
            return self.logits(hidden[:, -1:] if last_only else hidden)
        cap = self.config.logit_softcap
        head_dropout = getattr(self.lm_head, "lora_dropout", None)
        # The fused kernel sees one weight (W, or W + BA with LoRA): a head with a bias, or a LoRA
        # head with dropout in training, runs the plain path.
        plain_head = self.lm_head.bias is not None or (self.training and head_dropout is not None and head_dropout.p > 0)
        if fused and not plain_head:
            return linear_cross_entropy(hidden, self.output_weight, targets, cap=cap)
        if plain_head or head_dropout is not None:
            return F.cross_entropy(self.logits(hidden).flatten(0, -2).float(), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return cross_entropy_reference(hidden, self.output_weight, targets, cap=cap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on final hidden states (..., d) -> (..., V), soft-capped at ±logit_softcap
        when the config sets one. Code that runs ``hidden_states`` itself should call this, not
        ``lm_head``, so a capped model scores what it was trained on."""
        z = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return z if cap is None else softcap(z, cap)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output layer's effective weight (V, d): with LoRA on the head, W + α/r · B A."""
        delta = getattr(self.lm_head, "weight_delta", None)
        return self.lm_head.weight if delta is None else self.lm_head.weight + delta()

    def replace_head(self, n_out: int) -> None:
        """A new output layer of ``n_out`` outputs with a bias (a classification head, the book's
        chapter 6), untied from the embedding and initialised by its type."""
        w = self.lm_head.weight
        self.lm_head = Linear(self.config.d_model, n_out, bias=True, device=w.device, dtype=w.dtype)
        init_module_weights(self.lm_head, self.config.n_layer)
        self.config = self.config.replace(tie_embeddings=False, logit_softcap=None)  # class logits are not capped

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights counted once (as ``transformers`` counts)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if hasattr(self, "wpe") else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3 × forward): 6 per matmul weight,
        output layer included, plus attention's QKᵀ and AV (PaLM appendix B). Elementwise work is
        not counted: GELU or ReLU², QK-norm and the logit cap cost the same here."""
        c = self.config
        t = seq_len or c.context_length
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * c.n_layer * c.n_head * c.head_dim * t
