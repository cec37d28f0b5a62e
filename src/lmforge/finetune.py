"""Fine-tuning recipes: a pretrained model (any model lmforge loads) adapted to a task with the
one training loop (``train.fit``).

    classify:  a new classes head read at each text's last token (the book's chapter 6)
    instruct:  next-token loss on prompt + response, prompt and padding masked (chapter 7)
    dpo:       preference tuning against the model's own starting point (bonus material)

What trains is chosen the same way for every task: the head only, the last blocks and the
final norm (and the head), everything, or LoRA adapters. A run directory records the task,
its base model and what trained; unless everything trains, its checkpoints hold only the
trained tensors and loading lays them over the base model.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from . import atomic, distributed, tasks
from .checkpoint import TOKENIZER, CheckpointError, load_model, load_tokenizer
from .config import FinetuneConfig, LmforgeError, LoRAConfig, SampleConfig, TrainConfig, config_dict
from .evaluate import classification_metrics
from .losses import class_logits, classification_loss, next_token_loss, preference_loss, sequence_logprobs
from .lora import apply_lora, lora_config, lora_parameter_count
from .model import GPT
from .outputs import holds_a_run, inside, run_lock, staged_folder, write_error
from .precision import autocast, resolve_dtype
from .train import fit, ready_to_train

RESULTS = "results.json"


# ---------------------------------------------------------------- what trains

def set_trainable(model: GPT, finetune: FinetuneConfig, lora: LoRAConfig, head_trains: bool) -> None:
    """Freeze the model, then unfreeze what ``finetune.trainable`` names (or add LoRA adapters).
    ``head_trains``: the output layer is new (a classes head) and always trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    mode = finetune.trainable
    if mode == "lora":
        # A new classes head trains whole; LoRA on it would only restrict it.
        targets = tuple(t for t in lora.targets if not (head_trains and t == "head"))
        if not targets:
            raise LmforgeError("--lora.targets names only the head, and a classification run trains its new head "
                               "whole; give attn and/or mlp as LoRA targets")
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, targets)
    elif mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode == "last":
        if finetune.last_blocks > len(model.h):
            raise LmforgeError(f"--finetune.last_blocks {finetune.last_blocks} is more than the model's "
                               f"{len(model.h)} blocks")
        for block in model.h[-finetune.last_blocks:]:
            block.requires_grad_(True)
        model.ln_f.requires_grad_(True)
        if model.lm_head.weight is not model.wte.weight:
            model.lm_head.requires_grad_(True)  # a head tied to the embedding stays frozen with it
    elif mode == "head" and not head_trains:
        raise LmforgeError("--finetune.trainable head trains only a new classes head; for this task choose "
                           "last, all or lora")
    if head_trains:
        model.lm_head.requires_grad_(True)


def trained_names(model: GPT) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _describe(model: GPT, finetune: FinetuneConfig) -> str:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = f" (LoRA: {lora_parameter_count(model):,} adapter parameters)" if finetune.trainable == "lora" else ""
    return (f"trainable: {finetune.trainable}, {n_train:,} of {model.num_params():,} parameters "
            f"({100 * n_train / max(model.num_params(), 1):.2f} %){extra}")


# ---------------------------------------------------------------- shared set-up

def _file_identity(path: Path) -> dict:
    return {"sha256": atomic.sha256_file(path), "bytes": path.stat().st_size}


def _base_identity(spec: str, model: GPT, tok) -> dict:
    from .checkpoint import weights_digest

    path = Path(spec)
    return {"spec": str(path.resolve()) if path.exists() else spec, "params": model.num_params(),
            "tokenizer": tok.fingerprint, "digest": weights_digest(model)}


def _shards_early(train: TrainConfig) -> bool:
    return distributed.current().active and train.strategy == "fsdp"


def _base_model(base: str, dev: torch.device, train: TrainConfig, language_model: bool = True) -> tuple:
    """(model, tokenizer, the base's identity) to fine-tune on ``dev``.

    Under FSDP2 only rank 0 reads the base, into host memory (sharding then sends each block's share
    to the device: the whole base is never on one); the other ranks get its shapes, tokenizer and
    identity from rank 0 and read nothing, and ``distributed.wrap`` fills their shards from rank 0's
    values. So a machine of 8 ranks holds one copy of the base in host memory, not 8."""
    if not _shards_early(train):
        model, tok = _load_base(base, dev, language_model)
        return model, tok, _base_identity(base, model, tok)
    held: dict = {}

    def load() -> tuple:
        model, tok = _load_base(base, torch.device("cpu"), language_model)
        held["model"] = model  # rank 0 keeps its values; what it sends is shapes
        return distributed.shapes_of(model), tok, _base_identity(base, model, tok)

    shapes, tok, identity = distributed.from_main(load)
    return held.get("model", shapes), tok, identity


def _load_base(base: str, device: torch.device, language_model: bool = True) -> tuple[GPT, object]:
    """The model to fine-tune; a fine-tuned run as base has its LoRA adapters folded in first. A
    classifier can be the base of another classifier (its head is replaced), not of a language task."""
    from .lora import merge_lora
    from .models import load_any, load_language_model

    if language_model:
        return load_language_model(base, device)
    model, tok = load_any(base, device)
    merge_lora(model)
    return model, tok


def _holding_out(task: Callable) -> Callable:
    """A fine-tuning task that holds its --out run folder (``outputs.run_lock``) from its first check
    to its last write (results after training): another lmforge process training there is refused.
    Under torchrun only rank 0 (RANK=0, the rank that writes) holds it; the process group is joined
    later, inside the task."""
    signature = inspect.signature(task)

    @functools.wraps(task)
    def held(*args, **kwargs):
        out = signature.bind(*args, **kwargs).arguments["out"]
        with run_lock(out, active=distributed.writer()):
            return task(*args, **kwargs)
    return held


def _steps(n_train: int, finetune: FinetuneConfig, train: TrainConfig) -> TrainConfig:
    per_epoch = math.ceil(n_train / train.batch_size)
    steps = max(1, math.ceil(finetune.epochs * per_epoch / train.grad_accum))
    # Fine-tuning runs are short: evaluate and save about once per epoch by default.
    every = max(1, math.ceil(per_epoch / train.grad_accum))
    return replace(train, max_steps=steps, eval_interval=min(train.eval_interval, every),
                   save_interval=min(train.save_interval, every), log_interval=min(train.log_interval, every),
                   warmup_steps=min(train.warmup_steps, steps // 10))


# Known data sets (see `lmforge download`): their columns, when a file has no header.
KNOWN_COLUMNS = {"sms-spam": ("1", "0")}


def resolve_data(spec: str | Path, kind: str = "dataset") -> Path:
    """A data file: a path, or the name of a known data set (fetched into the cache)."""
    from . import hub

    path = Path(spec)
    if path.exists() or str(spec) not in hub.REGISTRY:
        return path
    if hub.REGISTRY[str(spec)].kind != kind:
        raise LmforgeError(f"{spec!r} is a model, not a data set")
    return hub.fetch(str(spec))


def _start(run: Path, data: Path, base: str, resume: bool, overwrite: bool, train: TrainConfig,
           device: str | None) -> torch.device:
    """Checks of the outputs, before anything is read; returns the device to train on (under torchrun:
    this rank's, after joining the job)."""
    from .pipeline import _prepare_run_dir

    ranks = distributed.init(train.dist_timeout, device)
    distributed.check_batch(train, ranks)

    if resume and overwrite:
        raise LmforgeError("--resume continues the run in --out and --overwrite starts it over; give one of them")
    if not data.is_file():
        raise LmforgeError(f"no data file at {data}")
    if Path(base).exists() and (inside(run.resolve(), Path(base).resolve()) or inside(Path(base).resolve(),
                                                                                 run.resolve())):
        raise LmforgeError(f"--out {run} and --base {base} overlap; a fine-tuning run needs a folder of its own")
    # Checks only: with --overwrite the old run is cleared later (_begin), once the data, labels and
    # base have all been read without error, so a mistyped flag never costs the old run.
    _prepare_run_dir(run, data, resume or overwrite, False)
    if ranks.active:
        return distributed.device_of(ranks)
    return torch.device(device) if device else torch.device("cpu")


def _begin(run: Path, data: Path, tok, resume: bool, overwrite: bool, train: TrainConfig, model: GPT,
           before: dict | None = None) -> None:
    """Clear an old run (--overwrite) and write the tokenizer and the untuned model's scores
    (``before``): the first writes of a new fine-tuning run. What ``fit`` would refuse before training
    (the loggers, the optimizer for what trains) is checked first, so that a refused run never costs
    the old one; a resumed run writes nothing here (a refused resume must not either)."""
    from .logger import check_loggers
    from .optim import make_optimizer
    from .pipeline import _prepare_run_dir

    check_loggers(train.tensorboard, train.wandb)
    make_optimizer(model, train)  # e.g. Muon with no trainable block matrix: refused here, not after the clearing
    if resume:
        return

    def clear_and_start() -> None:  # rank 0 alone writes
        if overwrite:  # clears the old run's files (its reports are run files too), nothing else
            _prepare_run_dir(run, data, False, True)
        run.mkdir(parents=True, exist_ok=True)
        tok.save(run / TOKENIZER)
        if before is not None:
            atomic.write_json(run / BEFORE, before)

    distributed.on_main(clear_and_start)


BEFORE = "before.json"


def _keep_before(run: Path, before: dict) -> None:
    """The untuned model's scores, kept so that a resumed run still reports before and after: written
    after training when the run lacks them (one resumed from before they were written)."""
    if distributed.current().main and _read_before(run) is None:
        atomic.write_json(run / BEFORE, before)


def _read_before(run: Path) -> dict | None:
    try:
        before = json.loads((run / BEFORE).read_text())
    except (OSError, ValueError):
        return None
    return before if isinstance(before, dict) else None


def _save_results(run: Path, results: dict) -> Path:
    if distributed.current().main:
        atomic.write_json(run / RESULTS, results)
    return run / RESULTS


# ---------------------------------------------------------------- classification

@torch.no_grad()
def predict_classes(model: GPT, ids: list[list[int]], pad_id: int, batch_size: int = 16,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, classes) probabilities for encoded texts."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for chunk in tasks.in_batches(len(ids), batch_size):
        x, lengths, _ = tasks.collate_classification([ids[i] for i in chunk], [0] * len(chunk), pad_id)
        with autocast(device, dtype):
            logits = class_logits(model, x.to(device), lengths.to(device))
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


@_holding_out
def finetune_classify(base: str, data: str | Path, out: str | Path, finetune: FinetuneConfig = FinetuneConfig(),
                      train: TrainConfig = TrainConfig(lr=5e-5, warmup_steps=0), lora: LoRAConfig = LoRAConfig(),
                      text_column: str = "text", label_column: str = "label", balance: bool = False,
                      pad_to: int | None = None, resume: bool = False, overwrite: bool = False,
                      allow_changes: bool = False,
                      progress: bool = True, device: str | None = None) -> dict:
    """Fine-tune ``base`` to classify the texts of ``data`` (a file, or a known data set's name);
    returns the metrics of every split."""
    if (text_column, label_column) == ("text", "label") and str(data) in KNOWN_COLUMNS:
        text_column, label_column = KNOWN_COLUMNS[str(data)]
    run, data = Path(out), resolve_data(data)
    dev = _start(run, data, base, resume, overwrite, train, device)
    rows = tasks.read_labelled(data, text_column, label_column)
    if balance:
        rows = tasks.balance(rows, finetune.seed)
    rows = tasks.subsample(rows, finetune.limit, finetune.seed)
    train_rows, val_rows, test_rows = tasks.split(rows, finetune.split, finetune.seed)
    labels = sorted({label for _, label in train_rows})
    if not labels:
        raise LmforgeError(f"the training split of {data} is empty ({len(rows)} records split {finetune.split[0]:g} / "
                           f"{finetune.split[1]:g} / {finetune.split[2]:g}); give more records or a larger training "
                           "fraction (--finetune.split)")
    if len(labels) < 2:
        raise LmforgeError(f"the training split of {data} has only the label {labels[0]!r}; a classifier needs "
                           "at least two classes")
    model, tok, identity = _base_model(base, dev, train, language_model=False)
    ctx = model.config.context_length
    max_len = min(finetune.max_length or ctx, ctx)
    if pad_to is not None and not 1 <= pad_to <= ctx:
        raise LmforgeError(f"--pad_to must be between 1 and the model's context ({ctx}), got {pad_to}")
    sets = {name: tasks.encode_labelled(r, tok, labels, max_len)
            for name, r in (("train", train_rows), ("val", val_rows), ("test", test_rows))}
    truncated = sum(s.truncated for s in sets.values())
    print(f"data: {len(rows)} texts, {len(labels)} classes ({', '.join(labels)}); train {len(train_rows)}, "
          f"val {len(val_rows)}, test {len(test_rows)}" + (f"; {truncated} texts cut to {max_len} tokens"
                                                            if truncated else ""))
    torch.manual_seed(train.seed)
    model.replace_head(len(labels))
    set_trainable(model, finetune, lora, head_trains=True)
    print(_describe(model, finetune))
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    tr = sets["train"]
    batches = distributed.rank_rows(tasks.EpochBatches(
        len(tr.ids), train.batch_size, train.seed, lambda idx: tasks.collate_classification(
            [tr.ids[i] for i in idx], [tr.labels[i] for i in idx], pad_id, pad_to)))
    train = _steps(len(tr.ids), finetune, train)

    def evaluate(m: GPT, dtype: torch.dtype) -> dict:
        s = sets["val"]
        if not s.ids:
            return {}
        probs = predict_classes(m, s.ids, pad_id, train.batch_size, dtype)
        y = torch.tensor(s.labels)
        loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y).item()
        return {"loss": loss, "accuracy": (probs.argmax(-1) == y).float().mean().item()}

    extra = {"base": identity, "head": {"labels": labels}, "lora": lora_config(model),
             "trained": trained_names(model), "weights": "full" if finetune.trainable == "all" else "trained",
             "finetune": config_dict(finetune), "data": _file_identity(data), "data_path": str(data.resolve()),
             "columns": {"text": text_column, "label": label_column}, "balance": balance, "pad_to": pad_to}
    _begin(run, data, tok, resume, overwrite, train, model)
    result = fit(model, batches, classification_loss, train, run, evaluate=evaluate, resume=resume,
                 extra_config=extra, progress=progress, task="classify",
                 allow_changes=allow_changes, finished_ok=True)
    dtype = resolve_dtype(train.dtype, dev)
    results = {"task": "classify", "steps": result.step, "seconds": result.seconds, "truncated": truncated}
    for name in ("train", "val", "test"):
        s = sets[name]
        if s.ids:
            probs = predict_classes(model, s.ids, pad_id, train.batch_size, dtype)
            results[name] = classification_metrics(probs.argmax(-1).tolist(), s.labels, labels)
    _save_results(run, results)
    if "test" in results and distributed.current().main:
        from .report import plot_confusion

        plot_confusion(results["test"]["confusion"], labels, run / "confusion.png")
    return results


def classify_texts(run: str | Path, texts: list[str], device: str = "cpu") -> list[tuple[str, float, dict]]:
    """(label, its probability, every label's probability) for each text, by a classification run."""
    model, cfg = load_model(run, device)
    if cfg.get("task") != "classify" or not cfg.get("head"):
        raise LmforgeError(f"{run} is not a classification run (its task is {cfg.get('task', 'pretrain')!r}); "
                           "give a run of `lmforge finetune classify`")
    return label_texts(model, load_tokenizer(run), cfg["head"]["labels"], texts)


def label_texts(model: GPT, tok, labels: list[str], texts: list[str]) -> list[tuple[str, float, dict]]:
    """(label, its probability, every label's probability) for each text, by a loaded classifier."""
    ctx = model.config.context_length
    ids = []
    for t in texts:
        if not t.strip():
            raise LmforgeError("an empty text cannot be classified; give some text")
        ids.append(tasks.plain_ids(tok, t)[:ctx])
    probs = predict_classes(model, ids, tok.eos_id or 0)
    out = []
    for row in probs.tolist():
        best = max(range(len(labels)), key=lambda i: row[i])
        out.append((labels[best], row[best], dict(zip(labels, row))))
    return out


# ---------------------------------------------------------------- instruction following

def _language_task(base: str, data: str | Path, out: str | Path, finetune: FinetuneConfig, lora: LoRAConfig,
                   template: str, resume: bool, overwrite: bool, device: str | None, train: TrainConfig) -> tuple:
    """What instruction and preference tuning start alike with: the checked template and paths, the
    record splits, the device, and the base model with what trains chosen (and, under FSDP2, sharded):
    (run, data, device, model, tokenizer, the base's identity, how to name a record, splits)."""
    tasks.check_template(template)
    run, data = Path(out), resolve_data(data)
    dev = _start(run, data, base, resume, overwrite, train, device)
    in_file = tasks.read_records(data)
    records = tasks.subsample(in_file, finetune.limit, finetune.seed)
    splits = tasks.split(records, finetune.split, finetune.seed)
    name = tasks.record_names(in_file, str(data))  # errors name a record by its place in the file
    model, tok, identity = _base_model(base, dev, train)
    if template == "chat" and not tok.chat_template:
        raise LmforgeError(f"{base} has no chat template; use --template alpaca or phi3")
    torch.manual_seed(train.seed)
    # What trains is chosen before the untuned model is scored: LoRA adapters start at zero, so the
    # scores are the base's either way, and under FSDP2 the model can be sharded first.
    set_trainable(model, finetune, lora, head_trains=False)
    print(_describe(model, finetune))
    if _shards_early(train):
        ready_to_train(model, train)
    return run, data, dev, model, tok, identity, name, splits


def _template_for(base: str, template: str | None) -> str:
    """The template asked for; by default the one the base was tuned on (a DPO run over an instruction
    run tuned on Phi-3's template goes on in it), else the book's Alpaca."""
    from .chat import tuned_template

    return template if template is not None else (tuned_template(base) or "alpaca")


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin, 2004): the longest common subsequence of the two texts' words, as
    precision and recall, combined. Words as Google's rouge-score package makes them by default:
    lower-cased runs of letters and digits (punctuation separates words and is not one)."""
    a, b = _rouge_words(candidate), _rouge_words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def _rouge_words(text: str) -> list[str]:
    import re

    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


@torch.no_grad()
def respond(model: GPT, tok, records: list[dict], template: str, max_new_tokens: int = 128,
            batch_size: int = 8) -> list[str]:
    """Greedy responses to instruction records, with the template the model was tuned on,
    ``batch_size`` records decoded together (each gets what it would get alone)."""
    from .generate import Decoder

    model.eval()
    ctx = model.config.context_length
    end = tasks.response_end(template, tok)  # what ends a response in the training data
    prompts, configs = [], []
    for i, rec in enumerate(records):
        instruction, input_text, _ = tasks.instruction_of(rec, f"record {i}")
        prompt = tasks.prompt_ids(tok, instruction, input_text, template, f"record {i}")
        prompts.append(prompt[-(ctx - 1):])
        configs.append(SampleConfig(max_new_tokens=min(max_new_tokens, ctx - len(prompts[-1])), temperature=0.0,
                                    top_k=None, seed=0))
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        answers: list[list[int]] = [[] for _ in rows]
        for step in Decoder(model, rows, configs[start:start + batch_size], end):
            for row, token in enumerate(step):
                if token is not None and not token.stop:
                    answers[row].append(token.id)
        out += [tok.decode(ids).strip() for ids in answers]
    return out


def _lm_eval(model: GPT, batches: list, dtype: torch.dtype) -> dict:
    from .evaluate import evaluate_loss

    res = evaluate_loss(model, batches, dtype)
    return {"loss": res["loss"], "perplexity": res["perplexity"]} if res["tokens"] else {}


@_holding_out
def finetune_instruct(base: str, data: str | Path, out: str | Path, finetune: FinetuneConfig = FinetuneConfig(
        trainable="all", epochs=2.0, split=(0.85, 0.05, 0.10)), train: TrainConfig = TrainConfig(
        lr=5e-5, warmup_steps=0, batch_size=8), lora: LoRAConfig = LoRAConfig(), template: str | None = None,
        mask_prompt: bool = False, respond_test: int | None = None, max_new_tokens: int = 128,
        resume: bool = False, overwrite: bool = False, allow_changes: bool = False, progress: bool = True,
        device: str | None = None) -> dict:
    """Instruction-tune ``base`` on Alpaca / chat records; returns validation loss and test ROUGE-L,
    before and after, and writes the test responses to ``responses.json``."""
    if respond_test is not None and respond_test < 0:
        raise LmforgeError(f"--respond_test must be >= 0 (test records to answer), got {respond_test}")
    template = _template_for(base, template)
    run, data, dev, model, tok, identity, name, (train_recs, val_recs, test_recs) = _language_task(
        base, data, out, finetune, lora, template, resume, overwrite, device, train)
    ctx = model.config.context_length
    max_len = min(finetune.max_length or ctx, ctx)
    sets = {split: tasks.encode_instructions(r, tok, template, max_len, str(data), name)
            for split, r in (("train", train_recs), ("val", val_recs))}
    truncated = sum(s.truncated for s in sets.values())
    dropped = sum(s.dropped for s in sets.values())
    print(f"data: train {len(train_recs)}, val {len(val_recs)}, test {len(test_recs)} records; template {template}"
          + (f"; {truncated} records cut to {max_len} tokens" if truncated else "")
          + (f"; {dropped} records left out (the prompt alone fills {max_len} tokens)" if dropped else ""))
    pad_id = tok.eot_id if tok.eot_id is not None else (tok.eos_id or 0)

    def collate(s: tasks.InstructionSet, idx: list[int]):
        return tasks.collate_instructions([s.ids[i] for i in idx], pad_id,
                                          [s.prompt_lengths[i] for i in idx] if mask_prompt else None, max_len)

    val_batches = [collate(sets["val"], idx) for idx in tasks.in_batches(len(sets["val"].ids), train.batch_size)]
    dtype = resolve_dtype(train.dtype, dev)
    tests = test_recs[:respond_test] if respond_test is not None else test_recs
    for i, rec in enumerate(tests):  # what the template cannot encode is refused now, not after training
        instruction, input_text, _ = tasks.instruction_of(rec, name(i, rec))
        tasks.prompt_ids(tok, instruction, input_text, template, name(i, rec))
    results: dict = {"task": "instruct", "template": template, "truncated": truncated, "dropped": dropped}
    before = _read_before(run) if resume else None
    before_answers: list[str] = []  # the untuned model's answers, shown beside the tuned ones (not kept on resume)
    if before is None:
        before = {"val": _lm_eval(model, val_batches, dtype)}
        refs = [tasks.instruction_of(r, "test")[2] or "" for r in tests]
        if tests:
            answers = before_answers = respond(model, tok, tests, template, max_new_tokens)
            before["rouge_l"] = sum(map(rouge_l, answers, refs)) / len(tests)
    results["before"] = before
    tr = sets["train"]
    batches = distributed.rank_rows(tasks.EpochBatches(len(tr.ids), train.batch_size, train.seed,
                                                       lambda idx: collate(tr, idx)))
    train = _steps(len(tr.ids), finetune, train)
    extra = {"base": identity, "lora": lora_config(model), "trained": trained_names(model),
             "weights": "full" if finetune.trainable == "all" else "trained", "finetune": config_dict(finetune),
             "template": template, "mask_prompt": mask_prompt, "data": _file_identity(data),
             "data_path": str(data.resolve()), "respond_test": respond_test, "max_new_tokens": max_new_tokens}
    _begin(run, data, tok, resume, overwrite, train, model, results["before"])
    result = fit(model, batches, next_token_loss, train, run, evaluate=lambda m, d: _lm_eval(m, val_batches, d),
                 resume=resume, extra_config=extra, progress=progress, task="instruct",
                 allow_changes=allow_changes, finished_ok=True,
                 resumable=frozenset({"respond_test", "max_new_tokens"}))  # what it answers after training
    _keep_before(run, results["before"])
    results.update(steps=result.step, seconds=result.seconds)
    results["after"] = {"val": _lm_eval(model, val_batches, dtype)}
    if tests:
        answers = respond(model, tok, tests, template, max_new_tokens)
        refs = [tasks.instruction_of(r, "test")[2] or "" for r in tests]
        results["after"]["rouge_l"] = sum(map(rouge_l, answers, refs)) / len(tests)
        records = [{**r, "model_response": a} for r, a in zip(tests, answers)]
        for record, answer in zip(records, before_answers):
            record["response_before"] = answer
        if distributed.current().main:
            atomic.write_text(run / "responses.json", json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    _save_results(run, results)
    return results


# ---------------------------------------------------------------- preference tuning (DPO)

@torch.no_grad()
def _reference_logprobs(model: GPT, pairs: tasks.PreferenceSet, pad_id: int, batch_size: int,
                        dtype: torch.dtype, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref of every chosen and rejected answer, computed once with the starting model
    (the reference never changes, so it need not be kept or run again)."""
    model.eval()
    device = next(model.parameters()).device
    out = {"chosen": [], "rejected": []}
    for idx in tasks.in_batches(len(pairs.chosen), batch_size):
        for key in out:
            x, y = tasks.collate_instructions([getattr(pairs, key)[i] for i in idx], pad_id,
                                              [pairs.prompt_lengths[i] for i in idx], max_length)
            with autocast(device, dtype):
                out[key].append(sequence_logprobs(model, x.to(device), y.to(device)).float().cpu())
    if not out["chosen"]:  # an empty split (a validation fraction of a few records)
        return torch.empty(0), torch.empty(0)
    return torch.cat(out["chosen"]), torch.cat(out["rejected"])


@_holding_out
def finetune_dpo(base: str, data: str | Path, out: str | Path, finetune: FinetuneConfig = FinetuneConfig(
        trainable="all", epochs=1.0, split=(0.85, 0.05, 0.10)), train: TrainConfig = TrainConfig(
        lr=5e-6, warmup_steps=0, batch_size=8, weight_decay=0.01), lora: LoRAConfig = LoRAConfig(),
        template: str | None = None, beta: float = 0.1, resume: bool = False, overwrite: bool = False,
        allow_changes: bool = False, progress: bool = True, device: str | None = None) -> dict:
    """Preference-tune ``base`` with DPO on prompt / chosen / rejected records; returns the
    validation loss, rewards and reward margin before and after."""
    if beta <= 0:
        raise LmforgeError(f"--beta must be > 0, got {beta}")
    template = _template_for(base, template)
    run, data, dev, model, tok, identity, name, (train_recs, val_recs, _) = _language_task(
        base, data, out, finetune, lora, template, resume, overwrite, device, train)
    ctx = model.config.context_length
    max_len = min(finetune.max_length or ctx, ctx)
    sets = {split: tasks.encode_preferences(r, tok, template, max_len, str(data), name)
            for split, r in (("train", train_recs), ("val", val_recs))}
    pad_id = tok.eot_id if tok.eot_id is not None else (tok.eos_id or 0)
    dtype = resolve_dtype(train.dtype, dev)
    # With LoRA the adapters start at zero, so the starting model is the base either way.
    refs = {name: _reference_logprobs(model, s, pad_id, train.batch_size, dtype, max_len) for name, s in sets.items()}
    truncated = sum(s.truncated for s in sets.values())
    dropped = sum(s.dropped for s in sets.values())
    print(f"data: train {len(train_recs)}, val {len(val_recs)} preference pairs; template {template}, beta {beta}"
          + (f"; {truncated} answers cut to {max_len} tokens" if truncated else "")
          + (f"; {dropped} pairs left out (the prompt alone fills {max_len} tokens)" if dropped else ""))
    loss_fn = preference_loss(beta)

    def collate(name: str, idx: list[int]):
        s, (rc, rr) = sets[name], refs[name]
        lengths = [s.prompt_lengths[i] for i in idx]
        cx, cy = tasks.collate_instructions([s.chosen[i] for i in idx], pad_id, lengths, max_len)
        rx, ry = tasks.collate_instructions([s.rejected[i] for i in idx], pad_id, lengths, max_len)
        return cx, cy, rx, ry, rc[idx], rr[idx]

    @torch.no_grad()
    def evaluate(m: GPT, dt: torch.dtype) -> dict:
        n = len(sets["val"].chosen)
        if not n:
            return {}
        was = m.training
        m.eval()
        totals: dict[str, float] = {}
        device = next(m.parameters()).device
        for idx in tasks.in_batches(n, train.batch_size):
            batch = [t.to(device) for t in collate("val", idx)]
            with autocast(device, dt):
                loss, metrics = loss_fn(m, batch)
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(idx)
        m.train(was)
        return {k: v / n for k, v in totals.items()}

    results: dict = {"task": "dpo", "beta": beta, "truncated": truncated, "dropped": dropped}
    results["before"] = (_read_before(run) if resume else None) or evaluate(model, dtype)
    batches = distributed.rank_rows(tasks.EpochBatches(len(sets["train"].chosen), train.batch_size, train.seed,
                                                       lambda idx: collate("train", idx)))
    train = _steps(len(sets["train"].chosen), finetune, train)
    extra = {"base": identity, "lora": lora_config(model), "trained": trained_names(model),
             "weights": "full" if finetune.trainable == "all" else "trained", "finetune": config_dict(finetune),
             "template": template, "beta": beta, "data": _file_identity(data), "data_path": str(data.resolve())}
    _begin(run, data, tok, resume, overwrite, train, model, results["before"])
    result = fit(model, batches, loss_fn, train, run, evaluate=evaluate, resume=resume, extra_config=extra,
                 progress=progress, task="dpo",
                 allow_changes=allow_changes, finished_ok=True)
    _keep_before(run, results["before"])
    results.update(steps=result.step, seconds=result.seconds, after=evaluate(model, dtype))
    _save_results(run, results)
    return results


def merge_run(run: str | Path, out: str | Path) -> Path:
    """A LoRA run's adapters folded into its base: a run directory of full weights at ``out``."""
    from .checkpoint import save_model
    from .lora import merge_lora

    run, out = Path(run), Path(out)
    if inside(out.resolve(), run.resolve()) or inside(run.resolve(), out.resolve()):  # before the loading
        raise LmforgeError(f"--out {out} and the run {run} overlap; write the merged model to a folder of its own")
    model, cfg = load_model(run)
    if not cfg.get("lora"):
        raise LmforgeError(f"{run} has no LoRA adapters to merge")
    base = Path(str((cfg.get("base") or {}).get("spec", "")))
    if base.is_absolute() and base.is_dir() and inside(out.resolve(), base):
        raise LmforgeError(f"--out {out} is inside {base}, the base model this run reads; write the merged model "
                           "to a folder of its own")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"--out {out} already exists; choose a new folder")
    if any(holds_a_run(p) for p in Path(os.path.abspath(out)).parents):  # ("../merged" from inside a run: fine)
        raise LmforgeError(f"--out {out} is inside a training run directory, which only training writes; write the "
                           "merged model to a folder of its own")
    tok = load_tokenizer(run)  # all that is read is read before anything is written
    merge_lora(model)
    keep = {k: v for k, v in cfg.items() if k not in ("lora", "trained", "weights", "checkpoint", "step", "model",
                                                         "format", "version")}
    # Written beside --out and moved in whole: a failure or Ctrl-C midway leaves no --out to refuse a second try
    try:
        with staged_folder(out) as stage:
            save_model(stage, model, int(cfg.get("step", 0)), {**keep, "merged_from": str(run.resolve())})
            tok.save(stage / TOKENIZER)
    except CheckpointError as e:  # (its words are a training run's: "resume with --resume true")
        if getattr(e, "os_error", None) is None:
            raise
        raise write_error(out, e.os_error) from None
    return out


__all__ = ["RESULTS", "classify_texts", "finetune_classify", "finetune_dpo", "finetune_instruct", "merge_run",
           "predict_classes", "respond", "rouge_l", "set_trainable", "trained_names"]
