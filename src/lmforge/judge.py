"""Scoring instruction responses 0-100 with a judge model (the book's chapter 7.8).

The judge is any OpenAI-compatible chat endpoint (Ollama, vLLM, a llama.cpp server, lmforge's
own server), reached with retries and a time-out, or any model lmforge loads, run in process.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from . import tasks
from .config import LmforgeError


def judge_prompt(record: dict) -> str:
    """The book's prompt: the input, the correct output and the model's response; an integer back."""
    instruction, input_text, output = tasks.instruction_of(record, "record")
    return (f"Given the input `{tasks.format_prompt(instruction, input_text, 'alpaca')}` "
            f"and correct output `{output}`, "
            f"score the model response `{record['model_response']}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def parse_score(text: str) -> int | None:
    """The first number in 0..100 in a judge's answer, rounded (None when there is none). Numbers are
    read whole: "1e999" or "-5" is not a 1 or a 5, "85.5" is 86."""
    for m in re.finditer(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?!\w|\.\d)", text):
        value = float(m.group())
        if 0 <= value <= 100:
            return round(value)
    return None


def http_judge(url: str, model: str, timeout: float = 60.0, retries: int = 3, api_key: str | None = None
               ) -> Callable[[str], str]:
    """A function prompt -> answer through ``POST {url}/chat/completions`` (temperature 0)."""
    from urllib.parse import urlparse

    if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise LmforgeError(f"--url {url!r} is not an http(s) address; give e.g. http://localhost:11434/v1")
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")

    def ask(prompt: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "seed": 123}).encode()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        last, tries = "", 0
        for attempt in range(retries + 1):
            tries = attempt + 1
            try:
                req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    reply = json.loads(resp.read().decode())
                return str(reply["choices"][0]["message"]["content"] or "")  # a null answer reads as no score
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:
                    break  # a request error does not go away by asking again
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                last = str(getattr(e, "reason", e))
            except (ValueError, KeyError, IndexError, TypeError):
                last = "an answer that is not an OpenAI chat completion"
            if attempt < retries:
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise LmforgeError(f"the judge at {endpoint} did not answer ({last}) after {tries} tr{'y' if tries == 1 else 'ies'}; check --url "
                           "and --judge_model, or judge with a local model (--judge MODEL)")

    return ask


class TooLong(LmforgeError):
    """A judge prompt longer than a local judge's context: that response is left unscored."""


def local_judge(model_spec: str, max_new_tokens: int = 8) -> Callable[[str], str]:
    """A function prompt -> answer by a model lmforge loads, the prompt put as a user's message in the
    template the model answers in (the one it was tuned on, else its own chat template, as `lmforge
    chat` does; plain text for a base model), the answer ending at that template's stop strings."""
    import torch

    from .chat import answer_template, stop_strings, user_prompt_ids
    from .config import SampleConfig
    from .generate import stream_text
    from .models import load_language_model
    from .tokenizer import ChatTemplateError

    model, tok = load_language_model(model_spec)
    model.eval()
    template = answer_template(model_spec, tok)
    config = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, seed=0,
                          stop=stop_strings(template) if template else ())
    room = model.config.context_length - max_new_tokens

    def ask(prompt: str) -> str:
        # The prompt quotes model responses and references: plain text, whatever they spell
        try:
            ids = user_prompt_ids(tok, template, prompt, "the judge's prompt") if template else \
                tasks.plain_ids(tok, prompt)
        except ChatTemplateError as e:  # (eval judge has no --template to offer)
            raise e.for_command(model_spec, "judge with another model") from None
        if len(ids) > room:  # cut, it would lose the question or the template's opening: not scored instead
            raise TooLong(f"the judge's prompt is {len(ids)} tokens; {model_spec} reads {room} "
                          f"({model.config.context_length} less {max_new_tokens} for the score)")
        with torch.no_grad():
            return "".join(stream_text(model, tok, ids, config))

    return ask


def judge_responses(path: str | Path, ask: Callable[[str], str], progress: bool = True) -> dict:
    """Scores of every record of a responses file (``lmforge finetune instruct`` writes one)."""
    from tqdm import tqdm

    records = tasks.read_records(path)
    missing = [i for i, r in enumerate(records) if "model_response" not in r]
    if missing:
        raise LmforgeError(f"{path}, record {missing[0]} has no 'model_response'; give the responses.json of a run "
                           "of `lmforge finetune instruct`")
    scores, too_long = [], 0
    for rec in tqdm(records, desc="judging", disable=not progress, dynamic_ncols=True):
        try:
            scores.append(parse_score(ask(judge_prompt(rec))))
        except TooLong:
            scores.append(None)
            too_long += 1
    scored = [s for s in scores if s is not None]
    return {"scores": scores, "n": len(records), "scored": len(scored), "too_long": too_long,
            "mean": sum(scored) / len(scored) if scored else None}


__all__ = ["TooLong", "http_judge", "judge_prompt", "judge_responses", "local_judge", "parse_score"]
