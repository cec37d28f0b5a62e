"""Scale-out: the same training on many processes, GPUs and machines, through torchrun.

PyTorch's own engine does the work: ``torchrun`` starts one process per device (and finds
the other machines through its rendezvous), ``torch.distributed`` connects them (NCCL on
GPUs, gloo on CPUs), and the model is wrapped from outside, after it is built:

    DDP     every rank holds the whole model; gradients are averaged by all-reduce in
            backward. For models that fit one device.
    FSDP2   (``fully_shard``) every rank holds 1/world of each parameter, gradient and
            optimiser state; a block's parameters are gathered just before it runs and
            freed after. For models that do not fit.

The data stays a pure function of the step: micro-batch k is the same global batch of
``batch_size`` sequences whatever the number of ranks, and rank r trains on its rows
[r·b/world, (r+1)·b/world). Averaging the ranks' gradients gives the gradient of the
global batch, so N ranks take the steps one process would, and a run saved at one
number of ranks resumes at another.

Checkpoints stay one unit, written once by rank 0: the full weights and a full optimiser
state in the single-process format (gathered from the shards under FSDP), so any number
of ranks — or one plain process — can load them.

``lmforge pretrain --devices N`` relaunches itself under torchrun (``launch``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from .attention import ATTENTION_CHUNK, chunk_spans
from .config import LmforgeError, TrainConfig, is_digits

STRATEGIES = ("ddp", "fsdp")

# GPT's logits are a view of the output layer's product; FSDP2 warns that an in-place op on them
# would skip its hook. lmforge's losses (sequence log-probabilities, class logits) read them out of
# place, so the warning on every step would only alarm. Only this message, only for GPT.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGPT\) returned a view tensor",
                        category=UserWarning)


class DistributedError(LmforgeError, RuntimeError):
    """A launch or a process group that cannot work as asked."""


@dataclass(frozen=True)
class Group:
    """This process's place in the job: rank (global), world size and local rank (on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, samples, prints and writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True inside a process that torchrun started (it sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def writer() -> bool:
    """Whether this process writes the job's files: a single process, or rank 0 of a torchrun job
    (known from its environment, before the process group is joined as after)."""
    return not launched() or os.environ["RANK"] == "0"


def current() -> Group:
    """The group of this process: the initialised process group's, else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Group()


def init(timeout_s: float = 600.0, device: str | None = None) -> Group:
    """Join the job torchrun started; a single process (not launched, or world size 1) needs no group.

    ``timeout_s`` bounds every collective: a rank that died or hangs makes the others fail with an
    error after it, instead of waiting for ever. Ranks other than 0 print nothing to stdout (their
    errors still reach stderr, prefixed by torchrun with the rank)."""
    import torch.distributed as dist

    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Group()
    if dist.is_initialized():
        return current()
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU (this machine has {torch.cuda.device_count()}); "
                                   "start at most one process per GPU (--devices)")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": torch.device("cuda", local_rank)} if use_cuda else {}))
    except Exception as e:  # a rendezvous that fails: wrong endpoint, a port in use, a peer gone
        raise DistributedError(f"could not join the process group ({backend}): {e}; check --rdzv_endpoint and "
                               "that every machine runs the same command") from None
    group = current()
    if not group.main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (one line per job, not one per rank)
    return group


def device_of(group: Group) -> torch.device:
    """The device a rank trains on: its own GPU when ``init`` joined over NCCL, else the CPU (no
    GPU, or ``--device cpu`` on a machine that has them: ``init`` chose gloo)."""
    import torch.distributed as dist

    if group.active and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", group.local_rank)
    return torch.device("cpu")


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- wrapping the model
def build(make: Callable[[], nn.Module], strategy: str, device: torch.device) -> nn.Module:
    """The model ``make()`` builds, placed for this job's ``strategy``.

    One process and DDP: on ``device``. FSDP2: no rank ever holds the whole model on its device,
    and only rank 0 holds its values at all: rank 0 builds it in host memory (``wrap`` then sends
    each unit to the device as it shards it), the other ranks build only its shapes, on the meta
    device, and ``wrap`` fills their shards from rank 0's values. So a model whose parameters do
    not fit one GPU can be trained on several, and a machine of 8 ranks holds one copy in host
    memory, not 8. (The random state of ranks other than 0 then differs from rank 0's; nothing
    draws from it but dropout, whose masks differ by rank anyway.)"""
    group = current()
    if not (group.active and strategy == "fsdp"):
        return make().to(device)
    if group.main:
        return make()
    with torch.device("meta"):
        return make()


def on_meta(model: nn.Module) -> bool:
    """Whether ``model`` is only shapes (``build`` on a rank other than 0 under FSDP2): its values
    come from rank 0 when ``wrap`` shards it, so nothing should be loaded into it before."""
    return any(p.is_meta for p in model.parameters())


def wrap(model: nn.Module, strategy: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The module to train, for this job: ``model`` itself on one process, DDP around it, or the
    model sharded in place by FSDP2 (each block a unit, then the root: embeddings, norm, head).

    Under FSDP2 every rank then takes its shard of rank 0's values (broadcast, one tensor at a
    time): ranks that built only shapes (``build``) get their values, and every rank starts from
    the very weights rank 0 holds. With bf16, parameters are gathered in bf16 and gradients
    reduced in fp32; the sharded master weights and the optimiser stay fp32."""
    group = current()
    if not group.active:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [group.local_rank] if next(model.parameters()).is_cuda else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
            else MixedPrecisionPolicy()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Rank 0's values, kept in host memory until sent: sharding moves the parameters it holds.
        values = {k: v.detach() for k, v in model.state_dict().items()} if group.main else {}
        for block in model.h:
            fully_shard(block, mp_policy=policy)  # moves this unit to the device, then keeps 1/world of it
        fully_shard(model, mp_policy=policy)
        if on_meta(model):
            model.to_empty(device=device_of(group))  # this rank's shards, allocated; their values come next
        set_model_state_dict(model, values, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return model
    raise DistributedError(f"unknown strategy {strategy!r}; use {' or '.join(STRATEGIES)}")


def reshard(model: nn.Module) -> None:
    """Put back the shards of every FSDP2 unit of ``model`` (nothing on a model that is not sharded).
    A forward pass with no backward after it (an evaluation) leaves the root unit's parameters
    gathered, registered in place of its shards; an optimiser made then would hold the gathered
    copies and update nothing that trains."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Backward inside this context all-reduces gradients only when ``sync``: the micro-batches of
    gradient accumulation but the last add into local gradients, and only the last communicates."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(wrapped, DDP) and not sync:
        with wrapped.no_sync():
            yield
    elif is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def mean_over_ranks(values: list[float | torch.Tensor], device: torch.device) -> list[float | torch.Tensor]:
    """The mean of each value over all ranks, as 0-dim tensors on ``device`` (one small all-reduce,
    which the host does not wait for); the values themselves on one process."""
    import torch.distributed as dist

    if not current().active:
        return values
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    dist.all_reduce(t)
    return list((t / current().world_size).unbind())


def all_ok(ok: bool, device: torch.device) -> bool:
    """Whether every rank reports ``ok``: how ranks learn that one of them failed at something only
    it did (rank 0 writing a checkpoint), so that all stop with an error instead of waiting."""
    import torch.distributed as dist

    if not current().active:
        return ok
    t = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0


def on_main(fn: Callable[[], Any], device: torch.device | None = None) -> Any:
    """``fn()`` on rank 0 alone (what writes files); when it fails there, every rank fails with it,
    instead of the others waiting at their next collective until the timeout."""
    error, result = None, None
    if current().main:
        try:
            result = fn()
        except Exception as e:  # passed on below: rank 0 raises it, the others learn that it happened
            error = e
    if not all_ok(error is None, device or device_of(current())):
        raise error or DistributedError("rank 0 stopped with an error (its message is above)")
    return result


def from_main(fn: Callable[[], Any], device: torch.device | None = None) -> Any:
    """``fn()`` run on rank 0 alone and its result sent to every rank (pickled: something small, such
    as shapes and a tokenizer, not weights); when it fails there, every rank fails with it."""
    result = on_main(fn, device)
    group = current()
    if not group.active:
        return result
    import torch.distributed as dist

    box = [result]
    dist.broadcast_object_list(box, src=0, device=device or device_of(group))
    return box[0]


def shapes_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that holds no values: every parameter and buffer on the meta device, with
    its shape, dtype, ``requires_grad`` and ties (an output layer tied to the embedding stays tied)."""
    import copy

    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)  # what memo maps is taken as already copied


def rank_rows(batches: Callable[[int], Any], group: Group | None = None) -> Callable[[int], Any]:
    """A batch source of this rank's rows of each global batch (every tensor split along dim 0).
    For fine-tuning batches built whole; pretraining windows read only their own rows (data.py).
    A batch whose rows do not divide over the ranks (an epoch's last) repeats its first rows."""
    from .train import map_tensors  # (train imports this module)

    group = group or current()
    if not group.active:
        return batches

    def rows(t: torch.Tensor) -> torch.Tensor:
        if not t.dim():  # a 0-d tensor (a scale, a flag) has no rows: every rank gets it whole
            return t
        n = t.size(0)
        if n % group.world_size:
            # An epoch's last, shorter batch: completed with its own first rows (as torch's
            # DistributedSampler pads an epoch), so that every rank has as many rows to average.
            t = t[torch.arange(-(-n // group.world_size) * group.world_size) % n]
        per = t.size(0) // group.world_size
        return t[group.rank * per:(group.rank + 1) * per]

    return lambda k: map_tensors(batches(k), rows)


def check_batch(train: TrainConfig, group: Group | None = None) -> None:
    """The global batch splits evenly over the ranks, and what cannot run on several is refused."""
    group = group or current()
    if train.batch_size % group.world_size:
        raise DistributedError(f"--train.batch_size {train.batch_size} is the global batch and must split evenly "
                               f"over {group.world_size} ranks; use a multiple of {group.world_size}")
    if train.batch_warmup_steps and group.world_size > 1:
        # Each rank holds a contiguous block of the global rows, so "the first rows" per rank is not the
        # first rows of the global batch, and DDP would weigh a rank's few rows like another's many.
        raise DistributedError("batch-size warm-up (--train.batch_warmup_steps) runs in one process only for now; "
                               "drop it, or train without --devices")


# --------------------------------------------------------------------------- checkpoints
def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
    """(weights, optimiser state) to save, in the single-process format, complete on rank 0.

    Weights: None means "the model's own state dict" (one process, DDP); under FSDP2 the shards
    are gathered (a collective: every rank must call this). The optimiser state is keyed by
    parameter index, in the order of the optimiser's groups, as ``optimizer.state_dict()`` is."""
    if not is_sharded(model):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not current().main:
        return weights, {}
    names = [n for g in by_name["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    groups, start = [], 0
    for g in by_name["param_groups"]:
        groups.append({**g, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return weights, {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved (single-process format) optimiser state into this job's optimiser; under FSDP2
    every rank keeps its own shard of it."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {order[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def gradient_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (it is a DTensor under FSDP2), left on the device."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


# --------------------------------------------------------------------------- launching
def check_launch(devices: int | None, nnodes: int = 1, node_rank: int | None = None,
                 rdzv_endpoint: str | None = None) -> None:
    """Refuse launch flags that cannot work, before any process starts (torchrun would fail on them
    with a traceback, or wait for machines that never come)."""
    if (devices is not None and devices < 1) or nnodes < 1:
        raise DistributedError(f"--devices and --nnodes must be >= 1, got {devices} and {nnodes}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = os.cpu_count() or 1
    if devices is not None and devices > max(gpus, cores):
        raise DistributedError(f"--devices {devices} is more processes than this machine has "
                               f"{f'GPUs ({gpus})' if gpus else f'CPU cores ({cores})'}; give at most "
                               f"{gpus or cores} (--nnodes adds machines)")
    if nnodes > 1 and not rdzv_endpoint:
        raise DistributedError("--nnodes > 1 needs --rdzv_endpoint HOST:PORT, the same on every machine")
    if rdzv_endpoint is not None:
        host, sep, port = rdzv_endpoint.rpartition(":")
        if not (sep and host.strip("[]") and is_digits(port) and 0 < int(port) < 65536):
            raise DistributedError(f"--rdzv_endpoint must be HOST:PORT (e.g. node0:29500, the same on every "
                                   f"machine), got {rdzv_endpoint!r}")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise DistributedError(f"--node_rank must be between 0 and --nnodes - 1 ({nnodes - 1}), got {node_rank}; "
                               "give each machine its own")


def launch(argv: list[str], devices: int, nnodes: int = 1, node_rank: int | None = None,
           rdzv_endpoint: str | None = None, module: str = "lmforge") -> int:
    """Run ``python -m lmforge ARGV`` under torchrun with ``devices`` processes per machine; returns its exit
    code. One machine runs standalone (a local rendezvous on a free port); several meet at ``rdzv_endpoint``
    (host:port of any of them, the same on all). torchrun watches the processes: when one fails, it stops
    the others and names the rank that failed. The flags are the caller's to check first (``check_launch``,
    which the command line runs whether or not it launches)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={devices}", f"--nnodes={nnodes}"]
    if nnodes > 1 or rdzv_endpoint:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        if node_rank is not None:
            cmd.append(f"--node_rank={node_rank}")
    else:
        cmd.append("--standalone")
    env = dict(os.environ)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        # Processes share the cores: each gets its part instead of all of them (oversubscription).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
    return subprocess.call([*cmd, "-m", module, *argv], env=env)


# --------------------------------------------------------------------------- memory, on paper
def memory_per_device(n_params: int, strategy: str, world_size: int, *, activations: int = 0,
                      param_bytes: int = 4, grad_bytes: int = 4, optim_bytes: int = 8,
                      largest_unit: int = 0, compute_bytes: int = 4) -> dict[str, int]:
    """Bytes each device holds while training, by what holds them.

    ``n_params`` parameters kept in ``param_bytes`` (fp32 master weights: 4), gradients in
    ``grad_bytes``, AdamW's two moments in ``optim_bytes`` (8 per parameter); ``activations``:
    the bytes a forward keeps for backward on one device (``activation_bytes``).

    DDP: every rank holds all of it, plus DDP's gradient buckets (a second copy of the gradients,
    which backward fills and the all-reduce reads). FSDP2: parameters, gradients and optimiser state
    are divided by the world size; each rank also holds one unit's gathered parameters
    (``largest_unit`` parameters in ``compute_bytes``) and, for prefetching, the next one."""
    if strategy not in STRATEGIES + ("single",):
        raise DistributedError(f"unknown strategy {strategy!r}; use single, ddp or fsdp")
    div = world_size if strategy == "fsdp" else 1
    out = {"parameters": n_params * param_bytes // div, "gradients": n_params * grad_bytes // div,
           "optimizer": n_params * optim_bytes // div, "activations": activations}
    if strategy == "ddp" and world_size > 1:
        out["gradient_buckets"] = n_params * grad_bytes
    if strategy == "fsdp" and world_size > 1:
        out["gathered"] = 2 * largest_unit * compute_bytes
    out["total"] = sum(out.values())
    return out


def activation_bytes(config: Any, batch: int, seq: int, dtype_bytes: int = 4, attention: str = "flash",
                     chunk: int = ATTENTION_CHUNK) -> int:
    """Bytes the forward of ``config``'s model keeps for backward, per device, at ``batch`` × ``seq``.

    Counted per block from what each operation saves, in units of one hidden state (b·s·d values):
    each norm keeps its input (LayerNorm) or its input and scaled output (RMSNorm, computed in
    fp32); attention keeps its input, q, its output and the output projection's input, plus k and v
    (smaller with grouped-query heads), with rotary positions q and k before rotation too, and with
    QK-norm the normalised q and k (new tensors, where plain q and k are views of the QKV output); the
    MLP keeps its input and, in its hidden width, GELU's (or ReLU²'s) input and output or SwiGLU's gate, up,
    activation and product. ``attention``: "flash" (the fused kernel, on a GPU) keeps no T × T scores;
    "plain" (the formula) keeps the softmax (heads · s · s); "chunked" (``ChunkedCausalAttention``,
    the CPU's path up to 1024 tokens) keeps each query chunk's weights over the keys it can see,
    about heads · s²/2. Plus the final norm and the output layer's input (the fused loss keeps no
    logits)."""
    d, f, h = config.d_model, config.ff_dim, config.n_head
    kv = config.kv_heads * config.head_dim
    bs = batch * seq
    norms = 2 * (2 * d if config.norm == "rmsnorm" else d)
    attn = 4 * d + 2 * kv + (d + kv if config.positions == "rope" else 0) + (d + kv if config.qk_norm else 0)
    mlp = d + (4 * f if config.mlp == "swiglu" else 2 * f)
    per_block = bs * (norms + attn + mlp)
    if attention == "plain":
        per_block += batch * h * seq * seq
    elif attention == "chunked":
        per_block += batch * h * sum((end - start) * end for start, end in chunk_spans(seq, chunk))
    elif attention != "flash":
        raise ValueError(f"attention is 'flash', 'chunked' or 'plain', not {attention!r}")
    return (config.n_layer * per_block + 2 * bs * d) * dtype_bytes


__all__ = [
    "STRATEGIES", "DistributedError", "Group", "activation_bytes", "all_ok", "build", "check_batch", "check_launch",
    "close", "current", "device_of", "from_main", "full_state", "gradient_norm", "gradient_sync", "init", "is_sharded",
    "launch", "launched", "load_optimizer_state", "mean_over_ranks", "memory_per_device", "on_main", "on_meta",
    "rank_rows", "reshard", "shapes_of", "wrap", "writer",
]
