"""Processes, FSDP2 sharding and full (unsharded) state for checkpoints.

Owns: `init` (one process, or one per rank under `torchrun`: gloo on CPU, nccl on GPU), `shard`
(FSDP2 `fully_shard` of a `TrainNet`: each block and each block's cross-attention as units, the
rest as the root, every entry point registered as a forward method), gradient averaging for
small replicated modules (the discriminator head), and the conversions between sharded and
full tensors that checkpoints need (weights, optimizer states, EMA).
Does not own: what is computed (`losses.py`, `rollout.py`) or the training loop (`train.py`).

One process runs the same code unsharded (plain tensors), so every helper here is the identity
there. Collective helpers must be called by all ranks in the same order.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# FSDP2 warns when a unit returns a view (our blocks return their keys/values as views of the
# projections). Nothing modifies those outputs in place, which is the case the warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1), or stay single-process.
    device: "auto" (cuda:LOCAL_RANK if CUDA is available, else cpu), "cpu" or "cuda"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for but torch.cuda.is_available() is False; use --device cpu")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, dev)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo):
    if info.distributed:
        dist.barrier()


def shard(net: nn.Module, info: DistInfo, forward_methods=()) -> nn.Module:
    """FSDP2 in place. `CausalWanDiT.cross_kv` calls each block's `cross_attn.kv` directly, so the
    cross-attention is its own unit with `kv` hooked; `forward_methods` are the root's extra
    entry points (besides `forward`) that must gather its parameters."""
    if not info.distributed:
        return net
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for blk in net.model.blocks:
        fully_shard(blk.cross_attn)
        register_fsdp_forward_method(blk.cross_attn, "kv")
        fully_shard(blk)
    fully_shard(net)
    for name in forward_methods:
        register_fsdp_forward_method(net, name)
    return net


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------


def mean_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar logs over ranks (one all-reduce)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: v / info.world for k, v in zip(keys, t.tolist())}


def average_grads_(module: nn.Module, info: DistInfo):
    """All-reduce-mean the grads of a replicated (unsharded) module, as DDP would."""
    if not info.distributed:
        return
    for p in module.parameters():
        if p.grad is None:  # identical on all ranks: the same code ran
            continue
        dist.all_reduce(p.grad)
        p.grad.div_(info.world)


def broadcast_module_(module: nn.Module, info: DistInfo):
    """Make a replicated module identical on all ranks (rank 0's values)."""
    if info.distributed:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def grad_norm_clip_(params, max_norm: float) -> float:
    """Clip the global grad norm (DTensor grads included) when max_norm > 0; returns the norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(full_tensor(norm))


# ---------------------------------------------------------------------------------------------
# sharded <-> full
# ---------------------------------------------------------------------------------------------


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: all ranks must call)."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref`: a DTensor with ref's mesh and placements, or a plain tensor.
    Every rank holds the same `full`, so each keeps its own shard without communication."""
    if _is_dtensor(ref):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements,
                                 src_data_rank=None)
    return full.to(device=ref.device, dtype=ref.dtype)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} on every rank."""
    return {k: full_tensor(v.detach()).cpu().clone() for k, v in module.state_dict().items()}


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with every tensor full and on the CPU (plain containers only)."""
    sd = opt.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        state[idx] = {k: full_tensor(v).cpu().clone() if torch.is_tensor(v) else v
                      for k, v in sorted(sd["state"][idx].items())}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, full: dict):
    """Inverse of `full_optimizer_state`: each state tensor sharded like its parameter."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for idx, s in full["state"].items():
        idx = int(idx)
        if idx >= len(params):
            raise ValueError(f"optimizer state has parameter index {idx}; this optimizer has {len(params)} "
                             f"parameters: the checkpoint was made for a different model")
        p = params[idx]
        state[idx] = {k: (v if k == "step" else shard_like(v, p)) if torch.is_tensor(v) else v
                      for k, v in s.items()}
    opt.load_state_dict({"state": state, "param_groups": full["param_groups"]})
