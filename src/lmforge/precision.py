"""Choosing and applying compute precision.

Training keeps fp32 master weights and runs matmuls in bf16 under autocast where the
hardware has fast bf16: CUDA GPUs that support it, and CPUs with AVX-512 BF16 or AMX.
"""

from __future__ import annotations

import contextlib
import warnings

import torch


def cpu_has_fast_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


_warned_slow_bf16 = False


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> bf16 where it is fast on ``device``, else fp32; 'float32' / 'bfloat16' as named."""
    device = torch.device(device)
    if name == "float32":
        return torch.float32
    global _warned_slow_bf16
    if name == "bfloat16":
        if device.type == "cpu" and not _warned_slow_bf16 and not cpu_has_fast_bf16():
            # Said once per process (a run resolves its dtype in several places): a whole run at a fraction
            # of its speed is a mistake to point out, not to refuse (the numbers are those of a bf16 CPU).
            _warned_slow_bf16 = True
            warnings.warn("bfloat16 was asked for, but this CPU has no fast bf16 (AVX-512 BF16 or AMX): its bf16 "
                          "products are emulated, many times slower than float32 (a training step of a small "
                          "SmolLM2: 40x on an AVX2 EPYC); ask for float32, or auto, which picks bf16 only where "
                          "it is fast", stacklevel=2)
        return torch.bfloat16
    if name != "auto":  # never read an unknown name (float8, fp16) silently as 'auto'
        from .config import ConfigError

        raise ConfigError(f"dtype must be float32, bfloat16 or auto, got {name!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype):
    """Autocast to ``dtype`` (a no-op context for fp32)."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tune_cpu_allocator() -> None:
    """Keep freed activation blocks in the process instead of returning them to the OS.

    glibc hands blocks above a moving threshold (32 MB at most) straight back with munmap,
    so every training step faults the same memory in again (hundreds of thousands of page
    faults per step: the output layer's (vocab × d) gradient alone is 150 MB for GPT-2).
    Serving every block from the heap (no mmap) and never trimming it keeps those blocks
    for reuse: the second step on touches no new page. The process keeps its peak memory
    until it exits, which is what a training process does anyway. Linux/glibc only; a
    no-op elsewhere.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
        libc.mallopt(M_MMAP_MAX, 0)  # no block from mmap: large ones come from the heap too
        libc.mallopt(M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):
        pass
