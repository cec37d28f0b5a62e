"""Conversations: the model behind `lmforge chat` and `lmforge serve`, and one way to turn a list
of messages into a prompt.

A conversation is OpenAI's list of ``{"role": "system" | "user" | "assistant", "content": str}``.
``render`` writes it in the template the model knows: its own chat template (ChatML for SmolLM2),
or the book's Alpaca template (or Phi-3's) for a model instruction-tuned on it; the single-turn
case is exactly ``tasks.format_prompt``, what fine-tuning trained on, so the two cannot drift.
A classification run is an ``Assistant`` too: it answers with its label.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import tasks
from .config import LmforgeError
from .model import GPT

ROLES = ("system", "user", "assistant")


def check_messages(messages: object) -> list[dict[str, str]]:
    """The messages as a clean list, or an error that names the bad one."""
    if not isinstance(messages, list) or not messages:
        raise LmforgeError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LmforgeError(f"message {i} must be an object with a role ({', '.join(ROLES)}) and a text content")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise LmforgeError("the last message must be the user's (the model answers it)")
    return out


def render(messages: Sequence[dict[str, str]], template: str, tokenizer=None) -> str:
    """The prompt text for ``messages`` under ``template``; the assistant's answer follows it."""
    if template == "chat":
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    tasks.check_template(template)
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    parts = []
    for m in turns:
        if m["role"] == "user":
            parts.append(tasks.format_prompt(m["content"], "", template).removeprefix(_header(template)))
        else:  # the next user turn starts with its own separator ("\n\n### Instruction:" in Alpaca)
            parts.append(m["content"] + ("\n" if template == "phi3" else ""))
    body = "".join(parts)
    if template == "alpaca":  # a system message takes the place of the Alpaca preamble
        return ("\n\n".join(system) if system else tasks.ALPACA_HEADER) + body
    return "".join(f"<|system|>\n{s}\n" for s in system) + body


def jinja_template(template: str) -> str:
    """``template`` (alpaca or phi3) as a Jinja chat template that renders exactly what ``render``
    writes: what an export carries, so that `transformers`, llama.cpp and lmforge itself prompt an
    exported model as it was tuned (a test holds the two equal)."""
    turns = ('{%- for m in messages -%}{%- if m.role == "user" -%}{{ USER_START + m.content + USER_END }}'
             '{%- elif m.role == "assistant" -%}{{ m.content + ASSISTANT_END }}{%- endif -%}{%- endfor -%}')
    if template == "alpaca":
        head = ('{%- set system = messages | selectattr("role", "equalto", "system") | map(attribute="content") '
                '| list -%}{{- system | join("\\n\\n") if system else HEADER -}}')
        words = {"HEADER": tasks.ALPACA_HEADER, "USER_START": "\n\n### Instruction:\n",
                 "USER_END": "\n\n### Response:\n", "ASSISTANT_END": ""}
    elif template == "phi3":
        head = '{%- for m in messages if m.role == "system" -%}{{ "<|system|>\\n" + m.content + "\\n" }}{%- endfor -%}'
        words = {"USER_START": "<|user|>\n", "USER_END": "\n<|assistant|>:\n", "ASSISTANT_END": "\n"}
    else:
        raise LmforgeError(f"only alpaca and phi3 have a Jinja form here, not {template!r}")
    text = head + turns
    for name, value in words.items():  # JSON strings are Jinja string literals
        text = text.replace(name, json.dumps(value))
    return text


def tuned_template(spec: str | Path) -> str | None:
    """The template the run at ``spec`` was instruction- or preference-tuned on, as its config records
    it (``merge-lora`` keeps it); None for anything else."""
    from .checkpoint import is_run_dir, read_run_config

    path = Path(spec)
    if not (path.is_dir() and is_run_dir(path)):
        return None
    template = read_run_config(path).get("template")
    return template if isinstance(template, str) else None


def answer_template(spec: str | Path, tokenizer) -> str | None:
    """The template the model at ``spec`` takes a user's message in: the one it was tuned on, else its
    own chat template; None when it has neither (a base model, which only continues text)."""
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        return tuned_template(spec)
    # an export of a run tuned on alpaca or phi3 carries that template in Jinja: the same prompt, and by
    # its name the template's stop strings come back too
    named = next((t for t in ("alpaca", "phi3") if own == jinja_template(t)), "chat")
    return tuned_template(spec) or named


def user_prompt_ids(tokenizer, template: str, text: str, what: str = "the prompt") -> list[int]:
    """The ids of ``text`` as one user message under ``template``, the answer to follow: the message is
    text, even where it spells a turn marker (``tasks.template_ids``)."""
    return tasks.template_ids(tokenizer, lambda t: render([{"role": "user", "content": t[0]}], template, tokenizer),
                              [text], what)


def _header(template: str) -> str:
    """What format_prompt puts before the first instruction (the Alpaca preamble)."""
    return tasks.ALPACA_HEADER if template == "alpaca" else ""


def stop_strings(template: str) -> tuple[str, ...]:
    """Text that starts the user's next turn: the model must stop before writing it."""
    return {"alpaca": ("### Instruction:",), "phi3": ("<|user|>", "<|end|>")}.get(template, ())


@dataclass
class Assistant:
    """A loaded model ready to answer: a language model with its template, or a classifier with
    its labels (``template == "classify"``)."""

    name: str
    model: GPT
    tokenizer: object
    template: str
    labels: list[str] = field(default_factory=list)
    compile: bool = False  # decode steps through torch.compile (see generate.Decoder)

    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu", template: str | None = None,
             dtype: str = "float32", compile: bool = False, quantize: str | None = None) -> Assistant:
        """``dtype``: float32, bfloat16 or auto (bf16 where the hardware is fast at it);
        ``quantize``: None or "int8" (weight-only, see quantize.py)."""
        from .checkpoint import is_run_dir, read_run_config
        from .lora import merge_lora
        from .models import load_any
        from .precision import resolve_dtype

        model, tok = load_any(spec, device)
        model.to(resolve_dtype(dtype, device))
        cfg = read_run_config(spec) if Path(spec).is_dir() and is_run_dir(Path(spec)) else {}
        name = Path(spec).name if Path(spec).exists() else spec
        if model.lm_head.out_features != model.config.vocab_size:
            if quantize:  # once ignored without a word
                raise LmforgeError(f"{spec} is a classifier: --quantize is for generating text; leave it out")
            labels = (cfg.get("head") or {}).get("labels") or [str(i) for i in range(model.lm_head.out_features)]
            return cls(name, model.eval(), tok, "classify", list(labels))
        merge_lora(model)
        model.to(resolve_dtype(dtype, device))  # the merged weights too
        if quantize:
            from .quantize import quantize_model

            quantize_model(model, quantize)
        if template is None:  # the template it was tuned on, else its own chat template, else the book's
            template = answer_template(spec, tok) or "alpaca"
        if template == "chat" and not getattr(tok, "chat_template", None):
            raise LmforgeError(f"{spec} has no chat template; use --template alpaca or phi3")
        tasks.check_template(template)
        return cls(name, model.eval(), tok, template, compile=compile)

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    @property
    def stop_ids(self) -> set[int]:
        return {i for i in (self.tokenizer.eos_id, self.tokenizer.eot_id) if i is not None}

    @property
    def stop(self) -> tuple[str, ...]:
        return stop_strings(self.template)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt's token ids: the template's own markers are special tokens, what the messages say
        is text, even where it spells one (``tasks.template_ids``)."""
        return tasks.template_ids(
            self.tokenizer, lambda texts: render([{**m, "content": t} for m, t in zip(messages, texts)],
                                                 self.template, self.tokenizer),
            [m["content"] for m in messages])

    def fit(self, messages: list[dict[str, str]], reserve: int) -> tuple[list[dict[str, str]], int]:
        """The newest messages whose prompt leaves ``reserve`` tokens for the answer: the oldest
        turns (never the system message or the last question) are dropped; returns how many."""
        kept, dropped = list(messages), 0
        while len(self.prompt_ids(kept)) + reserve > self.context_length:
            turns = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
            if not turns:
                break  # only the question is left: the caller reports it as too long
            del kept[turns[0]]  # a question goes with its answer
            dropped += 1
            if turns[0] < len(kept) - 1 and kept[turns[0]]["role"] == "assistant":
                del kept[turns[0]]
                dropped += 1
        return kept, dropped

    def classify(self, text: str) -> tuple[str, float, dict[str, float]]:
        """A classification run's label for ``text``, its probability and every label's."""
        from .finetune import label_texts

        return label_texts(self.model, self.tokenizer, self.labels, [text])[0]


# ---------------------------------------------------------------- the terminal chat

HELP = ("/reset clears the conversation, /system TEXT sets the system message, /exit leaves (or Ctrl-D); "
        "end a line with \\ to continue it, or write a block between two lines of \"\"\"; Ctrl-C stops an answer")


class Conversation:
    """The messages so far, kept within the context window, and the next answer streamed."""

    def __init__(self, assistant: Assistant, config, system: str | None = None) -> None:
        self.assistant, self.config = assistant, config
        self.check_system(system)
        self.system = system
        self.messages: list[dict[str, str]] = []

    def check_system(self, system: str | None) -> None:
        """Refuse a system message that leaves no room in the context (it is part of every prompt:
        once each message after it was refused as too long, however short)."""
        a = self.assistant
        if not system or a.template == "classify":
            return
        n = len(a.prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": ""}]))
        if n >= a.context_length:
            raise LmforgeError(f"the system message is {n} tokens with its template; the model's context is "
                               f"{a.context_length}: write a shorter one")

    def reset(self) -> None:
        self.messages = []

    def _with_system(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reply(self, text: str, notice=print):
        """Stream the answer to ``text`` as text deltas; the answer (or what was written of it
        before a Ctrl-C) joins the conversation. Oldest turns that no longer fit are dropped
        with a notice; a question too long on its own is an error."""
        from .generate import stream_text

        a = self.assistant
        if a.template == "classify":
            label, prob, _ = a.classify(text)
            yield f"{label} ({prob:.1%})"
            return
        question = {"role": "user", "content": text}
        alone = len(a.prompt_ids(([{"role": "system", "content": self.system}] if self.system else []) + [question]))
        if alone >= a.context_length:  # refused before the conversation is touched
            with_system = " (the system message included)" if self.system else ""
            raise LmforgeError(f"that message is {alone} tokens with its template{with_system}; the model's context "
                               f"is {a.context_length}: write a shorter one")
        self.messages.append(question)
        reserve = min(self.config.max_new_tokens, a.context_length // 4)  # room kept for the answer
        kept, dropped = a.fit(self._with_system(), reserve)
        if dropped:
            self.messages = [m for m in kept if m["role"] != "system"]
            notice(f"[the oldest {dropped} message{'s' if dropped > 1 else ''} no longer fit in the context and "
                   "were dropped]")
        ids = a.prompt_ids(kept)
        config = dataclasses.replace(self.config, stop=tuple(self.config.stop) + a.stop)  # and the template's
        answer = []
        try:
            for delta in stream_text(a.model, a.tokenizer, ids, config, compile=a.compile):
                answer.append(delta)
                yield delta
        finally:  # also on Ctrl-C: what was written stays in the conversation
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})


def read_message(read_line, prompt: str = ">>> ", more: str = "... ") -> str:
    """One message from the user: a line; a line ending in a backslash continues on the next;
    a line of three double quotes starts a block that the next such line ends. The end of input
    ends a message begun (a block never closed, a last line ending in a backslash): it is sent
    as it stands, not dropped; the next read then meets the end of input."""
    first = read_line(prompt)
    if first.strip() == '"""':
        lines = []
        try:
            while (line := read_line(more)).strip() != '"""':
                lines.append(line)
        except EOFError:
            if not lines:
                raise
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read_line(more))
        except EOFError:
            break
    return "\n".join(lines)


def _undecoded_byte(text: str) -> int | None:
    """Where ``text`` holds a byte that was not UTF-8 (Python's standard input turns such bytes into
    lone surrogates, U+DC80-U+DCFF, rather than failing): the byte's offset in the message, or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return len(text[:e.start].encode("utf-8"))


def run_terminal(assistant: Assistant, config, system: str | None = None, read_line=input, write=None) -> None:
    """The interactive chat loop: read a message, stream the answer, until /exit or end of input."""
    import sys

    def out(text: str) -> None:
        (write or sys.stdout.write)(text)
        if write is None:
            sys.stdout.flush()

    conv = Conversation(assistant, config, system)
    what = "labels texts" if assistant.template == "classify" else f"template {assistant.template}"
    out(f"chatting with {assistant.name} ({what}, context {assistant.context_length} tokens). {HELP}\n")
    while True:
        try:
            text = read_message(read_line)
        except EOFError:
            out("\n")
            return
        except UnicodeDecodeError as e:  # standard input read strictly (not through `lmforge chat`)
            out(f"[that message is not UTF-8 text (byte {e.start}); it was not sent: set the terminal to UTF-8]\n")
            continue
        except KeyboardInterrupt:
            out("\n(to leave: /exit or Ctrl-D)\n")
            continue
        if (bad := _undecoded_byte(text)) is not None:  # stdin decodes stray bytes as lone surrogates
            out(f"[that message is not UTF-8 text (byte {bad}); it was not sent: set the terminal to UTF-8]\n")
            continue
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            conv.reset()
            out("[conversation cleared]\n")
            continue
        if command == "/system" or command.startswith("/system "):
            system = command[len("/system"):].strip() or None
            try:
                conv.check_system(system)
            except LmforgeError as e:
                out(f"[{e}; the system message is unchanged]\n")
                continue
            conv.system = system
            conv.reset()
            out(f"[system message {'set' if conv.system else 'removed'}; conversation cleared]\n")
            continue
        if command.startswith("/") and command.split()[0] not in ("/exit", "/quit", "/reset", "/system"):
            out(f"[unknown command {command.split()[0]}; {HELP}]\n")
            continue
        answer = None
        try:
            answer = conv.reply(text, notice=lambda m: out(m + "\n"))
            for delta in answer:
                out(delta)
            out("\n")
        except KeyboardInterrupt:
            out("\n[stopped]\n")
        except LmforgeError as e:
            out(f"[{e}]\n")
        finally:
            if answer is not None:
                answer.close()  # the partial answer joins the conversation now, not whenever it is collected
