"""The GPU paths, checked and timed on one CUDA device in one short run (no test depends on it).

    correctness  on CUDA: left-padded batched decoding equals decoding alone, cached equals
                 uncached, the fused output-layer loss equals the plain one (loss and gradients)
                 in fp32 and under bf16 autocast, LoRA's fused path equals its plain path
    pretrain     gpt2-124m shape, 16 x 1024 tokens, bf16 autocast: lmforge eager and compiled vs
                 transformers' GPT2LMHeadModel (sdpa) eager; tokens/s and MFU
    finetune     SmolLM2-135M shape, 8 x 512 tokens, bf16 autocast: full and LoRA, lmforge vs
                 transformers (+ peft)
    decode       SmolLM2-135M shape in bf16: lmforge's Decoder vs transformers' generate, batch 1
                 and 8 streams, greedy

    python benchmarks/gpu_check.py                      # every part
    python benchmarks/gpu_check.py --parts correctness decode
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

import torch
import torch.nn.functional as F

DEV = os.environ.get("LMFORGE_DEVICE", "cuda")  # "cpu" runs the correctness part as a smoke test
PEAK_BF16 = 989e12  # H100/H200 dense bf16 tensor-core peak, FLOP/s


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _timed(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / steps


def _train_step(loss_of, opt):
    """One training step under bf16 autocast: forward, backward, optimizer."""
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def correctness() -> None:
    from lmforge.config import ModelConfig, SampleConfig
    from lmforge.generate import Decoder
    from lmforge.lora import apply_lora
    from lmforge.model import GPT

    torch.manual_seed(0)
    for preset in ("gpt-nano", "llama-micro"):
        model = GPT(ModelConfig.from_preset(preset, vocab_size=512, context_length=128)).to(DEV).eval()
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 8, 1)]
        cfg = SampleConfig(max_new_tokens=24, temperature=0, stop_at_eos=False)

        def ids(dec):
            rows = [[] for _ in range(dec.n)]
            for step in dec:
                for i, t in enumerate(step):
                    if t is not None:
                        rows[i].append(t.id)
            return rows
        together = ids(Decoder(model, prompts, cfg))
        alone = [ids(Decoder(model, [p], cfg))[0] for p in prompts]
        uncached = ids(Decoder(model, prompts, cfg, use_cache=False))
        print(f"  {preset}: batched == alone {together == alone}, cached == uncached {together == uncached}")
        x = torch.randint(0, 512, (4, 64), device=DEV)
        y = torch.randint(0, 512, (4, 64), device=DEV)
        for autocast in (False, True):
            grads = []
            for fused in (True, False):
                model.zero_grad()
                model.train()
                with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
                    loss = model(x, targets=y, fused=fused)
                loss.backward()
                grads.append((loss.item(), [p.grad.float().clone() for p in model.parameters()]))
            (la, ga), (lb, gb) = grads
            worst = max(((a - b).abs().max() / (b.abs().max() + 1e-12)).item() for a, b in zip(ga, gb))
            print(f"  {preset} fused loss, {'bf16 autocast' if autocast else 'fp32'}: loss {la:.6f} vs {lb:.6f}, "
                  f"worst relative gradient difference {worst:.2e}")
        apply_lora(model, rank=4, alpha=8, targets=("attn", "mlp", "head"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        model.eval()
        with torch.no_grad():
            a, b = model(x, targets=y), model(x, targets=y, fused=False)
        print(f"  {preset} LoRA head: fused loss {a.item():.6f} vs plain {b.item():.6f}")


def pretrain(steps: int) -> None:
    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.model import GPT
    from lmforge.optim import make_optimizer

    B, T, V = 16, 1024, 50257
    x = torch.randint(0, V, (B, T), device=DEV)
    y = torch.randint(0, V, (B, T), device=DEV)
    cfg = ModelConfig.from_preset("gpt2-124m")
    results = {}
    for name in ("lmforge", "lmforge compiled", "transformers"):
        torch.manual_seed(0)
        if name.startswith("lmforge"):
            model = GPT(cfg).to(DEV).train()
            opt = make_optimizer(model, TrainConfig(lr=6e-4, weight_decay=0.1))
            flops = model.flops_per_token(T) * B * T
            fwd = torch.compile(model) if "compiled" in name else model

            def loss_of():
                return fwd(x, targets=y)
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            hf = GPT2Config(vocab_size=V, n_positions=1024, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
            hf._attn_implementation = "sdpa"
            model = GPT2LMHeadModel(hf).to(DEV).train()
            opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=True)

            def loss_of():
                logits = model(input_ids=x).logits
                return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

        step = _train_step(loss_of, opt)
        t0 = time.perf_counter()
        step()
        _sync()
        first = time.perf_counter() - t0
        s = _timed(step, steps)
        results[name] = s
        print(f"  {name:<17} {B * T / s:>10,.0f} tok/s  {s * 1e3:7.1f} ms/step  MFU {flops / s / PEAK_BF16:5.1%}"
              f"  (first step {first:.1f} s)  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for name in ("lmforge", "lmforge compiled"):
        print(f"  {name} / transformers: {results['transformers'] / results[name]:.2f}x")


def finetune(steps: int) -> None:
    from lmforge.config import FinetuneConfig, LoRAConfig, ModelConfig, TrainConfig
    from lmforge.finetune import set_trainable
    from lmforge.model import GPT
    from lmforge.optim import make_optimizer

    B, T, V = 8, 512, 49152
    x = torch.randint(0, V, (B, T), device=DEV)
    y = torch.randint(0, V, (B, T), device=DEV)
    for mode in ("full", "lora"):
        times = {}
        for who in ("lmforge", "transformers"):
            torch.manual_seed(0)
            if who == "lmforge":
                model = GPT(ModelConfig.from_preset("smollm2-135m", context_length=2048)).to(DEV)
                set_trainable(model, FinetuneConfig(trainable="all" if mode == "full" else "lora"),
                              LoRAConfig(rank=16, alpha=16), head_trains=False)
                opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0))

                def loss_of():
                    return model(x, targets=y)
            else:
                from transformers import LlamaConfig, LlamaForCausalLM

                cfg = LlamaConfig(vocab_size=V, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                  rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
                cfg._attn_implementation = "sdpa"
                model = LlamaForCausalLM(cfg).to(DEV)
                if mode == "lora":
                    from peft import LoraConfig, get_peft_model

                    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=[
                        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

                def loss_of():
                    logits = model(input_ids=x).logits
                    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            model.train()
            times[who] = _timed(_train_step(loss_of, opt), steps)
            del model, opt
            torch.cuda.empty_cache()
        print(f"  {mode:<5} lmforge {times['lmforge'] * 1e3:6.1f} ms/step, transformers{' + peft' if mode == 'lora' else ''}"
              f" {times['transformers'] * 1e3:6.1f} ms/step: lmforge {times['transformers'] / times['lmforge']:.2f}x")


def decode(new: int) -> None:
    from lmforge.config import ModelConfig, SampleConfig
    from lmforge.generate import Decoder
    from lmforge.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("smollm2-135m", context_length=2048)).to(DEV, torch.bfloat16).eval()
    prompt = torch.randint(0, 49152, (32,)).tolist()
    cfg = SampleConfig(max_new_tokens=new, temperature=0, stop_at_eos=False)

    def ours(rows: int, compile: bool = False) -> float:
        _sync()
        t0 = time.perf_counter()
        n = sum(sum(t is not None for t in step) for step in Decoder(model, [prompt] * rows, cfg, compile=compile))
        _sync()
        return n / (time.perf_counter() - t0)
    ours(1)
    one, eight = ours(1), ours(8)
    t0 = time.perf_counter()
    ours(1, True)
    ours(8, True)
    print(f"  (compiling the decode step for batch 1 and 8: {time.perf_counter() - t0:.0f} s)")
    c1, c8 = ours(1, True), ours(8, True)
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                      tie_word_embeddings=True)).to(DEV, torch.bfloat16).eval()
    ids = torch.tensor([prompt], device=DEV)

    def theirs(rows: int) -> float:
        x = ids.expand(rows, -1)
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
        _sync()
        return rows * new / (time.perf_counter() - t0)
    theirs(1)
    h1, h8 = theirs(1), theirs(8)
    print(f"  batch 1: lmforge {one:6.1f} tok/s (compiled {c1:6.1f}), transformers {h1:6.1f} tok/s: "
          f"{one / h1:.2f}x ({c1 / h1:.2f}x compiled)")
    print(f"  8 streams: lmforge {eight:6.1f} tok/s aggregate ({eight / one:.1f}x one stream; compiled {c8:6.1f}, "
          f"{c8 / c1:.1f}x), transformers {h8:6.1f} tok/s: {eight / h8:.2f}x ({c8 / h8:.2f}x compiled)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["correctness", "pretrain", "finetune", "decode"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--new", type=int, default=128)
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name() if DEV == 'cuda' else DEV}, torch {torch.__version__}", flush=True)
    for part in a.parts:
        print(f"== {part}", flush=True)
        t0 = time.perf_counter()
        try:
            {"correctness": correctness, "pretrain": lambda: pretrain(a.steps), "finetune": lambda: finetune(a.steps),
             "decode": lambda: decode(a.new)}[part]()
        except Exception:  # noqa: BLE001  (one part failing must not hide the others)
            traceback.print_exc()
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
