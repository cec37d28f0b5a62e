"""The stages wired together: what `lmforge prepare`, `pretrain`, `eval` and the default run do.

Each function takes configs and paths, prints progress for people, and raises
``LmforgeError`` for anything a user can fix; the command line turns those into one
line and exit code 2.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .checkpoint import TOKENIZER, read_run_config
from .config import (
    DataConfig,
    LmforgeError,
    ModelConfig,
    SampleConfig,
    TokenizerConfig,
    TrainConfig,
)
from .data import (
    RandomWindows,
    ShardSet,
    SlidingWindows,
    prepare,
    read_documents,
    split_documents,
)
from .evaluate import bits_per_byte, evaluate_tokens
from .generate import generate_text
from .losses import next_token_loss
from .model import GPT
from .models import load_any
from .precision import default_device, resolve_dtype
from .report import plot_losses, read_metrics
from .tokenizer import Tokenizer
from .train import fit

DEFAULT_PROMPTS = ("The", "A function that")


def train_tokenizer(paths: list[str], out: str | Path, config: TokenizerConfig = TokenizerConfig(),
                    data: DataConfig = DataConfig()) -> Tokenizer:
    """Train BPE on the training documents only (held-out text must stay unseen) and save it."""
    docs = read_documents(paths, data)
    train_docs, _ = split_documents(docs, data)
    t0 = time.perf_counter()
    tok = Tokenizer.train(train_docs, config, verbose=True)
    path = tok.save(out)
    print(f"trained a {tok.vocab_size}-token BPE tokenizer on {sum(map(len, train_docs)):,} characters "
          f"in {time.perf_counter() - t0:.1f} s -> {path}")
    return tok


def prepare_shards(paths: list[str], tokenizer_path: str | Path, out: str | Path,
                   data: DataConfig = DataConfig(), force: bool = False) -> ShardSet:
    tok = Tokenizer.load(tokenizer_path)
    shards = prepare(paths, out, tok, data, force=force)
    tok.save(Path(out) / TOKENIZER)  # the shards carry the tokenizer that made them
    return shards


def _sampler(tokenizer: Tokenizer, prompts: tuple[str, ...], config: SampleConfig):
    def sample(model: GPT, step: int) -> None:
        from tqdm import tqdm

        for prompt in prompts:
            text = generate_text(model, tokenizer, prompt, config)
            tqdm.write(f"[sample @ step {step}] {prompt!r} -> {(prompt + text)!r}")
    return sample


def pretrain(data_dir: str | Path, out: str | Path, model_config: ModelConfig, train: TrainConfig = TrainConfig(),
             resume: bool = False, sample: SampleConfig = SampleConfig(max_new_tokens=40),
             prompts: tuple[str, ...] = DEFAULT_PROMPTS, device: str | None = None, progress: bool = True) -> dict:
    """Pretrain a GPT on prepared shards; returns a summary with the final losses."""
    shards = ShardSet.open(data_dir)
    tok_path = Path(data_dir) / TOKENIZER
    if not tok_path.is_file():
        raise LmforgeError(f"{data_dir} has no {TOKENIZER}; prepare it with `lmforge prepare`")
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.fingerprint != shards.fingerprint:
        raise LmforgeError(f"{data_dir}/{TOKENIZER} is not the tokenizer the shards were made with; run prepare again")
    # The tokenizer defines the id space: the embedding and output layer cover exactly its ids.
    model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
    run = Path(out)
    if resume:
        prior = read_run_config(run)
        if ModelConfig.from_dict(prior["model"]) != model_config:
            raise LmforgeError(f"{run} was trained with a different model config; resume with the same flags "
                               "(see its config.json) or start a new --out directory")
    elif (run / "model.safetensors").exists():
        raise LmforgeError(f"{run} already holds a trained model; pass --resume to continue it or choose a new --out")
    dev = torch.device(device) if device else default_device()
    torch.manual_seed(train.seed)
    model = GPT(model_config).to(dev)
    train_tokens, val_tokens = shards.tokens("train"), shards.tokens("val")
    ctx = model_config.context_length
    if train.stride:
        windows = SlidingWindows(train_tokens, ctx, train.stride, train.batch_size, train.seed)
        batches = windows.batch
        epochs = train.max_steps * train.grad_accum / len(windows)
        print(f"{len(windows)} batches per epoch; {train.max_steps} steps = {epochs:.1f} epochs")
    else:
        batches = RandomWindows(train_tokens, ctx, train.batch_size, train.seed).batch
    print(f"model: {model.num_params() / 1e6:.2f} M parameters ({model_config.n_layer} layers, width "
          f"{model_config.d_model}, context {ctx}, vocab {model_config.vocab_size}); precision "
          f"{str(resolve_dtype(train.dtype, dev)).removeprefix('torch.')}; device {dev}")
    print(f"data: {len(train_tokens):,} train tokens, {len(val_tokens):,} validation tokens")
    run.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run / TOKENIZER)

    def evaluate(m: GPT, dtype: torch.dtype) -> dict:
        return evaluate_tokens(m, val_tokens, train.batch_size, train.eval_batches, dtype)

    has_val = len(val_tokens) >= 2
    result = fit(model, batches, next_token_loss, train, run, evaluate=evaluate if has_val else None,
                 sample=_sampler(tokenizer, prompts, sample) if prompts else None, resume=resume, progress=progress)
    plot = plot_losses(run / "metrics.jsonl", run / "loss.png")
    summary = {"run": str(run), "steps": result.step, "train_loss": result.last_loss, "tokens": result.tokens,
               "seconds": result.seconds, "plot": str(plot) if plot else None}
    if has_val:
        summary.update({f"val_{k}": v for k, v in evaluate(model, resolve_dtype(train.dtype, dev)).items()})
    return summary


def evaluate_run(run_dir: str | Path, data_dir: str | Path, split: str = "val", batch_size: int = 8,
                 max_batches: int = 50, context: int | None = None, dtype: str = "float32") -> dict:
    model, tokenizer = load_any(str(run_dir), default_device())
    shards = ShardSet.open(data_dir)
    if shards.fingerprint != tokenizer.fingerprint:
        raise LmforgeError(f"{data_dir} was tokenized with a different tokenizer than {run_dir}; "
                           "prepare the data with the run's tokenizer.json")
    if context is not None and context > model.config.context_length:
        raise LmforgeError(f"context {context} is longer than the model's context length "
                           f"({model.config.context_length}); use --context {model.config.context_length} or less")
    if split not in ("train", "val"):
        raise LmforgeError(f"split must be 'train' or 'val', got {split!r}")
    tokens = shards.tokens(split)
    if len(tokens) < 2:
        raise LmforgeError(f"the {split} split of {data_dir} is empty")
    res = evaluate_tokens(model, tokens, batch_size, max_batches, resolve_dtype(dtype, default_device()), context)
    return {"split": split, **res}


def _compare_with_pretrained(run: Path, paths: list[str], name: str = "smollm2-135m-instruct",
                             chars: int = 20_000) -> dict:
    """Stage 5 of the default run: our small model next to a real pretrained one, on the same
    held-out text, in bits per byte (their tokenizers differ, so per-token losses do not compare)."""
    from .hub import HubError

    print(f"== 5/5 what pretraining at scale buys: {name} next to the model trained here")
    _, val_docs = split_documents(read_documents(paths), DataConfig())
    text = "\n\n".join(val_docs)[:chars]
    try:
        theirs, their_tok = load_any(name)
    except (HubError, LmforgeError) as e:
        print(f"skipped: {e}")
        return {}
    ours, our_tok = load_any(str(run))
    rows, out = [], {}
    prompt = "The"
    for label, model, tok in (("trained here", ours, our_tok), (name, theirs, their_tok)):
        res = bits_per_byte(model, tok, text)
        out[f"bpb_{'ours' if model is ours else 'pretrained'}"] = res["bits_per_byte"]
        sample = generate_text(model, tok, prompt, SampleConfig(max_new_tokens=30, temperature=0.7, top_k=40))
        n = model.num_params()
        rows.append(f"  {label:<24} {n / 1e6:>7.1f} M params   {res['bits_per_byte']:.3f} bits/byte   "
                    f"sample: {(prompt + sample)[:90]!r}")
    print(f"held-out text: {len(text.encode()):,} bytes of the validation documents")
    print("\n".join(rows))
    return out


def evaluate_text(model_spec: str, paths: list[str], dtype: str = "float32") -> dict:
    """Bits per byte of any model on text files (comparable across tokenizers)."""
    model, tokenizer = load_any(model_spec, default_device())
    text = "\n\n".join(read_documents(paths))
    return bits_per_byte(model, tokenizer, text, dtype=resolve_dtype(dtype, default_device()))


def export(model_spec: str, to: str, out: str | Path, dtype: str = "f16") -> Path:
    """Write a model as a Hugging Face folder or a GGUF file."""
    model, tokenizer = load_any(model_spec)
    if to == "hf":
        from .convert import export_hf

        return export_hf(model, out, tokenizer)
    if to == "gguf":
        from .gguf_io import export_gguf

        return export_gguf(model, tokenizer, out, dtype)
    raise LmforgeError(f"--to must be 'hf' or 'gguf', got {to!r}")


def main_job(data: list[str] | None = None, out: str | Path = "runs/default", minutes: float = 4.0,
             vocab_size: int = 4096, preset: str = "gpt-micro", train: TrainConfig | None = None,
             progress: bool = True) -> dict:
    """The built-in default: raw text -> tokenizer -> shards -> a pretrained GPT, evaluated and sampled."""
    t0 = time.perf_counter()
    out = Path(out)
    paths = data or ["builtin"]
    if (out / "model" / "model.safetensors").exists():
        raise LmforgeError(f"{out} already holds a finished run; choose another --out or delete it")
    print(f"== 1/5 tokenizer: byte-level BPE, vocabulary {vocab_size}, corpus: "
          f"{'text shipped with Python (pydoc topics + stdlib docstrings)' if paths == ['builtin'] else ', '.join(paths)}")
    train_tokenizer(paths, out / "tokenizer.json", TokenizerConfig(vocab_size=vocab_size))
    print("== 2/5 token shards")
    prepare_shards(paths, out / "tokenizer.json", out / "data")
    model_config = ModelConfig.from_preset(preset, vocab_size=vocab_size)
    # Sized for about 4 minutes on 2 CPU cores; max_minutes stops it (with a checkpoint) on slower machines.
    train = train or TrainConfig(batch_size=16, max_steps=1000, warmup_steps=50, lr=2e-3, eval_interval=200,
                                 eval_batches=10, save_interval=200, max_minutes=minutes, weight_decay=0.1)
    print(f"== 3/5 pretraining a {preset} GPT (stops after {train.max_steps} steps or {minutes} minutes)")
    summary = pretrain(out / "data", out / "model", model_config, train, progress=progress)
    print("== 4/5 evaluation")
    before = next(r for r in read_metrics(out / "model" / "metrics.jsonl") if r["step"] == 0)
    print(f"validation loss: untrained {before['val_loss']:.3f} (ln vocab = {math.log(vocab_size):.3f}, perplexity "
          f"{before['val_perplexity']:.0f}) -> trained {summary['val_loss']:.3f} (perplexity "
          f"{summary['val_perplexity']:.1f})")
    summary.update(_compare_with_pretrained(out / "model", paths))
    print(f"run directory: {out / 'model'} (weights, config, tokenizer, metrics.jsonl, loss curve {summary['plot']})")
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} minutes. Next: lmforge generate {out / 'model'} "
          "--prompt 'The'")
    summary["untrained_val_loss"] = before["val_loss"]
    return summary


__all__ = ["evaluate_run", "evaluate_text", "export", "main_job", "prepare_shards", "pretrain", "train_tokenizer"]
