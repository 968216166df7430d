"""torch.distributed helpers: the process's rank, and GiVA layers sharded by FSDP2 (fully_shard).

Under FSDP2 the parameters (the base weight, the vectors, a head) are DTensors, each process
holding a shard. What needs whole tensors gathers them, which is a collective: save_adapter,
save_adapters and export_lora must then be called by every process, and process 0 writes.
What changes the layers in place (init_bases, load_adapter, merge) runs before fully_shard and is
refused after: FSDP2 records at its first forward which parameters train, and init's forward, with
the vectors frozen, breaks the next bf16 backward; loading and merging would write into shards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without DTensor: nothing can be sharded
    DTensor = ()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 shards a parameter of ``module`` (it is a DTensor)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``tensor`` itself, or all shards of an FSDP2 DTensor gathered (a
    collective: every process must call it for the same tensors in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def writes_here(module: nn.Module) -> bool:
    """Whether this process writes a file made from ``module``'s tensors: every caller, unless
    FSDP2 shards them (then every process gathers and process 0 writes)."""
    return not is_sharded(module) or rank_and_world()[0] == 0


def check_not_sharded(layers: dict, action: str) -> None:
    """ValueError naming the first GiVA layer that FSDP2 shards: ``action`` must run before
    fully_shard."""
    sharded = [name for name, layer in layers.items() if is_sharded(layer)]
    if sharded:
        raise ValueError(f"GiVA layer {sharded[0]!r} is sharded by FSDP2 (fully_shard); {action} "
                         "before fully_shard, on the whole model")
