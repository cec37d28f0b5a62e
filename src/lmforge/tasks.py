"""Fine-tuning data: labelled texts (classification), instruction records and preference
triples; the prompt templates; and the collate functions that turn them into batches.

    rows / records ─read─→ split (seeded) ─encode(tokenizer, template)─→ ids ─collate─→ batch

One template function, ``format_prompt``, serves training, generation and serving, so the
text a model was tuned on and the text it is later prompted with cannot drift apart.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import LmforgeError, is_digits
from .fused_ce import IGNORE_INDEX


class DataError(LmforgeError, ValueError):
    """A fine-tuning data file that cannot be used as given."""


# ---------------------------------------------------------------- reading

def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON file (a list of objects) or a JSONL file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the data
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except RecursionError:
            raise DataError(f"{path} nests its JSON too deeply to read; give a list of flat records") from None
        where = [f"record {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            except RecursionError:
                raise DataError(f"{path}, line {n}: nests its JSON too deeply to read; each line must be one flat "
                                "JSON object") from None
            where.append(f"line {n}")
    for rec, w in zip(records, where):
        if not isinstance(rec, dict):
            raise DataError(f"{path}, {w}: expected a JSON object, got {type(rec).__name__}")
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _column(header: list[str] | None, name: str, path: Path, table: list[list[str]]) -> int:
    if is_digits(name):
        return int(name)
    if header is None or name not in header:
        first = table[0]
        raise DataError(f"{path} has no column {name!r} (its first row: {', '.join(c[:20] for c in first)}); "
                        f"{_column_hint(table)}")
    return header.index(name)


def _column_hint(table: list[list[str]]) -> str:
    """What to give instead of a column name that is not there, by the look of the rows: the label is
    the column of fewest distinct values, the text the one of longest cells. Named when the first row
    is a header (its cells occur nowhere below), numbered when the file has none."""
    rows = [r for r in table[:1000] if len(r) == len(table[0])]
    width = len(table[0])
    if width < 2:
        return "a labelled file needs a text column and a label column; this one has one"
    distinct = [len({r[i] for r in rows}) for i in range(width)]
    length = [sum(len(r[i]) for r in rows) / len(rows) for i in range(width)]
    label = min(range(width), key=lambda i: (distinct[i], length[i]))
    text = max((i for i in range(width) if i != label), key=lambda i: length[i])
    # a header: its cells occur nowhere below, while some label repeats there (two rows prove nothing)
    below = [r[label] for r in rows[1:]]
    header = len(below) > len(set(below)) and all(all(r[i] != rows[0][i] for r in rows[1:]) for i in (text, label))
    if header:
        return (f"name columns of its header (by the look of its rows: --text_column {rows[0][text]!r} "
                f"--label_column {rows[0][label]!r})")
    return (f"give the columns by number for a file without a header (by the look of its rows: --text_column {text} "
            f"--label_column {label})")


def field_text(value: object, where: str, name: str) -> str:
    """A JSON field used as text: a string, or a number or boolean written out (labels such as 0 / 1);
    null, NaN, a list or an object is an error naming the record and the field (once they became the
    texts "None", "nan" or "[...]" and were trained on)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):  # bool is an int
        return str(value)
    shown = "null" if value is None else type(value).__name__ if isinstance(value, (list, dict)) else repr(value)
    raise DataError(f"{where}: the field {name!r} is {shown}, not text; give it a text (or leave the record out)")


def read_labelled(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) rows of a CSV, TSV, JSON or JSONL file. Columns are named (a header row, or the
    keys of JSON objects) or numbered from 0 (a CSV / TSV file without a header)."""
    path = Path(path)
    if path.suffix.lower() in (".json", ".jsonl"):
        rows = []
        for i, rec in enumerate(read_records(path)):
            missing = [c for c in (text_column, label_column) if c not in rec]
            if missing:
                raise DataError(f"{path}, record {i} has no field {missing[0]!r} (it has: {', '.join(rec)}); "
                                "name the fields with --text_column / --label_column")
            where = f"{path}, record {i}"
            rows.append((field_text(rec[text_column], where, text_column),
                         field_text(rec[label_column], where, label_column)))
        return _checked(rows, path, "record")
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            # By the suffix, unless the first line says otherwise (a tab-separated file named .csv).
            tabbed = path.suffix.lower() in (".tsv", ".tab") or ("\t" in first and "," not in first.split("\t")[0])
            delimiter = "\t" if tabbed else ","
            table = list(csv.reader(f, delimiter=delimiter))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None
    except csv.Error as e:
        raise DataError(f"{path} is not a readable {'TSV' if delimiter == chr(9) else 'CSV'} file ({e})") from None
    table = [r for r in table if r]
    if not table:
        raise DataError(f"{path} holds no rows")
    numbered = is_digits(text_column) and is_digits(label_column)
    header = None if numbered else table[0]
    ti = _column(header, text_column, path, table)
    li = _column(header, label_column, path, table)
    body = table if numbered else table[1:]
    rows = []
    for n, r in enumerate(body, 1 if numbered else 2):
        if max(ti, li) >= len(r):
            raise DataError(f"{path}, row {n} has {len(r)} columns, fewer than the {max(ti, li) + 1} needed")
        rows.append((r[ti], r[li]))
    if numbered:
        _warn_if_header(rows, path, ti, li)
    return _checked(rows, path, "row", first=1 if numbered else 2)


def _warn_if_header(rows: list[tuple[str, str]], path: Path, ti: int, li: int) -> None:
    """Columns given by number mean the file has no header; if its first row still looks like one (its
    label names no class of any other row, while every other label occurs more than once), say so:
    read as data, the header would become a class of one text."""
    from collections import Counter

    if len(rows) < 5:
        return
    counts = Counter(label for _, label in rows[1:])
    label = rows[0][1]
    if label not in counts and min(counts.values()) > 1:
        import warnings

        warnings.warn(f"{path}: the first row ({rows[0][0][:30]!r}, {label!r}) looks like a header, but the columns "
                      f"were given by number ({ti} and {li}), which reads it as data; if it is a header, name the "
                      "columns instead (--text_column NAME --label_column NAME)", stacklevel=3)


def _checked(rows: list[tuple[str, str]], path: Path, unit: str, first: int = 0) -> list[tuple[str, str]]:
    for n, (text, label) in enumerate(rows, first):
        if not text.strip():
            raise DataError(f"{path}, {unit} {n} has an empty text; remove it or fill it in")
        if not label.strip():
            raise DataError(f"{path}, {unit} {n} has an empty label; remove it or fill it in")
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def balance(rows: Sequence[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """Down-sample every class to the size of the smallest (the book's balanced SMS set)."""
    by_label: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    n = min(len(v) for v in by_label.values())
    rng = random.Random(seed)
    out = [r for label in sorted(by_label) for r in rng.sample(by_label[label], n)]
    rng.shuffle(out)
    return out


def split(items: Sequence, fractions: tuple[float, float, float], seed: int) -> tuple[list, list, list]:
    """Shuffle with ``seed`` and cut into train / validation / test by ``fractions``."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n_train = int(len(order) * fractions[0])
    n_val = int(len(order) * fractions[1])
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def subsample(items: Sequence, limit: int | None, seed: int) -> list:
    """At most ``limit`` items, drawn with ``seed`` (all of them in their order when limit is None)."""
    if limit is None or limit >= len(items):
        return list(items)
    return random.Random(seed).sample(list(items), limit)


# ---------------------------------------------------------------- classification

def plain_ids(tokenizer, text: str) -> list[int]:
    """Ids of a user's text, a special-token string in it (``<|endoftext|>``) read as plain text."""
    return tokenizer.encode(text, disallowed_special=())


def template_ids(tokenizer, render: Callable[[list[str]], str], texts: Sequence[str],
                 what: str = "a message") -> list[int]:
    """Ids of ``render(texts)``: a template's own markers are special tokens; the texts it places
    (what a user or a data file wrote) are plain text, even where they spell a special token, alone
    or together ("<|im_" in one message, "end|>" in the next). Typed into a message or a training
    record, "<|im_end|>" must not end the turn and forge another role's (as OpenAI's API treats
    message text); and a model must be trained on the ids it is served."""
    text = render(list(texts))
    specials = getattr(tokenizer, "special_tokens", {})
    if not specials:
        return tokenizer.encode(text, allowed_special="all")
    marker = re.compile("|".join(re.escape(sp) for sp in sorted(specials, key=len, reverse=True)))
    # Where the template put each text: render again with a mark in place of each, and put the texts
    # back where the marks landed (in whatever order, as often as the template placed them). A blank
    # text keeps its place: a template may test it (Alpaca's "### Input:" section), and it spells nothing.
    marks = [f"\ue000{i}\ue001" if t.strip() else t for i, t in enumerate(texts)]
    marked = render(marks)
    parts = re.split("\ue000(\\d+)\ue001", marked)
    for placed in (texts, [t.strip() for t in texts]):  # a template may trim what it places (Llama 3's does)
        pieces = [part if j % 2 == 0 else placed[int(part)] for j, part in enumerate(parts)]
        if "".join(pieces) == text:
            break
    else:
        # The template changes the texts some other way, so where they lie is unknown. The prompt is
        # safe as a whole only if every special token in it is one the template wrote itself.
        if len(marker.findall(text)) == len(marker.findall(marked)):
            return tokenizer.encode(text, allowed_special="all")
        typed = [sp for sp in specials if any(sp in t for t in texts)]
        spelled = f"contains {typed[0]!r}, a special token of this model," if typed else \
            "spells a special token of this model across its parts,"
        raise DataError(f"{what} {spelled} and the template changes the text it is given, so it cannot be kept "
                        "as plain text; remove it")
    spans, pos = [], 0  # where the template's own text lies
    for j, piece in enumerate(pieces):
        if j % 2 == 0:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    # Split only at the template's special tokens: every run between them (texts included) is
    # encoded as plain text, as the whole prompt would be around its markers.
    ids, cursor = [], 0
    for a, b in spans:
        for m in marker.finditer(text, a, b):
            ids += plain_ids(tokenizer, text[cursor:m.start()])
            ids.append(specials[m.group()])
            cursor = m.end()
    return ids + plain_ids(tokenizer, text[cursor:])


@dataclass
class LabelledSet:
    """Encoded texts and their class indices; ``truncated`` counts texts cut to the maximum length."""

    ids: list[list[int]]
    labels: list[int]
    truncated: int = 0


def encode_labelled(rows: Sequence[tuple[str, str]], tokenizer, labels: list[str], max_length: int) -> LabelledSet:
    """Token ids of each text, its first ``max_length`` kept, and the index of each label in ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    ids, ys, truncated = [], [], 0
    for text, label in rows:
        if label not in index:
            shown = ", ".join(labels[:20]) + (f", and {len(labels) - 20:,} more" if len(labels) > 20 else "")
            raise DataError(f"label {label!r} does not occur in the training split (labels: {shown}); "
                            "fix the data or split it again with another --finetune.seed")
        full = plain_ids(tokenizer, text)
        truncated += len(full) > max_length
        ids.append(full[:max_length])
        ys.append(index[label])
    return LabelledSet(ids, ys, truncated)


def collate_classification(ids: Sequence[list[int]], labels: Sequence[int], pad_id: int,
                           pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (B, T), lengths (B,), labels (B,)): texts padded on the right to the longest in the
    batch (or to ``pad_to``). Under causal attention the padding after a text cannot change what
    the model computes at the text's last token, where the class is read."""
    width = max(len(x) for x in ids) if pad_to is None else pad_to
    x = torch.full((len(ids), width), pad_id, dtype=torch.long)
    for i, seq in enumerate(ids):
        seq = seq[:width]
        x[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    lengths = torch.tensor([min(len(s), width) for s in ids], dtype=torch.long)
    return x, lengths, torch.tensor(list(labels), dtype=torch.long)


# ---------------------------------------------------------------- instructions and templates

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
TEMPLATES = ("alpaca", "phi3", "chat")


def instruction_of(record: dict, where: str) -> tuple[str, str, str | None]:
    """(instruction, input, output) of an Alpaca record or a chat record (``messages``: the last
    assistant message is the output, the user messages before it the instruction)."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str)
                                                 for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects with text content")
        output = msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else None
        body = msgs[:-1] if output is not None else msgs
        users = [m["content"] for m in body if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: no user message")
        return "\n\n".join(users), "", output
    if "instruction" not in record:
        raise DataError(f"{where} has neither 'instruction' (Alpaca format) nor 'messages' (chat format); "
                        f"it has: {', '.join(record) or 'no fields'}")
    output = record.get("output")
    return (field_text(record["instruction"], where, "instruction"),
            "" if record.get("input") is None else field_text(record["input"], where, "input"),
            None if output is None else field_text(output, where, "output"))


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; known templates: {', '.join(TEMPLATES)}")


def format_prompt(instruction: str, input_text: str = "", template: str = "alpaca", tokenizer=None) -> str:
    """The prompt text for an instruction under ``template``; the response follows it directly.

    alpaca: the book's chapter 7 template. phi3: Phi-3's user/assistant markers (the book's
    exercise 7.1). chat: the model's own chat template (ChatML for SmolLM2)."""
    if template == "alpaca":
        text = f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}"
        if input_text:
            text += f"\n\n### Input:\n{input_text}"
        return text + "\n\n### Response:\n"
    if template == "phi3":
        return f"<|user|>\n{instruction}" + (f"\n{input_text}" if input_text else "") + "\n<|assistant|>:\n"
    if template == "chat":
        if tokenizer is None:
            raise DataError("the chat template needs the model's tokenizer")
        content = instruction + (f"\n\n{input_text}" if input_text else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    check_template(template)
    raise AssertionError(template)  # every known template is handled above


def prompt_ids(tokenizer, instruction: str, input_text: str, template: str, what: str = "a record") -> list[int]:
    """Ids of ``format_prompt``'s text, the instruction and input read as plain text (``template_ids``)."""
    return template_ids(tokenizer, lambda t: format_prompt(t[0], t[1], template, tokenizer), [instruction, input_text],
                        what)


def response_end(template: str, tokenizer) -> list[int]:
    """Ids that end a response in training data: the chat template's end-of-turn token (ChatML's
    <|im_end|>), else the end-of-text token."""
    end = tokenizer.eos_id if template == "chat" else (tokenizer.eot_id if tokenizer.eot_id is not None
                                                      else tokenizer.eos_id)
    return [] if end is None else [end]


@dataclass
class InstructionSet:
    """Encoded records: ``ids`` = prompt + response + end, ``prompt_lengths`` to mask the prompt;
    ``truncated`` counts records cut to the maximum length, ``dropped`` those whose prompt alone
    filled it (nothing of the response left to learn)."""

    ids: list[list[int]]
    prompt_lengths: list[int]
    truncated: int = 0
    dropped: int = 0


def _no_room(source: str, max_length: int) -> DataError:
    return DataError(f"in {source}, every record's prompt fills the maximum length ({max_length} tokens), leaving "
                     "no response to learn; raise --finetune.max_length or use a model with a longer context")


def record_names(records: Sequence[dict], source: str) -> Callable[[int, dict], str]:
    """How errors name a record: by its place in the file (``records`` in the file's order), also
    after a shuffled split has put it elsewhere; (i, record) -> "data.json, record 17"."""
    places = {id(r): i for i, r in enumerate(records)}
    return lambda i, rec: f"{source}, record {places.get(id(rec), i)}"


def encode_instructions(records: Sequence[dict], tokenizer, template: str, max_length: int,
                        source: str = "data", name: Callable[[int, dict], str] | None = None) -> InstructionSet:
    ids, prompt_lengths, truncated, dropped = [], [], 0, 0
    end = response_end(template, tokenizer)
    for i, rec in enumerate(records):
        where = name(i, rec) if name else f"{source}, record {i}"
        instruction, input_text, output = instruction_of(rec, where)
        if output is None:
            raise DataError(f"{where} has no 'output' (or final assistant message) to learn from")
        prompt = prompt_ids(tokenizer, instruction, input_text, template, where)
        if len(prompt) >= max_length:
            dropped += 1
            continue
        full = prompt + plain_ids(tokenizer, output) + end
        # Inputs are the first max_length ids and targets the next ones (the collate function
        # cuts both to max_length), so a cut record keeps max_length + 1 ids: its last target is
        # the next real token, never a padding/end target that would teach it to stop there.
        if len(full) > max_length + 1:
            full, truncated = full[:max_length + 1], truncated + 1
        ids.append(full)
        prompt_lengths.append(len(prompt))
    if records and not ids:
        raise _no_room(source, max_length)
    return InstructionSet(ids, prompt_lengths, truncated, dropped)


def collate_instructions(ids: Sequence[list[int]], pad_id: int, prompt_lengths: Sequence[int] | None = None,
                         max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) as the book's ``custom_collate_fn``: each record gets one padding token
    (``pad_id``, the end-of-text token) and is padded to the longest in the batch; targets are the
    inputs shifted by one; every padding target but the first is IGNORE_INDEX (the model learns to
    end its answer, not to predict padding); with ``prompt_lengths``, the targets that predict
    prompt tokens are IGNORE_INDEX too; ``max_length`` cuts both."""
    width = max(len(x) for x in ids) + 1
    inputs, targets = [], []
    for i, seq in enumerate(ids):
        padded = list(seq) + [pad_id] * (width - len(seq))
        x = torch.tensor(padded[:-1], dtype=torch.long)
        y = torch.tensor(padded[1:], dtype=torch.long)
        y[len(seq):] = IGNORE_INDEX  # positions after the first padding target
        if prompt_lengths is not None:
            y[:max(prompt_lengths[i] - 1, 0)] = IGNORE_INDEX  # targets that are prompt tokens
        if max_length is not None:
            x, y = x[:max_length], y[:max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs), torch.stack(targets)


# ---------------------------------------------------------------- preference pairs

@dataclass
class PreferenceSet:
    """Encoded preference pairs: prompt + chosen and prompt + rejected, with the prompt's length."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    prompt_lengths: list[int]
    truncated: int = 0
    dropped: int = 0


def encode_preferences(records: Sequence[dict], tokenizer, template: str, max_length: int,
                       source: str = "data", name: Callable[[int, dict], str] | None = None) -> PreferenceSet:
    chosen, rejected, lengths, truncated, dropped = [], [], [], 0, 0
    end = response_end(template, tokenizer)
    for i, rec in enumerate(records):
        where = name(i, rec) if name else f"{source}, record {i}"
        missing = [k for k in ("chosen", "rejected") if k not in rec]
        if missing:
            raise DataError(f"{where} has no {missing[0]!r} field (preference data needs a prompt "
                            "(instruction / input, or prompt), chosen and rejected)")
        if "prompt" in rec and "instruction" not in rec:
            instruction, input_text = field_text(rec["prompt"], where, "prompt"), ""
        else:
            instruction, input_text, _ = instruction_of(rec, where)
        prompt = prompt_ids(tokenizer, instruction, input_text, template, where)
        if len(prompt) >= max_length:
            dropped += 1
            continue
        pair = []
        for key in ("chosen", "rejected"):
            full = prompt + plain_ids(tokenizer, field_text(rec[key], where, key)) + end
            if len(full) > max_length + 1:  # as encode_instructions: the collate function cuts to max_length
                full, truncated = full[:max_length + 1], truncated + 1
            pair.append(full)
        chosen.append(pair[0])
        rejected.append(pair[1])
        lengths.append(len(prompt))
    if records and not chosen:
        raise _no_room(source, max_length)
    return PreferenceSet(chosen, rejected, lengths, truncated, dropped)


# ---------------------------------------------------------------- batches by epoch

class EpochBatches:
    """``batches(k)``: micro-batch k of a shuffled pass over ``n`` items, a pure function of k
    (each epoch shuffled with seed + epoch), as ``train.fit`` needs for an exact resume."""

    def __init__(self, n: int, batch_size: int, seed: int, collate: Callable[[list[int]], object]) -> None:
        if n < 1:
            raise DataError("the training split is empty; give more data or a larger train fraction")
        self.n, self.batch_size, self.seed, self.collate = n, batch_size, seed, collate
        self.per_epoch = math.ceil(n / batch_size)

    def indices(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        order = list(range(self.n))
        random.Random(self.seed + epoch).shuffle(order)
        return order[i * self.batch_size:(i + 1) * self.batch_size]

    def __call__(self, k: int):
        return self.collate(self.indices(k))


def in_batches(n: int, batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 in order, in batches (evaluation)."""
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


__all__ = ["ALPACA_HEADER", "DataError", "EpochBatches", "InstructionSet", "LabelledSet", "PreferenceSet", "TEMPLATES",
           "balance", "check_template", "collate_classification", "collate_instructions", "encode_instructions", "encode_labelled",
           "encode_preferences", "format_prompt", "in_batches", "instruction_of", "plain_ids", "read_labelled", "read_records",
           "response_end", "split", "subsample"]
