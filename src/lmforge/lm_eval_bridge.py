"""lmforge models inside EleutherAI's lm-evaluation-harness: an ``lm_eval`` model named ``lmforge``.

    pip install "lmforge[eval]"
    python -m lmforge.lm_eval_bridge --model lmforge --model_args pretrained=RUN,dtype=float32,batch_size=16 \\
        --tasks hellaswag                       # every other lm_eval option works as with lm_eval

``pretrained`` is any MODEL lmforge loads (a run directory, a Hugging Face folder, a .gguf file
or a known name). The harness asks three things of a model, and each goes through lmforge's own
code: ``loglikelihood`` (multiple choice) through ``choice_eval.loglikelihoods`` (the choices of
a question batched with their context run once), ``loglikelihood_rolling`` (perplexity) over the
harness' own disjoint windows of the model's context, and ``generate_until`` through the
``Decoder`` with ``TextStream`` cutting at the stop strings.

Why ``python -m lmforge.lm_eval_bridge`` and not the bare ``lm_eval`` command: lm-eval 0.4.13
finds a model name only in its registry, which an outside package fills by being imported
(``@register_model``); its command line imports no outside package (no entry-point group, no
plugin flag), so ``lm_eval --model lmforge`` stops with "no model for this name found". This
module registers ``lmforge`` and then hands its arguments, unchanged, to lm-eval's own command
line. In Python, ``import lmforge.lm_eval_bridge`` is enough before
``lm_eval.simple_evaluate(model="lmforge", ...)``.

``dtype`` is lmforge's compute precision (float32, bfloat16 or auto: autocast over fp32 weights,
as ``lmforge eval`` runs); ``batch_size`` counts continuations scored together, as in the hf
backend; ``max_length`` narrows the window of perplexity and generation (default, and always for
multiple choice: the model's context length).
"""

from __future__ import annotations

import json
import logging
import sys

import torch

from .config import LmforgeError, SampleConfig

try:
    from lm_eval.api.model import LM
except ImportError:  # a one-line message instead of a traceback into a missing package
    _MISSING = ("lm-evaluation-harness is not installed; pip install 'lmforge[eval]' "
                "(or: pip install lm-eval==0.4.13)")
    if __name__ == "__main__":  # `python -m lmforge.lm_eval_bridge`: no handler above us to print it
        print(f"lmforge: error: {_MISSING}", file=sys.stderr)
        raise SystemExit(2) from None
    raise LmforgeError(_MISSING) from None

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # what the harness' hf backend allows when a task does not say


def _device(name: str | None) -> torch.device:
    """The device asked for; a CUDA device where there is none falls back to the CPU, as the
    harness' hf backend does (its command line asks for cuda:0 unless told otherwise)."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        log.info("lmforge: %s asked for but CUDA is not available; running on the CPU", name)
        return torch.device("cpu")
    if name:
        return torch.device(name)
    from .precision import default_device

    return default_device()


def _batch_size(value: int | str | None) -> int:
    """The harness passes ``--batch_size`` as text ('16', 'auto', 'auto:4'); 'auto' means lmforge's default."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise LmforgeError(f"batch_size must be a whole number or 'auto', got {value!r}") from None
    if size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {size}")
    return size


class LmforgeLM(LM):
    """An lmforge model and its tokenizer, answering the harness' three kinds of request."""

    def __init__(self, pretrained: str, dtype: str = "float32", batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 device: str | None = None, max_length: int | None = None, max_batch_size: int | None = None,
                 **unused) -> None:
        super().__init__()
        from .models import load_language_model
        from .precision import resolve_dtype

        if unused:  # the harness passes its own options (e.g. trust_remote_code) to every backend
            log.info("lmforge: ignoring model arguments it has no use for: %s", ", ".join(sorted(unused)))
        self._device = _device(device)
        self.spec = str(pretrained)
        self.model, self.tokenizer = load_language_model(self.spec, self._device)
        self.model.eval()
        self.dtype = resolve_dtype(str(dtype), self._device)
        self._batch_size = _batch_size(batch_size)
        window = self.model.config.context_length
        if max_length is not None and not 1 <= int(max_length) <= window:
            raise LmforgeError(f"max_length must be between 1 and the model's context length ({window}), "
                               f"got {max_length}")
        self._max_length = int(max_length) if max_length is not None else window

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LmforgeLM:
        """The harness' command line always adds its own batch_size (1 unless --batch_size) and
        device (cuda:0 unless --device); a value written in --model_args wins over those, where the
        base class would stop with 'got multiple values for keyword argument'."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LmforgeLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ what the harness reads
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def eot_token_id(self) -> int:
        """The document separator, which the first rolling (perplexity) window starts from."""
        tok = self.tokenizer
        end = tok.eot_id if tok.eot_id is not None else tok.eos_id
        if end is None:
            raise LmforgeError(f"the tokenizer of {self.spec} has no end-of-text token, which the harness starts "
                               "perplexity windows from")
        return end

    @property
    def tokenizer_name(self) -> str:
        return f"lmforge-{self.tokenizer.name}-{self.tokenizer.fingerprint}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        """Recorded in the harness' results next to its own configuration."""
        return {"model": self.spec, "dtype": str(self.dtype).split(".")[-1],
                "model_num_parameters": self.model.num_params(), "context_length": self.max_length}

    # ------------------------------------------------------------------ the three requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether greedy decoding would produce it, per request."""
        from .choice_eval import loglikelihoods
        from .precision import tune_cpu_allocator

        if self._device.type == "cpu":
            tune_cpu_allocator()  # an evaluation process: logits blocks reused, not faulted in (evaluate_choice)
        pairs = [tuple(r.args) for r in requests]
        scored = loglikelihoods(self.model, self.tokenizer, pairs, batch_size=self.batch_size, dtype=self.dtype,
                                progress=not disable_tqdm)
        out = []
        for pair, (logprob, greedy, _) in zip(pairs, scored):
            out.append((float(logprob), bool(greedy)))
            self.cache_hook.add_partial("loglikelihood", pair, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each whole text, every token predicted once: the harness' disjoint windows
        of ``max_length`` tokens, the first starting from the end-of-text token."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, r in enumerate(requests):
            ids = self.tokenizer.encode(r.args[0], allowed_special="all")
            for w in get_rolling_token_windows(token_list=ids, prefix_token=self.eot_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        scores = score_windows(self.model, windows, self.batch_size, self.dtype, progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, scores):
            totals[i] += s
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(r.args), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation up to (not including) the first of its ``until`` strings, the
        end token or ``max_gen_toks`` tokens; greedy unless the request samples with a temperature."""
        from tqdm import tqdm

        groups: dict[str, list[int]] = {}  # requests with the same settings decode together
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="lmforge generate_until", disable=disable_tqdm)
        for rows in groups.values():
            config = self._sample_config(requests[rows[0]].args[1])
            rows = sorted(rows, key=lambda i: len(requests[i].args[0]))  # similar lengths pad less
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], config)
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", tuple(requests[i].args), text)
                bar.update(len(chunk))
        bar.close()
        return out

    # ------------------------------------------------------------------ helpers
    def _sample_config(self, gen_kwargs: dict) -> SampleConfig:
        from lm_eval.models.utils import normalize_gen_kwargs

        if not isinstance(gen_kwargs, dict):
            raise LmforgeError(f"generation settings must be a mapping, got {type(gen_kwargs).__name__}")
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [s for s in kw.get("until") or [] if isinstance(s, str) and s]
        greedy = not kw.get("do_sample") or float(kw.get("temperature") or 0.0) == 0.0
        return SampleConfig(max_new_tokens=int(kw["max_gen_toks"]), temperature=0.0 if greedy else
                            float(kw["temperature"]), top_k=kw.get("top_k") if not greedy else None,
                            top_p=kw.get("top_p") if not greedy else None, seed=kw.get("seed", 1234),
                            stop=tuple(until))

    def _generate(self, contexts: list[str], config: SampleConfig) -> list[str]:
        """One batch through the Decoder; each row's text goes through its own TextStream, which
        holds back a possible start of a stop string and ends the row at one."""
        from .generate import Decoder, TextStream, prompt_ids
        from .precision import autocast

        # Leave room for the answer, as the harness does; when the answer alone fills the window,
        # the Decoder keeps the prompt's end and slides the window as it goes.
        room = self.max_length - config.max_new_tokens
        prompts = [prompt_ids(self.tokenizer, c) for c in contexts]
        prompts = [p[-room:] if room > 0 else p[-self.max_length:] for p in prompts]
        ends = {i for i in (self.tokenizer.eos_id, self.tokenizer.eot_id) if i is not None}
        streams = [TextStream(self.tokenizer, config.stop) for _ in contexts]
        decoder = Decoder(self.model, prompts, config, ends)
        with torch.no_grad(), autocast(self._device, self.dtype):
            for step in decoder:
                for row, tok in enumerate(step):
                    if tok is None or tok.stop:
                        continue
                    streams[row].push(tok.id)
                    if streams[row].stopped:
                        decoder.finish(row)
        return [s.text + s.close() for s in streams]


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: list[tuple[list[int], list[int]]], batch_size: int = 16,
                  dtype: torch.dtype = torch.float32, progress: bool = False) -> list[float]:
    """Sum of log p(target | context) of each (context ids, target ids) window, where context +
    target fit the model's window plus one (the last target is predicted, never fed). Windows run
    in right-padded batches; padding after a row's tokens cannot change them (causal attention)."""
    from tqdm import tqdm

    from .precision import autocast

    device = next(model.parameters()).device
    window = model.config.context_length
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]) - len(windows[i][1]))
    out = [0.0] * len(windows)
    for start in tqdm(range(0, len(order), batch_size), desc="lmforge loglikelihood_rolling", disable=not progress):
        chunk = order[start:start + batch_size]
        inputs = [(windows[i][0] + windows[i][1])[:-1] for i in chunk]
        if any(not x or len(x) > window for x in inputs) or any(not windows[i][1] for i in chunk):
            raise LmforgeError(f"a scoring window must hold 1 to {window} input tokens and a non-empty target")
        x = torch.zeros((len(chunk), max(len(s) for s in inputs)), dtype=torch.long, device=device)
        for row, s in enumerate(inputs):
            x[row, :len(s)] = torch.tensor(s)
        with autocast(device, dtype):
            hidden = model.hidden_states(x)
        for row, i in enumerate(chunk):
            target = torch.tensor(windows[i][1], device=device)
            end = len(inputs[row])
            with autocast(device, dtype):  # the output layer only where a target is predicted
                logits = model.logits(hidden[row, end - len(target):end])
            logp = torch.log_softmax(logits.float(), dim=-1)
            out[i] = float(logp.gather(1, target[:, None]).sum())
    return out


def register() -> None:
    """Make ``lmforge`` a model name of the harness (importing this module does it)."""
    import lm_eval.models  # noqa: F401  (the harness fills in its own names only into an empty registry)
    from lm_eval.api.registry import model_registry

    # By module path, not the class: run as ``python -m`` this file is also ``__main__``, whose
    # class is a second copy that must not clash with the imported one.
    if "lmforge" not in model_registry:
        model_registry.register("lmforge", target="lmforge.lm_eval_bridge:LmforgeLM")


register()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with ``lmforge`` registered (see the module docstring)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except LmforgeError as e:  # lmforge's errors (a bad MODEL, a bad setting) as one line, as `lmforge` prints them
        print(f"lmforge: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = ["LmforgeLM", "main", "register", "score_windows"]

if __name__ == "__main__":
    main()
