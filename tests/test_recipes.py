"""Named training recipes: plain data applied to any preset's shape, flags given still win."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmforge.config import RECIPES, ConfigError, ModelConfig, recipe_configs


def test_each_recipe_sets_what_it_names_at_the_presets_shape():
    model, train = recipe_configs("book", "gpt-micro", max_steps=300)
    assert model == ModelConfig.from_preset("gpt-micro")  # the book trains plain GPT-2 blocks
    assert (train.lr, train.schedule, train.warmup_steps, train.beta2, train.grad_clip) == (4e-4, "constant", 0,
                                                                                          0.999, None)
    model, train = recipe_configs("modern", "gpt2-124m", max_steps=1000)
    assert (model.d_model, model.n_layer) == (768, 12)  # the shape is the preset's
    assert (model.positions, model.mlp, model.qk_norm, model.zero_init_proj, model.tie_embeddings,
            model.logit_softcap) == ("rope", "relu2", True, True, False, 15.0)
    assert (train.optimizer, train.schedule, train.warmup_steps) == ("muon", "wsd", 20)  # 2 % of the steps
    _, nano = recipe_configs("nanogpt", max_steps=300)
    assert (nano.schedule, nano.warmup_steps, nano.beta2) == ("cosine", 15, 0.95)


def test_overrides_win_and_rate_sets_the_main_optimisers_rate():
    model, train = recipe_configs("modern", "gpt-micro", rate=0.05, vocab_size=1000, warmup_steps=3, max_steps=100)
    assert model.vocab_size == 1000 and train.warmup_steps == 3
    assert train.muon_lr == 0.05 and train.lr == RECIPES["modern"]["train"]["lr"] == 4e-3
    _, train = recipe_configs("nanogpt", rate=1e-3)
    assert train.lr == 1e-3
    # lr names TrainConfig.lr (AdamW's rate) as everywhere else, Muon's stays the recipe's
    _, train = recipe_configs("modern", lr=1e-3)
    assert train.lr == 1e-3 and train.muon_lr == RECIPES["modern"]["train"]["muon_lr"]
    with pytest.raises(ConfigError, match="unknown model or train setting.*max_step"):
        recipe_configs("modern", max_step=10)


def test_an_unknown_recipe_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'fast'; known recipes: book, nanogpt, modern"):
        recipe_configs("fast")


def test_pretrain_with_a_recipe_records_its_settings_and_flags_win(tmp_path):
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data import prepare
    from lmforge.tokenizer import Tokenizer

    text = "the cat sat on the mat and the dog ran far away. " * 400
    tok = Tokenizer.train([text], TokenizerConfig(vocab_size=300))
    (tmp_path / "c.txt").write_text(text)
    prepare([str(tmp_path / "c.txt")], tmp_path / "data", tok, DataConfig(), quiet=True, save_tokenizer=True)
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--data", str(tmp_path / "data"), "--out",
                          str(run), "--preset", "gpt-nano", "--recipe", "modern", "--train.max_steps", "20",
                          "--train.batch_size", "4", "--train.lr", "0.002", "--model.logit_softcap", "30",
                          "--prompts", "[]"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["qk_norm"] is True and cfg["model"]["logit_softcap"] == 30.0  # the flag won
    assert cfg["train"]["optimizer"] == "muon" and cfg["train"]["schedule"] == "wsd"
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["muon_lr"] == RECIPES["modern"]["train"]["muon_lr"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--out", str(run), "--resume", "true",
                            "--recipe", "nanogpt", "--train.max_steps", "30"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        "lmforge: error: --recipe sets up a new run; a resumed run keeps the settings it was trained with (drop "
        "--recipe, or change one setting with its --model.* / --train.* flag)"]  # once silently ignored
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    null = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--out", str(run), "--resume", "true",
                           "--recipe", "null", "--train.max_steps", "21", "--prompts", "[]"],
                          capture_output=True, text=True, timeout=300)
    assert null.returncode == 0, null.stderr[-2000:]  # no recipe named: an ordinary resume
    uncapped = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--data", str(tmp_path / "data"), "--out",
                               str(tmp_path / "uncapped"), "--preset", "gpt-nano", "--recipe", "modern",
                               "--train.max_steps", "2", "--train.batch_size", "2", "--model.logit_softcap", "0",
                               "--prompts", "[]"], capture_output=True, text=True, timeout=300)
    assert uncapped.returncode == 0, uncapped.stderr[-2000:]
    cfg = json.loads((tmp_path / "uncapped" / "config.json").read_text())
    assert cfg["model"]["logit_softcap"] is None and cfg["model"]["qk_norm"] is True  # 0: the recipe's cap is off
    bad = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--data", str(tmp_path / "data"), "--out",
                          str(tmp_path / "other"), "--recipe", "fast"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "lmforge: error: unknown recipe 'fast'; known recipes: book, nanogpt, modern"]
