"""The speedrun recipe's model options (modded-nanogpt), each a ModelConfig field that is off by default:
QK-norm, the ReLU² MLP, zero-initialised output projections and soft-capped logits from an untied head.
Each is checked for what it promises; all of them together train, save and load, and are refused by
the export formats that cannot express them."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import attention as attention_module
from lmforge import fused_ce
from lmforge.attention import KVCache
from lmforge.config import ConfigError, ModelConfig, TrainConfig
from lmforge.fused_ce import cross_entropy_reference, linear_cross_entropy
from lmforge.model import GPT, MLP, init_module_weights
from test_decoder import assert_padded_rows_match_alone

LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_head=2, bias=False, qkv_bias=False)
ALL_ON = dict(qk_norm=True, mlp="relu2", zero_init_proj=True, logit_softcap=15.0, tie_embeddings=False)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, context_length=64, d_model=32, n_layer=2, n_head=4), **kw})


def _model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(_cfg(**kw))


# ----------------------------------------------------------------------------- config
def test_options_are_off_by_default_and_old_config_dicts_still_load():
    cfg = ModelConfig()
    assert (cfg.qk_norm, cfg.mlp, cfg.zero_init_proj, cfg.logit_softcap) == (False, "gelu", False, None)
    old = {k: v for k, v in _cfg().to_dict().items() if k not in ("qk_norm", "zero_init_proj", "logit_softcap")}
    assert ModelConfig.from_dict(old) == _cfg()  # a config.json written before the options existed


def test_softcap_is_refused_with_a_tied_head_or_a_cap_that_is_not_positive():
    with pytest.raises(ConfigError, match="untied") as e:
        ModelConfig(logit_softcap=15.0)  # tie_embeddings defaults to True
    assert "modded-nanogpt" in str(e.value) and "tie_embeddings=False" in str(e.value)
    for bad in (0.0, -5.0):
        with pytest.raises(ConfigError, match=f"logit_softcap must be > 0 or None, got {bad}"):
            ModelConfig(logit_softcap=bad, tie_embeddings=False)
    ModelConfig(logit_softcap=30.0, tie_embeddings=False)
    with pytest.raises(ConfigError, match="relu2"):
        ModelConfig(mlp="relu")  # the message names the new choice too


# ----------------------------------------------------------------------------- QK-norm
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_qk_norm_hands_attention_unit_rms_queries_and_keys_per_head(monkeypatch, positions):
    seen = []
    real = attention_module.attention

    def spy(q, k, v, **kw):
        seen.append((q, k))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention_module, "attention", spy)
    x = torch.randint(0, 64, (2, 10))
    for qk_norm in (True, False):
        seen.clear()
        _model(qk_norm=qk_norm, positions=positions, n_kv_head=2)(x)
        assert len(seen) == 2  # one call per layer
        for q, k in seen:
            assert q.shape == (2, 4, 10, 8) and k.shape == (2, 2, 10, 8)  # grouped-query: 2 KV heads
            rms = torch.cat([q.pow(2).mean(-1).sqrt().flatten(), k.pow(2).mean(-1).sqrt().flatten()])
            # Rotary positions rotate pairs of coordinates, which keeps the RMS the norm gave; norm_eps
            # (1e-5) against the small q and k of a fresh model leaves it a little under 1.
            close = torch.allclose(rms, torch.ones_like(rms), atol=1e-2)
            assert close == qk_norm, (qk_norm, rms.min(), rms.max())


def test_qk_norm_makes_attention_blind_to_the_scale_of_each_query_and_key_head():
    x = torch.randn(2, 9, 32)
    for qk_norm in (True, False):
        cfg = _cfg(qk_norm=qk_norm, n_kv_head=2, positions="rope", qkv_bias=False)
        torch.manual_seed(0)
        attn = attention_module.MultiHeadAttention(cfg)
        rope = attention_module.RotaryEmbedding(8, 64)(0, 9, x.device)
        before = attn(x, rope=rope)
        with torch.no_grad():  # rows of the fused projection: 4 query heads, then 2 key heads, of 8 each
            attn.c_attn.weight[:8] *= 7.0       # query head 0
            attn.c_attn.weight[40:48] *= 3.0    # key head 1
        after = attn(x, rope=rope)
        # (not exactly equal: norm_eps weighs a little more on the smaller, unscaled q and k)
        assert torch.allclose(after, before, atol=1e-4) == qk_norm


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_qk_norm_cached_and_padded_decoding_equal_the_full_forward(positions):
    model = _model(qk_norm=True, positions=positions, n_kv_head=2).eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (2, 12), generator=g)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, batch_size=2)
        parts = [model(idx[:, :5], cache)] + [model(idx[:, i:i + 1], cache) for i in range(5, 12)]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
        # left-padded rows of a batch, with and without the cache, equal each row's own forward
        prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 9, 6)]
        assert_padded_rows_match_alone(model, prompts)


# ----------------------------------------------------------------------------- ReLU²
def test_relu2_mlp_is_relu_squared_between_the_two_projections():
    torch.manual_seed(0)
    mlp = MLP(_cfg(mlp="relu2"))
    x = torch.randn(3, 5, 32)
    by_hand = F.relu(x @ mlp.c_fc.weight.T + mlp.c_fc.bias).pow(2) @ mlp.c_proj.weight.T + mlp.c_proj.bias
    torch.testing.assert_close(mlp(x), by_hand)
    assert mlp.c_fc.out_features == 128  # ff_dim: no gate, the same shapes as the GELU MLP
    gelu = MLP(_cfg())
    gelu.load_state_dict(mlp.state_dict())
    assert not torch.allclose(gelu(x), mlp(x), atol=1e-3)
    assert isinstance(GPT(_cfg(mlp="relu2")).h[0].mlp, MLP)


def test_recipe_options_add_no_parameters_and_no_counted_flops():
    base = GPT(_cfg(tie_embeddings=False))
    for kw in (dict(mlp="relu2"), dict(qk_norm=True), dict(logit_softcap=15.0), dict(zero_init_proj=True), ALL_ON):
        model = GPT(_cfg(**{"tie_embeddings": False, **kw}))
        assert model.num_params() == base.num_params()
        assert model.flops_per_token(64) == base.flops_per_token(64)  # relu² and gelu: the same matmuls


# ----------------------------------------------------------------------------- zero-initialised projections
@pytest.mark.parametrize("mlp", ["gelu", "swiglu", "relu2"])
def test_zero_init_proj_makes_every_block_start_as_the_identity(mlp):
    x = torch.randn(2, 7, 32)
    for zero in (True, False):
        model = _model(mlp=mlp, zero_init_proj=zero)
        zeroed = {name for name, p in model.named_parameters() if p.dim() == 2 and not p.any()}
        assert zeroed == ({f"h.{i}.{part}.c_proj.weight" for i in range(2) for part in ("attn", "mlp")}
                          if zero else set())
        for block in model.h:
            assert torch.equal(block(x), x) == zero
    # Every other weight is drawn as without the option, from the same seed (a fair ablation).
    plain, zeroed = _model(seed=3, mlp=mlp).state_dict(), _model(seed=3, mlp=mlp, zero_init_proj=True).state_dict()
    for name, tensor in plain.items():
        if not name.endswith("c_proj.weight"):
            assert torch.equal(zeroed[name], tensor), name


def test_zero_init_follows_the_residual_marker_not_the_name():
    root = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    root[0].residual_projection = True  # a module named "0", not "c_proj"
    init_module_weights(root, n_layer=2, seed=0, zero_residual=True)
    assert not root[0].weight.any() and root[1].weight.abs().sum() > 0
    init_module_weights(root, n_layer=2, seed=0)
    assert root[0].weight.abs().sum() > 0


# ----------------------------------------------------------------------------- soft-capped logits
def test_softcap_bounds_the_logits_by_c_and_is_c_tanh_of_the_raw_logits():
    model = _model(logit_softcap=2.0, tie_embeddings=False).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(500.0)  # raw logits far beyond the cap
        x = torch.randint(0, 64, (2, 9))
        raw = model.lm_head(model.hidden_states(x))
        logits = model(x)
    assert raw.abs().max() > 20.0
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    torch.testing.assert_close(model(x, last_only=True), logits[:, -1:], atol=1e-4, rtol=1e-4)


def _inputs(seed=0, n=45, d=16, v=37):
    g = torch.Generator().manual_seed(seed)
    h = (3 * torch.randn(n, d, generator=g)).requires_grad_(True)  # large logits: the cap matters
    w = torch.randn(v, d, generator=g).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::4] = -100
    return h, w, t


def _plain_capped_loss(h, w, t, cap):
    """Written out here, independent of fused_ce."""
    return F.cross_entropy(cap * torch.tanh((h @ w.T) / cap), t, ignore_index=-100)


@pytest.mark.parametrize("rows", [1, 8, 45])
@pytest.mark.parametrize("cap", [1.5, 30.0])
def test_fused_softcap_loss_and_gradients_equal_the_plain_formula(rows, cap):
    h, w, t = _inputs()
    want = _plain_capped_loss(h, w, t, cap)
    want_h, want_w = torch.autograd.grad(want, (h, w))
    for fn in (lambda: linear_cross_entropy(h, w, t, chunk_rows=rows, cap=cap),
               lambda: cross_entropy_reference(h, w, t, cap=cap)):
        loss = fn()
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert abs(loss.item() - want.item()) < 1e-5
        torch.testing.assert_close(gh, want_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, want_w, atol=1e-5, rtol=1e-5)
    uncapped = linear_cross_entropy(h, w, t, chunk_rows=rows)
    assert abs(uncapped.item() - want.item()) > 1e-3  # the cap changed the loss: the test can fail


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_fused_softcap_computes_only_the_gradient_asked_for(need):
    h, w, t = _inputs(2)
    h.requires_grad_(need[0])
    w.requires_grad_(need[1])
    want = torch.autograd.grad(_plain_capped_loss(h, w, t, 4.0), [x for x in (h, w) if x.requires_grad])
    got = torch.autograd.grad(linear_cross_entropy(h, w, t, chunk_rows=10, cap=4.0),
                              [x for x in (h, w) if x.requires_grad])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_softcap_under_bf16_autocast_is_close_to_the_plain_formula():
    h, w, t = _inputs(3, n=96, v=50)
    ref = _plain_capped_loss(h, w, t, 5.0)
    gh, gw = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_rows=32, cap=5.0)
    h_grad, w_grad = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
    assert (h_grad - gh).abs().max() < 0.02 * gh.abs().max()
    assert (w_grad - gw).abs().max() < 0.02 * gw.abs().max()


def test_every_loss_path_of_a_capped_model_agrees_with_its_capped_logits():
    model = _model(logit_softcap=3.0, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    x, y = torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 10))
    from_logits = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    for fused in (True, False):
        assert abs(model(x, targets=y, fused=fused).item() - from_logits.item()) < 1e-5
    model.lm_head.bias = nn.Parameter(torch.zeros(64))  # a head with a bias takes the plain path
    assert abs(model(x, targets=y).item() - from_logits.item()) < 1e-5


# ----------------------------------------------------------------------------- all together
def test_all_options_train_on_a_repeated_sentence_and_round_trip_through_a_checkpoint(tmp_path):
    from lmforge.checkpoint import load_model, save_model
    from lmforge.losses import next_token_loss
    from lmforge.optim import make_optimizer
    from lmforge.train import train_step

    ids = torch.tensor(list(b"the cat sat on the mat. " * 12))
    x, y = ids[:-1][None, :64].repeat(4, 1), ids[1:][None, :64].repeat(4, 1)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, context_length=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                            positions="rope", norm="rmsnorm", bias=False, qkv_bias=False, **ALL_ON))
    config = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=30, schedule="constant")
    opt = make_optimizer(model, config)
    losses = [train_step(model, opt, lambda k: (x, y), next_token_loss, step, config, torch.device("cpu"),
                         torch.float32).loss for step in range(30)]
    assert losses[0] > 0.9 * math.log(256) and losses[-1] < 0.3 * losses[0], losses
    assert all(math.isfinite(v) for v in losses)

    save_model(tmp_path / "run", model, step=30)
    stored = json.loads(next((tmp_path / "run").rglob("config.json")).read_text())["model"]
    assert {k: stored[k] for k in ALL_ON} == ALL_ON
    loaded, _ = load_model(tmp_path / "run")
    assert loaded.config == model.config
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(loaded(x, targets=y), model(x, targets=y))


@pytest.mark.parametrize("option, named", [(dict(qk_norm=True), "qk_norm"), (dict(mlp="relu2"), "relu2"),
                                           (dict(logit_softcap=15.0, tie_embeddings=False), "logit_softcap")])
def test_export_refuses_options_the_formats_cannot_express(tmp_path, option, named):
    from lmforge.convert import ConvertError, export_hf

    for base in (dict(), LLAMA):
        model = _model(**{**base, **option})
        with pytest.raises(ConvertError, match=named):
            export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    pytest.importorskip("gguf")
    from lmforge.gguf_io import export_gguf

    with pytest.raises(ConvertError, match=named):
        export_gguf(_model(**{**LLAMA, **option}), None, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_zero_init_proj_alone_still_exports_it_only_changes_the_start(tmp_path):
    from lmforge.convert import export_hf

    export_hf(_model(zero_init_proj=True), tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()


def _saved_for_backward(model: GPT, x: torch.Tensor) -> int:
    """Bytes of the activations autograd keeps for one loss (each storage once, parameters left out)."""
    kept: dict[int, int] = {}

    def pack(t):
        if t.is_floating_point() and not isinstance(t, nn.Parameter):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, targets=x)
    return sum(b for ptr, b in kept.items() if ptr not in params)


def test_activation_bytes_on_paper_match_what_autograd_keeps_with_the_options(monkeypatch):
    from lmforge.distributed import activation_bytes

    monkeypatch.setattr(attention_module, "CHUNKED_ATTENTION_MAX", 0)  # the fused kernel, as on a GPU

    for kw in (dict(qk_norm=True), dict(mlp="relu2"), {**LLAMA, **ALL_ON}):
        cfg = ModelConfig(vocab_size=256, context_length=64, d_model=64, n_layer=3, n_head=4, **kw)
        torch.manual_seed(0)
        measured = _saved_for_backward(GPT(cfg), torch.randint(0, 256, (4, 64)))
        assert abs(measured - activation_bytes(cfg, 4, 64)) / measured < 0.1, (kw, measured)


def test_fused_softcap_makes_its_buffers_on_the_inputs_device_and_never_the_whole_logits():
    """On the meta device (shapes without data): a buffer made on the CPU by mistake would fail here,
    as it would on a GPU."""
    h = torch.empty(70, 8, device="meta", requires_grad=True)
    w = torch.empty(30, 8, device="meta", requires_grad=True)
    t = torch.empty(70, dtype=torch.long, device="meta")
    made = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        made.append((out.device.type, tuple(out.shape)))
        return out

    torch.empty = spy
    try:
        loss = fused_ce._LinearCrossEntropy.apply(h, w, t, -100, 32, torch.float32, 15.0)
    finally:
        torch.empty = real_empty
    loss.backward()
    assert {dev for dev, _ in made} == {"meta"} and h.grad.device.type == w.grad.device.type == "meta"
    assert (70, 1) in [shape for _, shape in made]  # the slope at each target column
    assert (70, 30) not in [shape for _, shape in made]
