import torch

from lmforge.config import ModelConfig, SampleConfig
from lmforge.generate import generate, sample_next
from lmforge.model import GPT


def _model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layer=2, n_head=4)).eval()


def test_greedy_is_argmax_and_cache_agrees():
    model = _model()
    idx = torch.randint(0, 64, (2, 5))
    cfg = SampleConfig(max_new_tokens=8, temperature=0, stop_at_eos=False)
    cached = generate(model, idx, cfg)
    plain = generate(model, idx, cfg, use_cache=False)
    assert torch.equal(cached, plain)
    seq = idx.clone()
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq[:, 5:])


def test_generation_past_the_context_crops():
    model = _model()
    out = generate(model, torch.randint(0, 64, (1, 20)), SampleConfig(max_new_tokens=30, temperature=0))
    assert out.shape == (1, 30)


def test_seeded_sampling_is_reproducible():
    model = _model()
    idx = torch.randint(0, 64, (1, 3))
    cfg = SampleConfig(max_new_tokens=10, temperature=1.0, top_k=10, seed=7)
    assert torch.equal(generate(model, idx, cfg), generate(model, idx, cfg))


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws <= {0, 1}
    draws = {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(200)}
    assert draws == {0}  # token 0 alone holds > 50 % of the mass


def test_stops_at_eos():
    model = _model()
    idx = torch.randint(0, 64, (1, 3))
    greedy = generate(model, idx, SampleConfig(max_new_tokens=12, temperature=0, stop_at_eos=False))[0].tolist()
    j = max(i for i, t in enumerate(greedy) if t not in greedy[:i])  # the last first-occurrence
    out = generate(model, idx, SampleConfig(max_new_tokens=12, temperature=0), eos_id=greedy[j])
    assert out[0].tolist() == greedy[:j + 1]
