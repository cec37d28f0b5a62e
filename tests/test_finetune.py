"""Fine-tuning: classification, instruction following, LoRA and DPO on a tiny model made here."""

import json
import math

import pytest
import torch

from lmforge import tasks
from lmforge.checkpoint import load_model, save_model
from lmforge.config import FinetuneConfig, LoRAConfig, ModelConfig, TokenizerConfig, TrainConfig
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer

from conftest import TEXT

SPECIALS = ("<|endoftext|>",)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained-looking run directory to fine-tune: tokenizer + model weights."""
    root = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train([TEXT * 5], TokenizerConfig(vocab_size=300))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=64, d_model=32, n_layer=2, n_head=2))
    save_model(root, model, 0, {"task": "pretrain"})
    tok.save(root / "tokenizer.json")
    return root


def _spam_file(path, n=40):
    rows = []
    for i in range(n):
        if i % 2:
            rows.append(("spam", f"WIN a FREE prize now call {1000 + i} txt WIN"))
        else:
            rows.append(("ham", f"see you at lunch tomorrow, {['ok', 'fine', 'sure'][i % 3]} friend"))
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    return path


def test_classification_learns_a_separable_task_and_reports(base, tmp_path):
    from lmforge.finetune import classify_texts, finetune_classify

    data = _spam_file(tmp_path / "sms.tsv")
    res = finetune_classify(str(base), data, tmp_path / "run", FinetuneConfig(trainable="all", epochs=8),
                            TrainConfig(lr=3e-3, batch_size=8, warmup_steps=0, dtype="float32"),
                            text_column="1", label_column="0", progress=False)
    assert res["test"]["accuracy"] == 1.0 and res["val"]["accuracy"] == 1.0
    assert set(res["test"]["per_class"]) == {"ham", "spam"}
    assert (tmp_path / "run" / "confusion.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"]["confusion"] == res["test"]["confusion"]
    out = classify_texts(tmp_path / "run", ["WIN a FREE prize now call 1234 txt WIN", "see you at lunch friend"])
    assert [label for label, _, _ in out] == ["spam", "ham"]
    assert all(0.5 < p <= 1.0 for _, p, _ in out)


# ---------------------------------------------------------------- LoRA

def _tiny(tie=True, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=50, context_length=16, d_model=16, n_layer=2, n_head=2, tie_embeddings=tie))


@pytest.mark.parametrize("targets", [("attn", "mlp"), ("attn", "mlp", "head")])
def test_lora_starts_as_the_base_and_only_adapters_train(targets):
    from lmforge.lora import LoRALinear, apply_lora, lora_parameter_count

    model = _tiny()
    x = torch.randint(0, 50, (2, 10))
    y = torch.randint(0, 50, (2, 10))
    before, loss_before = model(x), model(x, targets=y)
    names = apply_lora(model, rank=4, alpha=8, targets=targets)
    assert torch.equal(model(x), before)  # B = 0: the same function
    torch.testing.assert_close(model(x, targets=y), loss_before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    # r (in + out) per layer: c_attn 16->48, c_proj 16->16, c_fc 16->64, mlp c_proj 64->16 (+ head 16->50)
    per_block = 4 * (16 + 48) + 4 * (16 + 16) + 4 * (16 + 64) + 4 * (64 + 16)
    expected = 2 * per_block + (4 * (16 + 50) if "head" in targets else 0)
    assert lora_parameter_count(model) == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(names) == 8 + ("head" in targets) and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    # one optimiser step moves only the adapters
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x, targets=y).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not torch.equal(model(x), before)


@pytest.mark.parametrize("tie", [True, False])
def test_lora_fused_loss_matches_the_plain_loss_and_merge_keeps_the_outputs(tie):
    from lmforge.lora import apply_lora, merge_lora

    model = _tiny(tie)
    apply_lora(model, rank=4, alpha=8, targets=("attn", "mlp", "head"))
    with torch.no_grad():  # adapters that do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, y = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10))
    model(x, targets=y, fused=False).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model(x, targets=y).backward()  # LoRA on the head: the fused kernel sees W + BA
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5, msg=n)
    model.eval()
    emb = model.wte.weight.detach().clone()
    before = model(x)
    assert merge_lora(model) == 9
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert torch.equal(model.wte.weight, emb)  # the embedding is not changed by the head's merge
    assert not model.config.tie_embeddings and model.lm_head.weight is not model.wte.weight
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_lora_bad_settings_are_one_line_errors():
    from lmforge.config import ConfigError
    from lmforge.lora import apply_lora

    with pytest.raises(ConfigError, match="unknown LoRA target 'ffn'; choose from attn, mlp, head"):
        apply_lora(_tiny(), targets=("ffn",))
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="targets must be among attn, mlp, head"):
        LoRAConfig(targets=("x",))


def test_lora_classifier_saves_only_adapters_and_head_and_loads_over_its_base(base, tmp_path):
    from lmforge.checkpoint import load_weights
    from lmforge.finetune import finetune_classify

    data = _spam_file(tmp_path / "sms.tsv")
    res = finetune_classify(str(base), data, tmp_path / "run", FinetuneConfig(trainable="lora", epochs=6),
                            TrainConfig(lr=1e-2, batch_size=8, warmup_steps=0, dtype="float32"),
                            LoRAConfig(rank=4, alpha=8), text_column="1", label_column="0", progress=False)
    assert res["test"]["accuracy"] >= 0.9
    tensors, _ = load_weights(tmp_path / "run" / "model.safetensors")
    assert set(tensors) == {n for n in tensors if "lora_" in n or n.startswith("lm_head.")}
    assert {"lm_head.weight", "lm_head.bias"} <= set(tensors) and len(tensors) == 2 + 2 * 8  # 2 blocks x 4 layers x (A, B)
    model, cfg = load_model(tmp_path / "run")
    assert cfg["weights"] == "trained" and cfg["lora"]["rank"] == 4 and cfg["task"] == "classify"
    # The merged run gives the same class probabilities, from full weights alone.
    from lmforge.finetune import classify_texts, merge_run

    texts = ["WIN a FREE prize now call 1234 txt WIN", "see you at lunch friend"]
    merged = merge_run(tmp_path / "run", tmp_path / "merged")
    a = classify_texts(tmp_path / "run", texts)
    b = classify_texts(merged, texts)
    for (la, pa, _), (lb, pb, _) in zip(a, b):
        assert la == lb and abs(pa - pb) < 1e-5
    assert "lora" not in json.dumps(load_model(merged)[1].get("lora"))


def test_a_trained_only_run_refuses_another_base(base, tmp_path):
    from lmforge.checkpoint import CheckpointError
    from lmforge.finetune import finetune_classify

    data = _spam_file(tmp_path / "sms.tsv", n=20)
    finetune_classify(str(base), data, tmp_path / "run", FinetuneConfig(trainable="head", epochs=1),
                      TrainConfig(batch_size=8, dtype="float32"), text_column="1", label_column="0", progress=False)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["weights"] == "trained" and cfg["trained"] == ["lm_head.weight", "lm_head.bias"]
    other = tmp_path / "other"
    tok = Tokenizer.load(base / "tokenizer.json")
    save_model(other, GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=64, d_model=32, n_layer=1,
                                      n_head=2)), 0)
    tok.save(other / "tokenizer.json")
    cfg_path = tmp_path / "run" / "checkpoints" / "latest" / "config.json"
    import hashlib

    doctored = json.loads(cfg_path.read_text())
    doctored["base"]["spec"] = str(other)
    data_bytes = (json.dumps(doctored, indent=2) + "\n").encode()
    cfg_path.write_bytes(data_bytes)
    manifest = cfg_path.parent / "manifest.json"
    m = json.loads(manifest.read_text())
    m["files"]["config.json"] = {"bytes": len(data_bytes), "sha256": hashlib.sha256(data_bytes).hexdigest()}
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="is not the base model .* was fine-tuned from"):
        load_model(tmp_path / "run")


# ---------------------------------------------------------------- what trains

@pytest.mark.parametrize("mode, expected", [
    ("head", {"lm_head.weight", "lm_head.bias"}),
    ("last", {"lm_head.weight", "lm_head.bias", "ln_f.weight", "ln_f.bias"}),
])
def test_trainable_modes(mode, expected):
    from lmforge.finetune import set_trainable, trained_names

    model = _tiny()
    model.replace_head(3)
    set_trainable(model, FinetuneConfig(trainable=mode, last_blocks=1), LoRAConfig(), head_trains=True)
    names = set(trained_names(model))
    if mode == "last":
        expected = expected | {n for n, _ in model.named_parameters() if n.startswith("h.1.")}
    assert names == expected
    assert not any(n.startswith("h.0.") or n.startswith("wte") for n in names)


def test_replace_head_unties_and_initialises_by_type():
    model = _tiny(tie=True)
    emb = model.wte.weight.detach().clone()
    model.replace_head(3)
    assert model.lm_head.weight.shape == (3, 16) and model.lm_head.bias is not None
    assert torch.equal(model.lm_head.bias, torch.zeros(3)) and 0.005 < model.lm_head.weight.std() < 0.05
    assert torch.equal(model.wte.weight, emb) and not model.config.tie_embeddings
    assert model(torch.randint(0, 50, (2, 5))).shape == (2, 5, 3)


def test_classification_pools_the_last_real_token_whatever_the_padding():
    from lmforge.losses import class_logits

    model = _tiny(tie=False).eval()
    model.replace_head(2)
    texts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    x, lengths, _ = tasks.collate_classification(texts, [0, 1], pad_id=0)
    assert x.tolist() == [[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]] and lengths.tolist() == [3, 6]
    pooled = class_logits(model, x, lengths)
    alone = [model(torch.tensor([t]))[0, -1] for t in texts]
    for i in range(2):
        torch.testing.assert_close(pooled[i], alone[i], atol=1e-6, rtol=1e-5)
    x2, lengths2, _ = tasks.collate_classification(texts, [0, 1], pad_id=49, pad_to=10)  # other padding, longer
    torch.testing.assert_close(class_logits(model, x2, lengths2), pooled, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- data, templates, collate

def test_collate_is_the_books_worked_example():
    """The book's chapter 7: inputs padded with 50256, targets shifted, padding beyond the first -100."""
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    x, y = tasks.collate_instructions(batch, pad_id=50256)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert y.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    x, y = tasks.collate_instructions(batch, pad_id=50256, prompt_lengths=[3, 1, 2], max_length=4)
    assert x.tolist() == [[0, 1, 2, 3], [5, 6, 50256, 50256], [7, 8, 9, 50256]]
    assert y.tolist() == [[-100, -100, 3, 4], [6, 50256, -100, -100], [-100, 9, 50256, -100]]


def test_collate_keeps_an_end_token_inside_a_record():
    """A record that contains the padding id itself (its own end token) keeps that target."""
    x, y = tasks.collate_instructions([[1, 9, 2], [3]], pad_id=9)
    assert y.tolist() == [[9, 2, 9], [9, -100, -100]]


def test_alpaca_template_is_the_books():
    prompt = tasks.format_prompt("Rewrite the sentence.", "The cat sat.", "alpaca")
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cat sat."
                      "\n\n### Response:\n")
    assert "### Input" not in tasks.format_prompt("Name a color.", "", "alpaca")
    assert tasks.format_prompt("Name a color.", "", "phi3") == "<|user|>\nName a color.\n<|assistant|>:\n"
    with pytest.raises(tasks.DataError, match="unknown template 'vicuna'; known templates: alpaca, phi3, chat"):
        tasks.format_prompt("x", "", "vicuna")


def test_chat_records_and_alpaca_records_read_alike():
    a = tasks.instruction_of({"instruction": "Say hi.", "input": "", "output": "Hi."}, "r")
    b = tasks.instruction_of({"messages": [{"role": "user", "content": "Say hi."},
                                           {"role": "assistant", "content": "Hi."}]}, "r")
    assert a == b == ("Say hi.", "", "Hi.")


def test_encode_instructions_counts_truncation(base):
    tok = Tokenizer.load(base / "tokenizer.json")
    recs = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
            {"instruction": "Say hi. " * 40, "input": "", "output": "Hi."}]
    short = len(tasks.encode_instructions(recs[:1], tok, "alpaca", 10**6).ids[0])
    s = tasks.encode_instructions(recs, tok, "alpaca", short + 2)
    assert s.truncated == 1 and len(s.ids[1]) == short + 2 and len(s.ids[0]) == short
    assert s.ids[0][-1] == tok.eot_id and s.prompt_lengths[0] < len(s.ids[0])


def test_splits_balance_and_batches_are_seeded():
    rows = [(f"t{i}", "a" if i < 30 else "b") for i in range(40)]
    bal = tasks.balance(rows, 1)
    assert sorted(r[1] for r in bal) == ["a"] * 10 + ["b"] * 10
    assert tasks.balance(rows, 1) == bal and tasks.balance(rows, 2) != bal
    tr, va, te = tasks.split(bal, (0.7, 0.1, 0.2), 123)
    assert (len(tr), len(va), len(te)) == (14, 2, 4) and sorted(tr + va + te) == sorted(bal)
    eb = tasks.EpochBatches(10, 4, 0, lambda idx: idx)
    epoch = [i for k in range(3) for i in eb(k)]
    assert sorted(epoch) == list(range(10)) and eb(3) != eb(0) or sorted(eb(3) + eb(4) + eb(5)) == list(range(10))


# ---------------------------------------------------------------- DPO and label scoring

def test_dpo_loss_by_hand():
    from lmforge.losses import dpo_loss

    loss, m = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5)
    # rewards: 0.5 (-1 + 2) = 0.5 and 0.5 (-3 + 2.5) = -0.25; margin 0.75; loss -log σ(0.75)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-6)
    assert m == pytest.approx({"chosen_reward": 0.5, "rejected_reward": -0.25, "reward_margin": 0.75})


def test_sequence_logprobs_sum_only_unmasked_targets():
    from lmforge.losses import sequence_logprobs

    model = _tiny(tie=False).eval()
    x = torch.tensor([[1, 2, 3, 4]])
    y = torch.tensor([[-100, 3, 4, -100]])
    logp = torch.log_softmax(model(x), -1)[0]
    assert sequence_logprobs(model, x, y).item() == pytest.approx((logp[1, 3] + logp[2, 4]).item(), abs=1e-5)


def test_continuation_logprobs_score_each_choice_as_alone():
    from lmforge.evaluate import continuation_logprobs

    model = _tiny(tie=False).eval()
    ctx, choices = [1, 2, 3], [[4], [5, 6, 7]]
    got = continuation_logprobs(model, ctx, choices)
    for cont, score in zip(choices, got):
        seq = torch.tensor([ctx + cont])
        logp = torch.log_softmax(model(seq[:, :-1]), -1)[0]
        want = sum(logp[len(ctx) - 1 + j, c].item() for j, c in enumerate(cont))
        assert score == pytest.approx(want, abs=1e-5)
