"""The batched decoder: left-padded rows get the ids they get alone, cached and uncached decoding
agree, per-row configs and generators, log-probabilities, the repetition penalty, and text
streaming that never splits a character or shows the start of a stop string."""

import pytest
import torch

from lmforge.attention import KVCache
from lmforge.config import ModelConfig, SampleConfig
from lmforge.generate import (
    Decoder,
    TextStream,
    generate,
    penalize_repeats,
    stream_text,
)
from lmforge.model import GPT

LLAMA = dict(n_kv_head=2, norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)


def _model(llama: bool, ctx: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, context_length=ctx, d_model=32, n_layer=2, n_head=4,
                           **(LLAMA if llama else {}))).eval()


def _ids(decoder: Decoder) -> list[list[int]]:
    rows = [[] for _ in range(decoder.n)]
    for step in decoder:
        for i, tok in enumerate(step):
            if tok is not None:
                rows[i].append(tok.id)
    return rows


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_left_padded_rows_get_the_ids_and_logits_they_get_alone(llama):
    model = _model(llama)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    greedy = SampleConfig(max_new_tokens=12, temperature=0, stop_at_eos=False)
    together = _ids(Decoder(model, prompts, greedy))
    alone = [_ids(Decoder(model, [p], greedy))[0] for p in prompts]
    assert together == alone
    with torch.no_grad():
        assert_padded_rows_match_alone(model, prompts)


def assert_padded_rows_match_alone(model, prompts: list[list[int]]) -> None:
    """The logits themselves: a left-padded batch, with and without the cache, equals each row's own
    full forward (also used by the recipe options' tests)."""
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts])
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    padded = model(batch, pad=pad)
    cache = KVCache(model.config, len(prompts), pad=pad)
    cached = torch.cat([model(batch[:, :4], cache), model(batch[:, 4:], cache)], dim=1)
    for i, p in enumerate(prompts):
        own = model(torch.tensor([p]))[0]
        torch.testing.assert_close(padded[i, width - len(p):], own, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached[i, width - len(p):], own, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_cached_and_uncached_decoding_agree_in_ids_and_logprobs(llama):
    model = _model(llama)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    cfg = SampleConfig(max_new_tokens=20, temperature=0, stop_at_eos=False)
    runs = []
    for use_cache in (True, False):
        steps = list(Decoder(model, prompts, cfg, use_cache=use_cache, logprobs=3))
        runs.append(steps)
    for a, b in zip(*runs, strict=True):
        for x, y in zip(a, b):
            assert x.id == y.id and x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert x.top[0][0] == x.id  # greedy: the chosen token is the most likely one
    # The log-probability is the model's own (before temperature), checked against a full forward.
    first = runs[0][0][1]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompts[1]]))[0, -1], -1)[first.id]
    assert first.logprob == pytest.approx(float(expected), abs=1e-5)


def test_rows_stop_on_their_own_and_report_why():
    model = _model(False)
    cfg = SampleConfig(max_new_tokens=8, temperature=0, stop_at_eos=False)
    free = _ids(Decoder(model, [[1, 2], [3, 4, 5]], cfg))
    stop_id = free[0][2]
    decoder = Decoder(model, [[1, 2], [3, 4, 5]],
                      [SampleConfig(max_new_tokens=8, temperature=0), SampleConfig(max_new_tokens=5, temperature=0)],
                      stop_ids={stop_id})
    steps = list(decoder)
    row0 = [s[0] for s in steps if s[0] is not None]
    assert [t.id for t in row0] == free[0][:free[0].index(stop_id) + 1] and row0[-1].stop
    assert decoder.finish_reason[0] == "stop"
    row1 = [s[1].id for s in steps if s[1] is not None]
    if stop_id in row1:
        assert decoder.finish_reason[1] == "stop"
    else:
        assert row1 == free[1][:5] and decoder.finish_reason[1] == "length"
    # A row ended from outside (a client that went away) yields nothing more.
    decoder = Decoder(model, [[1, 2], [3, 4, 5]], cfg)
    seen = []
    for n, step in enumerate(decoder):
        seen.append(step)
        if n == 1:
            decoder.finish(0, "cancelled")
    assert all(s[0] is None for s in seen[2:]) and all(s[1] is not None for s in seen)
    assert decoder.finish_reason == ["cancelled", "length"]


def test_each_row_with_its_own_generator_samples_as_it_would_alone():
    model = _model(True)
    cfgs = [SampleConfig(max_new_tokens=10, temperature=1.3, top_k=None, seed=s) for s in (1, 2, 3)]
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    together = _ids(Decoder(model, prompts, cfgs, generator=gens))
    alone = [_ids(Decoder(model, [p], c, generator=[torch.Generator().manual_seed(c.seed)]))[0]
             for p, c in zip(prompts, cfgs)]
    assert together == alone
    assert len({tuple(r) for r in together}) == 3


def test_repetition_penalty_by_hand_and_in_decoding():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert penalize_repeats(logits, seen, 1.0) is logits
    model = _model(False)
    with torch.no_grad():  # a model that always prefers token 7, then token 9
        model.lm_head.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.lm_head.weight[7, 0] = 5.0
        model.lm_head.weight[9, 0] = 3.0
    plain = _ids(Decoder(model, [[1]], SampleConfig(max_new_tokens=3, temperature=0)))[0]
    penalised = _ids(Decoder(model, [[1]], SampleConfig(max_new_tokens=3, temperature=0, repetition_penalty=4.0)))[0]
    assert plain == [7, 7, 7] and penalised[:2] == [7, 9]  # 7 seen: 5/4 < 3; then 9 seen too: 5/4 > 3/4


def test_empty_prompts_and_mismatched_configs_are_refused():
    model = _model(False)
    with pytest.raises(ValueError, match="at least one token"):
        Decoder(model, [[1], []])
    with pytest.raises(ValueError, match="2 sample configs for 1 prompts"):
        Decoder(model, [[1]], [SampleConfig(), SampleConfig()])


def test_generate_keeps_its_shape_for_a_batch_with_finished_rows():
    model = _model(False)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, idx, SampleConfig(max_new_tokens=6, temperature=0, stop_at_eos=False))
    assert out.shape == (2, 6)


class _Bytes:
    """A tokenizer whose token i is the byte i (so a character can be split across tokens)."""
    eos_id = eot_id = None

    def decode_bytes(self, ids):
        return bytes(ids)


def _stream(tokens: list[int], stop=()) -> tuple[list[str], TextStream]:
    ts = TextStream(_Bytes(), stop)
    out = [ts.push(t) for t in tokens]
    out.append(ts.close())
    return out, ts


def test_text_stream_never_splits_a_character():
    data = "héllo €1 😀".encode()
    out, ts = _stream(list(data))
    assert "".join(out) == "héllo €1 😀" and all("\ufffd" not in d for d in out)
    euro = "€".encode()
    assert _stream(list(euro))[0] == ["", "", "€", ""]  # nothing until the third byte
    out, _ = _stream([0xE2, 0x82])  # a character cut off by the end of the generation
    assert "".join(out) == "\ufffd"


def test_text_stream_holds_back_what_may_start_a_stop_string():
    out, ts = _stream(list(b"Answer: yes\nUser: more"), stop=["\nUser:"])
    assert "".join(out) == "Answer: yes" and ts.stopped and ts.text == "Answer: yes"
    # The held-back "\nUs" is released when the next byte shows it is not the stop string.
    out, ts = _stream(list(b"a\nUs!"), stop=["\nUser:"])
    assert out == ["a", "", "", "", "\nUs!", ""] and not ts.stopped
    out, ts = _stream(list(b"abc"), stop=["c", "bc"])  # the earliest stop string wins
    assert "".join(out) == "a" and ts.stopped
    assert ts.push(ord("z")) == "" and ts.close() == ""  # nothing after the stop


def test_stream_text_stops_at_a_stop_string_and_at_the_end_token():
    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world " * 20], TokenizerConfig(vocab_size=260))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=16, d_model=16, n_layer=1, n_head=2)).eval()
    cfg = SampleConfig(max_new_tokens=30, temperature=0, stop_at_eos=False)
    full = "".join(stream_text(model, tok, "hello", cfg))
    assert len(full) >= 3
    stop = full[1:3]
    cut = "".join(stream_text(model, tok, "hello", SampleConfig(max_new_tokens=30, temperature=0, stop=(stop,))))
    assert cut == full[:full.index(stop)]


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_static_cache_steps_equal_the_growing_cache(llama):
    """The static mode a compiled decode step uses (a column tensor, attention over the whole
    cache, masked) gives the logits of the ordinary cache, padded rows included."""
    model = _model(llama)
    pad = torch.tensor([0, 3])  # rows [1..5] and [6, 7], the second left-padded
    batch = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 6, 7]])
    with torch.no_grad():
        a, b = KVCache(model.config, 2, 16, pad=pad), KVCache(model.config, 2, 16, pad=pad)
        model(batch, a)
        model(batch, b)
        b.make_static()
        for tok in ([8, 9], [10, 11], [12, 13]):
            x = torch.tensor(tok)[:, None]
            la = model(x, a)
            lb = model(x, b)
            b.advance(1)
            torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    assert b.pos == a.pos == 8 and int(b.col) == 8


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_ids():
    model = _model(True, ctx=64)
    cfg = SampleConfig(max_new_tokens=70, temperature=0, stop_at_eos=False)  # past the context: a slide too
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert _ids(Decoder(model, prompts, cfg, compile=True)) == _ids(Decoder(model, prompts, cfg))


def _count_rewrites(monkeypatch) -> list[int]:
    """How many linears each compiled graph had rewritten as reductions, graph by graph."""
    import lmforge.generate as gen

    counts: list[int] = []
    real = gen._single_row_linears_as_reductions

    def spy(gm):
        real(gm)
        counts.append(sum(n.target is gen.gemv_linear for n in gm.graph.nodes))

    monkeypatch.setattr(gen, "_single_row_linears_as_reductions", spy)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_a_compiled_single_row_step_runs_every_linear_as_a_reduction_and_decodes_as_eager(llama, monkeypatch):

    rewritten = _count_rewrites(monkeypatch)
    model = _model(llama, ctx=64)
    cfg = SampleConfig(max_new_tokens=20, temperature=0, stop_at_eos=False)
    eager = [s[0] for s in Decoder(model, [[1, 2, 3]], cfg, logprobs=0)]
    fast = [s[0] for s in Decoder(model, [[1, 2, 3]], cfg, compile=True, logprobs=0)]
    assert [t.id for t in fast] == [t.id for t in eager]
    assert [t.logprob for t in fast] == pytest.approx([t.logprob for t in eager], abs=1e-4)
    per_block = 5 if llama else 4  # qkv, attention out, (gate,) up, down
    assert rewritten and set(rewritten) == {2 * per_block + 1}  # and the output layer


def test_gemv_linear_is_f_linear():
    from lmforge.generate import gemv_linear

    torch.manual_seed(0)
    x, w, b = torch.randn(1, 1, 48), torch.randn(40, 48), torch.randn(40)
    torch.testing.assert_close(gemv_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gemv_linear(x, w), x @ w.T, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_compiled_bf16_reduction_is_as_accurate_as_the_bf16_matmul(monkeypatch):
    """In the compiled graph the products are summed in fp32 and rounded once, so the bf16
    reduction is no further from the fp32 answer than bf16 ``F.linear`` is."""
    import lmforge.generate as gen

    rewritten = _count_rewrites(monkeypatch)
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 96).eval()
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        exact = layer(x)
        half = layer.to(torch.bfloat16)
        plain = half(x.bfloat16()).float()
        fast = gen._frozen_cpu(half)(x.bfloat16()).float()
    assert rewritten == [1]
    assert (fast - exact).abs().max() <= 1.5 * (plain - exact).abs().max() + 1e-3


def test_a_tiny_temperature_is_greedy_not_a_crash():
    from lmforge.generate import sample_next

    logits = torch.randn(3, 10)
    for t in (1e-39, 1e-300, 1e-6):
        assert torch.equal(sample_next(logits, t), logits.argmax(-1))


def test_a_padded_row_keeps_its_own_context_when_the_batch_slides():
    """A short row sharing a batch with a row that fills the context is not cut with it: it gets
    the ids and log-probabilities it gets alone (where it never slides)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-nano", vocab_size=64, context_length=64)).eval()
    short, long = [1, 2, 3, 4], list(range(1, 64))
    cfgs = [SampleConfig(max_new_tokens=60, temperature=0, stop_at_eos=False),
            SampleConfig(max_new_tokens=40, temperature=0, stop_at_eos=False)]
    together = list(Decoder(model, [short, long], cfgs, logprobs=0))
    alone = list(Decoder(model, [short], cfgs[0], logprobs=0))
    a = [s[0] for s in together]
    assert [t.id for t in a] == [s[0].id for s in alone]
    assert [t.logprob for t in a] == pytest.approx([s[0].logprob for s in alone], abs=1e-4)


def test_the_cache_grows_with_the_answer_and_decodes_as_without_it():
    model = _model(True, ctx=512)
    cfg = SampleConfig(max_new_tokens=300, temperature=0, stop_at_eos=False)
    dec = Decoder(model, [[1, 2, 3]], cfg)
    assert dec.cache.max_len == 128  # room for the prompt and some answer, not all 303 columns
    ids = _ids(dec)
    assert dec.cache.max_len == 303 and ids == _ids(Decoder(model, [[1, 2, 3]], cfg, use_cache=False))


def test_the_compiled_forward_is_kept_on_the_model_outside_its_state():
    from lmforge.generate import compiled

    model = _model(False)
    keys = set(model.state_dict())
    assert compiled(model) is compiled(model) and set(model.state_dict()) == keys
    first = compiled(model)
    with torch.no_grad():  # a graph with frozen weights must not outlive a change to them
        next(model.parameters()).add_(1.0)
    assert compiled(model) is not first and compiled(model) is compiled(model)


@pytest.mark.slow
def test_compiled_decoding_follows_a_change_of_weights():
    model = _model(True, ctx=64)
    cfg = SampleConfig(max_new_tokens=6, temperature=0, stop_at_eos=False)
    from lmforge.generate import compiled

    before = _ids(Decoder(model, [[1, 2, 3]], cfg, compile=True))
    graph = compiled(model)
    assert _ids(Decoder(model, [[1, 2, 3]], cfg, compile=True)) == before
    assert compiled(model) is graph  # decoding (which builds the rotary tables) changes no weight: no new graph
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    after = _ids(Decoder(model, [[1, 2, 3]], cfg, compile=True))
    assert after == _ids(Decoder(model, [[1, 2, 3]], cfg)) and after != before


def test_the_prefill_computes_logits_for_the_last_position_only(monkeypatch):
    model = _model(True)
    shapes = []
    head = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda x: shapes.append(tuple(x.shape)) or head(x))
    with torch.no_grad():
        full = model(torch.tensor([[1, 2, 3, 4, 5]]))
        last = model(torch.tensor([[1, 2, 3, 4, 5]]), last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    shapes.clear()
    _ids(Decoder(model, [[1, 2, 3, 4, 5, 6, 7]], SampleConfig(max_new_tokens=3, temperature=0)))
    assert shapes and all(s[1] == 1 for s in shapes)  # the 7-token prompt, then one token at a time
