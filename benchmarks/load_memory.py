"""Peak memory while loading a checkpoint: lmforge (meta-device model, tensors assigned in place)
against the naive way (build a model, read a state dict, copy it in) and transformers.

Each loader runs in a fresh subprocess; the number is the peak resident memory added by
loading, over the model's own size (fp32). Target: under 1.3× (naive loading needs ~2×).

    python benchmarks/load_memory.py [--preset gpt2-124m]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, folder: str) -> dict:
    import torch  # noqa: F401  (imported before the baseline, as every loader needs it)

    if kind == "transformers":
        import transformers  # noqa: F401
    from lmforge.convert import load_hf  # noqa: F401

    base = peak_mb()
    if kind == "lmforge":
        model = load_hf(folder)
    elif kind == "naive":
        import json as _json

        from safetensors.torch import load_file

        from lmforge.convert import from_hf_config, from_hf_state
        from lmforge.model import GPT

        cfg = from_hf_config(_json.loads((Path(folder) / "config.json").read_text()))
        model = GPT(cfg)                                                     # 1×: random weights
        state = from_hf_state(load_file(str(Path(folder) / "model.safetensors")), cfg)  # + 1×: the file
        model.load_state_dict(state, strict=False)                           # copied in
        del state
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # Touch every weight, so lazily mapped file pages count as they will once the model runs.
    total = sum(float(p.detach().sum()) for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"added_mb": peak_mb() - base, "model_mb": size, "checksum": total}


def make(preset: str, folder: str) -> None:
    from lmforge.config import ModelConfig
    from lmforge.convert import export_hf
    from lmforge.model import GPT

    export_hf(GPT(ModelConfig.from_preset(preset)), folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.make:
        make(*args.make)
        return
    # Every step runs in its own process: Linux carries a parent's peak RSS into its children,
    # so the parent must stay small for the children's peaks to mean anything.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--make", args.preset, tmp], check=True)
        print(f"checkpoint: {args.preset} as an HF folder (fp32 safetensors)")
        print(f"{'loader':<14}{'model MB':>10}{'peak added MB':>15}{'ratio':>8}")
        for kind in ("lmforge", "naive", "transformers"):
            out = subprocess.run([sys.executable, __file__, "--worker", kind, tmp], capture_output=True, text=True)
            if out.returncode:
                print(f"{kind:<14} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{kind:<14}{r['model_mb']:>10.0f}{r['added_mb']:>15.0f}{r['added_mb'] / r['model_mb']:>7.2f}×")


if __name__ == "__main__":
    main()
