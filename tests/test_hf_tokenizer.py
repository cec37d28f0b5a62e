"""Tokenizers from HF tokenizer.json and back: ids identical to the `tokenizers` library."""

import pytest
from conftest import TEXT, shared_file

from lmforge.config import TokenizerConfig
from lmforge.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from lmforge.tokenizer import EOT, Tokenizer

tokenizers = pytest.importorskip("tokenizers")


def _corpora_samples():
    return [shared_file("corpora", n).read_text(encoding="utf-8")[:200_000] for n in ("austen.txt", "kjv.txt",
                                                                                      "sotu.txt")]


def test_gpt2_tokenizer_json_matches_tokenizers(tmp_path):
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE
    enc = json.loads(shared_file("gpt2", "encoder.json").read_text())
    merges_txt = shared_file("gpt2", "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(m.split(" ")) for m in merges_txt if m]
    hf = HFTokenizer(BPE(vocab=enc, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_hf_tokenizer(tmp_path)
    assert ours.vocab_size == 50257 and ours.eot_id == 50256
    for text in _corpora_samples() + ["Hello, world<|endoftext|> 2024 numbers  123\n\n x"]:
        assert ours.encode(text, allowed_special="all") == hf.encode(text).ids


def test_export_loads_in_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = Tokenizer.train([TEXT * 30, "digits 0123456789 and ünïcödé ☃"], TokenizerConfig(vocab_size=400))
    save_hf_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    again = load_hf_tokenizer(tmp_path)
    for text in [TEXT, "Some  spaced\ttext,\n\nnew lines 42 and ☃!", *(_corpora_samples())]:
        ids = tok.encode(text, disallowed_special=())
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert again.encode(text, disallowed_special=()) == ids
        assert hf.decode(ids) == text
    assert hf.eos_token == EOT and hf.convert_tokens_to_ids(EOT) == tok.eot_id


def test_the_chat_template_and_end_token_beside_tokenizer_json_are_read_and_written(tmp_path):
    """transformers keeps them in tokenizer_config.json (or chat_template.jinja); once an HF folder
    loaded without them (a chat model prompted as a base model, answers running past <|im_end|>) and an
    export dropped them."""
    import json

    from conftest import CHATML, chat_tokenizer

    tok = chat_tokenizer()  # ChatML, ends at <|im_end|>
    save_hf_tokenizer(tok, tmp_path / "a", model_max_length=2048)
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML and config["eos_token"] == "<|im_end|>"
    assert config["model_max_length"] == 2048
    again = load_hf_tokenizer(tmp_path / "a")
    assert again.chat_template == CHATML and again.eos_id == tok.special_tokens["<|im_end|>"]
    # transformers' other layouts: a list of named templates, an AddedToken as eos, chat_template.jinja
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}]
    config["eos_token"] = {"content": "<|im_end|>", "special": True}
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config))
    again = load_hf_tokenizer(tmp_path / "a")
    assert again.chat_template == CHATML and again.eos_id == tok.special_tokens["<|im_end|>"]
    del config["chat_template"]
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "a" / "chat_template.jinja").write_text(CHATML)
    assert load_hf_tokenizer(tmp_path / "a").chat_template == CHATML
    config["chat_template"] = "an older template"  # the file comes first, as in transformers
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_hf_tokenizer(tmp_path / "a").chat_template == CHATML
    (tmp_path / "a" / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(Exception, match="tokenizer_config.json is not a JSON object"):
        load_hf_tokenizer(tmp_path / "a")


@pytest.mark.parametrize("bad", [
    {"model": {"type": "BPE"}},  # no vocab
    {"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [{"id": 1}]},  # special without content
    {"model": "BPE"},
    [1, 2],
    {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [1]}, "pre_tokenizer": {"type": "ByteLevel"}},
    {"model": {"type": "WordPiece", "vocab": {}}},
])
def test_damaged_hf_tokenizer_is_one_line(tmp_path, bad):
    import json

    from lmforge.hf_tokenizer import load_hf_tokenizer
    from lmforge.tokenizer import TokenizerError

    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(TokenizerError) as e:
        load_hf_tokenizer(path)
    assert "\n" not in str(e.value) and ("tokenizer.json" in str(e.value) or "not supported" in str(e.value))
