"""Tests written to kill mutmut survivors in config.py (docs/DEVELOPING.md, mutation testing).

Every validated field at its boundary: the last valid value is accepted, the first invalid one
is refused with the field's own message, and every problem is reported at once."""

import re

import pytest

from lmforge.config import (PRESETS, ConfigError, DataConfig, LmforgeError, ModelConfig, SampleConfig, TokenizerConfig,
                            TrainConfig, config_dict, json_ready)


def _refused(cls, kwargs, *messages):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    text = str(e.value)
    for m in messages:
        assert m in text, (m, text)
    return text


# ----------------------------------------------------------------------------- ModelConfig
@pytest.mark.parametrize("field", ["vocab_size", "context_length", "n_layer", "n_head", "d_model"])
def test_model_sizes_are_at_least_one(field):
    small = dict(vocab_size=4, context_length=4, d_model=4, n_layer=1, n_head=1)
    ModelConfig(**{**small, field: 1})
    text = _refused(ModelConfig, {**small, field: 0}, f"{field} must be >= 1, got 0")
    assert text.startswith("invalid model config: ")


@pytest.mark.parametrize("d_model, n_head, suggestion", [(10, 4, 8), (2, 4, 4), (14, 4, 16), (100, 3, 99)])
def test_model_width_must_divide_into_heads_with_a_suggestion(d_model, n_head, suggestion):
    text = _refused(ModelConfig, dict(d_model=d_model, n_head=n_head),
                    f"d_model ({d_model}) must be divisible by n_head ({n_head}); try d_model={suggestion}")
    assert text == (f"invalid model config: d_model ({d_model}) must be divisible by n_head ({n_head}); "
                    f"try d_model={suggestion}")


def test_model_kv_heads():
    assert ModelConfig(d_model=12, n_head=6, n_kv_head=6).kv_heads == 6
    assert ModelConfig(d_model=12, n_head=6, n_kv_head=1).kv_heads == 1
    assert ModelConfig(d_model=12, n_head=6, n_kv_head=3).kv_heads == 3
    assert ModelConfig(d_model=12, n_head=6).kv_heads == 6  # None: one per query head
    for bad in (0, -1, 4, 12):
        _refused(ModelConfig, dict(d_model=12, n_head=6, n_kv_head=bad), f"n_kv_head ({bad}) must divide n_head (6)")


def test_model_derived_sizes():
    c = ModelConfig(d_model=12, n_head=3)
    assert (c.head_dim, c.ff_dim) == (4, 48)
    assert ModelConfig(d_model=12, n_head=3, d_ff=5).ff_dim == 5
    ModelConfig(d_ff=1)
    _refused(ModelConfig, dict(d_ff=0), "d_ff must be >= 1, got 0")


def test_model_dropout_eps_theta_and_choices():
    ModelConfig(dropout=0.0)
    ModelConfig(dropout=0.999)
    _refused(ModelConfig, dict(dropout=1.0), "dropout must be in [0, 1), got 1.0")
    _refused(ModelConfig, dict(dropout=-0.01), "dropout must be in [0, 1), got -0.01")
    ModelConfig(norm_eps=1e-12)
    _refused(ModelConfig, dict(norm_eps=0.0), "norm_eps must be > 0, got 0.0")
    ModelConfig(rope_theta=1e-6)
    _refused(ModelConfig, dict(rope_theta=0.0), "rope_theta must be > 0, got 0.0")
    for kind in ("layernorm", "rmsnorm"):
        ModelConfig(norm=kind)
    for kind in ("gelu", "swiglu"):
        ModelConfig(mlp=kind)
    for kind in ("learned", "rope"):
        ModelConfig(positions=kind)
    text = _refused(ModelConfig, dict(norm="batchnorm", mlp="relu", positions="alibi"),
                    "norm must be 'layernorm' or 'rmsnorm', got 'batchnorm'",
                    "mlp must be 'gelu' or 'swiglu', got 'relu'",
                    "positions must be 'learned' or 'rope', got 'alibi'")
    assert text.count("; ") == 2  # three problems, one message


def test_rotary_needs_an_even_head_size():
    ModelConfig(d_model=6, n_head=3, positions="rope")  # head size 2
    ModelConfig(d_model=6, n_head=2, positions="learned")  # head size 3 is fine without rotary
    _refused(ModelConfig, dict(d_model=6, n_head=2, positions="rope"), "rotary embeddings need an even head size, got 3")
    _refused(ModelConfig, dict(d_model=5, n_head=1, positions="rope"), "rotary embeddings need an even head size, got 5")
    # An indivisible width gets its own message, not a head size computed from it.
    text = _refused(ModelConfig, dict(d_model=7, n_head=2, positions="rope"), "must be divisible by n_head")
    assert "rotary" not in text


def test_model_config_round_trips_and_names_unknown_keys():
    c = ModelConfig(d_model=12, n_head=3, n_kv_head=1)
    assert ModelConfig.from_dict(c.to_dict()) == c
    assert c.replace(n_layer=5).n_layer == 5 and c.replace(n_layer=5).d_model == 12
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({**c.to_dict(), "width": 3, "depth": 2})
    assert str(e.value).startswith("unknown model config keys ['depth', 'width']; known keys: ['bias', 'context_length'")


def test_presets_and_their_overrides():
    c = ModelConfig.from_preset("gpt-nano", n_layer=3)
    assert (c.vocab_size, c.context_length, c.d_model, c.n_layer, c.n_head) == (512, 64, 64, 3, 4)
    assert ModelConfig.from_preset("gpt2-124m") == ModelConfig()
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("gpt5")
    assert str(e.value) == "unknown model preset 'gpt5'; known presets: " + ", ".join(PRESETS)
    assert isinstance(e.value, LmforgeError) and isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------- TokenizerConfig
def test_tokenizer_config_boundaries():
    TokenizerConfig(vocab_size=257)
    TokenizerConfig(vocab_size=258, special_tokens=("<a>", "<b>"))
    TokenizerConfig(vocab_size=256, special_tokens=())
    text = _refused(TokenizerConfig, dict(vocab_size=257, special_tokens=("<a>", "<b>")),
                    "vocab_size must be at least 256 byte tokens + 2 special token(s) = 258, got 257")
    assert text.startswith("invalid tokenizer config: ")
    assert (_refused(TokenizerConfig, dict(special_tokens=("<a>", "<a>")))
            == "invalid tokenizer config: special_tokens contains duplicates")
    assert (_refused(TokenizerConfig, dict(special_tokens=("<a>", "")))
            == "invalid tokenizer config: special tokens must be non-empty strings")


# ----------------------------------------------------------------------------- DataConfig
def test_data_config_boundaries():
    DataConfig(val_fraction=0.0, workers=0, errors="replace")
    DataConfig(val_fraction=0.99, errors="strict")
    text = _refused(DataConfig, dict(val_fraction=1.0), "val_fraction must be in [0, 1), got 1.0")
    assert text.startswith("invalid data config: ")
    _refused(DataConfig, dict(val_fraction=-0.1), "val_fraction must be in [0, 1), got -0.1")
    _refused(DataConfig, dict(errors="ignore"), "errors must be 'strict' or 'replace', got 'ignore'")
    _refused(DataConfig, dict(workers=-1), "workers must be >= 0, got -1")


# ----------------------------------------------------------------------------- TrainConfig
INT_FIELDS = ["batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "save_interval",
              "log_interval", "keep_checkpoints"]


@pytest.mark.parametrize("field", INT_FIELDS)
def test_train_counts_are_integers_of_at_least_one(field):
    TrainConfig(**{field: 1})
    text = _refused(TrainConfig, {field: 0}, f"{field} must be an integer >= 1, got 0")
    assert text == f"invalid train config: {field} must be an integer >= 1, got 0"
    _refused(TrainConfig, {field: 2.0}, f"{field} must be an integer >= 1, got 2.0")


def test_train_config_boundaries():
    TrainConfig(max_minutes=None, stride=None, grad_clip=None)
    TrainConfig(max_minutes=0.01, stride=1, lr=1e-9, min_lr_ratio=0.0, warmup_steps=0, weight_decay=0.0,
                beta1=0.0, beta2=0.0, grad_clip=1e-6, sample_interval=0, schedule="constant", dtype="float32")
    TrainConfig(min_lr_ratio=1.0, beta1=0.999, beta2=0.999, schedule="cosine", dtype="bfloat16")
    TrainConfig(dtype="auto")
    cases = [
        (dict(max_minutes=0), "max_minutes must be > 0"),
        (dict(stride=0), "stride must be >= 1, got 0"),
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(min_lr_ratio=-0.1), "min_lr_ratio must be in [0, 1], got -0.1"),
        (dict(min_lr_ratio=1.1), "min_lr_ratio must be in [0, 1], got 1.1"),
        (dict(warmup_steps=-1), "warmup_steps must be >= 0, got -1"),
        (dict(schedule="linear"), "schedule must be 'cosine', 'constant' or 'wsd'"),
        (dict(weight_decay=-0.01), "weight_decay must be >= 0"),
        (dict(beta1=1.0), "beta1 and beta2 must be in [0, 1)"),
        (dict(beta2=1.0), "beta1 and beta2 must be in [0, 1)"),
        (dict(beta1=-0.1), "beta1 and beta2 must be in [0, 1)"),
        (dict(beta2=-0.1), "beta1 and beta2 must be in [0, 1)"),
        (dict(grad_clip=0.0), "grad_clip must be > 0 or None"),
        (dict(dtype="float16"), "dtype must be auto, float32 or bfloat16"),
        (dict(sample_interval=-1), "sample_interval must be >= 0"),
    ]
    for kwargs, message in cases:
        assert _refused(TrainConfig, kwargs) == "invalid train config: " + message, kwargs
    every = {k: v for kwargs, _ in cases for k, v in kwargs.items()}
    text = _refused(TrainConfig, every)
    assert text.count("; ") == 10  # eleven problems (one for both betas), one message


# ----------------------------------------------------------------------------- SampleConfig
def test_sample_config_every_problem_in_one_message():
    text = _refused(SampleConfig, dict(max_new_tokens=-1, temperature=-1, top_k=0, top_p=2.0))
    assert text == ("invalid sample config: max_new_tokens must be >= 0, got -1; temperature must be >= 0, got -1; "
                    "top_k must be >= 1 or None, got 0; top_p must be in (0, 1] or None, got 2.0")
    SampleConfig(top_k=None, top_p=None)


# ----------------------------------------------------------------------------- JSON
def test_config_dict_is_json_ready():
    d = config_dict(TokenizerConfig(special_tokens=("<a>", "<b>")))
    assert d == {"vocab_size": 4096, "special_tokens": ["<a>", "<b>"], "pattern": "gpt2"}
    assert json_ready({"a": (1, (2, 3)), "b": [{"c": (4,)}], "d": "x"}) == {"a": [1, [2, 3]], "b": [{"c": [4]}], "d": "x"}
    assert re.fullmatch(r"\d+", str(config_dict(TrainConfig())["batch_size"]))


def test_restored_settings_keep_the_stored_values_under_those_given_again_and_drop_retired_names():
    from lmforge.config import LmforgeError, TrainConfig, restored

    stored = {"lr": 0.5, "batch_size": 3, "a_setting_of_an_older_version": 1}
    got = restored(TrainConfig, stored, {"batch_size": 7}, "runs/x")
    assert (got.lr, got.batch_size, got.max_steps) == (0.5, 7, TrainConfig().max_steps)
    with pytest.raises(LmforgeError, match=r"^the settings stored in runs/x cannot be read \(.*\); start a new run$"):
        restored(TrainConfig, {"lr": "fast"}, {}, "runs/x")  # a hand-edited config.json
    with pytest.raises(LmforgeError, match=r"""cannot be read \('lr' is "fast", but it takes a number\)"""):
        restored(TrainConfig, {"lr": "fast"}, {}, "runs/x")  # the setting and what it takes are named
    with pytest.raises(LmforgeError, match=r"cannot be read \(the TrainConfig settings are a JSON list, not an obj"):
        restored(TrainConfig, [], {}, "runs/x")
    for good in ({"lr": 1}, {"peak_flops": None}):  # JSON's own spellings of the types
        restored(TrainConfig, good, {}, "runs/x")
    from lmforge.config import FinetuneConfig

    assert tuple(restored(FinetuneConfig, {"split": [0.8, 0.1, 0.1]}, {}, "runs/x").split) == (0.8, 0.1, 0.1)
    with pytest.raises(LmforgeError, match=r"'split' is \[0.8, 0.2\], but it takes a list"):
        restored(FinetuneConfig, {"split": [0.8, 0.2]}, {}, "runs/x")


def test_a_pretraining_run_whose_stored_settings_are_damaged_resumes_with_a_one_line_error(tmp_path):
    import json

    from lmforge.config import LmforgeError, TrainConfig
    from lmforge.pipeline import resume_configs

    model = {**ModelConfig.from_preset("gpt-nano").to_dict(), "n_layer": "two"}  # hand-edited
    (tmp_path / "config.json").write_text(json.dumps({"format": "lmforge-run", "model": model, "train": {}}))
    with pytest.raises(LmforgeError, match="""^the settings stored in .* cannot be read \\('n_layer' is "two", but it """
                                           "takes a whole number\\)"):
        resume_configs(tmp_path, {}, {})
    model["n_layer"] = 2
    (tmp_path / "config.json").write_text(json.dumps({"format": "lmforge-run", "model": model,
                                                      "train": {"lr": "fast"}}))
    with pytest.raises(LmforgeError, match="^the settings stored in .* cannot be read"):
        resume_configs(tmp_path, {}, {})
    (tmp_path / "config.json").write_text(json.dumps({"format": "lmforge-run", "model": model, "data_path": "d",
                                                      "train": {"lr": 0.25}}))
    assert resume_configs(tmp_path, {}, {"batch_size": 3})[::2] == ("d", TrainConfig(lr=0.25, batch_size=3))


def test_malformed_turns_a_bad_value_into_one_line_and_lets_lmforges_own_errors_and_others_pass():
    from lmforge.config import ConfigError, malformed

    said = lambda e: LmforgeError(f"bad file ({e})")  # noqa: E731
    with pytest.raises(LmforgeError, match=r"^bad file \(invalid literal for int\(\) with base 10: 'x'\)$"):
        with malformed(said):
            int("x")
    with pytest.raises(ConfigError, match="^its own words$"):  # a ValueError too, but it has said what is wrong
        with malformed(said):
            raise ConfigError("its own words")
    with pytest.raises(KeyError):  # not a kind it was given
        with malformed(said, (TypeError,)):
            {}["k"]
    with pytest.raises(ValueError, match="^x$"):
        with malformed(said, (TypeError,)):
            raise ValueError("x")


def test_a_model_config_read_with_a_value_of_the_wrong_type_names_the_setting():
    """What `generate RUN` says of a hand-edited config.json (load_model puts the file's path before it)."""
    good = ModelConfig.from_preset("gpt-nano").to_dict()
    with pytest.raises(TypeError, match="""^'n_layer' is "x", but it takes a whole number$"""):
        ModelConfig.from_dict({**good, "n_layer": "x"})
    with pytest.raises(TypeError, match="^'tie_embeddings' is 1, but it takes true or false$"):
        ModelConfig.from_dict({**good, "tie_embeddings": 1})
    with pytest.raises(TypeError, match="^the ModelConfig settings are a JSON list, not an object"):
        ModelConfig.from_dict([])
    assert ModelConfig.from_dict({**good, "norm_eps": 1}).norm_eps == 1  # a whole number is a number
