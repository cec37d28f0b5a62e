"""Tests written to kill mutmut survivors in model.py (docs/DEVELOPING.md, mutation testing)."""

import math

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model import GPT, MLP, RMSNorm, SwiGLU, init_module_weights, make_norm


def test_rmsnorm_default_eps_is_1e_minus_5():
    norm = RMSNorm(2)
    x = torch.tensor([[3e-3, 4e-3]])  # mean square 1.25e-5: comparable to eps
    rms = math.sqrt(12.5e-6 + 1e-5)
    assert norm(x)[0].tolist() == pytest.approx([3e-3 / rms, 4e-3 / rms], rel=1e-5)


def test_rmsnorm_normalises_the_last_dimension_of_a_sequence():
    norm = RMSNorm(4, eps=0.0)
    x = torch.arange(1.0, 25.0).reshape(2, 3, 4)  # (B, T, d) with T != d
    want = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(norm(x), want)


def test_rmsnorm_keeps_a_low_precision_input_in_its_dtype():
    norm = RMSNorm(4).to(torch.bfloat16)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    want = (x.float() / (x.float().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).to(torch.bfloat16)
    assert torch.equal(out, want)


def test_layernorm_bias_follows_the_config():
    assert make_norm(ModelConfig(d_model=4, n_head=1, bias=False)).bias is None
    assert make_norm(ModelConfig(d_model=4, n_head=1, bias=True)).bias is not None
    assert make_norm(ModelConfig(d_model=4, n_head=1, norm_eps=0.25)).eps == 0.25


@pytest.mark.parametrize("cls, mlp", [(MLP, "gelu"), (SwiGLU, "swiglu")])
def test_mlp_dropout_is_the_configured_rate(cls, mlp):
    for p in (0.0, 0.3):
        m = cls(ModelConfig(d_model=4, n_head=1, mlp=mlp, dropout=p))
        assert m.drop.p == p
    m = cls(ModelConfig(d_model=4, n_head=1, mlp=mlp, dropout=0.0)).train()
    x = torch.randn(8, 4)
    assert torch.equal(m(x), m(x))  # no dropout at rate 0, even in training mode


def test_model_dropout_layers_use_the_configured_rate():
    model = GPT(ModelConfig(vocab_size=8, context_length=4, d_model=4, n_layer=1, n_head=1, dropout=0.0)).train()
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(idx), model(idx))


def test_modules_of_other_types_are_initialised_by_themselves_or_zeroed():
    class Knows(nn.Module):  # a module that knows its own initialisation (as LoRA layers do)
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.full((3,), 5.0))

        def reset_parameters(self):
            with torch.no_grad():
                self.a.fill_(7.0)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.full((3,), 5.0))

    root = nn.Sequential(Knows(), Plain(), nn.LayerNorm(3), nn.Linear(3, 3))
    with torch.no_grad():
        root[2].weight.fill_(2.0)
        root[2].bias.fill_(2.0)
        root[3].bias.fill_(2.0)
    init_module_weights(root, n_layer=1, seed=0)
    assert root[0].a.tolist() == [7.0, 7.0, 7.0]
    assert root[1].b.tolist() == [0.0, 0.0, 0.0]
    assert root[2].weight.tolist() == [1.0, 1.0, 1.0] and root[2].bias.tolist() == [0.0, 0.0, 0.0]
    assert root[3].bias.tolist() == [0.0, 0.0, 0.0] and root[3].weight.abs().max() > 0


def test_a_shared_parameter_is_initialised_once_by_its_first_owner():
    """A weight shared by a plain layer and a residual projection keeps the first one's
    initialisation (as the tied embedding and output layer share one)."""
    torch.manual_seed(0)
    first, second = nn.Linear(64, 256, bias=False), nn.Linear(64, 256, bias=False)
    second.weight = first.weight
    second.residual_projection = True
    init_module_weights(nn.Sequential(first, second), n_layer=50, seed=0)
    assert first.weight.std().item() == pytest.approx(0.02, rel=0.05)  # not 0.02 / 10


def test_init_skips_parameters_on_the_meta_device():
    with torch.device("meta"):
        model = GPT(ModelConfig(vocab_size=8, context_length=4, d_model=4, n_layer=1, n_head=1))
    init_module_weights(model, 1, seed=0)  # nothing to draw: no error
    assert model.wte.weight.device.type == "meta"


def test_init_weights_with_a_seed_is_reproducible_and_seed_dependent():
    cfg = ModelConfig(vocab_size=16, context_length=4, d_model=8, n_layer=1, n_head=1)
    a, b = GPT(cfg), GPT(cfg)
    a.init_weights(seed=1)
    b.init_weights(seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    b.init_weights(seed=2)
    assert not torch.equal(a.wte.weight, b.wte.weight)


def test_flops_per_token_defaults_to_the_context_length():
    cfg = ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=2, n_head=2)
    model = GPT(cfg)
    assert model.flops_per_token() == model.flops_per_token(8)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert model.flops_per_token(3) == 6 * n_matmul + 12 * 2 * 2 * 4 * 3


def test_forward_with_targets_is_the_mean_loss_on_both_paths():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2)
    model = GPT(cfg)
    x, y = torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))
    y[0, :3] = -100
    logits = model(x)
    want = nn.functional.cross_entropy(logits.reshape(-1, 16), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(x, targets=y), want)
    torch.testing.assert_close(model(x, targets=y, fused=False), want)
    assert model.output_weight is model.lm_head.weight


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_layers_follow_the_bias_setting(bias):
    m = SwiGLU(ModelConfig(d_model=4, n_head=1, mlp="swiglu", bias=bias))
    for layer in (m.c_gate, m.c_fc, m.c_proj):
        assert (layer.bias is not None) == bias


def test_swiglu_output_projection_is_scaled_as_a_residual_projection():
    cfg = ModelConfig(vocab_size=16, context_length=4, d_model=128, n_head=2, n_layer=8, mlp="swiglu",
                      norm="rmsnorm", positions="rope", bias=False)
    model = GPT(cfg)
    assert model.h[0].mlp.c_proj.residual_projection is True
    assert model.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert model.h[0].mlp.c_gate.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_block_is_two_pre_norm_residual_branches(positions):
    """Block(x) = y + mlp(ln_2(y)) with y = x + attn(ln_1(x)), rotary angles passed to attention."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2, positions=positions)
    model = GPT(cfg)
    block = model.h[0]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.5 * torch.randn_like(p))  # norms and biases away from their initial values
    x = torch.randn(2, 5, 8)
    rope = model.rotary(0, 5, x.device) if positions == "rope" else None
    y = x + block.attn(block.ln_1(x), None, rope)
    want = y + block.mlp(block.ln_2(y))
    torch.testing.assert_close(block(x, None, rope), want)
    if rope is not None:  # the angles matter: without them the block computes something else
        assert not torch.allclose(block(x, None, None), want)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_hidden_states_are_the_blocks_applied_in_order_with_positions(positions):
    """hidden_states = ln_f(blocks(wte[idx] (+ wpe[pos]))), rotary angles for the absolute
    positions; with a KV cache the positions continue where the cache stopped."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=2, n_head=2, positions=positions)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 16, (2, 6))
    x = model.wte(idx)
    rope = None
    if positions == "learned":
        x = x + model.wpe.weight[:6]
    else:
        rope = model.rotary(0, 6, idx.device)
    for block in model.h:
        x = block(x, None, rope)
    want = model.ln_f(x)
    torch.testing.assert_close(model.hidden_states(idx), want)
    from lmforge.attention import KVCache
    cache = KVCache(cfg, batch_size=2)
    model.hidden_states(idx[:, :4], cache)
    torch.testing.assert_close(model.hidden_states(idx[:, 4:], cache), want[:, 4:])


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_forward_on_the_meta_device_makes_everything_there(positions):
    """Positions are made on the input's device (a CPU tensor here would fail on a GPU)."""
    with torch.device("meta"):
        model = GPT(ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2, positions=positions))
    idx = torch.zeros(2, 5, dtype=torch.long, device="meta")
    out = model(idx)
    assert out.device.type == "meta" and out.shape == (2, 5, 16)


def test_output_weight_adds_a_lora_heads_change():
    from lmforge.lora import LoRALinear

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2, tie_embeddings=False))
    model.lm_head = LoRALinear(model.lm_head, 2, 4.0, 0.0)
    with torch.no_grad():
        model.lm_head.lora_B.normal_()  # rows that differ: a change the softmax sees
    delta = model.lm_head.weight_delta()
    assert delta.abs().max() > 0
    torch.testing.assert_close(model.output_weight, model.lm_head.weight + delta)
    x, y = torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))
    want = nn.functional.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1))
    torch.testing.assert_close(model(x, targets=y), want)  # the loss sees the adapted head too


def test_replace_head_makes_an_untied_initialised_head_with_a_bias():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=16, context_length=8, d_model=64, n_layer=4, n_head=2))
    with torch.no_grad():
        model.wte.weight.fill_(1.0)
    model.replace_head(300)
    head = model.lm_head
    assert head.weight.shape == (300, 64) and head.bias is not None and head.bias.shape == (300,)
    assert head.weight is not model.wte.weight and not model.config.tie_embeddings
    assert head.bias.abs().max() == 0 and head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.unique().tolist() == [1.0]  # the embedding is left as it was
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, 300)


def test_replace_head_follows_the_old_heads_device_and_dtype():
    with torch.device("meta"):
        model = GPT(ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2))
    model.replace_head(3)
    assert model.lm_head.weight.device.type == "meta"
    model = GPT(ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2)).to(torch.bfloat16)
    model.replace_head(3)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.device.type == "cpu"


def _lora_head_model(dropout: float) -> GPT:
    from lmforge.lora import LoRALinear

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2))
    model.lm_head = LoRALinear(model.lm_head, 2, 4.0, dropout)
    with torch.no_grad():
        model.lm_head.lora_B.normal_()  # B starts at zero; rows that differ change the softmax
    return model


def _kernel_calls(monkeypatch) -> list[str]:
    """Which loss path forward takes: the fused kernel or the plain reference (values are equal)."""
    from lmforge import model as model_module

    calls: list[str] = []
    fused, plain = model_module.linear_cross_entropy, model_module.cross_entropy_reference
    monkeypatch.setattr(model_module, "linear_cross_entropy", lambda *a, **k: calls.append("fused") or fused(*a, **k))
    monkeypatch.setattr(model_module, "cross_entropy_reference",
                        lambda *a, **k: calls.append("plain") or plain(*a, **k))
    return calls


def test_forward_with_targets_runs_the_fused_kernel_unless_told_not_to(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    model = GPT(ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2))
    x = torch.randint(0, 16, (2, 8))
    model(x, targets=x)
    model(x, targets=x, fused=False)
    assert calls == ["fused", "plain"]


def _masked_targets() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 16, (2, 8), generator=g), torch.randint(0, 16, (2, 8), generator=g)
    y[0, :3] = -100  # IGNORE_INDEX: left out of the mean
    return x, y


@pytest.mark.parametrize("fused", [True, False])
def test_a_lora_head_with_dropout_in_training_takes_the_plain_loss_with_dropout(monkeypatch, fused):
    calls = _kernel_calls(monkeypatch)
    model = _lora_head_model(0.5).train()
    x, y = _masked_targets()
    torch.manual_seed(3)
    loss = model(x, targets=y, fused=fused)
    torch.manual_seed(3)
    logits = model.lm_head(model.hidden_states(x))  # the same dropout masks, drawn in the same order
    want = nn.functional.cross_entropy(logits.reshape(-1, 16), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want)
    assert calls == []  # neither kernel: they see one weight, W + BA, and no dropout
    model.eval()
    no_dropout = nn.functional.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1), ignore_index=-100)
    assert not torch.allclose(loss, no_dropout)


def test_a_lora_head_runs_fused_in_eval_mode_or_without_dropout(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    x, y = _masked_targets()
    for model in (_lora_head_model(0.5).eval(), _lora_head_model(0.0).train()):
        want = nn.functional.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(model(x, targets=y), want)
    assert calls == ["fused", "fused"]


def test_replace_head_records_an_untied_head_in_the_config():
    model = GPT(ModelConfig(vocab_size=16, context_length=8, d_model=8, n_layer=1, n_head=2))
    model.replace_head(3)
    assert model.config.tie_embeddings is False and model.config.to_dict()["tie_embeddings"] is False


def test_rotary_angles_use_the_configured_theta_and_cover_the_context():
    cfg = ModelConfig(vocab_size=16, context_length=12, d_model=8, n_layer=1, n_head=2, positions="rope",
                      rope_theta=500.0)
    model = GPT(cfg)
    cos, sin = model.rotary(0, 12, torch.device("cpu"))
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, 4, 2).float() / 4))
    angles = torch.outer(torch.arange(12).float(), inv_freq)
    torch.testing.assert_close(cos, torch.cat([angles, angles], -1).cos())
    assert model.rotary.cos.shape == (12, 4)  # a table for the context, not more


def test_a_layer_sharing_its_weight_still_has_its_own_bias_zeroed():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight  # initialised by its first owner; the bias is second's own
    with torch.no_grad():
        second.bias.fill_(2.0)
    init_module_weights(nn.Sequential(first, second), n_layer=1, seed=0)
    assert second.bias.tolist() == [0.0] * 4
