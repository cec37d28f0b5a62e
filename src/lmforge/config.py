"""Configuration: frozen dataclasses, validated at construction, and the model presets.

Every default in lmforge lives here. The command line derives its flags and help text
from these classes, so a default is never typed twice. This module imports nothing of
lmforge, so anything may import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

CONFIG_FORMAT_VERSION = 1


class LmforgeError(Exception):
    """An error a user can fix: the message says what was wrong and how to fix it.

    The command line prints it as one line and exits with code 2.
    """


class Terminated(BaseException):
    """SIGTERM (``kill``, ``docker stop``, ``timeout``), raised where the command is, as Ctrl-C raises
    KeyboardInterrupt: what cleans up after an interrupt (temporary files, a half-made folder) and
    training's last checkpoint happen for it too, where the default action would end the process
    on the spot. Not a KeyboardInterrupt: the chat's "Ctrl-C stops the answer" must not catch it."""


SPLIT_RULE_TEXT = "three fractions (train, val, test), none negative, train above 0, that sum to 1"


def valid_split(split) -> bool:
    """Three fractions (train, validation, test), none negative, some training data, summing to 1."""
    return len(split) == 3 and all(f >= 0 for f in split) and split[0] > 0 and abs(sum(split) - 1.0) < 1e-6


def one_line(text: str) -> str:
    """A message on one line: what an error prints (runs of white space, newlines included, become one space)."""
    return " ".join(text.split())


class ConfigError(LmforgeError, ValueError):
    """A configuration value is invalid."""


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise_all(name: str, problems: list[str]) -> None:
    # Collect every problem and report them at once: fixing one at a time is tedious.
    if problems:
        raise ConfigError(f"invalid {name}: " + "; ".join(problems))


MAX_CONTEXT = 1 << 24  # 16.8M tokens: past the longest real models' (10M); a header saying 1e12 is damaged


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer: GPT-2 style by default, Llama style with
    norm='rmsnorm', mlp='swiglu', positions='rope', bias=False and, often, n_kv_head < n_head."""

    vocab_size: int = 50257
    """Number of token ids the embedding and output layer cover."""
    context_length: int = 1024
    """Longest sequence the model accepts (size of the learned position table)."""
    d_model: int = 768
    """Width of the residual stream."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of query heads."""
    n_kv_head: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_head."""
    d_ff: int | None = None
    """Hidden width of the MLP; None means 4 * d_model."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches."""
    bias: bool = True
    """Biases in linear layers and LayerNorm."""
    qkv_bias: bool = True
    """Bias on the query/key/value projection (GPT-2: yes; the book's chapter 5: no)."""
    tie_embeddings: bool = True
    """Share the token-embedding matrix with the output layer (GPT-2 does)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation: LayerNorm (GPT-2) or RMSNorm (Llama)."""
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    """Feed-forward: GELU MLP (GPT-2), gated SwiGLU (Llama) or relu(x)² without a gate (modded-nanogpt)."""
    positions: Literal["learned", "rope"] = "learned"
    """Position information: a learned table (GPT-2) or rotary embeddings (Llama)."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys (no learned scale) before rotary positions: attention
    scores stay bounded, so higher learning rates train stably (modded-nanogpt, OLMo 2)."""
    zero_init_proj: bool = False
    """Start the output projections of attention and MLP at zero: every block begins as the identity."""
    logit_softcap: float | None = None
    """Soft-cap the output logits to (-c, c) as c·tanh(z/c) (modded-nanogpt: 15-30); needs an untied head."""

    def __post_init__(self) -> None:
        p: list[str] = []
        # (a model's config.json or GGUF header says 1.5 or "400" as readily as 400)
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model", "n_kv_head", "d_ff"):
            value = getattr(self, name)
            if not (is_whole(value) or (value is None and name in ("n_kv_head", "d_ff"))):
                p.append(f"{name} must be a whole number, got {value!r}")
        _raise_all("model config", p)
        _check(p, self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}")
        _check(p, self.context_length >= 1, f"context_length must be >= 1, got {self.context_length}")
        _check(p, self.context_length <= MAX_CONTEXT,
               f"context_length must be at most {MAX_CONTEXT:,} tokens, got {self.context_length:,}")
        _check(p, self.n_layer >= 1, f"n_layer must be >= 1, got {self.n_layer}")
        _check(p, self.n_head >= 1, f"n_head must be >= 1, got {self.n_head}")
        _check(p, self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        if self.n_head >= 1 and self.d_model % self.n_head:
            p.append(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); "
                     f"try d_model={self.n_head * max(1, round(self.d_model / self.n_head))}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            p.append(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        _check(p, self.d_ff is None or self.d_ff >= 1, f"d_ff must be >= 1, got {self.d_ff}")
        _check(p, 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(p, self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _check(p, self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        _check(p, self.mlp in ("gelu", "swiglu", "relu2"),
               f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r} (or 'relu2', relu(x)² without a gate)")
        _check(p, self.positions in ("learned", "rope"), f"positions must be 'learned' or 'rope', got {self.positions!r}")
        _check(p, self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _check(p, self.logit_softcap is None or self.logit_softcap > 0,
               f"logit_softcap must be > 0 or None, got {self.logit_softcap}")
        # The cap is meant for an untied head (modded-nanogpt's recipe): tied, its squashed gradient would
        # also reshape the token embeddings.
        _check(p, self.logit_softcap is None or not self.tie_embeddings,
               "logit_softcap needs an untied output layer (the cap is meant for an untied head, as in "
               "modded-nanogpt's recipe); set tie_embeddings=False or logit_softcap=None")
        if self.positions == "rope" and self.n_head >= 1 and self.d_model % self.n_head == 0 and self.head_dim % 2:
            p.append(f"rotary embeddings need an even head size, got {self.head_dim}")
        _raise_all("model config", p)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        check_types(cls, d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Presets are plain data. The GPT-2 shapes are OpenAI's (qkv bias, tied head, vocab 50,257);
# the small ones are for CPU work, their vocabulary set by the tokenizer at training time.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(d_model=768, n_layer=12, n_head=12),
    "gpt2-355m": dict(d_model=1024, n_layer=24, n_head=16),
    "gpt2-774m": dict(d_model=1280, n_layer=36, n_head=20),
    "gpt2-1558m": dict(d_model=1600, n_layer=48, n_head=25),
    "gpt-nano": dict(vocab_size=512, context_length=64, d_model=64, n_layer=2, n_head=4),
    "gpt-micro": dict(vocab_size=4096, context_length=128, d_model=192, n_layer=4, n_head=6),
    "gpt-small": dict(vocab_size=8192, context_length=256, d_model=384, n_layer=6, n_head=6),
    # SmolLM2-135M's shape, as read from its files: Llama architecture, GQA 9/3, tied embeddings.
    "smollm2-135m": dict(vocab_size=49152, context_length=8192, d_model=576, n_layer=30, n_head=9, n_kv_head=3,
                         d_ff=1536, bias=False, qkv_bias=False, norm="rmsnorm", mlp="swiglu", positions="rope",
                         rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
    "llama-micro": dict(vocab_size=4096, context_length=128, d_model=192, n_layer=4, n_head=6, n_kv_head=2,
                        d_ff=512, bias=False, qkv_bias=False, norm="rmsnorm", mlp="swiglu", positions="rope"),
}


# Training recipes: what to train (architecture options, applied to any preset's shape) and how
# (optimiser, schedule). Plain data, applied by `recipe_configs`; `benchmarks/quality.py` compares them
# on the same tokens. Warm-up is a fraction of the run's steps, so a recipe fits any run length.
# The rates of nanogpt and modern are the best of a sweep at gpt-micro's shape (README, Benchmarks).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # The book's chapter 5: GPT-2 blocks, AdamW at a constant 4e-4 (torch's betas), no clipping.
    "book": {"model": {}, "train": dict(lr=4e-4, schedule="constant", warmup_fraction=0.0, beta2=0.999,
                                        weight_decay=0.1, grad_clip=None)},
    # nanoGPT: GPT-2 blocks, AdamW (0.9, 0.95), linear warm-up, cosine decay to a tenth, clipping at 1.
    "nanogpt": {"model": {}, "train": dict(lr=1e-3, schedule="cosine", warmup_fraction=0.05, beta2=0.95,
                                           weight_decay=0.1, grad_clip=1.0)},
    # modded-nanogpt's ideas: rotary positions, RMSNorm, QK-norm, ReLU², zero-initialised output
    # projections, an untied soft-capped head; Muon for the blocks' matrices with AdamW for the rest;
    # warm-up-stable-decay.
    "modern": {"model": dict(positions="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, zero_init_proj=True,
                             tie_embeddings=False, logit_softcap=15.0, bias=False, qkv_bias=False),
               "train": dict(optimizer="muon", muon_lr=0.005, lr=4e-3, schedule="wsd", decay_fraction=0.4,
                             warmup_fraction=0.02, beta2=0.95, weight_decay=0.0, grad_clip=1.0)},
}


DEFAULT_RECIPE = "modern"  # what the default run trains with: the winner of benchmarks/quality.py


def recipe_configs(recipe: str, preset: str = "gpt-micro", *, rate: float | None = None,
                   **overrides: Any) -> tuple["ModelConfig", "TrainConfig"]:
    """The model and train configs of ``recipe`` at ``preset``'s shape; ``overrides`` name fields of
    either (``vocab_size``, ``max_steps``, ``lr``, ...) and win over the recipe; ``rate`` sets the
    rate of the recipe's main optimiser (Muon's for a Muon recipe, else ``lr``)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - model_fields - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"unknown model or train setting(s) {', '.join(unknown)} for recipe {recipe!r}")
    r = RECIPES[recipe]
    model = ModelConfig.from_preset(preset, **{**r["model"], **{k: v for k, v in overrides.items()
                                                                  if k in model_fields}})
    train = {k: v for k, v in r["train"].items() if k != "warmup_fraction"}
    train.update({k: v for k, v in overrides.items() if k not in model_fields})
    if rate is not None:
        train["muon_lr" if train.get("optimizer") == "muon" else "lr"] = rate
    if "warmup_steps" not in overrides:
        max_steps = train.get("max_steps", TrainConfig.max_steps)
        train["warmup_steps"] = round(r["train"].get("warmup_fraction", 0.0) * max_steps)
    return model, TrainConfig(**train)


# Matrix types `lmforge export --to gguf` writes (norms are always f32).
GGUF_EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@dataclass(frozen=True)
class TokenizerConfig:
    """How to train a byte-level BPE tokenizer."""

    vocab_size: int = 4096
    """Size of the vocabulary, special tokens included (at least 256 + number of specials)."""
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    """Special tokens, given ids after the learned merges; the first separates documents."""
    pattern: str = "gpt2"
    """Pre-tokenization regex: 'gpt2', 'gpt4' or a regular expression."""

    def __post_init__(self) -> None:
        p: list[str] = []
        specials = tuple(self.special_tokens)
        _check(p, len(set(specials)) == len(specials), "special_tokens contains duplicates")
        _check(p, all(specials), "special tokens must be non-empty strings")
        need = 256 + len(specials)
        _check(p, self.vocab_size >= need,
               f"vocab_size must be at least 256 byte tokens + {len(specials)} special token(s) = {need}, "
               f"got {self.vocab_size}")
        _raise_all("tokenizer config", p)


@dataclass(frozen=True)
class DataConfig:
    """How text files become token shards."""

    val_fraction: float = 0.1
    """Fraction of documents held out for validation (at least one document when there are two)."""
    seed: int = 1337
    """Seed of the train/validation split."""
    text_field: str = "text"
    """Field holding the text in JSONL files."""
    errors: Literal["strict", "replace"] = "strict"
    """How to treat bytes that are not UTF-8: 'strict' stops with an error, 'replace' substitutes U+FFFD."""
    workers: int = 0
    """Processes for encoding; 0 picks one per CPU for large corpora."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, 0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _check(p, self.errors in ("strict", "replace"), f"errors must be 'strict' or 'replace', got {self.errors!r}")
        _check(p, self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        _raise_all("data config", p)


_WARNED_MUON_LR: set[float] = set()


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: batches, optimiser, schedule, precision, logging and checkpoints."""

    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    batch_warmup_steps: int = 0
    """Batch-size warm-up: during this many first steps each micro-batch uses only its first rows, a fraction
    growing linearly from batch_warmup_start to 1 (0: no warm-up)."""
    batch_warmup_start: float = 0.25
    """Fraction of each micro-batch's rows used at step 0 of the batch-size warm-up."""
    max_steps: int = 1000
    """Optimiser steps to run (the schedule's length)."""
    max_minutes: float | None = None
    """Stop early, with a checkpoint, after this many minutes of training in this invocation (a guard; resume
    continues from there)."""
    stride: int | None = None
    """Sliding-window stride; None samples random windows (large corpora), an int walks the corpus in epochs."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine or wsd decay, as a fraction of lr."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    """Learning-rate schedule after warm-up: cosine decay, constant, or 'wsd' (warm-up-stable-decay: constant,
    then a linear decay over the last decay_fraction of max_steps)."""
    decay_fraction: float = 0.2
    """With schedule 'wsd': the fraction of max_steps, at the end, over which the learning rate decays."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """'adamw' for every parameter, or 'muon': Muon (orthogonalised momentum) for the 2-D weights inside the
    transformer blocks and AdamW for embeddings, output layer, norms and biases."""
    muon_lr: float = 0.02
    """Peak learning rate of the Muon-updated matrices (the schedule scales it as it scales lr)."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not biases, norms); with Muon, its matrices shrink by
    the same factor per step as AdamW's."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute precision: 'auto' uses bf16 autocast where the hardware runs it fast."""
    compile: bool = False
    """Compile the model with torch.compile (slow to start, faster per step)."""
    eval_interval: int = 100
    """Steps between validation runs (and at the end)."""
    eval_batches: int = 20
    """Batches per validation run."""
    sample_interval: int = 0
    """Steps between text samples; 0 samples only at the start and the end."""
    save_interval: int = 200
    """Steps between checkpoints (and at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in the run's checkpoints/ folder (the newest ones)."""
    log_interval: int = 10
    """Steps between metrics.jsonl records."""
    tensorboard: bool = False
    """Also log to TensorBoard, in RUN/tensorboard (pip install 'lmforge[tensorboard]')."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'lmforge[wandb]'; WANDB_MODE=offline logs locally, in RUN/wandb)."""
    wandb_project: str = "lmforge"
    """The W&B project the run is logged to."""
    peak_flops: float | None = None
    """Peak FLOP/s of the hardware, for MFU; None: a known GPU's data-sheet peak, else a matmul timed here."""
    seed: int = 1337
    """Seed of model initialisation, batch order and dropout."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun (--devices N): 'ddp' keeps the whole model on every device, 'fsdp' shards parameters,
    gradients and optimiser state over them (FSDP2), for models that do not fit one device."""
    dist_timeout: float = 600.0
    """Seconds a collective may wait under torchrun before the job stops with an error (a rank that died or hangs)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                     "save_interval", "log_interval", "keep_checkpoints"):
            v = getattr(self, name)
            _check(p, isinstance(v, int) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        _check(p, self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0")
        _check(p, self.stride is None or self.stride >= 1, f"stride must be >= 1, got {self.stride}")
        _check(p, self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(p, 0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(p, self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(p, self.schedule in ("cosine", "constant", "wsd"), "schedule must be 'cosine', 'constant' or 'wsd'")
        _check(p, 0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if (self.schedule == "wsd" and 0 < self.decay_fraction <= 1
                and self.warmup_steps + self.decay_steps > self.max_steps):
            p.append(f"the wsd schedule's warm-up ({self.warmup_steps} steps) and decay ({self.decay_steps} steps, "
                     f"decay_fraction {self.decay_fraction} of max_steps) exceed max_steps ({self.max_steps}); lower "
                     "warmup_steps or decay_fraction, or raise max_steps")
        _check(p, isinstance(self.batch_warmup_steps, int) and self.batch_warmup_steps >= 0,
               f"batch_warmup_steps must be an integer >= 0, got {self.batch_warmup_steps!r}")
        _check(p, 0 < self.batch_warmup_start <= 1,
               f"batch_warmup_start must be in (0, 1], got {self.batch_warmup_start}")
        _check(p, self.optimizer in ("adamw", "muon"), f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        _check(p, self.muon_lr > 0, f"muon_lr must be > 0, got {self.muon_lr}")
        _check(p, 0 <= self.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _check(p, not (self.optimizer == "muon" and self.strategy == "fsdp"),
               "optimizer 'muon' cannot run under strategy 'fsdp' (Newton-Schulz needs whole matrices, FSDP shards "
               "them); use --train.strategy ddp")
        _check(p, self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(p, 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        _check(p, self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None")
        _check(p, self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16")
        _check(p, self.sample_interval >= 0, "sample_interval must be >= 0")
        _check(p, self.peak_flops is None or self.peak_flops > 0,
               f"peak_flops must be > 0 or None, got {self.peak_flops}")
        _check(p, isinstance(self.wandb_project, str) and self.wandb_project.strip() != "",
               "wandb_project must be a project name")
        _check(p, self.strategy in ("ddp", "fsdp"), f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        _check(p, self.dist_timeout > 0, f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        _raise_all("train config", p)
        if self.optimizer == "muon" and not 0.005 <= self.muon_lr <= 0.1 and self.muon_lr not in _WARNED_MUON_LR:
            import warnings

            _WARNED_MUON_LR.add(self.muon_lr)  # once per value: configs are rebuilt on every replace and load
            warnings.warn(f"muon_lr {self.muon_lr:g} is outside Muon's usual range 0.005-0.1", stacklevel=3)

    @property
    def decay_steps(self) -> int:
        """The wsd schedule's decay steps: decay_fraction of max_steps, at least one."""
        return max(1, round(self.decay_fraction * self.max_steps))


@dataclass(frozen=True)
class SampleConfig:
    """How to generate text."""

    max_new_tokens: int = 100
    """Tokens to generate after the prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy decoding."""
    top_k: int | None = 50
    """Keep only the k most likely tokens; None keeps all."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability reaches p; None keeps all."""
    seed: int | None = 1337
    """Seed of the sampler; None draws a fresh one (what `lmforge generate` does unless given a seed)."""
    stop_at_eos: bool = True
    """Stop a sequence when it produces the end-of-text token."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already in the prompt or the output (1 = none, 1.1-1.3 typical)."""
    stop: tuple[str, ...] = ()
    """Strings that end the generation (not included in the text)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        object.__setattr__(self, "stop", tuple(self.stop))  # a list from the command line or JSON
        _check(p, self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        # Bounded so that a logit divided or multiplied by it stays finite (1e-300 made inf, then NaN
        # probabilities); beyond these a penalty changes nothing more that a user could see.
        _check(p, 1e-3 <= self.repetition_penalty <= 1e3,
               f"repetition_penalty must be between 0.001 and 1000 (1 = none, 1.1-1.3 typical), "
               f"got {self.repetition_penalty}")
        _check(p, self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(p, self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or None, got {self.top_k}")
        _check(p, self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1] or None, got {self.top_p}")
        _check(p, self.seed is None or -2**63 <= self.seed < 2**64,  # what a torch.Generator takes
               f"seed must be between -2^63 and 2^64 - 1, got {self.seed}")
        _raise_all("sample config", p)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (low-rank updates of frozen Linear layers)."""

    rank: int = 16
    """Rank r of each update B·A."""
    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    targets: tuple[str, ...] = ("attn", "mlp")
    """Layers to adapt: attn (QKV and output projection), mlp, head (the output layer)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, isinstance(self.rank, int) and self.rank >= 1, f"rank must be an integer >= 1, got {self.rank!r}")
        _check(p, self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}")
        _check(p, 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in ("attn", "mlp", "head")]
        _check(p, not bad and len(self.targets) > 0, f"targets must be among attn, mlp, head, got {list(self.targets)}")
        _raise_all("lora config", p)


@dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tuning run trains and on which split of its data."""

    trainable: Literal["head", "last", "all", "lora"] = "last"
    """What trains: the output head only; the last --finetune.last_blocks blocks + final norm + head; everything;
    or LoRA adapters (see --lora.*) plus a new head."""
    last_blocks: int = 1
    """Blocks that train with trainable=last."""
    epochs: float = 5.0
    """Passes over the training split (sets train.max_steps)."""
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    """Train / validation / test fractions, drawn with --finetune.seed."""
    seed: int = 123
    """Seed of the shuffle that splits the data."""
    max_length: int | None = None
    """Longest record in tokens (longer ones are truncated and counted); None: the model's context."""
    limit: int | None = None
    """Use only this many records (drawn with the seed) before splitting: a quick run on a subsample."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.trainable in ("head", "last", "all", "lora"),
               f"trainable must be head, last, all or lora, got {self.trainable!r}")
        _check(p, isinstance(self.last_blocks, int) and self.last_blocks >= 1, "last_blocks must be an integer >= 1")
        _check(p, self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(p, valid_split(self.split), f"split must be {SPLIT_RULE_TEXT}, got {list(self.split)}")
        _check(p, self.max_length is None or self.max_length >= 2, "max_length must be >= 2 or None")
        _check(p, self.limit is None or self.limit >= 3, "limit must be >= 3 or None")
        _raise_all("finetune config", p)


def config_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as JSON-ready data (tuples become lists)."""
    return json_ready(dataclasses.asdict(obj))


def is_whole(value: Any) -> bool:
    """Whether a value read from JSON is a whole number (JSON's true and false are Python ints, not numbers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_digits(text: str) -> bool:
    """Whether ``text`` is a whole number written in ASCII digits, what ``int`` reads. (``str.isdigit``
    also holds for "²" and "١", which ``int`` refuses or reads as another digit.)"""
    return text.isascii() and text.isdigit()


def is_number(value: Any) -> bool:
    """Whether a value read from JSON is a number, whole or not (true and false are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON can be a field of type ``hint`` (a Literal's choices are checked
    by the config itself, which lists them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_whole(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    return True


def _kind(hint: Any) -> str:
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}
    if hint in words:
        return words[hint]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_kind(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list"
    return str(hint)


def check_types(cls: type, values: Any) -> None:
    """Settings read from a file (a run's config.json, hand-edited or of another tool) must be a JSON
    object whose values have the types of ``cls``'s fields: else a TypeError that names the setting
    and the type it takes (which the reader's ``malformed`` turns into its one-line error), not one
    from deep inside the model ("'>=' not supported between 'str' and 'int'")."""
    if not isinstance(values, dict):
        raise TypeError(f"the {cls.__name__} settings are a JSON {type(values).__name__}, not an object of names "
                        "and values")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _fits(value, hints[name]):
            raise TypeError(f"{name!r} is {json.dumps(value)[:40]}, but it takes {_kind(hints[name])}")


def restored(cls: type, stored: dict[str, Any], given: dict[str, Any], run: Any) -> Any:
    """A settings dataclass as the run ``run`` stored it, with the settings given again on top
    (resuming keeps a run's own settings); stored names this version no longer has are left out."""
    known = {f.name for f in dataclasses.fields(cls)}
    with unreadable_settings(run):
        check_types(cls, stored)
        return cls(**{**{k: v for k, v in stored.items() if k in known}, **given})


@contextlib.contextmanager
def malformed(describe: Callable[[Exception], LmforgeError],
              kinds: tuple[type[Exception], ...] = (TypeError, ValueError, ZeroDivisionError)):
    """Inside: an error of ``kinds``, raised by a value read from a file being of the wrong type or
    range ("400" for a count, null, 0 heads), becomes ``describe(e)``, a one-line error; lmforge's
    own errors (ValueErrors too) pass as they are, having said what is wrong already."""
    try:
        yield
    except LmforgeError:
        raise
    except kinds as e:
        raise describe(e) from None


def unreadable_settings(run: Any) -> contextlib.AbstractContextManager:
    """A stored setting of a type the config cannot take (a hand-edited or foreign config.json) is a
    one-line error naming the run, not a TypeError from deep inside the dataclass."""
    return malformed(lambda e: LmforgeError(f"the settings stored in {run} cannot be read ({e}); start a new run"),
                     (TypeError,))


def json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


__all__ = [
    "CONFIG_FORMAT_VERSION", "ConfigError", "FinetuneConfig", "GGUF_EXPORT_TYPES", "DataConfig", "LmforgeError",
    "LoRAConfig", "ModelConfig", "PRESETS", "SampleConfig", "Terminated", "TokenizerConfig", "TrainConfig",
    "check_types", "config_dict", "malformed", "restored", "unreadable_settings",
]
