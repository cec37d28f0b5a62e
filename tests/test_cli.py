"""The command line end to end on a tiny model, and its errors: one line, exit code 2."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from lmforge.cli import main

TINY = ["--preset", "gpt-nano", "--model.context_length", "32", "--train.batch_size", "4", "--train.max_steps", "12",
        "--train.warmup_steps", "2", "--train.eval_interval", "6", "--train.eval_batches", "2", "--train.log_interval",
        "1", "--train.save_interval", "6", "--train.dtype", "float32", "--prompts", "[Document]"]


def test_pipeline_end_to_end(prepared, capsys):
    tmp, tok, data = prepared
    run = tmp / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "[sample @ step 0]" in out and "[sample @ step 12]" in out and "finished 12 steps" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 6, 12]  # the untrained model first
    assert abs(vals[0]["val_loss"] - math.log(300)) < 0.3 and vals[-1]["val_loss"] < vals[0]["val_loss"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["context_length"] == 32 and cfg["model"]["vocab_size"] == 300

    assert main(["generate", str(run), "--prompt", "Document", "--sample.max_new_tokens", "10",
                 "--sample.temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Document") and len(first) > len("Document\n")
    assert main(["generate", str(run), "--prompt", "Document", "--sample.max_new_tokens", "10",
                 "--sample.temperature", "0"]) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic

    assert main(["eval", str(run), "--data", str(data), "--batch_size", "4", "--max_batches", "2"]) == 0
    m = re.search(r"val loss ([\d.]+)  perplexity ([\d.]+)  \(([\d,]+) tokens\)", capsys.readouterr().out)
    # The same windows fit evaluated at step 12 (batch 4, 2 batches, context 32), in fp32 both times.
    assert float(m.group(1)) == pytest.approx(vals[-1]["val_loss"], abs=1e-4)
    assert float(m.group(2)) == pytest.approx(math.exp(float(m.group(1))), rel=1e-3)
    assert int(m.group(3).replace(",", "")) == 4 * 2 * 32
    # shards prepared with no validation split: the error says which split there is and how to get the other
    assert main(["prepare", "--data", str(tmp / "corpus"), "--tokenizer", str(tok), "--out", str(tmp / "trainonly"),
                 "--text.val_fraction", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp / "trainonly")]) == 2
    assert capsys.readouterr().err.endswith("is empty; evaluate the other one (--split train), or prepare the data "
                                            "again with --text.val_fraction above 0\n")

    assert main(["tokenizer", "encode", "--tokenizer", str(tok), "--text", "Document 3."]) == 0
    ids = capsys.readouterr().out.strip()
    assert main(["tokenizer", "decode", "--tokenizer", str(tok), "--ids", ids]) == 0
    assert capsys.readouterr().out == "Document 3.\n"


def test_yaml_config_file(prepared, capsys):
    tmp, _, data = prepared
    cfg = tmp / "pretrain.yaml"
    cfg.write_text(f"data: {data}\nout: {tmp / 'yrun'}\npreset: gpt-nano\nmodel:\n  context_length: 32\n"
                   "train:\n  max_steps: 3\n  batch_size: 2\n  dtype: float32\n  eval_interval: 3\nprompts: []\n")
    assert main(["pretrain", "--config", str(cfg)]) == 0
    run_cfg = json.loads((tmp / "yrun" / "config.json").read_text())
    assert run_cfg["train"]["max_steps"] == 3 and run_cfg["train"]["batch_size"] == 2
    assert run_cfg["train"]["dtype"] == "float32" and run_cfg["train"]["eval_interval"] == 3
    assert run_cfg["model"]["context_length"] == 32 and run_cfg["model"]["d_model"] == 64  # gpt-nano's width
    assert run_cfg["data_path"] == str(data.resolve())
    records = [json.loads(ln) for ln in (tmp / "yrun" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3]


def test_help_comes_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--train.lr" in text and "Peak learning rate" in text and "--model.n_head" in text


def _error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lmforge: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_errors(tmp_path, prepared, capsys):
    tmp, tok, data = prepared
    empty = tmp / "empty.txt"
    empty.write_text("")
    assert "empty.txt is empty" in _error(["prepare", "--data", str(empty), "--tokenizer", str(tok), "--out",
                                           str(tmp / "d2")], capsys)
    good = {p.name: p.read_bytes() for p in data.iterdir()}
    assert "empty.txt is empty" in _error(["prepare", "--data", str(empty), "--tokenizer", str(tok), "--out",
                                           str(data), "--force", "true"], capsys)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == good  # the good shards are untouched
    tok_bytes = tok.read_bytes()
    assert "is empty" in _error(["tokenizer", "train", "--data", str(empty), "--out", str(tok)], capsys)
    assert tok.read_bytes() == tok_bytes
    binary = tmp / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "blob.txt looks binary" in _error(["tokenizer", "train", "--data", str(binary), "--out",
                                              str(tmp / "t.json")], capsys)
    latin = tmp / "latin.txt"
    latin.write_bytes(b"caf\xe9 " * 100)
    assert "--text.errors replace" in _error(["prepare", "--data", str(latin), "--tokenizer", str(tok), "--out",
                                              str(tmp / "d3")], capsys)
    assert "at least 256" in _error(["tokenizer", "train", "--data", str(latin), "--out", str(tmp / "t.json"),
                                     "--tokenizer.vocab_size", "100"], capsys)
    short = tmp / "short.txt"
    short.write_text("just a few words")
    assert main(["prepare", "--data", str(short), "--tokenizer", str(tok), "--out", str(tmp / "ds")]) == 0
    capsys.readouterr()
    assert "shorter than one context window" in _error(["pretrain", "--data", str(tmp / "ds"), "--out",
                                                        str(tmp / "r"), *TINY], capsys)
    assert "divisible by n_head" in _error(["pretrain", "--data", str(data), "--out", str(tmp / "r"), *TINY,
                                            "--model.d_model", "30"], capsys)
    assert "is not a model: expected a run directory" in _error(["generate", str(tmp)], capsys)
    assert "not a known model" in _error(["generate", "no-such-model"], capsys)
    assert "no such file" in _error(["prepare", "--data", "/nonexistent.txt", "--tokenizer", str(tok), "--out",
                                     str(tmp / "d4")], capsys).lower()
    assert "lmforge pretrain --help" in _error(["pretrain", "--bogus-flag"], capsys)


def test_default_run_offline(tmp_path):
    """The main job as a user runs it (a subprocess), with its work fixed in steps: the time guard
    fires and says so, the same command resumes and finishes, a third time is refused; a last stage
    that could not run (no SmolLM2 offline) is tried again by the next run."""
    import re

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMFORGE_OFFLINE": "1", "LMFORGE_CACHE": str(tmp_path / "cache")}
    env.pop("LMFORGE_MIRROR", None)  # stage 5 needs SmolLM2: with no cache, mirror or network it says so and skips
    cmd = [sys.executable, "-m", "lmforge", "--out", str(tmp_path / "r"), "--steps", "30", "--preset", "gpt-nano",
           "--vocab_size", "512"]
    first = subprocess.run([*cmd, "--max_minutes", "0.0001"], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "guard fired at step 1 of 30" in first.stdout and "skipped:" in first.stdout
    assert "== 6/6 four ways to solve a task" in first.stdout
    assert "[sample @ step 0] The" in first.stdout and "] 'The" not in first.stdout  # text, not repr strings
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming the default run" in second.stdout and "from step 1 of 30" in second.stdout
    m = re.search(r"untrained ([\d.]+) \(ln vocab = ([\d.]+),.*-> trained ([\d.]+)", second.stdout)
    untrained, ln_vocab, trained = map(float, m.groups())
    assert abs(ln_vocab - math.log(512)) < 1e-3 and abs(untrained - ln_vocab) < 0.3 and trained < untrained - 0.3
    records = [json.loads(ln) for ln in (tmp_path / "r" / "model" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "loss" in r) == [10, 20, 30]
    assert (tmp_path / "r" / "model" / "loss.png").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "is pretrained; running its last stage" in again.stdout
    assert "skipped:" in again.stdout and "== 3/6" not in again.stdout
    third = subprocess.run([*cmd, "--fourway_limit", "0"], capture_output=True, text=True, env=env, timeout=600)
    assert third.returncode == 2 and "already holds a finished default run" in third.stderr
    assert "Traceback" not in first.stderr + second.stderr + again.stderr + third.stderr


LLAMA = [a if a != "gpt-nano" else "llama-micro" for a in TINY]


def test_export_and_use_elsewhere(prepared, capsys):
    tmp, _, data = prepared
    corpus = next((tmp / "corpus").glob("*.txt"))
    for preset_args, name in ((TINY, "gpt"), (LLAMA, "llama")):
        run = tmp / f"run-{name}"
        assert main(["pretrain", "--data", str(data), "--out", str(run), *preset_args]) == 0
        assert main(["export", str(run), "--to", "hf", "--out", str(tmp / f"hf-{name}")]) == 0
        capsys.readouterr()
        outs = []
        for spec in (str(run), str(tmp / f"hf-{name}")):
            assert main(["generate", spec, "--prompt", "Document", "--sample.max_new_tokens", "8",
                         "--sample.temperature", "0"]) == 0
            outs.append(capsys.readouterr().out)
            assert main(["eval", spec, "--text", str(corpus)]) == 0
            outs.append(capsys.readouterr().out)
            # The shards the run trained on are the exported model's too (its tokenizer has another name)
            assert main(["eval", spec, "--data", str(data), "--max_batches", "2"]) == 0
            outs.append(capsys.readouterr().out)
        assert outs[:3] == outs[3:]  # same model, same tokenizer, same numbers
        from lmforge.evaluate import bits_per_byte
        from lmforge.models import load_any

        model, tok = load_any(str(run))
        want = bits_per_byte(model, tok, corpus.read_text(encoding="utf-8"))
        got = re.search(r"bits per byte ([\d.]+)  \(([\d,]+) tokens, ([\d,]+) bytes\)", outs[1])
        assert float(got.group(1)) == pytest.approx(want["bits_per_byte"], abs=1e-4)
        assert int(got.group(2).replace(",", "")) == want["tokens"] and int(got.group(3).replace(",", "")) == want["bytes"]
        assert 0 < len(corpus.read_bytes()) - want["bytes"] < 16  # every byte but the first token's is scored
    assert "Llama-family" in _error(["export", str(tmp / "run-gpt"), "--to", "gguf", "--out", str(tmp / "x.gguf")],
                                    capsys)
    assert main(["export", str(tmp / "run-llama"), "--to", "gguf", "--out", str(tmp / "m.gguf"), "--dtype",
                 "f32"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp / "m.gguf"), "--prompt", "Document", "--sample.max_new_tokens", "8",
                 "--sample.temperature", "0"]) == 0
    assert capsys.readouterr().out == outs[0]
    assert main(["eval", str(tmp / "m.gguf"), "--data", str(data), "--max_batches", "2"]) == 0  # its own end id


def test_download_lists_and_refuses_unknown(capsys):
    assert main(["download"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m-instruct" in listing and "instruction-data-with-preference" in listing
    assert "unknown name 'nope'" in _error(["download", "nope"], capsys)


def _model_config_of(args, monkeypatch):
    """The ModelConfig `pretrain` would train with these arguments (training itself stubbed out)."""
    import lmforge.pipeline as pipeline

    seen = []

    def fake_pretrain(data, out, model_config, *args, **kwargs):
        seen.append(model_config)
        return {"run": str(out), "steps": 0, "tokens": 0, "seconds": 0.0, "train_loss": 0.0}

    monkeypatch.setattr(pipeline, "pretrain", fake_pretrain)
    assert main(["pretrain", *args]) == 0
    return seen[-1]


@pytest.mark.parametrize("flags", [[], ["--preset", "llama-micro", "--model.context_length", "32"],
                                   ["--preset", "gpt-nano", "--model.n_kv_head", "2", "--model.dropout", "0.1"]])
def test_print_config_reproduces_the_run(tmp_path, monkeypatch, capsys, flags):
    from lmforge.config import PRESETS, ModelConfig

    base = ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "r")]
    direct = _model_config_of([*base, *flags], monkeypatch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["pretrain", *base, *flags, "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    (tmp_path / "run.yaml").write_text(printed)
    assert _model_config_of(["--config", str(tmp_path / "run.yaml")], monkeypatch) == direct
    preset = flags[1] if flags else "gpt-micro"
    assert direct.d_model == PRESETS[preset]["d_model"] and direct != ModelConfig()  # the preset, not GPT-2 124M
    assert "d_model: 768" not in printed


def test_help_says_where_model_values_come_from(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.d_model D_MODEL Width of the residual stream. Null: the preset's value." in text
    assert "default: 768" not in text and "default: 50257" not in text


def test_unknown_command_names_the_known_ones(capsys):
    assert main(["talk"]) == 2
    assert capsys.readouterr().err == ("lmforge: error: unknown command 'talk'; known commands: run, tokenizer, "
                                       "prepare, pretrain, finetune, classify, merge-lora, generate, chat, serve, eval, "
                                       "export, download, report (see `lmforge --help`)\n")


def test_lmforges_warnings_are_one_line_and_other_librarys_keep_pythons_format(tmp_path):
    from lmforge.cli import format_warning

    corpus = tmp_path / "c.txt"
    corpus.write_text("one two three one two three\n" * 20)
    out = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "train", "--data", str(corpus), "--out",
                          str(tmp_path / "tok.json"), "--tokenizer.vocab_size", "2000"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "warning" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("lmforge: warning: asked for 2,000 tokens but the corpus supports")
    assert "UserWarning" not in out.stderr and "tokenizer.py" not in out.stderr
    other = format_warning(UserWarning("x"), UserWarning, "/usr/lib/python3/site-packages/torch/nn.py", 7)
    assert other.startswith("/usr/lib/python3/site-packages/torch/nn.py:7: UserWarning: x")


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--devices", "1.5"], "--devices must be a whole number or null, got 1.5"),
    (["pretrain", "--train.lr", "fast"], "--train.lr must be a number, got fast"),
    (["pretrain", "--train.compile", "maybe"], "--train.compile must be true or false, got maybe"),
    (["pretrain", "--train.dtype", "fp8"], "--train.dtype must be one of auto, float32, bfloat16, got fp8"),
    (["finetune", "classify", "--base", "b", "--data", "d.csv", "--out", "o", "--finetune.split", "0.98,0.01,0.01"],
     "--finetune.split must be a list in brackets, such as [0.8,0.1,0.1], got 0.98,0.01,0.01"),
    (["serve", "x", "--api_key"], "argument --api_key: expected one argument"),  # other parser errors pass as they are
])
def test_a_flag_value_of_the_wrong_type_is_said_in_words(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    where = " ".join(argv[:2]) if argv[0] == "finetune" else argv[0]  # the subcommand's own help
    assert err == f"lmforge: error: {message}. See `lmforge {where} --help`.\n"


def test_run_names_its_own_flag_and_encode_refuses_bytes_that_are_not_utf8(tmp_path, capsys):
    import subprocess
    import sys

    assert main(["run", "--out", str(tmp_path / "r"), "--steps", "0"]) == 2
    assert capsys.readouterr().err == "lmforge: error: --steps must be at least 1, got 0\n"
    assert not (tmp_path / "r").exists()
    tok = tmp_path / "tok.json"
    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer import Tokenizer

    Tokenizer.train(["hello world " * 50], TokenizerConfig(vocab_size=270)).save(tok)
    res = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "encode", "--tokenizer", str(tok)],
                         input=b"\xff\xfe", capture_output=True)
    assert res.returncode == 2 and res.stdout == b""
    assert res.stderr == b"lmforge: error: the text on standard input is not UTF-8 text (byte 0); convert it to UTF-8\n"
