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

from . import distributed
from .checkpoint import METRICS as METRICS_FILE
from .checkpoint import TOKENIZER, has_checkpoint, read_run_config
from .config import (
    DEFAULT_RECIPE,
    DataConfig,
    LmforgeError,
    ModelConfig,
    SampleConfig,
    TokenizerConfig,
    TrainConfig,
    recipe_configs,
)
from .data import (
    SHARD_FILES,
    RandomWindows,
    ShardSet,
    SlidingWindows,
    is_shard_dir,
    prepare,
    read_documents,
    read_text_files,
    split_documents,
)
from .evaluate import bits_per_byte, evaluate_tokens
from .generate import generate_text
from .losses import next_token_loss
from .model import GPT
from .models import load_any, load_language_model
from .outputs import check_output, inside, write_error
from .precision import default_device, resolve_dtype
from .report import plot_losses, read_metrics
from .tokenizer import FORMAT as TOKENIZER_FORMAT
from .tokenizer import Tokenizer
from .train import fit

DEFAULT_PROMPTS = ("The", "A function that")
EVAL_DTYPES = ("float32", "bfloat16", "auto")


def _tokenizer_file(out: str | Path) -> Path:
    """Where ``Tokenizer.save(out)`` writes: a folder (or a name without a suffix) gets tokenizer.json inside."""
    out = Path(out)
    return out / TOKENIZER if out.is_dir() or not out.suffix else out


def _is_tokenizer_file(path: Path) -> bool:
    # lmforge writes {"format": "lmforge-bpe", ...} with the format first: the head suffices,
    # so a large unrelated file is never read whole.
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.replace(b" ", b"").startswith(b'{"format":"' + TOKENIZER_FORMAT.encode() + b'"')


def train_tokenizer(paths: list[str], out: str | Path, config: TokenizerConfig = TokenizerConfig(),
                    data: DataConfig = DataConfig(), overwrite: bool = False) -> Tokenizer:
    """Train BPE on the training documents only (held-out text must stay unseen) and save it."""
    target = _tokenizer_file(out)
    check_output(target, kind="file", what="an lmforge tokenizer file", own_kind=_is_tokenizer_file,
                 inputs=paths, overwrite=overwrite)
    docs = read_documents(paths, data)
    train_docs, val_docs = split_documents(docs, data)
    t0 = time.perf_counter()
    tok = Tokenizer.train(train_docs, config, verbose=True)
    try:
        path = tok.save(target)
    except OSError as e:
        raise write_error(target, e) from None
    held = sum(map(len, val_docs))
    print(f"trained a {tok.vocab_size}-token BPE tokenizer on {sum(map(len, train_docs)):,} characters"
          + (f" ({held:,} more held out for validation)" if held else "")
          + f" in {time.perf_counter() - t0:.1f} s -> {path}")
    return tok


def prepare_shards(paths: list[str], tokenizer_path: str | Path, out: str | Path,
                   data: DataConfig = DataConfig(), force: bool = False, overwrite: bool = False) -> ShardSet:
    out = Path(out)
    tok_file = _tokenizer_file(tokenizer_path) if Path(tokenizer_path).is_dir() else Path(tokenizer_path)
    # The tokenizer stored in the shard folder itself may be used to prepare that folder again:
    # it is read first and the folder keeps it, so it is an input that is never rewritten.
    own_tokenizer = tok_file.is_file() and tok_file.resolve() == (out / TOKENIZER).resolve()
    check_output(out, kind="folder", what="a folder of token shards from `lmforge prepare`", own_kind=is_shard_dir,
                 inputs=[*paths, *([] if own_tokenizer else [tokenizer_path])], writes=SHARD_FILES,
                 overwrite=overwrite)
    tok = Tokenizer.load(tokenizer_path)
    # The shards carry the tokenizer that made them, written in the same commit.
    return prepare(paths, out, tok, data, force=force, save_tokenizer=not own_tokenizer)


def _sampler(tokenizer: Tokenizer, prompts: tuple[str, ...], config: SampleConfig):
    def sample(model: GPT, step: int) -> list[dict]:
        from tqdm import tqdm

        samples = []
        for prompt in prompts:
            text = generate_text(model, tokenizer, prompt, config)
            tqdm.write(f"[sample @ step {step}] {_as_text(prompt + text)}")
            samples.append({"prompt": prompt, "text": text})
        return samples  # fit keeps them in metrics.jsonl, for the run report
    return sample


def _as_text(text: str) -> str:
    """A sample as readable text on one line: newlines shown as ⏎, other control characters dropped."""
    return "".join("⏎" if c == "\n" else c for c in text if c == "\n" or c.isprintable())


def _prepare_run_dir(run: Path, data_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse outputs that would destroy inputs or other work; with ``overwrite``, clear an old run."""
    from . import atomic
    from .checkpoint import CHECKPOINTS, RUN_FILES, TOKENIZER, is_run_dir

    r, d = run.resolve(), data_dir.resolve()
    if inside(r, d) or inside(d, r):
        raise LmforgeError(f"--out {run} and --data {data_dir} overlap; the run directory must be separate from "
                           "the data it trains on")
    if run.exists() and not run.is_dir():
        raise LmforgeError(f"--out {run} is an existing file; give a directory")
    if (run / CHECKPOINTS).exists() and not (run / CHECKPOINTS).is_dir():
        raise LmforgeError(f"{run / CHECKPOINTS} is a file, where lmforge keeps a run's checkpoints; move it away "
                           "or choose a new --out")
    if resume:
        return
    if has_checkpoint(run):
        if not overwrite:
            raise LmforgeError(f"{run} already holds a trained model; pass --resume true to continue it, "
                               "--overwrite true to start it over, or choose a new --out")
    elif run.is_dir() and any(run.iterdir()) and not is_run_dir(run) and not overwrite:
        raise LmforgeError(f"{run} is not empty and is not an lmforge run directory; choose a new --out or pass "
                           "--overwrite true to write into it anyway")
    if overwrite and is_run_dir(run):  # only lmforge's own files go: the checkpoints and what points at them
        atomic.remove_tree(run / CHECKPOINTS)
        for name in RUN_FILES - {CHECKPOINTS, TOKENIZER}:  # the tokenizer is written again right after
            if (run / name).is_symlink() or (run / name).is_file():
                (run / name).unlink()
            elif (run / name).is_dir():  # the loggers' folders and the report's plots: a new run has its own
                atomic.remove_tree(run / name)


def resume_configs(out: str | Path, model_overrides: dict, train_overrides: dict,
                   preset: str | None = None) -> tuple[str, ModelConfig, TrainConfig]:
    """The data directory, model config and train config to resume ``out`` with: the run's own
    stored settings, with only what the user gave explicitly changed."""
    from .config import restored, unreadable_settings

    stored = read_run_config(out)
    base_model = ModelConfig.from_preset(preset).to_dict() if preset else stored["model"]
    with unreadable_settings(out):
        model = ModelConfig.from_dict({**base_model, **model_overrides})
    return stored.get("data_path") or "", model, restored(TrainConfig, stored.get("train", {}), train_overrides, out)


def pretrain(data_dir: str | Path, out: str | Path, model_config: ModelConfig, train: TrainConfig = TrainConfig(),
             resume: bool = False, sample: SampleConfig = SampleConfig(max_new_tokens=40, seed=1337),
             prompts: tuple[str, ...] = DEFAULT_PROMPTS, device: str | None = None, progress: bool = True,
             allow_changes: bool = False, overwrite: bool = False) -> dict:
    """Pretrain a GPT on prepared shards; returns a summary with the final losses.

    With ``resume``, training continues from the newest complete checkpoint in ``out``; see
    ``train.fit`` for what may change on resume.

    Under torchrun (``lmforge pretrain --devices N``), every rank runs this: each trains on its rows
    of every batch (``train.batch_size`` is the global batch), rank 0 alone prints and writes.
    """
    from .outputs import run_lock

    ranks = distributed.init(train.dist_timeout, device)
    try:
        with run_lock(out, active=distributed.writer()):  # held from before --overwrite clears anything to the end
            return _pretrain(data_dir, out, model_config, train, resume, sample, prompts, device, progress,
                             allow_changes, overwrite, ranks)
    finally:
        distributed.close()


def _pretrain(data_dir: str | Path, out: str | Path, model_config: ModelConfig, train: TrainConfig, resume: bool,
              sample: SampleConfig, prompts: tuple[str, ...], device: str | None, progress: bool, allow_changes: bool,
              overwrite: bool, ranks: distributed.Group) -> dict:
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
    from .logger import check_loggers

    check_loggers(train.tensorboard, train.wandb)  # before --overwrite clears anything
    distributed.check_batch(train, ranks)
    dev = distributed.device_of(ranks) if ranks.active else torch.device(device) if device else default_device()
    distributed.on_main(lambda: _prepare_run_dir(run, Path(data_dir), resume, overwrite), dev)
    torch.manual_seed(train.seed)  # the same initial weights on every rank
    model = distributed.build(lambda: GPT(model_config), train.strategy, dev)  # under FSDP2: values on rank 0 only
    train_tokens, val_tokens = shards.tokens("train"), shards.tokens("val")
    ctx = model_config.context_length
    if train.stride:
        windows = SlidingWindows(train_tokens, ctx, train.stride, train.batch_size, train.seed, rank=ranks.rank,
                                 world_size=ranks.world_size)  # this rank's rows of every global batch
        batches = windows.batch
        epochs = train.max_steps * train.grad_accum / len(windows)
        print(f"{len(windows)} batches per epoch; {train.max_steps} steps = {epochs:.1f} epochs")
    else:
        batches = RandomWindows(train_tokens, ctx, train.batch_size, train.seed, rank=ranks.rank,
                                world_size=ranks.world_size).batch
    print(f"model: {model.num_params() / 1e6:.2f} M parameters ({model_config.n_layer} layers, width "
          f"{model_config.d_model}, context {ctx}, vocab {model_config.vocab_size}); precision "
          f"{str(resolve_dtype(train.dtype, dev)).removeprefix('torch.')}; device {dev}")
    print(f"data: {len(train_tokens):,} train tokens, {len(val_tokens):,} validation tokens")
    if ranks.active:
        print(f"ranks: {ranks.world_size} ({train.strategy}), {train.batch_size // ranks.world_size} sequences each "
              "per micro-batch")

    def start_run() -> None:
        run.mkdir(parents=True, exist_ok=True)
        if not resume:
            tokenizer.save(run / TOKENIZER)

    distributed.on_main(start_run, dev)

    def evaluate(m: GPT, dtype: torch.dtype) -> dict:
        return evaluate_tokens(m, val_tokens, train.batch_size, train.eval_batches, dtype)

    has_val = len(val_tokens) >= 2
    # What the data is, so that resuming on other data is caught; where it is, so resume can find it.
    data_identity = {"data": shards.identity, "data_path": str(Path(data_dir).resolve())}
    result = fit(model, batches, next_token_loss, train, run, evaluate=evaluate if has_val else None,
                 sample=_sampler(tokenizer, prompts, sample) if prompts else None, resume=resume, progress=progress,
                 extra_config=data_identity, allow_changes=allow_changes)
    plot = plot_losses(run / METRICS_FILE, run / "loss.png") if ranks.main else None
    summary = {"run": str(run), "steps": result.step, "train_loss": result.last_loss, "tokens": result.tokens,
               "seconds": result.seconds, "plot": str(plot) if plot else None, "stopped_early": result.stopped_early}
    if result.stopped_early:
        print(f"resume with: lmforge pretrain --out {run} --resume true")
    if has_val:
        summary.update({f"val_{k}": v for k, v in evaluate(model, resolve_dtype(train.dtype, dev)).items()})
    return summary


def _check_eval_args(batch_size: int = 1, max_batches: int = 1, context: int | None = None,
                     dtype: str = "float32") -> None:
    # Checked before a model is loaded: a bad flag should cost nothing.
    problems = [f"--{name} must be an integer >= 1, got {value!r}"
                for name, value in (("batch_size", batch_size), ("max_batches", max_batches))
                if not isinstance(value, int) or value < 1]
    if context is not None and context < 1:
        problems.append(f"--context must be >= 1, got {context}")
    if dtype not in EVAL_DTYPES:
        problems.append(f"--dtype must be one of {', '.join(EVAL_DTYPES)}, got {dtype!r}")
    if problems:
        raise LmforgeError("; ".join(problems))


def evaluate_run(run_dir: str | Path, data_dir: str | Path, split: str = "val", batch_size: int = 8,
                 max_batches: int = 50, context: int | None = None, dtype: str = "float32") -> dict:
    _check_eval_args(batch_size, max_batches, context, dtype)
    if split not in ("train", "val"):
        raise LmforgeError(f"--split must be 'train' or 'val', got {split!r}")
    shards = ShardSet.open(data_dir)
    model, tokenizer = load_language_model(str(run_dir), default_device())
    if not shards.made_with(tokenizer):
        raise LmforgeError(f"{data_dir} was tokenized with a different tokenizer than {run_dir}; "
                           "prepare the data with the run's tokenizer.json")
    if context is not None and context > model.config.context_length:
        raise LmforgeError(f"context {context} is longer than the model's context length "
                           f"({model.config.context_length}); use --context {model.config.context_length} or less")
    tokens = shards.tokens(split)
    if len(tokens) < 2:
        other = "train" if split == "val" else "val"
        raise LmforgeError(f"the {split} split of {data_dir} is empty; evaluate the other one (--split {other})"
                           + (", or prepare the data again with --text.val_fraction above 0" if split == "val" else ""))
    res = evaluate_tokens(model, tokens, batch_size, max_batches, resolve_dtype(dtype, default_device()), context)
    return {"split": split, **res}


def _compare_with_pretrained(run: Path, paths: list[str], name: str = "smollm2-135m-instruct",
                             chars: int = 20_000) -> dict:
    """Stage 5 of the default run: our small model next to a real pretrained one, on the same
    held-out text, in bits per byte (their tokenizers differ, so per-token losses do not compare)."""
    from .hub import HubError

    print(f"== 5/6 what pretraining at scale buys: {name} next to the model trained here")
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
                    f"sample: {_as_text(prompt + sample)[:90]}")
    print(f"held-out text: {len(text.encode()):,} bytes of the validation documents")
    print("\n".join(rows))
    return out


FOUR_WAYS = "four-ways"


SMS_SPAM_BALANCED = 1284  # texts of the SMS Spam Collection once balanced (every spam text, as many ham ones)


def _four_ways(out: Path, limit: int, name: str = "smollm2-135m-instruct") -> dict:
    """Stage 6 of the default run: the pretrained model adapted to a task four ways (zero-shot,
    few-shot, a classifier head, instruction tuning), on a subsample of SMS spam that fits the run's budget."""
    from .four_ways import four_ways
    from .hub import HubError

    print(f"== 6/6 four ways to solve a task: {name} on SMS spam (ham or spam), {limit} of the {SMS_SPAM_BALANCED:,} balanced "
          "texts (a subsample, to fit this run's budget; benchmarks/finetune_quality.py runs all of them)")
    try:
        res = four_ways(name, "sms-spam", out / FOUR_WAYS, limit=limit, shots=4, epochs=1.0, trainable="lora",
                        progress=False, overwrite=True)
    except (HubError, LmforgeError) as e:
        print(f"skipped: {e}")
        return {}
    width = max(len(w) for w in res["ways"])
    for way, r in res["ways"].items():
        print(f"  {way:<{width}}  test accuracy {r['accuracy']:.3f}  ({r['n']} texts, {r['minutes']:.1f} min)")
    _ask(out / FOUR_WAYS / "instruction", res["labels"], res["ways"]["instruction fine-tuning"]["accuracy"])
    return res["ways"]


CHAT_QUESTION = "Congratulations! You have won a free holiday. Text WIN to 80082 now to claim your prize."
CHAT_ANSWER = "spam"  # what a person would answer


def _ask(run: Path, labels: list[str], accuracy: float | None = None) -> None:
    """The instruction-tuned run answers one chat message, streamed, and the command that serves it."""
    from .chat import Assistant, Conversation
    from .four_ways import INSTRUCTION

    # Written as the Alpaca records it was tuned on were: the instruction, then the text as its input.
    question = f"{INSTRUCTION.format(labels=', '.join(labels))}\n\n### Input:\n{CHAT_QUESTION}"
    print(f"the instruction-tuned model, asked in a chat: {question!r}\n  answer: ", end="", flush=True)
    conv = Conversation(Assistant.load(str(run), default_device()), SampleConfig(max_new_tokens=16, temperature=0))
    for delta in conv.reply(question):
        print(delta, end="", flush=True)
    known = f"; this model labels {accuracy:.0%} of its test texts right" if accuracy is not None else ""
    print(f"\n  (a person would answer {CHAT_ANSWER!r}{known})")
    print(f"  chat with it: lmforge chat {run}   serve it (OpenAI API and a chat page): lmforge serve {run}")


def evaluate_text(model_spec: str, paths: list[str], dtype: str = "float32") -> dict:
    """Bits per byte of any model on text files (comparable across tokenizers)."""
    _check_eval_args(dtype=dtype)
    text = read_text_files(paths)
    model, tokenizer = load_language_model(model_spec, default_device())
    return bits_per_byte(model, tokenizer, text, dtype=resolve_dtype(dtype, default_device()))


def export(model_spec: str, to: str, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write a model as a Hugging Face folder or a GGUF file (``dtype``: the GGUF matrix type, default f16).

    The output is checked first (see ``outputs.check_output``): never one of the inputs,
    never a run directory, never an unrelated existing file or folder unless ``overwrite``."""
    from .config import GGUF_EXPORT_TYPES

    if to not in ("hf", "gguf"):
        raise LmforgeError(f"--to must be 'hf' or 'gguf', got {to!r}")
    if to == "hf" and dtype is not None:
        raise LmforgeError("--dtype sets the matrix type of a GGUF file; a Hugging Face export is always float32 "
                           "(drop --dtype, or use --to gguf)")
    dtype = dtype or "f16"
    if dtype not in GGUF_EXPORT_TYPES:
        raise LmforgeError(f"--dtype must be one of {', '.join(GGUF_EXPORT_TYPES)}, got {dtype!r}")
    if to == "hf":
        from .convert import HF_EXPORT_FILES, export_hf, is_hf_export

        check_output(out, kind="folder", what="a Hugging Face folder written by `lmforge export`",
                     own_kind=is_hf_export, inputs=[model_spec], writes=HF_EXPORT_FILES, overwrite=overwrite)
        model, tokenizer = _exported(model_spec)
        return export_hf(model, out, tokenizer)
    from .gguf_io import export_gguf, is_gguf_export

    check_output(out, kind="file", what="a GGUF file written by `lmforge export`", own_kind=is_gguf_export,
                 inputs=[model_spec], overwrite=overwrite, example="model.gguf")
    model, tokenizer = _exported(model_spec)
    return export_gguf(model, tokenizer, out, dtype)


def _exported(model_spec: str) -> tuple:
    """The model and tokenizer an export writes. A run instruction-tuned on Alpaca's or Phi-3's
    template exports it as its chat template (in Jinja): what `transformers`, llama.cpp and lmforge
    then prompt it with is what it was tuned on."""
    from .chat import jinja_template, tuned_template

    model, tokenizer = load_language_model(model_spec)
    template = tuned_template(model_spec)
    if template in ("alpaca", "phi3"):
        tokenizer.chat_template = jinja_template(template)
        tokenizer.eos_id = tokenizer.eot_id  # what these templates' answers end with in training (tasks.response_end)
    return model, tokenizer


def _default_run_report(out: Path, summary: dict) -> Path:
    """The pretrained model's report, with the default run's evaluations (stages 5 and 6) as its tables."""
    from .report import add_evaluations, write_report

    tables = {}
    if "bpb_ours" in summary:
        tables["bits per byte on the held-out text (lower is better)"] = [
            {"model": "trained here", "bits per byte": summary["bpb_ours"]},
            {"model": "smollm2-135m-instruct", "bits per byte": summary.get("bpb_pretrained")}]
    if summary.get("four_ways"):
        tables["four ways to solve SMS spam with SmolLM2-135M"] = [
            {"way": way, "test accuracy": r.get("accuracy"), "texts": r.get("n"), "minutes": r.get("minutes")}
            for way, r in summary["four_ways"].items()]
    if tables:
        add_evaluations(out / "model", tables)
    return write_report(out / "model")


def main_job(data: list[str] | None = None, out: str | Path = "runs/default", steps: int = 1000,
             max_minutes: float = 15.0, vocab_size: int = 4096, preset: str = "gpt-micro",
             train: TrainConfig | None = None, progress: bool = True, fourway_limit: int = 300,
             recipe: str | None = DEFAULT_RECIPE) -> dict:
    """The built-in default: raw text -> tokenizer -> shards -> a pretrained GPT, evaluated and sampled;
    then the real pretrained SmolLM2-135M solves SMS spam four ways (``fourway_limit`` texts).

    Its work is fixed (``steps`` optimiser steps of 16 x 128 tokens), so the same command gives the
    same model on every machine; ``max_minutes`` is only a guard, reported if it fires. Run again
    after an interruption, it resumes where the last checkpoint left off. ``recipe`` (config.RECIPES)
    sets the architecture options and the optimiser; None trains plain GPT-2 blocks with AdamW at
    2e-3, warm-up and cosine decay (the default run before the recipes).
    """
    t0 = time.perf_counter()
    out = Path(out)
    paths = data or ["builtin"]
    # About 5 minutes on 2 CPU cores with the modern recipe (4 without); the guard is three times that.
    fixed = dict(batch_size=16, max_steps=steps, eval_interval=200, eval_batches=10, save_interval=100,
                 max_minutes=max_minutes)

    def configs(vocab: int) -> tuple[ModelConfig, TrainConfig]:
        if recipe:
            model, recipe_train = recipe_configs(recipe, preset, vocab_size=vocab, **fixed)
        else:
            model = ModelConfig.from_preset(preset, vocab_size=vocab)
            recipe_train = TrainConfig(**fixed, warmup_steps=50, lr=2e-3, weight_decay=0.1)
        return model, train or recipe_train

    if steps < 1:  # (before the train config, whose message names flags `run` does not have)
        raise LmforgeError(f"--steps must be at least 1, got {steps}")
    _, train = configs(vocab_size)  # bad settings are refused before anything is written
    if fourway_limit != 0 and not 20 <= fourway_limit <= SMS_SPAM_BALANCED:
        raise LmforgeError(f"--fourway_limit must be 0 (leave the stage out) or 20 to {SMS_SPAM_BALANCED} texts (all the "
                           f"balanced SMS spam texts), got {fourway_limit}")
    tok_config = TokenizerConfig(vocab_size=vocab_size)
    resume = has_checkpoint(out / "model")
    if resume:
        done = read_run_config(out / "model").get("step", 0)
        if done >= train.max_steps:
            if (out / FOUR_WAYS / "four_ways.json").is_file() or not fourway_limit:
                raise LmforgeError(f"{out} already holds a finished default run; choose another --out, or use it: "
                                   f"lmforge generate {out / 'model'} --prompt 'The'")
            print(f"== the default run in {out} is pretrained; running its last stage")
            summary = {"four_ways": _four_ways(out, fourway_limit)}
            summary["report"] = str(_default_run_report(out, summary))
            print(f"report: {summary['report']} (open it in a browser)")
            return summary
        print(f"== resuming the default run in {out} from step {done} of {train.max_steps} (stages 1 and 2 are done)")
    else:
        print(f"== 1/6 tokenizer: byte-level BPE, vocabulary {vocab_size}, corpus: "
              f"{'text shipped with Python (pydoc topics + stdlib docstrings)' if paths == ['builtin'] else ', '.join(paths)}")
        train_tokenizer(paths, out / "tokenizer.json", tok_config)
        print("== 2/6 token shards")
        prepare_shards(paths, out / "tokenizer.json", out / "data")
    vocab = Tokenizer.load(out / "tokenizer.json").vocab_size  # a small corpus may give fewer tokens than asked
    model_config, train = configs(vocab)
    print(f"== 3/6 pretraining a {preset} GPT{f' ({recipe} recipe)' if recipe else ''} for {train.max_steps} steps "
          f"({train.max_steps * train.batch_size * model_config.context_length:,} tokens)")
    summary = pretrain(out / "data", out / "model", model_config, train, progress=progress, resume=resume)
    if summary["stopped_early"]:
        print(f"note: the {max_minutes:g}-minute guard fired at step {summary['steps']} of {train.max_steps}: this "
              "machine is slower than the run was sized for, so the model below is trained less than intended. "
              f"Run the same command again to finish it.")
    print("== 4/6 evaluation")
    before = next((r for r in read_metrics(out / "model" / "metrics.jsonl") if r["step"] == 0 and "val_loss" in r),
                  None)
    if before is not None:
        print(f"validation loss: untrained {before['val_loss']:.3f} (ln vocab = {math.log(vocab):.3f}, perplexity "
              f"{before['val_perplexity']:.0f}) -> trained {summary['val_loss']:.3f} (perplexity "
              f"{summary['val_perplexity']:.1f})")
        summary["untrained_val_loss"] = before["val_loss"]
    summary.update(_compare_with_pretrained(out / "model", paths))
    if fourway_limit:
        summary["four_ways"] = _four_ways(out, fourway_limit)
    summary["report"] = str(_default_run_report(out, summary))
    print(f"run directory: {out / 'model'} (weights, config, tokenizer, metrics.jsonl, loss curve {summary['plot']})")
    print(f"report: {summary['report']} (open it in a browser: curves, evaluations, samples, hardware, timings)")
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} minutes. Next: lmforge generate {out / 'model'} "
          "--prompt 'The'")
    return summary


__all__ = ["evaluate_run", "evaluate_text", "export", "main_job", "prepare_shards", "pretrain", "train_tokenizer"]
