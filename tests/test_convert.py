"""Weights in and out: parity with transformers on tiny random checkpoints it writes itself."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig, SampleConfig
from lmforge.convert import ConvertError, export_hf, from_hf_config, load_hf
from lmforge.generate import generate
from lmforge.model import GPT

transformers = pytest.importorskip("transformers")


def _gpt2_dir(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=120, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "hf_gpt2")
    return model, tmp_path / "hf_gpt2"


def _llama_dir(tmp_path, tie=True):
    cfg = transformers.LlamaConfig(vocab_size=130, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, rope_theta=10000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so a wrong mapping of them cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf_llama")
    return model, tmp_path / "hf_llama"


def _check_parity(theirs, ours, vocab):
    idx = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    g_ref = theirs.generate(idx[:1, :5], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:]
    g_ours = generate(ours, idx[:1, :5], SampleConfig(max_new_tokens=12, temperature=0, stop_at_eos=False))[0]
    assert g_ours.tolist() == g_ref.tolist()


def test_gpt2_from_hf_safetensors(tmp_path):
    theirs, folder = _gpt2_dir(tmp_path)
    ours = load_hf(folder)
    assert ours.config.vocab_size == 120 and ours.config.tie_embeddings
    _check_parity(theirs, ours, 120)


@pytest.mark.parametrize("tie", [True, False])
def test_llama_from_hf_safetensors(tmp_path, tie):
    theirs, folder = _llama_dir(tmp_path, tie)
    ours = load_hf(folder)
    assert ours.config.kv_heads == 2 and ours.config.positions == "rope"
    _check_parity(theirs, ours, 130)


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-micro"])
def test_export_loads_in_transformers(tmp_path, preset):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=150, context_length=32)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    out = export_hf(ours, tmp_path / "export")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _check_parity(theirs, ours, 150)
    assert ours.num_params() == theirs.num_parameters()
    again = load_hf(out)
    idx = torch.randint(0, 150, (1, 10))
    torch.testing.assert_close(again(idx), ours(idx))


def test_shape_mismatch_names_the_tensor(tmp_path):
    _, folder = _gpt2_dir(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_embd"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"tensor 'wte.weight' has shape \(120, 48\)"):
        load_hf(folder)


def test_unsupported_configs_are_named():
    with pytest.raises(ConvertError, match="model_type 'bert'"):
        from_hf_config({"model_type": "bert"})
    with pytest.raises(ConvertError, match="lacks 'n_embd'"):
        from_hf_config({"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_layer": 1, "n_head": 1})


LLAMA_CFG = {"model_type": "llama", "vocab_size": 10, "max_position_embeddings": 8, "hidden_size": 8,
             "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16}


def test_unsupported_llama_features_keep_their_own_message():
    # not "damaged or hand-edited": these are real configs lmforge cannot read yet
    with pytest.raises(ConvertError, match=r"^rope_scaling .* is not supported yet"):
        from_hf_config({**LLAMA_CFG, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConvertError, match=r"^head_dim 16 != hidden_size / num_attention_heads"):
        from_hf_config({**LLAMA_CFG, "head_dim": 16})


@pytest.mark.parametrize("edit", [{"vocab_size": "10"}, {"max_position_embeddings": None},
                                  {"num_attention_heads": 0}, {"rope_theta": "abc"},
                                  {"intermediate_size": 1.5}, {"max_position_embeddings": 10 ** 12}])
def test_a_config_value_of_the_wrong_type_or_range_is_a_convert_error(edit):
    # Once internal errors: TypeError, ZeroDivisionError, ValueError; and (the last two) an allocation
    # of terabytes when the model was built or generated
    with pytest.raises(ConvertError, match="has a value of the wrong type or range"):
        from_hf_config({**LLAMA_CFG, **edit})


def test_a_config_json_that_is_no_object_and_an_upper_case_gguf_name(tmp_path):
    from lmforge.config import LmforgeError
    from lmforge.models import load_any

    for text in ("null", "[1, 2]", '"llama"'):
        (tmp_path / "config.json").write_text(text)
        (tmp_path / "tokenizer.json").write_text("{}")
        with pytest.raises(LmforgeError, match="config.json is not a JSON object"):
            load_any(str(tmp_path))
        with pytest.raises(ConvertError, match="config.json is not a JSON object"):
            load_hf(tmp_path)
    (tmp_path / "M.GGUF").write_bytes(b"not a gguf at all")  # read as a GGUF (and refused as one), not "not a model"
    with pytest.raises(LmforgeError, match="GGUF") as e:
        load_any(str(tmp_path / "M.GGUF"))
    assert "is not a model" not in str(e.value)


def test_the_rotary_table_grows_as_positions_are_used_and_matches_the_formula():
    """It was built for the whole context at once: a config claiming 10^12 positions allocated terabytes."""
    from lmforge.attention import RotaryEmbedding

    rope = RotaryEmbedding(8, 100_000, theta=500.0)
    cos, sin = rope(0, 4, torch.device("cpu"))
    assert rope.cos.size(0) == RotaryEmbedding.FIRST
    cos2, _ = rope(40_000, 3, torch.device("cpu"))
    assert rope.cos.size(0) == 2 * RotaryEmbedding.FIRST  # doubled, not the 100k of the context
    inv = 1.0 / (500.0 ** (torch.arange(0, 8, 2).float() / 8))
    want = torch.outer(torch.arange(40_000, 40_003).float(), inv)
    torch.testing.assert_close(cos2, torch.cat([want, want], -1).cos())
    torch.testing.assert_close(rope(0, 4, torch.device("cpu"))[1], sin)
    per_row, _ = rope.at(torch.tensor([[0, 99_999]]))
    assert rope.cos.size(0) == 100_000 and per_row.shape == (1, 1, 2, 8)
    fresh = RotaryEmbedding(8, 100_000, theta=500.0)  # a bound known (a compiled decode step's keys): no read
    fresh.at(torch.tensor([[3]]), bound=40_000)
    assert fresh.cos.size(0) == 40_000


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_positions": 8,
                                                      "n_embd": 8, "n_layer": 1, "n_head": 1}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ConvertError, match="never loads"):
        load_hf(tmp_path)


def test_openai_community_layout(tmp_path):
    """The hub's GPT-2 files: no 'transformer.' prefix, old causal-mask buffers beside the weights."""
    from safetensors.torch import load_file, save_file

    theirs, folder = _gpt2_dir(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    for i in range(2):
        renamed[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(renamed, folder / "model.safetensors")
    _check_parity(theirs, load_hf(folder), 120)


def _tiny_tokenizer():
    from conftest import TEXT

    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.train([TEXT * 20], TokenizerConfig(vocab_size=300))


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-micro"])
def test_export_writes_the_tokenizers_own_bos_eos(tmp_path, preset):
    tok = _tiny_tokenizer()
    assert tok.eot_id == 299
    ours = GPT(ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, context_length=32)).eval()
    out = export_hf(ours, tmp_path / "export", tok)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((out / name).read_text())
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (299, 299), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert theirs.config.eos_token_id == 299 and theirs.generation_config.eos_token_id == 299
    assert theirs.generation_config.bos_token_id == 299  # not GPT-2's 50256 (Llama's 1 / 2), outside this vocabulary


def test_export_is_recognised_and_a_failed_one_changes_nothing(tmp_path, monkeypatch):
    import errno

    from lmforge import atomic
    from lmforge.convert import is_hf_export
    from lmforge.outputs import OutputError

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    out = export_hf(GPT(ModelConfig.from_preset("gpt-nano", vocab_size=300, context_length=32)), tmp_path / "e", tok)
    assert is_hf_export(out)
    _, theirs = _gpt2_dir(tmp_path)  # written by transformers: not lmforge's
    assert not is_hf_export(theirs) and not is_hf_export(tmp_path / "nowhere")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = atomic.write_file, []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 3:  # the weights and the config are written; then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(atomic, "write_file", full_disk)
    torch.manual_seed(1)
    with pytest.raises(OutputError, match="could not write .*No space left on device"):
        export_hf(GPT(ModelConfig.from_preset("gpt-nano", vocab_size=300, context_length=32)), out, tok)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "hf_gpt2"]  # no staging folder left


def test_an_export_over_an_export_is_all_or_nothing_and_leaves_nothing_stale(tmp_path, monkeypatch):
    """A rename that failed midway left the new weights beside the old tokenizer (and said "unchanged"); a
    folder where a file goes did too; a stale chat_template.jinja (read before tokenizer_config.json's
    template) outlived an --overwrite; a stage a kill -9 left stayed for ever."""
    import os

    from lmforge.outputs import OutputError

    tok = _tiny_tokenizer()
    model = lambda seed: torch.manual_seed(seed) and GPT(ModelConfig.from_preset(  # noqa: E731
        "gpt-nano", vocab_size=300, context_length=32))
    out = export_hf(model(0), tmp_path / "e", tok)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, moved = os.replace, []

    def fails_on_the_fourth(src, dst):
        if Path(dst).parent == out:  # a file moving into the export (not the stage's own renames)
            moved.append(dst)
            if len(moved) == 4:  # three new files in place (the weights too), then a failure
                raise OSError(13, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fails_on_the_fourth)
    with pytest.raises(OutputError, match="Permission denied"):
        export_hf(model(1), out, tok)
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export, whole
    (out / "tokenizer_config.json").unlink()
    (out / "tokenizer_config.json").mkdir()  # a folder where a file goes: refused before anything moves
    (out / "tokenizer_config.json" / "keep").write_text("mine")
    with pytest.raises(OutputError, match="tokenizer_config.json is a folder where a file goes; move it away"):
        export_hf(model(1), out, tok)
    assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]
    assert (out / "tokenizer_config.json" / "keep").read_text() == "mine"
    (out / "tokenizer_config.json" / "keep").unlink()
    (out / "tokenizer_config.json").rmdir()
    (out / "chat_template.jinja").write_text("{{ 'stale' }}")
    dead, alive = tmp_path / ".e.4194999.abc.tmp", tmp_path / f".e.{os.getpid()}.xyz.tmp"  # (past pid_max)
    swapping = tmp_path / ".e.4194998.def.tmp"  # killed mid-swap: the only copy of files that were in out
    for stage in (dead, alive, swapping):
        stage.mkdir()
        (stage / "model.safetensors").write_bytes(b"x" * 1000)
    (swapping / ".replaced").mkdir()
    (swapping / ".replaced" / "config.json").write_text("{}")
    export_hf(model(1), out, tok)
    assert not (out / "chat_template.jinja").exists() and (out / "tokenizer_config.json").is_file()
    assert not dead.exists() and alive.exists() and swapping.exists()  # a living process's stage is its own


@pytest.mark.parametrize("damage", ["nan", "inf", "int64"])
def test_weights_that_are_not_finite_floats_are_refused_naming_the_tensor(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from lmforge.config import LmforgeError

    torch.manual_seed(0)
    out = export_hf(GPT(ModelConfig.from_preset("gpt-nano", vocab_size=300, context_length=32)), tmp_path / "e",
                    _tiny_tokenizer())
    weights = load_file(out / "model.safetensors")
    name = sorted(weights)[3]
    if damage == "int64":
        weights[name] = weights[name].to(torch.int64)
    else:
        weights[name] = weights[name].clone()
        weights[name].view(-1)[7] = float(damage)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    # Once these loaded and every score came out nan
    with pytest.raises(LmforgeError, match="not floating point" if damage == "int64" else "NaN or infinite"):
        load_hf(out)


def test_a_query_key_or_value_tensor_of_a_layer_the_config_lacks_is_refused():
    from lmforge.convert import from_hf_state

    cfg = from_hf_config(LLAMA_CFG)  # one layer
    extra = {"model.layers.99.self_attn.q_proj.weight": torch.zeros(8, 8)}  # once silently dropped
    with pytest.raises(ConvertError, match="'model.layers.99.self_attn.q_proj.weight' belongs to no layer of the 1"):
        from_hf_state(extra, cfg)
