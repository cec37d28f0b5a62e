"""The bridge to lm-evaluation-harness: lmforge models run the harness' tasks as model ``lmforge``.

Offline: a tiny run directory and a local multiple-choice task (a YAML over a JSONL file) made in
tmp_path; nothing is downloaded (the harness' datasets library is told it is offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the bridge needs lm-evaluation-harness: pip install -e '.[dev]' (or '.[eval]')")

from conftest import TEXT

from lmforge.checkpoint import save_model
from lmforge.config import LmforgeError, ModelConfig, SampleConfig, TokenizerConfig
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
TASK = "tiny_choice"
WINDOW = 64


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny random GPT and a tiny trained tokenizer, saved as an lmforge run. Its weights are ten
    times GPT-2's initial scale, so that every token of a prompt moves what it predicts (at the
    usual scale a random model barely looks at its context, and a dropped token would go unseen)."""
    from lmforge.model import init_module_weights

    run = tmp_path_factory.mktemp("bridge") / "run"
    tok = Tokenizer.train([TEXT * 5], TokenizerConfig(vocab_size=300))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=WINDOW, d_model=32, n_layer=2, n_head=4))
    init_module_weights(model, model.config.n_layer, seed=0, std=0.2)
    save_model(run, model, 0, {"task": "pretrain"})
    tok.save(run / "tokenizer.json")
    return run


ITEMS = [
    {"context": "The quick brown fox", "choices": ["jumps over the lazy dog.", "is not gold.", "saves nine."], "label": 0},
    {"context": "A stitch in time", "choices": ["saves nine.", "catches the worm", "is a way", "glitters"], "label": 0},
    {"context": "Where there is a will,", "choices": ["there is a way.", "the early bird", "fox"], "label": 0},
    {"context": "All that glitters", "choices": ["is not gold;", "jumps", "the lazy dog. A stitch"], "label": 0},
    {"context": "The early bird", "choices": ["catches the worm.", "saves", "is a will"], "label": 2},
    {"context": "Document 3. The lazy dog", "choices": ["sleeps", "jumps over the quick brown fox", "runs"], "label": 1},
    {"context": "Empty glitters and foxes", "choices": ["a", "gold", "stitch in time saves nine"], "label": 1},
    # longer than the model's window of 64 tokens: both sides cut it from the left
    {"context": TEXT * 2 + "So the fox", "choices": ["jumps.", "is gold.", "sleeps all day long"], "label": 0},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local multiple-choice task for the harness: a YAML over a JSONL file (plain lmforge layout)."""
    folder = tmp_path_factory.mktemp("task")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in ITEMS), encoding="utf-8")
    (folder / "yaml").mkdir()
    (folder / "yaml" / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""", encoding="utf-8")
    return folder


def _lm(run_dir: Path, **kwargs):
    from lmforge.lm_eval_bridge import LmforgeLM

    return LmforgeLM(pretrained=str(run_dir), device="cpu", **kwargs)


def _requests(kind: str, *args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


@pytest.fixture(scope="module")
def harness_result(run_dir, task_dir):
    """The task through lm_eval.simple_evaluate with model="lmforge", samples logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lmforge.lm_eval_bridge  # noqa: F401  (registers "lmforge")

    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse fixture does not cover it
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        return lm_eval.simple_evaluate(model="lmforge", model_args=f"pretrained={run_dir},dtype=float32,batch_size=4",
                                       tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir / "yaml"),
                                                                              include_defaults=False),
                                       log_samples=True, device="cpu", verbosity="WARNING")


@pytest.mark.slow
def test_harness_and_lmforge_scorer_give_the_same_accuracy_on_the_same_items(run_dir, task_dir, harness_result):
    from lmforge.choice_eval import evaluate_choice, read_task
    from lmforge.models import load_language_model

    model, tok = load_language_model(str(run_dir))
    ours = evaluate_choice(model, tok, read_task(task_dir / "items.jsonl"), batch_size=4)
    theirs = harness_result["results"][TASK]
    assert theirs["sample_len"] == ours["n"] == len(ITEMS)
    assert theirs["acc,none"] == ours["acc"]
    assert theirs["acc_norm,none"] == ours["acc_norm"]
    per_doc = {s["doc_id"]: s for s in harness_result["samples"][TASK]}
    assert [per_doc[i]["acc"] for i in range(len(ITEMS))] == [float(r["correct"]) for r in ours["items"]]
    assert [per_doc[i]["acc_norm"] for i in range(len(ITEMS))] == [float(r["correct_norm"]) for r in ours["items"]]
    assert ours["truncated"] == 1  # the long item really was cut (and still agrees)


@pytest.mark.slow
def test_harness_per_choice_loglikelihoods_match_lmforge_within_1e4(run_dir, task_dir, harness_result):
    from lmforge.choice_eval import evaluate_choice, read_task
    from lmforge.evaluate import continuation_logprobs
    from lmforge.models import load_language_model

    model, tok = load_language_model(str(run_dir))
    ours = evaluate_choice(model, tok, read_task(task_dir / "items.jsonl"), batch_size=4)
    for sample in harness_result["samples"][TASK]:
        i = sample["doc_id"]
        harness = [float(r[0][0]) for r in sample["resps"]]
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in ITEMS[i]["choices"]]
        assert harness == pytest.approx(ours["items"][i]["logprobs"], abs=1e-4)
        # and against a scorer that shares no code with the bridge's path (one request at a time)
        ctx = tok.encode(ITEMS[i]["context"], disallowed_special=())
        for choice, got in zip(ITEMS[i]["choices"], harness):
            whole = tok.encode(ITEMS[i]["context"] + " " + choice, disallowed_special=())
            want = continuation_logprobs(model, ctx, [whole[len(ctx):]])[0]
            assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_lm_eval_command_line_runs_model_lmforge_on_a_local_task(run_dir, task_dir, harness_result, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.lm_eval_bridge", "--model", "lmforge",
         "--model_args", f"pretrained={run_dir},dtype=float32,batch_size=4", "--tasks", TASK,
         "--include_path", str(task_dir / "yaml"), "--output_path", str(out), "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    got = json.loads(results_file.read_text())["results"][TASK]
    want = harness_result["results"][TASK]
    assert (got["acc,none"], got["acc_norm,none"]) == (want["acc,none"], want["acc_norm,none"])
    assert "|tiny_choice|" in proc.stdout  # the harness' own table


@pytest.mark.slow
def test_lmforge_eval_harness_reports_a_bad_model_in_one_line_and_exit_code_2(tmp_path, task_dir):
    proc = subprocess.run(  # `lmforge eval harness` is the harness' command line through lmforge's
        [sys.executable, "-m", "lmforge", "eval", "harness", "--model", "lmforge",
         "--model_args", f"pretrained={tmp_path / 'no-such-run'}", "--tasks", TASK,
         "--include_path", str(task_dir / "yaml"), "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: no model named") and "no-such-run" in last
    assert "Traceback" not in proc.stderr


def _text_of_length(tok, multiple: int) -> tuple[str, list[int]]:
    """A text whose token count is a multiple of ``multiple`` (words are added until it is)."""
    text = TEXT * 2
    for _ in range(200):
        ids = tok.encode(text, allowed_special="all")
        if len(ids) % multiple == 0:
            return text, ids
        text += " fox"
    raise AssertionError("no text of a suitable length")


def _loss_sum(model, ids: list[int]) -> float:
    """Summed next-token loss of ``ids`` cut into (B, T) rows, through the model's own loss path."""
    x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    return float(model(x[None], targets=y[None])) * y.numel()


def test_loglikelihood_rolling_is_minus_lmforge_loss_over_disjoint_windows_after_the_end_token(run_dir):
    lm = _lm(run_dir, max_length=32)
    tok, model = lm.tokenizer, lm.model
    text, ids = _text_of_length(tok, 32)
    assert len(ids) >= 64  # at least two windows
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", (text,)), disable_tqdm=True)
    seq = [tok.eot_id, *ids]  # every token predicted once; the first from the end-of-text token
    windows = [seq[s:s + 33] for s in range(0, len(ids), 32)]  # 32 inputs, 32 targets each, no overlap
    with torch.no_grad():
        want = -sum(_loss_sum(model, w) for w in windows)
    assert got == pytest.approx(want, rel=1e-5)


def test_loglikelihood_rolling_of_a_short_text_is_one_window(run_dir):
    lm = _lm(run_dir)
    text = "The quick brown fox jumps."
    ids = lm.tokenizer.encode(text)
    assert len(ids) < WINDOW
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", (text,)), disable_tqdm=True)
    with torch.no_grad():
        want = -_loss_sum(lm.model, [lm.tokenizer.eot_id, *ids])
    assert got == pytest.approx(want, rel=1e-5)


def test_loglikelihood_rolling_gives_the_last_window_its_full_context(run_dir):
    """The harness' rule: a text of 40 tokens in windows of 32 scores its last 8 tokens after the 32
    before them (not after 8 alone, as a plain cut would)."""
    from lmforge.evaluate import continuation_logprobs

    lm = _lm(run_dir, max_length=32)
    tok = lm.tokenizer
    ids = tok.encode(TEXT * 2, allowed_special="all")[:40]
    text = tok.decode(ids)
    ids = tok.encode(text, allowed_special="all")
    n = len(ids)
    assert 32 < n < 64
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", (text,)), disable_tqdm=True)
    with torch.no_grad():
        first = -_loss_sum(lm.model, [tok.eot_id, *ids[:32]])
        last = continuation_logprobs(lm.model, ids[n - 33:32], [ids[32:]])[0]
    assert got == pytest.approx(first + last, rel=1e-5)


def test_score_windows_gives_the_same_sums_batched_and_one_at_a_time(run_dir):
    from lmforge.lm_eval_bridge import score_windows

    lm = _lm(run_dir)
    ids = lm.tokenizer.encode(TEXT * 2)
    windows = [(ids[:5], ids[5:9]), (ids[:30], ids[30:31]), ([ids[0]], ids[1:64]), (ids[10:12], ids[12:40])]
    alone = [score_windows(lm.model, [w], batch_size=1)[0] for w in windows]
    together = score_windows(lm.model, windows, batch_size=4)
    assert together == pytest.approx(alone, abs=1e-4)
    assert len({round(s, 3) for s in together}) == 4


def test_generate_until_is_greedy_and_stops_after_max_gen_toks(run_dir):
    from lmforge.generate import generate

    lm = _lm(run_dir)
    prompt = "The quick brown"
    (got,) = lm.generate_until(_requests("generate_until", (prompt, {"until": [], "max_gen_toks": 12})),
                               disable_tqdm=True)
    ids = lm.tokenizer.encode(prompt)
    new = generate(lm.model, torch.tensor([ids]), SampleConfig(max_new_tokens=12, temperature=0), lm.tokenizer.eot_id)
    want = [t for t in new[0].tolist()]
    want = want[:want.index(lm.tokenizer.eot_id)] if lm.tokenizer.eot_id in want else want
    assert got == lm.tokenizer.decode(want)
    assert len(got) > 4


def test_generate_until_keeps_the_prompts_end_leaving_room_for_max_gen_toks(run_dir):
    """The harness' rule: a prompt keeps its last max_length - max_gen_toks tokens."""
    from lmforge.generate import generate

    lm = _lm(run_dir)
    prompt = TEXT * 2
    ids = lm.tokenizer.encode(prompt)
    assert len(ids) > WINDOW
    (got,) = lm.generate_until(_requests("generate_until", (prompt, {"until": [], "max_gen_toks": 10})),
                               disable_tqdm=True)
    config = SampleConfig(max_new_tokens=10, temperature=0, stop_at_eos=False)
    kept, whole = (lm.tokenizer.decode(generate(lm.model, torch.tensor([p]), config)[0].tolist())
                   for p in (ids[-(WINDOW - 10):], ids[-WINDOW:]))
    assert kept != whole  # the cut matters for this model, so the comparison below can tell
    assert got == kept


def test_generate_until_stops_before_the_first_until_string(run_dir):
    lm = _lm(run_dir)
    prompts = ["The quick brown", "A stitch"]
    free = lm.generate_until(_requests("generate_until", *[(p, {"until": [], "max_gen_toks": 20}) for p in prompts]),
                             disable_tqdm=True)
    assert all(len(t) >= 8 for t in free), free
    stops = [free[0][4:6], free[1][5:8]]
    cut = lm.generate_until(_requests("generate_until", *[(p, {"until": [s, "never-appears"], "max_gen_toks": 20})
                                                          for p, s in zip(prompts, stops)]), disable_tqdm=True)
    assert cut == [t[:t.find(s)] for t, s in zip(free, stops)]
    assert all(len(c) < len(t) for c, t in zip(cut, free))


def test_generate_until_batches_rows_as_they_would_run_alone(run_dir):
    lm = _lm(run_dir, batch_size=3)
    args = [("The quick brown", {"until": ["\n"], "max_gen_toks": 10}), ("Where", {"until": ["\n"], "max_gen_toks": 10}),
            ("All that glitters is not gold", {"until": ["."], "max_gen_toks": 6})]
    together = lm.generate_until(_requests("generate_until", *args), disable_tqdm=True)
    alone = [lm.generate_until(_requests("generate_until", a), disable_tqdm=True)[0] for a in args]
    assert together == alone


def test_empty_context_is_scored_after_the_end_of_text_token(run_dir):
    from lmforge.evaluate import continuation_logprobs

    lm = _lm(run_dir)
    ((got, _),) = lm.loglikelihood(_requests("loglikelihood", ("", " the quick brown fox")), disable_tqdm=True)
    want = continuation_logprobs(lm.model, [lm.tokenizer.eot_id], [lm.tokenizer.encode(" the quick brown fox")])[0]
    assert got == pytest.approx(want, abs=1e-4)


def test_model_args_given_on_the_command_line_win_over_the_harness_defaults(run_dir):
    from lmforge.lm_eval_bridge import LmforgeLM

    # what the harness' command line does: its own batch_size and device beside --model_args
    lm = LmforgeLM.create_from_arg_string(f"pretrained={run_dir},batch_size=7", {"batch_size": 1, "device": "cuda:0"})
    assert lm.batch_size == 7
    if not torch.cuda.is_available():
        assert lm.device.type == "cpu"  # as the harness' hf backend: no CUDA, the CPU
    assert LmforgeLM.create_from_arg_string(f"pretrained={run_dir}", {"batch_size": "auto"}).batch_size == 16


def test_bad_model_arguments_are_one_line_errors(run_dir, tmp_path):
    from lmforge.lm_eval_bridge import LmforgeLM

    with pytest.raises(LmforgeError, match="no model named"):
        LmforgeLM(pretrained=str(tmp_path / "missing"))
    with pytest.raises(LmforgeError, match="batch_size must be a whole number"):
        _lm(run_dir, batch_size="many")
    with pytest.raises(LmforgeError, match="batch_size must be >= 1"):
        _lm(run_dir, batch_size=0)
    with pytest.raises(LmforgeError, match="max_length must be between 1 and the model's context length"):
        _lm(run_dir, max_length=WINDOW + 1)
    with pytest.raises(LmforgeError, match="dtype must be float32, bfloat16 or auto"):
        _lm(run_dir, dtype="float8")


def test_the_harness_finds_lmforge_and_its_own_backends_by_name():
    """In a fresh process: registering lmforge first must not hide the harness' own backends (it
    fills in their names only into an empty registry)."""
    code = ("import lmforge.lm_eval_bridge as b, lm_eval.api.registry as r; "
            "print(r.get_model('lmforge') is b.LmforgeLM, r.get_model('dummy').__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "DummyLM"], proc.stderr[-2000:]


def test_the_bridge_without_lm_eval_is_one_line_also_run_as_a_module():
    script = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['x', '--help']; "
              "runpy.run_module('lmforge.lm_eval_bridge', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("lmforge: error: lm-evaluation-harness is not installed; pip install "
                                   "'lmforge[eval]' (or: pip install lm-eval==0.4.13)")


def test_eval_harness_output_path_is_checked_as_lmforge_outputs_are(run_dir, tmp_path, capsys):
    """The harness wrote its results into a training run, and given a file it logged the failure and
    exited 0 with nothing saved; lmforge checks --output_path before the harness runs."""
    from lmforge.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("keep me")
    for out, said in ((run_dir, "is a training run directory"), (text, "is a file, but this command writes a folder"),
                      (f"--output_path={run_dir / 'results.json'}", "is in a training run directory")):
        args = [out] if str(out).startswith("--") else ["--output_path", str(out)]
        assert main(["eval", "harness", "--model", "lmforge", "--tasks", TASK, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert text.read_text() == "keep me" and not list(run_dir.rglob("results*.json"))
