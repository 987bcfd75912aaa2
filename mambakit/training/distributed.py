"""Data parallelism applied from outside the model: FSDP2 (``fully_shard`` per block, then the
root) or DDP, set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

The model code knows nothing of this; a single process uses the model as it is. State dicts go
through ``torch.distributed.checkpoint.state_dict`` with full (gathered, CPU) tensors, so
checkpoints are the ordinary single-file format whatever the parallelism.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)


@dataclass
class Env:
    """This process's place: rank in [0, world_size), its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> Env:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), or a single process.

    ``device``: None = cuda (this process's ``LOCAL_RANK`` GPU) if available, else cpu.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Env(rank, world_size, dev)


def teardown(env: Env) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, env: Env, mode: str) -> nn.Module:
    """Wrap ``model`` (already on ``env.device``) for data parallelism; returns the module to call.

    ``"fsdp"``: FSDP2 shards each block, then the root (embedding, final norm and tied head
    together), each block prefetching its neighbour's parameters. Parameters are gathered and
    gradients reduced in fp32 and the bf16 compute comes from the trainer's autocast, exactly as in
    one process, so the losses do not depend on the number of processes. ``"ddp"``: replicas. A single process gets ``model`` back unchanged.
    """
    if not env.distributed:
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    blocks = list(model.backbone.layers)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    # Gather the next block's parameters while this one computes, in both directions.
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([block])
    return model


def no_grad_sync(wrapped: nn.Module, env: Env, sync: bool):
    """Context for one backward: skip the gradient all-reduce unless ``sync`` (accumulation steps)."""
    if not env.distributed or sync:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)

    return fsdp_no_sync()


def all_reduce_sum(values: list[float], env: Env) -> list[float]:
    """Element-wise sum over processes of a few numbers (identity for one process)."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(value, env: Env):
    """Rank 0's ``value`` on every rank."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), gathered whole onto the CPU; collective (every
    rank calls it), but only rank 0 gets the tensors (the others get empty dicts)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Inverse of :func:`full_state`: every rank passes the full dicts and keeps its own shard."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
