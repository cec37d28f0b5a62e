import math

import pytest
import torch
from conftest import overfit

from lmforge.config import PRESETS, ConfigError, ModelConfig
from lmforge.model import GPT


def test_config_validation_reports_every_problem():
    with pytest.raises(ConfigError, match="divisible by n_head") as e:
        ModelConfig(d_model=100, n_head=3, dropout=1.5)
    assert "dropout" in str(e.value)
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig(n_head=12, n_kv_head=5)
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'"):
        ModelConfig.from_preset("gpt5")


@pytest.mark.parametrize("name", ["gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1558m"])
def test_gpt2_parameter_counts_equal_transformers(name):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        ours = GPT(cfg)
        theirs = GPT2LMHeadModel(GPT2Config(n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head))
    assert ours.num_params() == theirs.num_parameters()
    if name == "gpt2-124m":
        assert ours.num_params() == 124_439_808


def test_init_loss_is_about_ln_vocab():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, context_length=64, d_model=64, n_layer=2, n_head=4)
    model = GPT(cfg)
    x = torch.randint(0, 512, (8, 64))
    y = torch.randint(0, 512, (8, 64))
    loss = model(x, targets=y).item()
    assert abs(loss - math.log(512)) < 0.1


def test_overfits_one_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=16, d_model=64, n_layer=2, n_head=4)
    model = GPT(cfg)
    x = torch.randint(0, 64, (4, 16))
    y = torch.roll(x, -1, dims=1)
    assert overfit(model, x, y, steps=150, lr=3e-3).item() < 0.05


def test_tied_head_and_scaled_residual_init():
    model = GPT(ModelConfig.from_preset("gpt-nano"))
    assert model.lm_head.weight is model.wte.weight
    std = model.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 2)) < 0.003
    assert model.h[0].attn.c_attn.bias.abs().sum() == 0


def test_flops_per_token():
    cfg = ModelConfig.from_preset("gpt2-124m")
    with torch.device("meta"):
        model = GPT(cfg)
    n_matmul = 12 * 12 * 768 * 768 + 50257 * 768
    assert model.flops_per_token(1024) == 6 * n_matmul + 12 * 12 * 768 * 1024


def test_presets_build():
    for name, values in PRESETS.items():
        cfg = ModelConfig.from_preset(name)
        assert {k: getattr(cfg, k) for k in values} == values, name  # every preset value is applied
        with torch.device("meta"):
            model = GPT(cfg)
        assert len(model.h) == cfg.n_layer and model.wte.weight.shape == (cfg.vocab_size, cfg.d_model), name
    assert ModelConfig.from_preset("gpt-nano", n_layer=3).n_layer == 3  # overrides win over the preset
    smol = ModelConfig.from_preset("smollm2-135m")
    with torch.device("meta"):
        assert GPT(smol).num_params() == 134_515_008  # SmolLM2-135M's published parameter count


def test_initialisation_follows_module_type_not_parameter_names():
    """A head added under any name is initialised as a linear layer; a layer marked as a residual
    projection is scaled by 1/sqrt(2 n_layer) whatever it is called; norms start as the identity."""
    import math

    import torch
    from torch import nn

    from lmforge.config import ModelConfig
    from lmforge.model import GPT, init_module_weights

    cfg = ModelConfig.from_preset("gpt-nano", d_model=256, n_head=4, n_layer=8)
    model = GPT(cfg)
    model.score = nn.Linear(256, 1024)          # a classification head, named unlike anything in GPT-2
    model.out_layer = nn.Linear(1024, 256)
    model.out_layer.residual_projection = True
    model.h[0].ln_1.weight.data.fill_(3.0)
    init_module_weights(model, cfg.n_layer, seed=0)
    assert abs(model.score.weight.std().item() - 0.02) < 0.001 and model.score.bias.abs().max() == 0
    want = 0.02 / math.sqrt(2 * 8)
    assert abs(model.out_layer.weight.std().item() - want) < 0.0005
    assert abs(model.h[0].attn.c_proj.weight.std().item() - want) < 0.0005
    assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert torch.equal(model.h[0].ln_1.weight, torch.ones(256)) and model.lm_head.weight is model.wte.weight


@pytest.mark.slow
def test_training_step_compiles_in_one_graph_on_the_cpu_silently_with_the_eager_values():
    """`--compile` on a CPU: the chunked attention (cached causal biases), the fused loss (rows without a
    target skipped, the unit-gradient shortcut) once broke the graph or warned at every start."""
    import warnings

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, context_length=256, d_model=32, n_layer=2, n_head=4, n_kv_head=2))
    x = torch.randint(0, 97, (2, 256))
    y = torch.randint(0, 97, (2, 256))
    y[:, :100] = -100  # a prompt's positions, as fine-tuning masks them

    def loss_and_grads(m):
        model.zero_grad()
        loss = m(x, targets=y)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    want = loss_and_grads(model)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # as Dynamo's lru_cache warning
        got = loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True))  # a break raises
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
