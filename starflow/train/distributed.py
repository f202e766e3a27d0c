"""Multi-process training under ``torchrun``: process group, one device per rank, DDP / FSDP wrapping,
and sharded checkpoints through ``torch.distributed.checkpoint``.

Launched without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) everything
here degrades to a single process and the trainer behaves exactly as before.

What each rank computes is decided by the trainer: every rank draws the randomness of the *global*
batch from the same seed and keeps its slice, so a run's numbers do not depend on the world size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local}")
    return rank, world, local


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU if there is one, else CPU. A bare ``cuda`` also means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        dev = torch.device(name)
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        return dev
    return torch.device(name)


def init_distributed(device_name: str = "auto", timeout_minutes: float = 30.0) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and pick this rank's device.

    Idempotent: a second trainer in the same process reuses the group."""
    rank, world, local = env_ranks()
    device = resolve_device(device_name, local)
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(), device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes),
                                **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend()), device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---- wrapping ------------------------------------------------------------------------------------
class LossModule(nn.Module):
    """Routes ``model.loss`` through ``forward`` so DDP's and FSDP's forward hooks run around it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.loss(*args, **kwargs)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP gathers one at a time: every child of every ``nn.ModuleList`` (flow blocks,
    transformer layers), deepest first so inner units are wrapped before the blocks holding them."""
    units = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            visit(child)
        if isinstance(m, nn.ModuleList):
            units.extend(c for c in m if any(True for _ in c.parameters()))

    visit(model)
    return units


def wrap(model: nn.Module, mode: str, info: DistInfo, device: torch.device, find_unused: bool = False) -> nn.Module:
    """The module the trainer calls for the loss: ``LossModule`` for one process, inside DDP, or with
    FSDP2 full sharding applied to ``model`` in place (its parameters become sharded DTensors)."""
    root = LossModule(model)
    if not info.enabled:
        return root
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(root, device_ids=ids, find_unused_parameters=find_unused)
    if mode == "fsdp":
        shard_fully(root, info, device)
        return root
    raise ValueError(f"train.distributed: expected 'ddp' or 'fsdp', got {mode!r}")


def _mesh(info: DistInfo, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (info.world_size,))


def shard_fully(module: nn.Module, info: DistInfo, device: torch.device) -> None:
    """FSDP2 (``fully_shard``) on every unit and on the root: each rank keeps 1/world of every parameter,
    gradient and optimizer state; a unit's full weights exist only while it runs."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(info, device)
    for unit in shard_units(module):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)


def set_gradient_sync(wrapped: nn.Module, enabled: bool):
    """Context for one micro-step of gradient accumulation: skip the gradient all-reduce (DDP) or
    reduce-scatter (FSDP) on all but the last micro-step."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(wrapped, DDP):
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2 module
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def ema_update_sharded(ema, model: nn.Module, decay: float) -> None:
    """``AveragedModel.update_parameters`` (EMA, buffers averaged too) on FSDP-sharded modules: each rank
    updates its own shards. (The stock foreach update refuses the mix of DTensor parameters and plain
    buffers.) Same arithmetic: copy on the first update, then lerp towards the model by 1 - decay."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    first = bool(ema.n_averaged == 0)
    with torch.no_grad():
        pairs = zip(list(ema.module.parameters()) + list(ema.module.buffers()),
                    list(model.parameters()) + list(model.buffers()), strict=True)
        for e, p in pairs:
            e, p = local(e.detach()), local(p.detach())
            if first:
                e.copy_(p)
            elif e.is_floating_point() or e.is_complex():
                e.lerp_(p, 1 - decay)
            else:
                e.copy_(e * decay + p * (1 - decay))
    ema.n_averaged += 1


# ---- sharded state --------------------------------------------------------------------------------
def sharded_state(model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module) -> dict:
    """Model, optimizer (keyed by parameter name) and EMA state as sharded DTensors, for DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optimizer": osd, "ema": ema.state_dict()}


def save_sharded(path: str, model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module) -> None:
    """Every rank writes its shards into ``path`` (collective; ``path`` must be on storage all ranks see)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, opt, ema), checkpoint_id=path)


def load_sharded(path: str, model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module) -> None:
    """Collective inverse of ``save_sharded``; DCP reshards, so the world size may differ from the save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, opt, ema)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    ema.load_state_dict(state["ema"])


def full_state_on_rank0(module: nn.Module) -> dict[str, torch.Tensor]:
    """Gather a sharded module's full state dict onto rank 0's CPU (collective; empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
