"""Multiple choice by log-likelihood, scored the way lm-evaluation-harness scores it.

An item is a context, a few choices and the index of the right one. Each choice follows the
context after one space (the harness's ``target_delimiter``); its score is the summed
log-probability of its tokens given the context. The prediction is the best score (``acc``),
or the best score per character of the choice (``acc_norm``, which takes away the advantage
of short choices). A k-shot prompt puts k solved items, drawn with a seed, before the context.

Readers (``read_task``): HellaSwag JSONL, BIG-bench ``task.json`` and a plain JSONL of
``{"context", "choices", "label"}``.

Scoring (``loglikelihoods``) runs each distinct context once and shares its keys and values
with all of its continuations; many contexts go into one left-padded batch, sorted by length
so that little of it is padding. ``loglikelihood_reference`` scores one request with a plain
forward pass over the whole sequence: the two agree (a test holds them to 1e-4 in fp32).
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import LmforgeError, is_digits, is_number, is_whole
from .precision import autocast, tune_cpu_allocator

TARGET_DELIMITER = " "  # between a context and a choice (the harness's default)
FEWSHOT_DELIMITER = "\n\n"  # between the solved examples of a k-shot prompt
RESULTS_FORMAT = "lmforge-eval-choice"
SUITE_FORMAT = "lmforge-eval-suite"
SUITE_FILES = ("suite.md", "suite.json")


@dataclass
class ChoiceItem:
    """One question: the context, the choices (without the space that joins them to the context)
    and the index of the right choice."""

    context: str
    choices: list[str]
    label: int


# ---------------------------------------------------------------------------- readers

def read_task(path: str | Path) -> list[ChoiceItem]:
    """The items of a task file, its layout recognised from its content: a BIG-bench ``task.json``
    (a JSON object with ``examples``; a folder holding one is accepted too), HellaSwag JSONL
    (records with ``endings``) or plain JSONL ``{"context", "choices", "label"}``. Any problem
    raises LmforgeError naming the file, the line and the fix. Items skipped on purpose (BIG-bench
    examples with no single best answer) are reported as a warning."""
    items, _, notes = _read_task(path)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return items


def _read_task(path: str | Path) -> tuple[list[ChoiceItem], str, list[str]]:
    """(items, layout name, notes about skipped items)."""
    path = Path(path)
    if path.is_dir() and (path / "task.json").is_file():
        path = path / "task.json"
    text = _read_text(path)
    if not text.strip():
        raise LmforgeError(f"{path} is empty: it holds no items; give a task file with at least one item")
    records = _json_records(path, text)
    if isinstance(records, dict):
        items, notes = _bigbench_items(path, records)
        return items, "bigbench", notes
    if not records:
        raise LmforgeError(f"{path} holds no items; give a task file with at least one item")
    first = records[0][1]
    if isinstance(first, dict) and ("endings" in first or "ctx_a" in first or "activity_label" in first):
        return [_hellaswag_item(path, where, rec) for where, rec in records], "hellaswag", []
    return [_plain_item(path, where, rec) for where, rec in records], "plain", []


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LmforgeError(f"task file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise LmforgeError(f"{path} is a folder without a task.json; give a task file") from None
    except OSError as e:
        raise LmforgeError(f"cannot read task file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the data
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LmforgeError(f"{path} is not UTF-8 text (byte {e.start}, line {line}); save it as UTF-8") from None


def _json_records(path: Path, text: str) -> dict | list[tuple[str, object]]:
    """A BIG-bench task object, or (where, record) pairs from JSON lines (or a JSON array)."""
    stripped = text.lstrip()
    if stripped[:1] in "{[":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            # 'Extra data' after a first complete value: JSON lines, read below line by line.
            if e.msg != "Extra data" and path.suffix == ".json" and "\n" in stripped.strip():
                raise LmforgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                   "fix the file") from None
        else:
            if isinstance(whole, dict) and "examples" in whole:
                return whole
            if isinstance(whole, dict) and path.name == "task.json":
                raise LmforgeError(f"{path} has no 'examples' (a BIG-bench task with subtasks keeps them in its "
                                   "subfolders); give one subtask's task.json")
            if isinstance(whole, dict) and path.suffix == ".json" and \
                    not {"context", "choices", "ctx", "endings"} & set(whole):  # neither a task nor a record
                raise LmforgeError(f"{path} is one JSON object without 'examples': not a BIG-bench task; give a "
                                   "BIG-bench task.json, or records (a JSON list or one object per line)")
            if isinstance(whole, list):
                return [(f"record {i + 1}", rec) for i, rec in enumerate(whole)]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno}); each line must be "
                               "one JSON object") from None
    return records


def _json_type(value: object) -> str:
    names = {str: "a string", list: "an array", dict: "an object", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _field(path: Path, where: str, rec: object, name: str, layout: str, fields: str):
    if not isinstance(rec, dict):
        raise LmforgeError(f"{path}: {where} is {_json_type(rec)}, not an object; {layout} records are "
                           f"objects with {fields}")
    if name not in rec or rec[name] is None:
        raise LmforgeError(f"{path}: {where} has no {name!r} field; {layout} records need {fields}")
    return rec[name]


def _string(path: Path, where: str, value: object, name: str) -> str:
    if not isinstance(value, str):
        raise LmforgeError(f"{path}: {where}: {name} is {_json_type(value)}, not a string; give text")
    return value


def _label(path: Path, where: str, value: object, n_choices: int) -> int:
    """An index into the choices: an integer, or a string of digits (HellaSwag on the HF hub)."""
    if isinstance(value, str) and is_digits(value.strip().removeprefix("-")):
        value = int(value)
    if not is_whole(value):
        raise LmforgeError(f"{path}: {where}: label {value!r} is not an integer; give the index of the right "
                           "choice (0 for the first)")
    if not 0 <= value < n_choices:
        raise LmforgeError(f"{path}: {where}: label {value} is out of range for {n_choices} choices; give an index "
                           f"from 0 to {n_choices - 1}")
    return value


def _checked_choices(path: Path, where: str, choices: object) -> list[str]:
    if not isinstance(choices, list):
        raise LmforgeError(f"{path}: {where}: the choices are {_json_type(choices)}, not a list; give a list "
                           "of strings")
    if not choices:
        raise LmforgeError(f"{path}: {where}: the choice list is empty; give at least one choice")
    seen: set[str] = set()
    for i, c in enumerate(choices):
        c = _string(path, where, c, f"choice {i}")
        if not c:
            # acc_norm divides by the choice's length, and an empty choice has no tokens to score
            raise LmforgeError(f"{path}: {where}: choice {i} is empty; give every choice some text")
        if c in seen:
            raise LmforgeError(f"{path}: {where}: the choice {c!r} appears twice; choices must differ")
        seen.add(c)
    return list(choices)


PLAIN_FIELDS = "'context' (text), 'choices' (a list of texts) and 'label' (the index of the right choice)"


def _plain_item(path: Path, where: str, rec: object) -> ChoiceItem:
    context = _string(path, where, _field(path, where, rec, "context", "plain", PLAIN_FIELDS), "context")
    choices = _checked_choices(path, where, _field(path, where, rec, "choices", "plain", PLAIN_FIELDS))
    label = _label(path, where, _field(path, where, rec, "label", "plain", PLAIN_FIELDS), len(choices))
    return ChoiceItem(context, choices, label)


HELLASWAG_FIELDS = "'activity_label', 'ctx_a' and 'ctx_b' (or 'ctx'), 'endings' and 'label'"


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness' clean-up of HellaSwag text: WikiHow's '[title]' becomes a sentence
    end, other bracketed markers go, double spaces become one."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(path: Path, where: str, rec: object) -> ChoiceItem:
    def field(name: str):
        return _field(path, where, rec, name, "HellaSwag", HELLASWAG_FIELDS)

    activity = _string(path, where, field("activity_label"), "activity_label")
    if isinstance(rec, dict) and ("ctx_a" in rec or "ctx_b" in rec or "ctx" not in rec):
        ctx_a = _string(path, where, field("ctx_a"), "ctx_a")
        ctx_b = _string(path, where, field("ctx_b"), "ctx_b")
        ctx = ctx_a + " " + ctx_b.capitalize()  # str.capitalize lowers the rest too, as the harness does
    else:
        ctx = _string(path, where, field("ctx"), "ctx")
    endings = field("endings")
    if isinstance(endings, list):
        endings = [hellaswag_preprocess(_string(path, where, e, f"ending {i}")) for i, e in enumerate(endings)]
    choices = _checked_choices(path, where, endings)
    label = _label(path, where, field("label"), len(choices))
    return ChoiceItem(hellaswag_preprocess(activity + ": " + ctx), choices, label)


BIGBENCH_FIELDS = "'input' (text) and 'target_scores' (an object: choice -> score)"


def _finite(value: object) -> bool:
    """A JSON number that is a finite float (an integer of 400 digits is not one)."""
    try:
        return is_number(value) and math.isfinite(float(value))
    except OverflowError:
        return False


def _bigbench_items(path: Path, task: dict) -> tuple[list[ChoiceItem], list[str]]:
    """Items of a BIG-bench JSON task, formatted as BIG-bench (and the harness' BIG-bench JSON task)
    format them: input prefix, the input, the choices listed in BIG-bench's fixed shuffled order,
    output prefix (its trailing space is the delimiter). The label is the choice with the highest
    target score; an example whose top score is shared has no single right answer and is skipped
    (and reported), since accuracy against any one of them would be wrong."""
    import numpy as np

    examples = task["examples"]
    if not isinstance(examples, list) or not examples:
        raise LmforgeError(f"{path}: 'examples' is empty or not a list; a BIG-bench task needs a list of examples")
    def prefix(name: str, default: str) -> str:  # null means the default (once the text "None")
        value = task.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise LmforgeError(f"{path}: {name} is {_json_type(value)}, not text; give a string (or leave it out for "
                               f"{default!r})")
        return value

    input_prefix = prefix("example_input_prefix", "\nQ: ")
    output_prefix = prefix("example_output_prefix", "\nA: ")
    choice_prefix = prefix("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input")
    append_choices = True if append_choices is None else append_choices  # null: the default, as above
    if not isinstance(append_choices, bool):  # (bool("false") is True)
        raise LmforgeError(f"{path}: append_choices_to_input is {_json_type(append_choices)}, not true or false; "
                           "give true or false (or leave it out for true)")
    items, tied = [], []
    for i, ex in enumerate(examples):
        where = f"example {i + 1}"
        text = _string(path, where, _field(path, where, ex, "input", "BIG-bench", BIGBENCH_FIELDS), "input")
        if isinstance(ex, dict) and "target_scores" not in ex and "target" in ex:
            raise LmforgeError(f"{path}: {where} has a 'target' but no 'target_scores': a generative task; lmforge "
                               "scores multiple-choice tasks (examples with target_scores)")
        scores = _field(path, where, ex, "target_scores", "BIG-bench", BIGBENCH_FIELDS)
        if not isinstance(scores, dict):
            raise LmforgeError(f"{path}: {where}: target_scores is {_json_type(scores)}, not an object; give "
                               "choice -> score")
        choices = _checked_choices(path, where, list(scores))
        values = list(scores.values())
        if not all(_finite(v) for v in values):  # NaN would make no choice the best
            raise LmforgeError(f"{path}: {where}: every target score must be a finite number; give e.g. 1 for the "
                               "right choice and 0 for the others")
        best = max(values)
        if values.count(best) > 1:
            tied.append(i + 1)
            continue
        if append_choices:  # BIG-bench's order: the sorted choices permuted by a generator seeded 42
            shown = np.random.RandomState(seed=42).permutation(sorted(choices))
            text = text + choice_prefix + choice_prefix.join(shown)
        context = (input_prefix + text + output_prefix).rstrip(" ")
        items.append(ChoiceItem(context, choices, values.index(best)))
    notes = []
    if tied:
        shown = ", ".join(map(str, tied[:10])) + (", ..." if len(tied) > 10 else "")
        notes.append(f"{path}: skipped {len(tied)} of {len(examples)} examples whose highest target score is "
                     f"shared by several choices (no single right answer): examples {shown}")
    if not items:
        raise LmforgeError(f"{path}: no example has a single best choice; nothing to score")
    return items, notes


# ---------------------------------------------------------------------------- requests to tokens

def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, disallowed_special=())  # '<|endoftext|>' in data is text, not a token


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness makes them: trailing whitespace of the context
    moves onto the continuation; the context and the whole are encoded, and the continuation is the
    whole's ids after the context's (so a token that spans the join is the continuation's). An empty
    context becomes the tokenizer's ``eos_id`` (its end-of-text token, or a chat model's own end
    token: what the harness's ``prefix_token_id`` is, the HF tokenizer's eos)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        eos = tokenizer.eos_id
        if eos is None:
            raise LmforgeError("an item has an empty context and the tokenizer has no end-of-text token to stand "
                               "for it; give every item a context")
        return [eos], _encode(tokenizer, continuation)
    ctx = _encode(tokenizer, context)
    return ctx, _encode(tokenizer, context + continuation)[len(ctx):]


@dataclass
class _Request:
    index: int
    context: list[int]  # cut from the left so that context + continuation fit the window (+1, see below)
    continuation: list[int]
    truncated: int


def _requests(tokenizer, pairs: Sequence[tuple[str, str]], window: int,
              names: Sequence[str] | None = None) -> list[_Request]:
    """The pairs encoded and fitted to the window; ``names`` say in errors which pair is meant (as
    "item 3, choice 2"; by default "request i")."""
    out = []
    memo: dict[str, list[int]] = {}  # a context shared by four choices is encoded once
    for i, (context, continuation) in enumerate(pairs):
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise LmforgeError(f"request {i}: the context and the continuation must be strings")
        if context.rstrip() == context and context:
            ctx = memo.get(context)
            if ctx is None:
                ctx = memo[context] = _encode(tokenizer, context)
            cont = _encode(tokenizer, context + continuation)[len(ctx):]
        else:
            ctx, cont = encode_request(tokenizer, context, continuation)
        if not cont:
            raise LmforgeError(f"{names[i] if names else f'request {i}'}: the continuation {continuation!r} encodes "
                               "to no tokens; give every choice some text")
        out.append(_request(i, ctx, cont, window, names[i] if names else None))
    return out


def _request(i: int, ctx: list[int], cont: list[int], window: int, name: str | None = None) -> _Request:
    if len(cont) > window:
        raise LmforgeError(f"{name or f'request {i}'}: the continuation is {len(cont)} tokens, longer than the "
                           f"model's window ({window}); shorten the choice or use a model with a longer context")
    # The first token is never predicted, so window + 1 tokens fit one pass (as in the harness).
    cut = max(0, len(ctx) + len(cont) - (window + 1))
    return _Request(i, ctx[cut:], cont, cut)


# ---------------------------------------------------------------------------- scoring

@torch.no_grad()
def loglikelihood_reference(model: torch.nn.Module, tokenizer, context: str, continuation: str,
                            dtype: torch.dtype = torch.float32) -> tuple[float, bool, int]:
    """One request scored the plain way: one forward pass over its last window + 1 tokens
    (the harness's method). The reference that ``loglikelihoods`` is tested against."""
    window = model.config.context_length
    (req,) = _requests(tokenizer, [(context, continuation)], window)
    seq = req.context + req.continuation
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(device, dtype):
            logits = model(torch.tensor([seq[:-1]], device=device))[0].float()
    finally:
        model.train(was_training)
    n = len(req.continuation)
    picked = logits[len(seq) - 1 - n:]                                  # (n, V): predict each continuation token
    target = torch.tensor(req.continuation, device=device)
    logp = torch.log_softmax(picked, -1)[torch.arange(n, device=device), target]
    return float(logp.sum()), bool((picked.argmax(-1) == target).all()), n


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16,
                   dtype: torch.dtype = torch.float32, progress: bool = False,
                   stats: dict | None = None, names: Sequence[str] | None = None) -> list[tuple[float, bool, int]]:
    """For each (context, continuation): (summed log p of the continuation's tokens given the context,
    whether each of them is the model's greedy choice, how many there are), in the order given.

    Contexts longer than the window lose tokens from the left; pass a dict as ``stats`` to get
    ``truncated`` (how many requests were cut) and ``truncated_tokens`` (per request, in order).
    ``batch_size`` counts continuations scored together; ``names`` name the requests in errors."""
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
    reqs = _requests(tokenizer, requests, model.config.context_length, names)
    if stats is not None:
        stats["truncated_tokens"] = [r.truncated for r in reqs]
        stats["truncated"] = sum(1 for r in reqs if r.truncated)
    return _score(model, reqs, batch_size, dtype, progress)


def token_loglikelihoods(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                         dtype: torch.dtype = torch.float32) -> list[tuple[float, bool, int]]:
    """``loglikelihoods`` for requests already in token ids: (context ids, continuation ids) pairs,
    each context non-empty (it predicts the continuation's first token)."""
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
    reqs = []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise LmforgeError(f"request {i}: the context and the continuation must be at least one token each; "
                               "give every choice some text")
        reqs.append(_request(i, list(ctx), list(cont), model.config.context_length))
    return _score(model, reqs, batch_size, dtype, progress=False)


@torch.no_grad()
def _score(model: torch.nn.Module, reqs: list[_Request], batch_size: int, dtype: torch.dtype,
           progress: bool) -> list[tuple[float, bool, int]]:
    from tqdm import tqdm

    window = model.config.context_length
    results: list[tuple[float, bool, int] | None] = [None] * len(reqs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(reqs), desc="scoring", unit="choice", disable=not progress, dynamic_ncols=True) as bar:
            for batch in _batches(reqs, batch_size, window, model.config.n_head):
                for r, (logp, greedy) in zip((r for group in batch for r in group),
                                             _score_batch(model, batch, dtype, device)):
                    results[r.index] = (logp, greedy, len(r.continuation))
                bar.update(sum(len(g) for g in batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


# Attention over a batch of packed rows has rows × heads × width² scores, which a masked kernel
# may hold all at once; batches stop growing at this many (a row of any width is always allowed
# on its own). 2^28 fp32 scores are 1 GB: far above what short items need, a ceiling for long ones.
SCORE_BUDGET = 1 << 28


def _row_width(row: list[_Request]) -> int:
    return len(row[0].context) + sum(len(r.continuation) - 1 for r in row)


def _rows(reqs: list[_Request], batch_size: int, window: int) -> list[list[_Request]]:
    """Requests with the same context, as rows of at most ``batch_size`` requests and ``window``
    columns: the context once, then each continuation but its last token (which nothing is
    predicted from). A single request always fits: its context was cut so that context and
    continuation fit window + 1 tokens."""
    by_context: dict[tuple[int, ...], list[_Request]] = {}
    for r in reqs:
        by_context.setdefault(tuple(r.context), []).append(r)
    rows = []
    for group in by_context.values():
        row: list[_Request] = []
        width = len(group[0].context)
        for r in group:
            if row and (len(row) == batch_size or width + len(r.continuation) - 1 > window):
                rows.append(row)
                row, width = [], len(group[0].context)
            row.append(r)
            width += len(r.continuation) - 1
        rows.append(row)
    return rows


def _batches(reqs: list[_Request], batch_size: int, window: int, n_head: int = 1) -> list[list[list[_Request]]]:
    """Rows in batches of at most ``batch_size`` requests in all (and ``SCORE_BUDGET``), widest
    first: neighbours in a batch have similar widths (little padding), and memory runs out, if it
    does, at the start."""
    batches: list[list[list[_Request]]] = []
    n = width = 0
    for row in sorted(_rows(reqs, batch_size, window), key=_row_width, reverse=True):
        if not batches or n + len(row) > batch_size or (len(batches[-1]) + 1) * n_head * width ** 2 > SCORE_BUDGET:
            batches.append([])
            n, width = 0, _row_width(row)
        batches[-1].append(row)
        n += len(row)
    return batches


def _score_batch(model, rows: list[list[_Request]], dtype: torch.dtype, device) -> list[tuple[float, bool]]:
    """One forward pass for a batch of rows, each a context followed by its continuations
    (right-padded to the widest row). A continuation's tokens take the positions that follow the
    context and see the context and their own earlier tokens, nothing of the other continuations:
    the numbers of running each context + continuation alone, with each context computed once.
    The output layer runs only where a continuation token is predicted: at the context's last
    token, then at each continuation token but the last."""
    width = max(_row_width(row) for row in rows)
    ids, pos, seg = [], [], []
    picks: list[int] = []    # flat (row · width + column) of each prediction, continuation by continuation
    targets: list[int] = []
    for b, row in enumerate(rows):
        ctx = row[0].context
        n_ctx = len(ctx)
        r_ids, r_pos, r_seg = list(ctx), list(range(n_ctx)), [0] * n_ctx
        for i, r in enumerate(row):
            body = r.continuation[:-1]
            col = len(r_ids)
            picks += [b * width + n_ctx - 1] + [b * width + c for c in range(col, col + len(body))]
            r_ids += body
            r_pos += range(n_ctx, n_ctx + len(body))
            r_seg += [i + 1] * len(body)
            targets += r.continuation
        pad = width - len(r_ids)
        ids.append(r_ids + [0] * pad)
        pos.append(r_pos + [0] * pad)
        seg.append(r_seg + [-1] * pad)
    lens = [len(r.continuation) for row in rows for r in row]
    owner_t = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(device)
    seg_t = torch.tensor(seg, device=device)
    cols = torch.arange(width, device=device)
    # Query q sees key k when k is not after q and k is context (segment 0) or of q's own
    # continuation. Padding (segment -1, at the end of a row) sees itself and the padding before it.
    mask = (cols[None, None, :] <= cols[None, :, None]) & \
        ((seg_t[:, None, :] == 0) | (seg_t[:, None, :] == seg_t[:, :, None]))           # (B, T, T)
    with autocast(device, dtype):
        hidden = model.hidden_states(torch.tensor(ids, device=device),
                                     layout=(torch.tensor(pos, device=device), mask[:, None]))
        logits = model.logits(hidden.flatten(0, 1).index_select(0, torch.tensor(picks, device=device))).float()
    target = torch.tensor(targets, device=device)
    logp = -F.cross_entropy(logits, target, reduction="none")  # one fused log-softmax pass, (N,)
    missed = (logits.argmax(-1) != target).float()
    sums = torch.zeros(len(lens), device=device).index_add_(0, owner_t, logp)
    misses = torch.zeros(len(lens), device=device).index_add_(0, owner_t, missed)
    return [(float(s), m == 0) for s, m in zip(sums.tolist(), misses.tolist())]


# ---------------------------------------------------------------------------- multiple-choice evaluation

def _key(item: ChoiceItem) -> tuple:
    return item.context, tuple(item.choices), item.label


def build_contexts(items: list[ChoiceItem], shots: int = 0, seed: int = 1234,
                   fewshot_items: list[ChoiceItem] | None = None) -> list[str]:
    """Each item's prompt: ``shots`` solved examples (context, space, right choice) joined by blank
    lines, a blank line, then the item's context. Examples are drawn as the harness draws them: one
    generator seeded once, items in order, ``shots + 1`` drawn when the pool holds the item (which
    is then dropped: an item is never its own example), else ``shots``. The pool is
    ``fewshot_items``, else the items themselves."""
    if shots < 0:
        raise LmforgeError(f"--shots must be >= 0, got {shots}")
    if shots == 0:
        return [item.context for item in items]
    pool = items if fewshot_items is None else fewshot_items
    pool_keys = {_key(p) for p in pool}
    rng = random.Random(seed)
    contexts = []
    for item in items:
        key = _key(item)
        own = key in pool_keys
        if len(pool) < shots + own:
            raise LmforgeError(f"{shots}-shot needs at least {shots + own} items to draw examples from "
                               f"{'besides the item itself ' if own else ''}but there are {len(pool)}; "
                               "give fewer --shots or more items")
        drawn = [p for p in rng.sample(pool, shots + own) if _key(p) != key][:shots]
        solved = [p.context + TARGET_DELIMITER + p.choices[p.label] for p in drawn]
        contexts.append(FEWSHOT_DELIMITER.join(solved) + FEWSHOT_DELIMITER + item.context)
    return contexts


def _stderr(hits: list[bool]) -> float | None:
    """Standard error of a mean of 0/1 scores (sample standard deviation, as the harness reports);
    None for a single item (JSON has no NaN)."""
    n = len(hits)
    if n < 2:
        return None
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) * n / (n - 1) / n)


def _first_max(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # ties: the first, as numpy's argmax


def evaluate_choice(model: torch.nn.Module, tokenizer, items: list[ChoiceItem], shots: int = 0, seed: int = 1234,
                    batch_size: int = 16, dtype: torch.dtype = torch.float32,
                    fewshot_items: list[ChoiceItem] | None = None, progress: bool = False) -> dict:
    """Accuracy (``acc``) and length-normalised accuracy (``acc_norm``: summed log-probability
    divided by the choice's length in characters) over the items, with every item's scores.

    On the CPU this sets the process's allocator to keep freed blocks (``tune_cpu_allocator``, as
    training does): each batch's (predictions × vocabulary) logits then reuse one block instead of
    faulting in tens of MB anew, which cost more than the log-softmax itself. An evaluation
    process keeps its peak memory until it ends."""
    if not items:
        raise LmforgeError("no items to evaluate; give a task with at least one item")
    if next(model.parameters()).device.type == "cpu":
        tune_cpu_allocator()
    contexts = build_contexts(items, shots, seed, fewshot_items)
    requests = [(ctx, TARGET_DELIMITER + c) for ctx, item in zip(contexts, items) for c in item.choices]
    names = [f"item {i + 1} of {len(items)}, choice {j + 1} ({c[:30]!r})" for i, item in enumerate(items)
             for j, c in enumerate(item.choices)]
    stats: dict = {}
    t0 = time.perf_counter()
    scores = loglikelihoods(model, tokenizer, requests, batch_size, dtype, progress, stats=stats, names=names)
    seconds = time.perf_counter() - t0
    per_item, at = [], 0
    for i, item in enumerate(items):
        k = len(item.choices)
        mine, cut = scores[at:at + k], stats["truncated_tokens"][at:at + k]
        at += k
        logprobs = [s[0] for s in mine]
        normed = [lp / len(c) for lp, c in zip(logprobs, item.choices)]
        pred, pred_norm = _first_max(logprobs), _first_max(normed)
        per_item.append({"index": i, "label": item.label, "pred": pred, "pred_norm": pred_norm,
                         "correct": pred == item.label, "correct_norm": pred_norm == item.label,
                         "logprobs": logprobs, "logprobs_norm": normed, "tokens": [s[2] for s in mine],
                         "greedy": [s[1] for s in mine], "truncated_tokens": max(cut)})
    hits = [r["correct"] for r in per_item]
    hits_norm = [r["correct_norm"] for r in per_item]
    return {"settings": {"shots": shots, "seed": seed, "fewshot_pool": "items" if fewshot_items is None
                         else f"{len(fewshot_items)} separate items", "target_delimiter": TARGET_DELIMITER,
                         "fewshot_delimiter": FEWSHOT_DELIMITER, "acc_norm": "log-probability / characters",
                         "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch.")},
            "acc": sum(hits) / len(hits), "acc_stderr": _stderr(hits),
            "acc_norm": sum(hits_norm) / len(hits_norm), "acc_norm_stderr": _stderr(hits_norm),
            "n": len(items), "truncated": sum(1 for r in per_item if r["truncated_tokens"]),
            "requests": len(requests), "seconds": seconds, "items": per_item}


# ---------------------------------------------------------------------------- commands

def _is_results_file(path: Path) -> bool:
    """A results JSON this command wrote (it may be replaced without --overwrite)."""
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return f'"format": "{RESULTS_FORMAT}"'.encode() in head


def _check_args(shots: int, batch_size: int, limit: int | None, dtype: str) -> torch.dtype:
    from .precision import default_device, resolve_dtype

    if shots < 0:
        raise LmforgeError(f"--shots must be >= 0, got {shots}")
    if batch_size < 1:
        raise LmforgeError(f"--batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise LmforgeError(f"--limit must be >= 1 (or left out: every item), got {limit}")
    return resolve_dtype(dtype, default_device())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _task_name(path: Path) -> str:
    """A BIG-bench task's folder name (resolved: a bare "task.json" in the current folder has no parent
    in its path), else the file's stem."""
    return path.resolve().parent.name if path.name == "task.json" else path.stem


def run_choice_eval(model_spec: str, task_path: str, shots: int = 0, seed: int = 1234, batch_size: int = 16,
                    dtype: str = "float32", limit: int | None = None, out: str | None = None,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """``lmforge eval choice``: one model on one task file; prints a summary and, with ``out``,
    writes the results JSON (settings, every item's scores, the task file's sha256). The output
    is checked before any work: never an input, never someone else's file unless ``overwrite``.
    ``limit`` scores the first N items; k-shot examples are still drawn from all of them."""
    from . import __version__, atomic
    from .models import load_language_model
    from .outputs import check_output
    from .precision import default_device

    compute = _check_args(shots, batch_size, limit, dtype)
    if out is not None:
        check_output(out, kind="file", what="a results file of `lmforge eval choice`", own_kind=_is_results_file,
                     inputs=[model_spec, task_path], overwrite=overwrite)
    items, layout, notes = _read_task(task_path)
    for note in notes:
        print(f"lmforge: warning: {note}", file=sys.stderr)
    chosen = items[:limit] if limit is not None else items
    model, tok = load_language_model(model_spec, default_device())
    res = evaluate_choice(model, tok, chosen, shots, seed, batch_size, compute,
                          fewshot_items=items if len(chosen) < len(items) else None, progress=progress)
    path = Path(task_path)
    result = {"format": RESULTS_FORMAT, "model": model_spec,
              "task": {"path": str(path), "name": _task_name(path), "layout": layout,
                       "sha256": atomic.sha256_file(path / "task.json" if path.is_dir() else path),
                       "items": len(items), "limit": limit},
              **res, "warnings": notes, "lmforge_version": __version__, "time": _now()}
    print(f"{_task_name(path)}: acc {res['acc']:.4f}  acc_norm {res['acc_norm']:.4f}  ({res['n']} items, "
          f"{shots}-shot, {res['truncated']} truncated, {res['seconds']:.1f} s)")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {atomic.write_json(out, result)}")
    return result


def _is_suite_dir(path: Path) -> bool:
    from .outputs import read_json_head

    head = read_json_head(path / "suite.json")
    return head is not None and head.get("format") == SUITE_FORMAT


def _unique_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        name, n = _task_name(p), 2
        while name in names:
            name, n = f"{_task_name(p)}-{n}", n + 1
        names.append(name)
    return names


def suite_table(result: dict) -> str:
    """The suite as a Markdown table: a row per model, acc and acc_norm per task, bits per byte."""
    tasks = [t["name"] for t in result["tasks"]]
    header = ["model", *(f"{t} {m}" for t in tasks for m in ("acc", "acc_norm"))]
    if result["text"] is not None:
        header.append("bits/byte")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in result["models"]:
        row = result["results"][model]
        cells = [model, *(f"{row['tasks'][t][m]:.4f}" for t in tasks for m in ("acc", "acc_norm"))]
        if result["text"] is not None:
            cells.append(f"{row['bits_per_byte']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    s = result["settings"]
    notes = [f"{t['name']}: {t['path']}, {t['n']} items" + (f" (of {t['items']})" if t["n"] != t["items"] else "")
             + (f", {t['truncated']} truncated in some model" if t["truncated"] else "") for t in result["tasks"]]
    if result["text"] is not None:
        notes.append(f"bits per byte on {', '.join(result['text']['paths'])} ({result['text']['bytes']:,} bytes)")
    return ("\n".join(lines) + f"\n\n{s['shots']}-shot, seed {s['seed']}, {s['dtype']}. acc_norm: log-probability per "
            "character of the choice.\n" + "".join(f"\n- {n}" for n in notes) + "\n")


def run_suite(models: list[str], tasks: list[str], text: list[str] | None = None, out: str = "suite",
              shots: int = 0, seed: int = 1234, batch_size: int = 16, dtype: str = "float32",
              limit: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """``lmforge eval suite``: every model on every task, plus bits per byte on ``text`` (files
    joined by blank lines), as one table printed in Markdown and written as ``suite.md`` and
    ``suite.json`` into the folder ``out``. Tasks and text are read, and the output checked,
    before any model is loaded."""
    from . import __version__, atomic
    from .data import read_text_files
    from .evaluate import bits_per_byte
    from .models import check_language_models, load_language_model
    from .outputs import check_output, staged_folder
    from .precision import default_device

    if not models:
        raise LmforgeError("give at least one model")
    check_language_models(models)  # not found after the first model was scored
    if not tasks:
        raise LmforgeError("give at least one task file with --tasks")
    compute = _check_args(shots, batch_size, limit, dtype)
    out_dir = check_output(out, kind="folder", what="a folder written by `lmforge eval suite`", own_kind=_is_suite_dir,
                           inputs=[*models, *tasks, *(text or [])], writes=SUITE_FILES, overwrite=overwrite)
    paths = [Path(t) for t in tasks]
    twice = [t for i, t in enumerate(tasks) if Path(t).resolve() in {Path(u).resolve() for u in tasks[:i]}]
    if twice:
        raise LmforgeError(f"the task {twice[0]} is given twice; give each task once")
    loaded = [_read_task(p) for p in paths]
    for _, _, notes in loaded:
        for note in notes:
            print(f"lmforge: warning: {note}", file=sys.stderr)
    corpus = read_text_files(list(text)) if text else None
    names = _unique_names(paths)
    task_info = [{"name": name, "path": str(p), "layout": layout, "items": len(items),
                  "n": len(items[:limit] if limit is not None else items), "truncated": 0,
                  "sha256": atomic.sha256_file(p / "task.json" if p.is_dir() else p)}
                 for name, p, (items, layout, _) in zip(names, paths, loaded)]
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for spec in models:
        model, tok = load_language_model(spec, default_device())
        row: dict = {"tasks": {}}
        for info, (items, _, _) in zip(task_info, loaded):
            chosen = items[:limit] if limit is not None else items
            res = evaluate_choice(model, tok, chosen, shots, seed, batch_size, compute,
                                  fewshot_items=items if len(chosen) < len(items) else None, progress=progress)
            row["tasks"][info["name"]] = {k: res[k] for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
                                                              "truncated", "seconds")}
            info["truncated"] = max(info["truncated"], res["truncated"])
        if corpus is not None:
            row.update(bits_per_byte(model, tok, corpus, dtype=compute))
        results[spec] = row
        del model
    result = {"format": SUITE_FORMAT, "models": list(models), "tasks": task_info,
              "text": None if corpus is None else {"paths": list(text), "bytes": len(corpus.encode("utf-8"))},
              "settings": {"shots": shots, "seed": seed, "batch_size": batch_size, "limit": limit,
                           "dtype": str(compute).removeprefix("torch.")},
              "results": results, "seconds": time.perf_counter() - t0, "lmforge_version": __version__, "time": _now()}
    table = suite_table(result)
    print(table, end="")
    with staged_folder(out_dir) as stage:
        atomic.write_text(stage / "suite.md", table)
        atomic.write_json(stage / "suite.json", result)
    print(f"wrote {out_dir / 'suite.md'} and {out_dir / 'suite.json'}")
    return result


__all__ = ["ChoiceItem", "build_contexts", "encode_request", "evaluate_choice", "hellaswag_preprocess",
           "loglikelihood_reference", "loglikelihoods", "read_task", "run_choice_eval", "run_suite", "suite_table"]
