"""`lmforge report RUN`: the run report of a tiny pretraining run and of tiny fine-tuning runs made here,
rendered in a real headless Chromium (Debian's `chromium` and `chromium-driver`, `pip install selenium`;
skipped, saying which is missing, without them), and the report's answers to bad input. A screenshot of
each page is kept in tmp_path, and copied to $LMFORGE_ARTIFACTS when that is set."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TEXT, headless_chromium
from test_finetune import _instruction_file as instruction_records

from lmforge.cli import main
from lmforge.config import (
    FinetuneConfig,
    ModelConfig,
    SampleConfig,
    TokenizerConfig,
    TrainConfig,
)

EVIL = "<script>document.title='pwned'; window.pwned = 1</script>"
CURVES = ["gradient-norm.png", "learning-rate.png", "loss-by-step.png", "loss-by-tokens.png", "throughput-mfu.png"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(f"Document {i}. " + TEXT * (3 + i % 4), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, corpus) -> Path:
    """12 steps of a tiny GPT, sampled every 4 steps from two prompts, one of them a <script>."""
    from lmforge.pipeline import prepare_shards, pretrain, train_tokenizer

    root = tmp_path_factory.mktemp("pretrain")
    train_tokenizer([str(corpus)], root / "tok.json", TokenizerConfig(vocab_size=300))
    prepare_shards([str(corpus)], root / "tok.json", root / "data")
    pretrain(root / "data", root / "run", ModelConfig.from_preset("gpt-nano", context_length=32),
             TrainConfig(batch_size=4, max_steps=12, warmup_steps=2, log_interval=2, eval_interval=4, eval_batches=1,
                         sample_interval=4, dtype="float32"),
             sample=SampleConfig(max_new_tokens=12, seed=1), prompts=("The", EVIL), progress=False)
    return root / "run"


def _spam_file(path: Path, n: int = 40) -> Path:
    rows = [("spam", f"WIN a FREE prize now call {1000 + i} txt WIN") if i % 2 else
            ("ham", f"see you at lunch tomorrow, {['ok', 'fine', 'sure'][i % 3]} friend") for i in range(n)]
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    return path


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, pretrain_run) -> Path:
    from lmforge.finetune import finetune_classify

    root = tmp_path_factory.mktemp("classify")
    finetune_classify(str(pretrain_run), _spam_file(root / "sms.tsv"), root / "run",
                      FinetuneConfig(trainable="all", epochs=3),
                      TrainConfig(lr=3e-3, batch_size=8, warmup_steps=0, dtype="float32"),
                      text_column="1", label_column="0", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium("1200,900")


def _open(driver, page: Path) -> dict:
    """Load the page and read what a person would see: headings, tables, images, text."""
    driver.get(page.resolve().as_uri())
    return driver.execute_script("""
        const text = s => [...document.querySelectorAll(s)].map(e => e.textContent.trim());
        return {title: document.title, h1: text('h1'), h2: text('h2'), h3: text('h3'),
                tables: document.querySelectorAll('table').length, scripts: document.querySelectorAll('script').length,
                images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth,
                                                         inline: i.src.startsWith('data:image/png;base64,')})),
                prompts: text('pre.prompt'), pwned: window.pwned === undefined ? null : window.pwned,
                warnings: text('#warnings li'), body: document.body.innerText};""")


def _screenshot(driver, name: str, tmp_path: Path) -> Path:
    """A full-page screenshot; asserted to show a page, not a blank."""
    from PIL import Image, ImageStat

    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1200, min(height + 100, 8000))
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    with Image.open(shot) as img:
        grey = img.convert("L")
        assert len(grey.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # text, lines and plots: many shades
        assert ImageStat.Stat(grey).stddev[0] > 10  # not a blank page of one colour
    if os.environ.get("LMFORGE_ARTIFACTS"):
        out = Path(os.environ["LMFORGE_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / name)
    driver.set_window_size(1200, 900)
    return shot


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_report_renders_its_sections_plots_tables_and_samples(pretrain_run, browser, tmp_path, capsys):
    out = tmp_path / "pretrain.html"
    assert main(["report", str(pretrain_run), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pretrain-plots").glob("*.png")) == CURVES
    seen = _open(browser, out)
    assert seen["h1"] == ["Run report: run"] and seen["title"] == "lmforge report: run"
    assert seen["h2"] == ["Summary", "Training curves", "Evaluation", "Samples", "Configuration", "Hardware", "Timings"]
    assert len(seen["images"]) == len(CURVES) and all(i["inline"] and i["width"] > 300 for i in seen["images"])
    assert {i["alt"] for i in seen["images"]} == {"Loss by step", "Loss by tokens seen", "Learning rate",
                                                  "Throughput and MFU", "Gradient norm (before clipping)"}
    # tables: summary, validation, one per sampled step (0, 4, 8, 12), hardware, timings
    sampled = sorted({r["step"] for r in _records(pretrain_run) if "samples" in r})
    assert sampled == [0, 4, 8, 12] and seen["h3"] == ["Validation during training", *(f"step {s}" for s in sampled)]
    assert seen["tables"] == 2 + len(sampled) + 2
    assert "finished: 12 of 12 steps" in seen["body"] and "MFU, median of the log intervals" in seen["body"]
    assert "measured: 1024³ float32 matmul" in seen["body"] and '"max_steps": 12' in seen["body"]
    # the <script> prompt is text on the page, and nothing ran
    assert seen["prompts"] == ["The", EVIL] * len(sampled) and seen["scripts"] == 0 and seen["pwned"] is None
    assert seen["title"] != "pwned" and not seen["warnings"]
    _screenshot(browser, "report-pretrain.png", tmp_path)


def test_classification_report_adds_accuracy_per_epoch_scores_and_the_confusion_matrix(classify_run, browser,
                                                                                      tmp_path):
    assert main(["report", str(classify_run)]) == 0
    page = classify_run / "report.html"
    results = json.loads((classify_run / "results.json").read_text())
    assert sorted(p.name for p in (classify_run / "report-plots").glob("*.png")) == sorted(
        [*CURVES, "accuracy.png", "confusion.png"])
    seen = _open(browser, page)
    assert "Fine-tuning: classify" in seen["h2"]
    assert {"Scores per split", "Per class (test split)"} <= set(seen["h3"])
    assert len(seen["images"]) == 7 and all(i["width"] > 200 for i in seen["images"])
    assert {"Accuracy per epoch", "Confusion matrix (test split)"} <= {i["alt"] for i in seen["images"]}
    cells = browser.execute_script("return [...document.querySelectorAll('table.confusion tbody tr')]"
                                   ".map(r => [...r.cells].map(c => c.textContent))")
    labels, confusion = results["test"]["labels"], results["test"]["confusion"]
    assert cells == [[label, *map(str, row)] for label, row in zip(labels, confusion)]
    assert "base model" in seen["body"] and "samples" not in json.dumps([r for r in _records(classify_run)])
    _screenshot(browser, "report-classify.png", tmp_path)


def _instruction_file(path: Path, preference: bool = False) -> Path:
    return instruction_records(path, n=16, preference=preference, suffix=f" {EVIL}")


@pytest.fixture(scope="module")
def long_base(tmp_path_factory) -> Path:
    """An untrained tiny model with room for Alpaca prompts (256 positions), saved as a run."""
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.model import GPT
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train([TEXT * 5], TokenizerConfig(vocab_size=300))
    torch.manual_seed(0)
    save_model(root, GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=256, d_model=32, n_layer=2, n_head=2)),
               0, {"task": "pretrain"})
    tok.save(root / "tokenizer.json")
    return root


def test_instruction_and_dpo_reports_show_before_and_after(long_base, tmp_path):
    from lmforge.finetune import finetune_dpo, finetune_instruct
    from lmforge.report import write_report

    split = FinetuneConfig(trainable="all", epochs=1, split=(0.75, 0.125, 0.125))
    train = TrainConfig(lr=1e-3, batch_size=4, warmup_steps=0, dtype="float32")
    finetune_instruct(str(long_base), _instruction_file(tmp_path / "i.json"), tmp_path / "instruct", split, train,
                      max_new_tokens=4, progress=False)
    page = write_report(tmp_path / "instruct").read_text()
    responses = json.loads((tmp_path / "instruct" / "responses.json").read_text())
    assert len(responses) == 2 and all("response_before" in r for r in responses)
    assert "<h2>Fine-tuning: instruct</h2>" in page and "<th>before fine-tuning</th>" in page
    assert "<td>validation loss</td>" in page and "2 of 2 test responses" in page
    assert "<script" not in page and "Name the color red. &lt;script&gt;document.title=&#x27;pwned&#x27;" in page
    finetune_dpo(str(long_base), _instruction_file(tmp_path / "p.json", preference=True), tmp_path / "dpo",
                 split, train, progress=False)
    page = write_report(tmp_path / "dpo").read_text()
    assert "<h2>Fine-tuning: dpo</h2>" in page and "<td>reward margin</td>" in page
    assert (tmp_path / "dpo" / "report-plots" / "dpo-rewards.png").stat().st_size > 5000
    assert 'alt="DPO rewards and margin"' in page


def test_the_report_replaces_only_its_own_page_and_never_a_file_of_the_run(pretrain_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run, symlinks=True)
    victim = tmp_path / "victim"  # another run: its files were replaced with --overwrite (its newest weights)
    shutil.copytree(pretrain_run, victim, symlinks=True)
    step = sorted((victim / "checkpoints").glob("step-*"))[-1]
    victim_files = {p: p.read_bytes() for p in sorted(victim.rglob("*")) if p.is_file()}
    metrics = (run / "metrics.jsonl").read_bytes()
    assert main(["report", str(run)]) == 0 and main(["report", str(run)]) == 0  # its own page: replaced
    other = tmp_path / "notes.html"
    other.write_text("mine")
    cases = [(["--out", str(other)], "already exists and is not an lmforge report"),
             (["--out", str(run / "metrics.jsonl")], "is a file of the run itself"),
             (["--out", str(run / "metrics.jsonl"), "--overwrite", "true"], "is a file of the run itself"),
             (["--out", str(run / "config.json"), "--overwrite", "true"], "is a file of the run itself"),
             (["--out", str(tmp_path)], "is a folder"),
             (["--out", str(run / "checkpoints" / "r.html")], "inside the run's checkpoints"),
             (["--out", str(other / "report.html")], "a file is in the way"),
             (["--out", ""], "--out '' names no file; give a file path such as report.html"),  # once an internal error
             (["--out", str(step / "model.safetensors"), "--overwrite", "true"],
              "is a file of another training run, which only training writes"),
             (["--out", str(victim / "config.json"), "--overwrite", "true"], "is a file of another training run"),
             (["--out", str(victim / "checkpoints" / "r.html")], "is inside the checkpoints of another training run")]
    capsys.readouterr()
    for extra, message in cases:
        assert main(["report", str(run), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error:") and message in err and err.count("\n") == 1, (extra, err)
    assert other.read_text() == "mine" and (run / "metrics.jsonl").read_bytes() == metrics
    assert {p: p.read_bytes() for p in sorted(victim.rglob("*")) if p.is_file()} == victim_files
    assert json.loads((run / "config.json").read_text())["format"] == "lmforge-run"
    assert main(["report", str(run), "--out", str(other), "--overwrite", "true"]) == 0
    assert other.read_text().startswith("<!DOCTYPE html>")
    # a plots folder of someone else's files is not written into; the report's own is renewed
    mine = tmp_path / "mine-plots"
    mine.mkdir()
    (mine / "loss-by-step.png").write_bytes(b"my picture")
    assert main(["report", str(run), "--out", str(tmp_path / "mine.html")]) == 2
    assert "holds files that are not a report's" in capsys.readouterr().err
    assert (mine / "loss-by-step.png").read_bytes() == b"my picture" and not (tmp_path / "mine.html").exists()
    (run / "report-plots" / "stale.png").write_bytes(b"from an older report")
    assert main(["report", str(run)]) == 0 and not (run / "report-plots" / "stale.png").exists()


def test_a_report_that_fails_on_a_full_disk_leaves_no_half_folder_and_keeps_the_old_one(pretrain_run, tmp_path,
                                                                                       monkeypatch, capsys):
    import errno

    from lmforge import atomic

    real, calls = atomic.write_bytes, []

    def full_after_one(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(atomic, "write_bytes", full_after_one)
    out = tmp_path / "r.html"
    assert main(["report", str(pretrain_run), "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # once r-plots/ with one plot in it
    monkeypatch.undo()
    assert main(["report", str(pretrain_run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r-plots").iterdir()}
    calls.clear()
    monkeypatch.setattr(atomic, "write_bytes", lambda path, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", str(path))))
    assert main(["report", str(pretrain_run), "--out", str(out)]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "r-plots").iterdir()} == before  # the old plots stay


@pytest.mark.parametrize("where, message", [("nowhere", "no run directory at"), ("file", "is a file"),
                                            ("folder", "is not a run directory")])
def test_what_is_not_a_run_is_one_line(tmp_path, capsys, where, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    assert main(["report", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "folder" / "report.html").exists()


def test_a_run_still_training_gets_a_page_with_a_warning_and_its_metrics_untouched(pretrain_run, tmp_path):
    from lmforge.report import write_report

    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run, symlinks=True)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 14, "loss": 5.1, "lr"')  # the writer is mid-line
    before = (run / "metrics.jsonl").read_bytes()
    page = write_report(run).read_text()
    assert "the last line of metrics.jsonl is half-written (the run may still be training)" in page
    assert (run / "metrics.jsonl").read_bytes() == before
    assert page.count('<img alt="') == len(CURVES)


def test_a_sample_with_undecodable_bytes_still_gets_a_page(pretrain_run, tmp_path):
    from lmforge.report import write_report

    run = tmp_path / "run"
    shutil.copytree(pretrain_run, run, symlinks=True)
    with open(run / "metrics.jsonl", "a") as f:  # a prompt from argv bytes that were not UTF-8 (a lone surrogate)
        f.write('{"step": 99, "samples": [{"prompt": "caf\\udce9", "text": " ok"}]}\n')
    page = write_report(run).read_text(encoding="utf-8")
    assert "caf?" in page


def test_a_run_with_no_metrics_yet_gets_a_page_that_says_so(tmp_path, browser):
    from lmforge.report import write_report

    run = tmp_path / "run"  # a run stopped in its first second: a tokenizer and an empty log
    run.mkdir()
    (run / "tokenizer.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    seen = _open(browser, write_report(run))
    assert seen["warnings"] == ["metrics.jsonl holds no records yet (the run has just started)",
                                "the run has no checkpoint yet, so its config and hardware are not known"]
    assert seen["images"] == [] and "No training records to plot yet." in seen["body"]
    assert "no training steps logged yet" in seen["body"]


def test_the_default_run_ends_with_its_report_and_prints_the_path(tmp_path, corpus, monkeypatch, capsys):
    from lmforge.pipeline import main_job

    monkeypatch.setenv("LMFORGE_OFFLINE", "1")  # stage 5 (SmolLM2) is skipped offline, with a line saying so
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMFORGE_MIRROR", raising=False)
    summary = main_job([str(corpus)], tmp_path / "default", steps=4, vocab_size=300, preset="gpt-nano",
                       progress=False, fourway_limit=0)
    out = capsys.readouterr().out
    page = tmp_path / "default" / "model" / "report.html"
    assert summary["report"] == str(page) and f"report: {page} (open it in a browser" in out
    html = page.read_text()
    assert "<h2>Samples</h2>" in html and "finished: 4 of 4 steps" in html and html.count('<img alt="') == len(CURVES)


@pytest.mark.parametrize("content, message", [
    ("{not json", "results.json could not be read (JSONDecodeError)"),
    (json.dumps({"task": "classify", "test": {"confusion": [[1, 2], [3, 4]], "labels": ["a"]}}),
     "results.json or responses.json has an unexpected shape; this panel is left out.")])
def test_a_damaged_or_odd_results_file_is_reported_on_the_page(classify_run, tmp_path, content, message):
    from lmforge.report import write_report

    run = tmp_path / "run"
    shutil.copytree(classify_run, run, symlinks=True)
    (run / "results.json").write_text(content)
    page = write_report(run, tmp_path / "r.html").read_text()
    assert message in page and (run / "results.json").read_text() == content
    assert 'alt="Accuracy per epoch"' in page  # the rest of the page is there


@pytest.mark.parametrize("config", [{"train": {"max_steps": "abc"}}, {"train": {"max_steps": True}}, {"train": []},
                                    {"train": {"max_steps": None}, "model": "x"}, [], None])
def test_a_config_with_values_of_the_wrong_type_still_gets_a_summary(tmp_path, config):
    """A hand-edited config.json that still passes its manifest: the page says less, it does not fail."""
    from lmforge.report import _summary

    html = _summary(tmp_path, "pretrain", [{"step": 5, "loss": 1.0}], config, None)
    assert "at step 5" in html


def test_a_truncated_metrics_file_does_not_hide_the_checkpoints_step(tmp_path):
    from lmforge.report import _summary

    config = {"step": 5, "train": {"max_steps": 5}}
    assert "finished: 5 of 5 steps" in _summary(tmp_path, "pretrain", [{"step": 2, "loss": 1.0}], config, None)
    assert "finished: 5 of 5 steps" in _summary(tmp_path, "pretrain", [], config, None)


def test_a_damaged_metrics_file_is_not_called_a_run_that_just_started(tmp_path):
    from lmforge.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text("{}")
    (run / "metrics.jsonl").write_text("garbage\n\x00\x01 more garbage\n")
    page = Path(write_report(run)).read_text()
    assert "2 line(s) of metrics.jsonl could not be read" in page and "just started" not in page
