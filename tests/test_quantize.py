"""Weight-only int8 decoding: the fast kernel equals its written-out reference, the rounding
error is what the scale allows, and a quantized model predicts what the float model predicts."""

import torch
from torch import nn

from lmforge.config import ModelConfig, SampleConfig
from lmforge.generate import Decoder
from lmforge.model import GPT
from lmforge.quantize import Int8Linear, quantize_int8, quantize_rows


def test_rows_round_to_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different sizes
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())
    assert quantize_rows(torch.zeros(2, 3))[0].abs().sum() == 0  # an all-zero row stays zero, no division by 0


def test_the_int8_kernel_equals_the_dequantized_reference():
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=True)
    q = Int8Linear(lin)
    x = torch.randn(2, 5, 48)
    ref = torch.nn.functional.linear(x, q.weight, q.bias)
    torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)
    assert (q.weight - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-7
    assert q(x.bfloat16()).dtype == torch.bfloat16  # bf16 activations in and out, fp32 inside


def test_a_quantized_model_predicts_what_the_float_model_predicts():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-micro", vocab_size=300, context_length=64)
    model = GPT(cfg).eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ref = model(x)
    wte = model.wte.weight.detach().clone()
    n = quantize_int8(model)
    assert n == 5 * cfg.n_layer + 1 and isinstance(model.lm_head, Int8Linear)  # qkv, o, gate, up, down; head
    assert torch.equal(model.wte.weight, wte)  # the tied embedding keeps its float table
    with torch.no_grad():
        out = model(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.02
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9
    cfg_s = SampleConfig(max_new_tokens=5, temperature=0, stop_at_eos=False)
    assert len([s for s in Decoder(model, [[1, 2, 3]], cfg_s)]) == 5


def test_generate_and_chat_run_quantized(tmp_path, capsys):
    from conftest import TEXT

    from lmforge.chat import Assistant
    from lmforge.checkpoint import save_model
    from lmforge.cli import main
    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train([TEXT * 3], TokenizerConfig(vocab_size=280))
    torch.manual_seed(0)
    save_model(tmp_path, GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=64, d_model=32, n_layer=2,
                                         n_head=2)), 0, {"task": "pretrain"})
    tok.save(tmp_path / "tokenizer.json")
    assert main(["generate", str(tmp_path), "--prompt", "Doc", "--quantize", "int8", "--sample.max_new_tokens", "6",
                 "--sample.seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Doc")
    a = Assistant.load(str(tmp_path), quantize="int8")
    assert isinstance(a.model.h[0].attn.c_attn, Int8Linear)
