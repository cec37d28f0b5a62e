"""Multiple choice by log-likelihood (choice_eval): readers, batched scoring against the plain
way, accuracy on rigged models, k-shot prompts, truncation, bad input, results and the suite."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TEXT

from lmforge.choice_eval import (
    ChoiceItem,
    build_contexts,
    encode_request,
    evaluate_choice,
    loglikelihood_reference,
    loglikelihoods,
    read_task,
    run_choice_eval,
    run_suite,
)
from lmforge.config import LmforgeError, ModelConfig, TokenizerConfig
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 5], TokenizerConfig(vocab_size=300))


def tiny(tok, context_length=64, llama=False, seed=0):
    torch.manual_seed(seed)
    kw = {"vocab_size": tok.vocab_size, "context_length": context_length, "d_model": 32, "n_layer": 2, "n_head": 4}
    if llama:
        kw.update(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_head=2, bias=False, qkv_bias=False)
    return GPT(ModelConfig(**kw)).eval()


def unigram(tok, prefs: dict[int, float] | None = None) -> GPT:
    """A GPT whose next-token logits are ``prefs`` (0 for other tokens) whatever the context: every
    weight zero, so the final LayerNorm outputs its bias (a unit vector) and the output layer's
    first column is the logits."""
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=64, d_model=32, n_layer=2, n_head=4,
                            tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.bias[0] = 1.0
        for t, v in (prefs or {}).items():
            model.lm_head.weight[t, 0] = v
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    """Two tiny run directories (different weights, same tokenizer)."""
    from lmforge.checkpoint import save_model

    root = tmp_path_factory.mktemp("runs")
    out = []
    for i in range(2):
        run = root / f"run{i}"
        save_model(run, tiny(tok, seed=i), 0)
        tok.save(run / "tokenizer.json")
        out.append(run)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PLAIN = [{"context": f"The quick brown fox {i}", "choices": ["jumps", "sleeps", "runs away"], "label": i % 3}
         for i in range(6)]


# ---------------------------------------------------------------------------- readers

def test_hellaswag_lines_are_preprocessed_as_the_harness_does(tmp_path):
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow "
         "covering the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
         "ctx": "ignored when ctx_a and ctx_b are there", "split": "val",
         "endings": [", the man adds wax to the windshield and cuts it.", ", the man continues removing the snow."],
         "label": 1},
        {"activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
         "ctx_b": "WATER them daily", "endings": ["[step] Use a hose.  Gently.", "[title] Buy seeds [step] Plant them."],
         "label": "1"},
        {"activity_label": "Cooking", "ctx": "A man stirs a pot.", "endings": ["He adds salt.", "He sings."],
         "label": 0},
    ])
    assert read_task(path) == [
        ChoiceItem("Removing ice from car: Then, the man writes over the snow covering the window of a car, and a "
                   "woman wearing winter clothes smiles. Then",
                   [", the man adds wax to the windshield and cuts it.", ", the man continues removing the snow."], 1),
        # capitalize() lowers the rest of ctx_b; ' [title]' ends a sentence; brackets go; double spaces shrink
        ChoiceItem("Home and Garden: How to grow tomatoes. Pick a sunny spot. Water them daily",
                   [" Use a hose. Gently.", " Buy seeds Plant them."], 1),
        ChoiceItem("Cooking: A man stirs a pot.", ["He adds salt.", "He sings."], 0),
    ]


def test_bigbench_task_json_is_formatted_as_bigbench_and_ties_are_skipped(tmp_path):
    task = {"name": "arith", "description": "d", "keywords": ["k"], "metrics": ["multiple_choice_grade"],
            "examples": [{"input": "2 + 2 =", "target_scores": {"4": 1, "5": 0}},
                         {"input": "Is the sky blue?", "target_scores": {"yes": 0.0, "no": 0.5, "maybe": 0.2}},
                         {"input": "tie", "target_scores": {"a": 1, "b": 1}}]}
    folder = tmp_path / "arith"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps(task, indent=2))
    with pytest.warns(UserWarning, match="skipped 1 of 3 examples .*examples 3"):
        items = read_task(folder / "task.json")
    # BIG-bench's defaults: '\nQ: ' before, the choices listed in its fixed shuffled order, '\nA: ' after
    assert items == [ChoiceItem("\nQ: 2 + 2 =\n  choice: 5\n  choice: 4\nA:", ["4", "5"], 0),
                     ChoiceItem("\nQ: Is the sky blue?\n  choice: maybe\n  choice: no\n  choice: yes\nA:",
                                ["yes", "no", "maybe"], 1)]
    task.update(example_input_prefix="Question: ", example_output_prefix="\nAnswer: ", append_choices_to_input=False)
    task["examples"] = task["examples"][:1]
    (folder / "task.json").write_text(json.dumps(task))
    assert read_task(folder) == [ChoiceItem("Question: 2 + 2 =\nAnswer:", ["4", "5"], 0)]  # a folder with task.json


def test_plain_jsonl_and_json_array_are_read_as_given(tmp_path):
    rows = [{"context": "Where there is a will,", "choices": ["there is a way", "no"], "label": 0, "extra": 1},
            {"context": "", "choices": ["a"], "label": 0}]
    want = [ChoiceItem("Where there is a will,", ["there is a way", "no"], 0), ChoiceItem("", ["a"], 0)]
    assert read_task(write_jsonl(tmp_path / "t.jsonl", rows)) == want
    (tmp_path / "t.json").write_text(json.dumps(rows))
    assert read_task(tmp_path / "t.json") == want


BAD = [
    ("missing label", "t.jsonl", '{"context": "a", "choices": ["x", "y"]}\n', r"line 1 has no 'label' field"),
    ("missing field, line 2", "t.jsonl", ('{"context": "a", "choices": ["x"], "label": 0}\n{"choices": ["x"], '
                                          '"label": 0}\n'), r"line 2 has no 'context' field"),
    ("hellaswag missing endings", "h.jsonl", ('{"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["x"], '
                                              '"label": 0}\n{"activity_label": "A", "ctx_a": "b", "ctx_b": "c", '
                                              '"label": 0}\n'), r"line 2 has no 'endings'"),
    ("label out of range", "t.jsonl", '{"context": "a", "choices": ["x", "y"], "label": 2}\n',
     r"line 1: label 2 is out of range for 2 choices"),
    ("negative label", "t.jsonl", '{"context": "a", "choices": ["x", "y"], "label": -1}\n', r"label -1 is out of range"),
    ("label not a number", "t.jsonl", '{"context": "a", "choices": ["x", "y"], "label": "x"}\n', r"is not an integer"),
    ("empty choice list", "t.jsonl", '{"context": "a", "choices": [], "label": 0}\n', r"the choice list is empty"),
    ("duplicate choices", "t.jsonl", '{"context": "a", "choices": ["x", "y", "x"], "label": 0}\n',
     r"the choice 'x' appears twice"),
    ("empty choice", "t.jsonl", '{"context": "a", "choices": ["x", ""], "label": 0}\n', r"choice 1 is empty"),
    ("choices not a list", "t.jsonl", '{"context": "a", "choices": "xy", "label": 0}\n', r"not a list"),
    ("line not an object", "t.jsonl", '{"context": "a", "choices": ["x"], "label": 0}\n"text"\n',
     r"line 2 is a string, not an object"),
    ("array record not an object", "t.json", '[{"context": "a", "choices": ["x"], "label": 0}, 3]',
     r"record 2 is a number, not an object"),
    ("non-UTF-8", "t.jsonl", b'{"context": "a", "choices": ["x"], "label": 0}\n{"context": "\xff"}\n',
     r"is not UTF-8 text \(byte \d+, line 2\)"),
    ("malformed JSON line", "t.jsonl", '{"context": "a", "choices": ["x"], "label": 0}\n{"context": \n',
     r"line 2 is not valid JSON"),
    ("empty file", "t.jsonl", "\n  \n", r"is empty"),
    ("bigbench generative", "task.json", '{"examples": [{"input": "a", "target": "b"}]}',
     r"a generative task"),
    ("bigbench only ties", "task.json", '{"examples": [{"input": "a", "target_scores": {"x": 0, "y": 0}}]}',
     r"no example has a single best choice"),
    ("bigbench scores not numbers", "task.json", '{"examples": [{"input": "a", "target_scores": {"x": "1"}}]}',
     r"every target score must be a finite number"),
    ("bigbench NaN score", "task.json", '{"examples": [{"input": "a", "target_scores": {"x": NaN, "y": 0}}]}',
     r"every target score must be a finite number"),  # once scored: NaN made no choice the best, silently
    ("bigbench prefix not text", "task.json", '{"examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}}], '
                                              '"choice_prefix": 3}', r"choice_prefix is a number, not text"),
    ("object without examples", "t.json", '{"name": "x"}', r"one JSON object without 'examples': not a BIG-bench task"),
    ("bigbench huge integer score", "task.json", '{"examples": [{"input": "a", "target_scores": {"x": 1' + "0" * 400
     + ', "y": 0}}]}', r"every target score must be a finite number"),  # once an OverflowError
    ("a record of another layout", "t.jsonl", '{"question": "q", "options": ["a", "b"], "answer": 0}\n',
     r"line 1 has no 'context' field"),
    ("bigbench broken JSON", "task.json", '{"examples": [\n  {"input": "a",}\n]}', r"is not valid JSON \(.* line 2"),
    ("bigbench subtasks", "task.json", '{"name": "x", "subtasks": ["a"]}', r"has no 'examples'"),
    # once an "internal error" (str.isdigit holds for them, int() refuses them) or, for "١", the label 1
    *((f"label {s!r}", "t.jsonl", json.dumps({"context": "a", "choices": ["x", "y"], "label": s}),
       rf"line 1: label '{s}' is not an integer") for s in ("--1", "\u00b2", "\u0661", "1.0", "")),
    ("bigbench append_choices_to_input a string", "task.json",  # once read as bool("false"): true
     '{"examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}}], "append_choices_to_input": "false"}',
     r"append_choices_to_input is a string, not true or false"),
]


@pytest.mark.parametrize("content_name,content,problem", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_task_files_give_one_line_errors(tmp_path, content_name, content, problem):
    path = tmp_path / content_name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LmforgeError, match=problem) as e:
        read_task(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("content_name,content,problem", [BAD[i][1:] for i in (0, 3, 6, 7, 11, 12, 13)],
                         ids=[BAD[i][0] for i in (0, 3, 6, 7, 11, 12, 13)])
def test_cli_refuses_bad_tasks_with_exit_2_and_writes_nothing(tmp_path, runs, capsys, content_name, content,
                                                              problem):
    from lmforge.cli import main

    path = tmp_path / content_name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "results.json"
    assert main(["eval", "choice", str(runs[0]), "--task", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [content_name]
    assert main(["eval", "suite", str(runs[0]), "--tasks", str(path), "--out", str(tmp_path / "suite")]) == 2
    assert not (tmp_path / "suite").exists()


def test_a_missing_task_file_is_named(tmp_path):
    with pytest.raises(LmforgeError, match="nothere.jsonl does not exist"):
        read_task(tmp_path / "nothere.jsonl")


# ---------------------------------------------------------------------------- scoring

def test_tokenisation_follows_the_harness(tok):
    # the context's trailing space moves onto the continuation; the continuation is the whole's tail
    ctx, cont = encode_request(tok, "A stitch ", "in time")
    assert ctx == tok.encode("A stitch") and cont == tok.encode("A stitch in time")[len(ctx):]
    assert tok.decode(cont) == " in time"
    # an empty context stands as the end-of-text token
    assert encode_request(tok, "", "The fox") == ([tok.eot_id], tok.encode("The fox"))


REQUESTS = [
    ("The quick brown fox", " jumps over the lazy dog"), ("The quick brown fox", " sleeps"),
    ("The quick brown fox", " jumps over the lazy dog"),  # the same request twice
    ("A stitch in time ", "saves nine"), ("", "Where there is a will"), ("x", " y"),
    ("All that glitters is not gold; " * 4, " the early bird catches the worm"),  # longer than the window
    ("Where there is a will, there is a way.", " A stitch in time saves nine."),  # a long continuation
]


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_batched_scores_equal_one_request_at_a_time(tok, llama):
    from lmforge.evaluate import continuation_logprobs

    model = tiny(tok, context_length=32, llama=llama)
    plain = [loglikelihood_reference(model, tok, c, x) for c, x in REQUESTS]
    for batch_size in (1, 3, 64):
        got = loglikelihoods(model, tok, REQUESTS, batch_size=batch_size)
        assert [g[2] for g in got] == [p[2] for p in plain] and [g[1] for g in got] == [p[1] for p in plain]
        assert [g[0] for g in got] == pytest.approx([p[0] for p in plain], abs=1e-4)
    # the reference agrees with the older scorer of evaluate.py where nothing is truncated
    for c, x in REQUESTS[:2]:
        ctx, cont = encode_request(tok, c, x)
        assert loglikelihood_reference(model, tok, c, x)[0] == pytest.approx(
            continuation_logprobs(model, ctx, [cont])[0], abs=1e-4)


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_a_packed_row_computes_what_each_sequence_computes_alone(tok, llama):
    # one row: a prefix, then two branches that each see the prefix and themselves only
    model = tiny(tok, context_length=16, llama=llama)
    prefix, a, b = [5, 9, 2, 7], [11, 3, 8], [4, 4]
    ids = torch.tensor([prefix + a + b])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5]])
    seg = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    cols = torch.arange(9)
    mask = (cols[None] <= cols[:, None]) & ((seg[None] == 0) | (seg[None] == seg[:, None]))
    with torch.no_grad():
        packed = model.hidden_states(ids, layout=(positions, mask[None, None]))[0]
        alone_a = model.hidden_states(torch.tensor([prefix + a]))[0]
        alone_b = model.hidden_states(torch.tensor([prefix + b]))[0]
    assert torch.allclose(packed[:7], alone_a, atol=1e-5) and torch.allclose(packed[7:], alone_b[4:], atol=1e-5)
    with pytest.raises(ValueError, match="beyond the model's context length"):
        model.hidden_states(ids, layout=(positions + 10, mask[None, None]))
    with pytest.raises(ValueError, match="takes positions"):
        model.hidden_states(ids, layout=(positions[:, :5], mask[None, None]))
    with pytest.raises(ValueError, match="boolean mask"):  # a float mask would be added to the scores
        model.hidden_states(ids, layout=(positions, mask[None, None].float()))
    with pytest.raises(ValueError, match="no cache or padding"):
        model.hidden_states(ids, pad=torch.tensor([1]), layout=(positions, mask[None, None]))


def test_rows_split_where_a_context_s_continuations_outgrow_the_window_or_the_score_budget(tok, monkeypatch):
    import lmforge.choice_eval as ce

    model = tiny(tok, context_length=24)
    context = "The quick brown fox jumps"
    endings = [" over the lazy dog", " a stitch in time saves nine", " where there is a will", " all that glitters",
               " is not gold", " the early bird catches the worm"]
    requests = [(context, e) for e in endings]
    reqs = ce._requests(tok, requests, 24)
    rows = ce._rows(reqs, 64, 24)
    assert len(rows) > 1 and all(ce._row_width(r) <= 24 for r in rows)  # one context, several rows
    plain = [loglikelihood_reference(model, tok, c, x) for c, x in requests]
    got = loglikelihoods(model, tok, requests, batch_size=64)
    assert [g[0] for g in got] == pytest.approx([p[0] for p in plain], abs=1e-4)
    monkeypatch.setattr(ce, "SCORE_BUDGET", 1)  # every row in a batch of its own
    assert len(ce._batches(reqs, 64, 24)) == len(rows)
    got = loglikelihoods(model, tok, requests, batch_size=64)
    assert [g[0] for g in got] == pytest.approx([p[0] for p in plain], abs=1e-4)


def test_long_contexts_are_cut_from_the_left_and_counted(tok):
    model = tiny(tok, context_length=16)
    context, continuation = "The quick brown fox jumps over the lazy dog. " * 2, " A stitch in time"
    ctx, cont = encode_request(tok, context, continuation)
    stats = {}
    (score, _, n), = loglikelihoods(model, tok, [(context, continuation), ("x", " y")], stats=stats)[:1]
    cut = len(ctx) + len(cont) - 17  # 16 positions predict 17 tokens' worth: the first is never predicted
    assert cut > 0 and stats["truncated_tokens"] == [cut, 0] and stats["truncated"] == 1 and n == len(cont)
    seq = (ctx + cont)[cut:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0], -1)
    want = sum(float(logp[len(seq) - 1 - len(cont) + i, t]) for i, t in enumerate(cont))
    assert score == pytest.approx(want, abs=1e-4)
    items = [ChoiceItem(context, ["A stitch in time", "B"], 0), ChoiceItem("x", ["y"], 0)]
    assert evaluate_choice(model, tok, items)["truncated"] == 1


def test_a_continuation_longer_than_the_window_is_refused(tok):
    with pytest.raises(LmforgeError, match="longer than the model's window"):
        loglikelihoods(tiny(tok, context_length=8), tok, [("a", " " + TEXT)])
    items = [ChoiceItem("a", ["b", "c"], 0), ChoiceItem("a", ["b", TEXT], 0)]
    with pytest.raises(LmforgeError, match=r"^item 2 of 2, choice 2 \('.*'\): the continuation is \d+ tokens"):
        evaluate_choice(tiny(tok, context_length=8), tok, items)  # once "request 3"


def test_a_null_bigbench_prefix_is_the_default_not_the_text_none(tmp_path):
    path = tmp_path / "task.json"
    task = {"examples": [{"input": "t", "target_scores": {"a": 1, "b": 0}}]}
    path.write_text(json.dumps(task))
    default = read_task(path)
    path.write_text(json.dumps({**task, "example_input_prefix": None, "example_output_prefix": None,
                                "choice_prefix": None}))
    assert read_task(path) == default and "None" not in default[0].context


def test_greedy_flag_is_whether_the_model_would_have_written_the_continuation(tok):
    (t,) = tok.encode(" the")
    model = unigram(tok, {t: 10.0})
    (_, greedy_the, _), (_, greedy_is, _) = loglikelihoods(model, tok, [("over", " the"), ("over", " is")])
    assert greedy_the and not greedy_is


def test_rigged_model_picks_the_right_choice_every_time(tok):
    # one-token choices; 'the' and 'there' are only ever right, 'is' and 'a' only ever wrong
    items = [ChoiceItem("The quick brown fox", ["the", "is", "a"], 0),
             ChoiceItem("Where there is a will", ["is", "there", "a"], 1),
             ChoiceItem("A stitch in time", ["is", "a", "there"], 2)]
    assert all(len(tok.encode(" " + c)) == 1 for it in items for c in it.choices)
    right = {tok.encode(" the")[0], tok.encode(" there")[0]}
    res = evaluate_choice(unigram(tok, {t: 8.0 for t in right}), tok, items)
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0 and [r["pred"] for r in res["items"]] == [0, 1, 2]
    assert res["n"] == 3
    res = evaluate_choice(unigram(tok, {t: -20.0 for t in right}), tok, items)  # a model that avoids the answers
    assert res["acc"] == 0.0 and res["acc_norm"] == 0.0


def test_acc_norm_divides_by_characters_and_can_disagree_with_acc(tok):
    # A model with equal logits everywhere: each token costs ln V, so acc picks the choice with the
    # fewest tokens, acc_norm the one with the most characters per token.
    # (characters, not bytes: 'naïve café' has 10 characters and 12 bytes)
    item = ChoiceItem("The", ["a", "quick brown fox jumps", "naïve café"], 1)
    k = [len(encode_request(tok, "The", " " + c)[1]) for c in item.choices]
    per_char = [n / len(c) for n, c in zip(k, item.choices)]
    assert k.index(min(k)) == 0 and per_char.index(min(per_char)) == 1  # the construction holds
    res = evaluate_choice(unigram(tok), tok, [item])
    r = res["items"][0]
    assert r["pred"] == 0 and r["pred_norm"] == 1 and res["acc"] == 0.0 and res["acc_norm"] == 1.0
    assert r["logprobs"] == pytest.approx([-n * math.log(tok.vocab_size) for n in k], abs=1e-4)
    assert r["logprobs_norm"] == pytest.approx([-n * math.log(tok.vocab_size) / len(c) for n, c in zip(k, item.choices)],
                                               abs=1e-4)
    assert r["tokens"] == k


def test_equal_scores_go_to_the_first_choice(tok):
    res = evaluate_choice(unigram(tok), tok, [ChoiceItem("The", ["ab", "cd"], 1)])  # same tokens count, chars
    assert res["items"][0]["pred"] == 0 and res["items"][0]["pred_norm"] == 0 and res["acc"] == 0.0


# ---------------------------------------------------------------------------- k-shot

def test_k_shot_prompts_are_exact_and_never_show_the_item_itself():
    items = [ChoiceItem(f"c{i}", ["x", "y", "z"], i % 3) for i in range(4)]
    # One random.Random(1234), three items drawn per item (sample): [3, 0, 2], [0, 2, 3], [0, 3, 1],
    # [1, 0, 2]; the item itself is dropped and the first two left are its examples.
    assert build_contexts(items, 2, 1234) == ["c3 x\n\nc2 z\n\nc0", "c0 x\n\nc2 z\n\nc1", "c0 x\n\nc3 x\n\nc2",
                                              "c1 y\n\nc0 x\n\nc3"]
    assert build_contexts(items, 0) == ["c0", "c1", "c2", "c3"]
    many = [ChoiceItem(f"q{i}", ["a", "b"], i % 2) for i in range(30)]
    for seed in range(5):
        for item, prompt in zip(many, build_contexts(many, 3, seed)):
            shots = prompt.split("\n\n")
            assert len(shots) == 4 and shots[-1] == item.context
            assert all(s.split(" ")[0] != item.context for s in shots[:-1])
    assert build_contexts(many, 3, 1) != build_contexts(many, 3, 2)  # the seed matters


def test_k_shot_from_a_separate_pool_draws_k(tmp_path):
    items = [ChoiceItem("q", ["a", "b"], 0)]
    pool = [ChoiceItem(f"p{i}", ["a", "b"], 1) for i in range(3)]
    # the item is not in the pool: random.Random(7).sample(pool, 2) draws exactly two, pool items 1 and 0
    assert build_contexts(items, 2, 7, pool) == ["p1 b\n\np0 b\n\nq"]
    with pytest.raises(LmforgeError, match="2-shot needs at least 3 items"):
        build_contexts(pool[:2], 2)


def test_k_shot_scores_are_the_scores_of_the_k_shot_prompts(tok):
    model = tiny(tok)
    items = [ChoiceItem(f"The quick brown fox {i}", ["jumps", "sleeps"], i % 2) for i in range(4)]
    res = evaluate_choice(model, tok, items, shots=2, seed=5)
    prompts = build_contexts(items, 2, 5)
    want = [loglikelihood_reference(model, tok, p, " " + c)[0] for p, it in zip(prompts, items) for c in it.choices]
    got = [lp for r in res["items"] for lp in r["logprobs"]]
    assert got == pytest.approx(want, abs=1e-4) and res["settings"]["shots"] == 2


# ---------------------------------------------------------------------------- results and the suite

def test_results_json_holds_settings_scores_and_the_task_fingerprint(tmp_path, runs, capsys):
    from lmforge import __version__
    from lmforge.cli import main
    from lmforge.models import load_language_model

    task = write_jsonl(tmp_path / "plain.jsonl", PLAIN)
    out = tmp_path / "res" / "results.json"
    assert main(["eval", "choice", str(runs[0]), "--task", str(task), "--shots", "1", "--limit", "4",
                 "--batch_size", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plain: acc " in printed and f"wrote {out}" in printed
    res = json.loads(out.read_text())
    assert res["format"] == "lmforge-eval-choice" and res["model"] == str(runs[0])
    assert res["task"] == {"path": str(task), "name": "plain", "layout": "plain", "items": 6, "limit": 4,
                           "sha256": hashlib.sha256(task.read_bytes()).hexdigest()}
    assert res["settings"]["shots"] == 1 and res["settings"]["seed"] == 1234 and res["n"] == 4
    assert res["lmforge_version"] == __version__ and res["time"][:2] == "20"
    model, tok = load_language_model(str(runs[0]))
    items = read_task(task)
    want = evaluate_choice(model, tok, items[:4], shots=1, fewshot_items=items)  # examples drawn from all six
    assert [r["logprobs"] for r in res["items"]] == [pytest.approx(r["logprobs"], abs=1e-5) for r in want["items"]]
    assert res["acc"] == want["acc"] and res["acc_norm"] == want["acc_norm"]
    assert {"index", "label", "pred", "pred_norm", "logprobs", "logprobs_norm", "tokens", "greedy",
            "truncated_tokens"} <= set(res["items"][0])
    # its own results file may be replaced; another file, or an input, may not
    assert main(["eval", "choice", str(runs[0]), "--task", str(task), "--out", str(out)]) == 0
    other = tmp_path / "notes.json"
    other.write_text("{}")
    assert main(["eval", "choice", str(runs[0]), "--task", str(task), "--out", str(other)]) == 2
    assert other.read_text() == "{}"
    assert main(["eval", "choice", str(runs[0]), "--task", str(task), "--out", str(task)]) == 2
    assert json.loads(task.read_text().splitlines()[0]) == PLAIN[0]


def test_run_choice_eval_without_out_writes_nothing(tmp_path, runs):
    task = write_jsonl(tmp_path / "plain.jsonl", PLAIN)
    res = run_choice_eval(str(runs[0]), str(task), limit=2, progress=False)
    assert res["n"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["plain.jsonl"]


def test_skipped_examples_are_reported_in_the_results(tmp_path, runs, capsys):
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"examples": [{"input": "1 + 1 =", "target_scores": {"2": 1, "3": 0}},
                                             {"input": "either", "target_scores": {"a": 1, "b": 1}}]}))
    res = run_choice_eval(str(runs[0]), str(task), progress=False)
    assert res["n"] == 1 and res["task"]["layout"] == "bigbench" and len(res["warnings"]) == 1
    assert "lmforge: warning: " in capsys.readouterr().err and "skipped 1 of 2 examples" in res["warnings"][0]


def test_suite_table_covers_every_model_on_every_task(tmp_path, runs, tok, capsys):
    from lmforge.evaluate import bits_per_byte
    from lmforge.models import load_language_model

    plain = write_jsonl(tmp_path / "plain.jsonl", PLAIN)
    bb = tmp_path / "arith"
    bb.mkdir()
    (bb / "task.json").write_text(json.dumps({"examples": [
        {"input": f"{i} + 1 =", "target_scores": {str(i + 1): 1, str(i + 2): 0}} for i in range(5)]}))
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)
    out = tmp_path / "suite"
    res = run_suite([str(r) for r in runs], [str(plain), str(bb / "task.json")], [str(text)], str(out), limit=5,
                    progress=False)
    table = (out / "suite.md").read_text()
    assert table in capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| model | plain acc | plain acc_norm | arith acc | arith acc_norm | bits/byte |"
    assert len([line for line in lines if line.startswith((f"| {runs[0]}", f"| {runs[1]}"))]) == 2
    assert json.loads((out / "suite.json").read_text()) == json.loads(json.dumps(res))
    for run, line in zip(runs, lines[2:4]):
        model, tk = load_language_model(str(run))
        cells = [line.split(" | ")[0].lstrip("| ")]
        for path in (plain, bb / "task.json"):
            r = evaluate_choice(model, tk, read_task(path)[:5])
            cells += [f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}"]
            assert res["results"][str(run)]["tasks"][path.stem if path.suffix == ".jsonl" else "arith"]["acc"] \
                == r["acc"]
        cells.append(f"{bits_per_byte(model, tk, TEXT * 3)['bits_per_byte']:.4f}")
        assert line == "| " + " | ".join(cells) + " |"
    assert res["tasks"][1]["sha256"] == hashlib.sha256((bb / "task.json").read_bytes()).hexdigest()
    # a run directory is never an output
    with pytest.raises(LmforgeError, match="training run directory"):
        run_suite([str(runs[0])], [str(plain)], out=str(runs[1]), progress=False)
    # refused before any model is loaded: the same model or task twice (once two equal rows, the model
    # scored twice), a classifier, a name that is nothing
    fresh = tmp_path / "fresh"
    for models, tasks_, problem in (([str(runs[0]), str(runs[0]) + "/"], [str(plain)], "again; give each model once"),
                                    ([str(runs[0])], [str(plain), str(plain)], "given twice; give each task once"),
                                    ([str(runs[0]), "no-such-model"], [str(plain)], "no model named 'no-such-model'")):
        with pytest.raises(LmforgeError, match=problem):
            run_suite(models, tasks_, out=str(fresh), progress=False)
        assert not fresh.exists()
    from lmforge.checkpoint import save_model
    from lmforge.models import check_language_models

    save_model(tmp_path / "cls", GPT(ModelConfig(vocab_size=8, context_length=8, d_model=8, n_layer=1, n_head=1)), 0,
               {"task": "classify", "head": {"labels": ["a", "b"]}})
    with pytest.raises(LmforgeError, match="cls is a classifier, not a language model; leave it out"):
        check_language_models([str(runs[0]), str(tmp_path / "cls")])
    with pytest.raises(LmforgeError, match="'sms-spam' is a data set, not a model"):
        check_language_models([str(runs[0]), "sms-spam"])


def test_eval_suite_command(tmp_path, runs, capsys):
    from lmforge.cli import main

    plain = write_jsonl(tmp_path / "plain.jsonl", PLAIN)
    out = tmp_path / "suite"
    assert main(["eval", "suite", str(runs[0]), str(runs[1]), "--tasks", str(plain), "--out", str(out),
                 "--shots", "1"]) == 0
    res = json.loads((out / "suite.json").read_text())
    assert res["models"] == [str(runs[0]), str(runs[1])] and res["settings"]["shots"] == 1 and res["text"] is None
    assert "bits/byte" not in (out / "suite.md").read_text()


@pytest.mark.slow
def test_smollm2_batched_scores_equal_plain_scores():
    from lmforge import hub

    path = hub.cache_dir() / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is not cached (lmforge download smollm2-135m-instruct)")
    from lmforge.models import load_language_model

    model, tok = load_language_model(str(path))
    items = [ChoiceItem("The capital of France is", ["Paris", "London", "a potato"], 0),
             ChoiceItem("Two plus two equals", ["four", "seven"], 0)]
    requests = [(it.context, " " + c) for it in items for c in it.choices]
    got = loglikelihoods(model, tok, requests, batch_size=4)
    want = [loglikelihood_reference(model, tok, c, x) for c, x in requests]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert evaluate_choice(model, tok, items)["acc"] == 1.0


def test_a_bigbench_task_json_in_the_current_folder_is_named_by_that_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from lmforge.choice_eval import _task_name

    folder = tmp_path / "arithmetic_word"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert _task_name(Path("task.json")) == "arithmetic_word"  # once "" (": acc ..." in the output)
    assert _task_name(Path("sub/items.jsonl")) == "items"
