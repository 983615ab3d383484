"""Data parallel plumbing for the trainer: join torchrun's process group, replicate (DDP) or shard (FSDP2) the CLT,
and move between sharded training state and the full, unsharded tensors that checkpoints hold.

Checkpoints always hold full tensors written by rank 0, whatever the mode: every rank reads the whole checkpoint
and, under FSDP, keeps its shard. So a run may resume on another number of processes, and DDP and FSDP
checkpoints are interchangeable.

FSDP here makes each source layer's decoder (clt.SourceDecoder, 94% of a full CLT's parameters) a unit of
its own and the rest (the encoder W_enc [L, n, d], biases, scales) the root unit. A decoder is gathered for
its forward, freed after it, gathered again for its backward, and its gradient reduce-scattered as soon as
that backward ends, so a GPU holds one or two whole decoders at a time, never all of them: an expansion-16
full CLT at LLaVA-7B width becomes a matter of GPU count (clt_lite.plan sizes it: ``Plan.fsdp_gpu_bytes``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .choices import Parallel, names
from .clt import CrossLayerTranscoder
from .devices import resolve_device

PARALLEL = names(Parallel)  # TrainConfig.parallel: replicate, or shard parameters, gradients and optimizer states


class Ranks(NamedTuple):
    """Data-parallel position of this process (rank 0 of 1 without torchrun)."""

    rank: int
    world: int

    def sum(self, t: Tensor) -> Tensor:
        """Sum a tensor over ranks (identity on one process)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t


def setup_ranks(device_name: str) -> tuple[Ranks, torch.device, bool]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (ranks, device, whether we created the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    use_cuda = device.type == "cuda"
    if world == 1:
        return Ranks(0, 1), device, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Ranks(dist.get_rank(), dist.get_world_size()), device, created


def decoder_sharder(parallel: str, ranks: Ranks, device: torch.device) -> Callable[[nn.Module], None] | None:
    """What CrossLayerTranscoder(on_decoder=...) and .load(on_decoder=...) call on each decoder as it appears: under
    FSDP, shard it at once (so the CLT is never whole on one device: an expansion-16 CLT at 7B width is 300 GB);
    None otherwise. Every rank builds the same decoders (same seed, same file) and keeps its shard."""
    if ranks.world == 1 or parallel != "fsdp":
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world,))
    # Each decoder is freed after its forward (reshard_after_forward) and gathered again when used: the AuxK loss
    # and the JumpReLU penalty call the decoders' forward too, so they see whole weights.
    return lambda decoder: fully_shard(decoder, mesh=mesh, reshard_after_forward=True)


def wrap(clt: nn.Module, parallel: str, ranks: Ranks, device: torch.device) -> nn.Module:
    """The module the training step calls: `clt` itself on one process, a DDP wrapper, or `clt` sharded in place.

    Build the CLT identically on every rank first (same seed, same first batch): DDP and fully_shard both start
    from the weights each rank holds; under FSDP pass decoder_sharder() to the constructor or load() so that the
    decoders are sharded as they are built, and this call shards the rest. Build the optimizer over
    clt.parameters() *after* this call (FSDP replaces them by sharded DTensors).
    """
    if ranks.world == 1:
        return clt
    if parallel == "ddp":
        # DDP all-reduces (averages) gradients in buckets during backward; it needs every parameter used in forward.
        return DistributedDataParallel(clt)
    from torch.distributed.fsdp import FSDPModule, fully_shard

    shard = decoder_sharder(parallel, ranks, device)
    for decoder in clt.decoders:
        if not isinstance(decoder, FSDPModule):  # not sharded while the CLT was built
            shard(decoder)
    # The root unit (encoder, biases) stays gathered from forward to the end of backward (FSDP never reshards the
    # root after forward). FSDP averages gradients over ranks with a reduce-scatter, as DDP does with its all-reduce.
    fully_shard(clt, mesh=clt.decoders[0].weight.device_mesh)
    return clt


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state(tree: Any, ranks: Ranks) -> Any:
    """`tree` (a state dict, nested dicts/lists) with every sharded DTensor gathered into a full CPU tensor on
    rank 0 (None elsewhere). A collective: every rank calls it with the same structure. Unsharded values pass."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, dict):
        return {k: full_state(v, ranks) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(full_state(v, ranks) for v in tree)
    if isinstance(tree, DTensor):
        full = tree.full_tensor()  # one tensor at a time: the gather never holds more than one full tensor
        return full.cpu() if ranks.rank == 0 else None
    return tree


def full_model(clt: nn.Module, ranks: Ranks) -> nn.Module | None:
    """An unsharded copy of a sharded CLT on rank 0's CPU (None on other ranks); `clt` itself when not sharded.

    A collective under FSDP: every rank calls it."""
    if not is_sharded(clt):
        return clt
    state = full_state(clt.state_dict(), ranks)
    if ranks.rank != 0:
        return None
    with torch.device("meta"):
        full = CrossLayerTranscoder(clt.config)
    full.load_state_dict(state, assign=True)
    return full


def shard_optimizer_state(state: dict, params: list[nn.Parameter]) -> dict:
    """A full optimizer state dict (from a checkpoint, on CPU) with every per-parameter tensor of a sharded
    parameter's shape cut down to this rank's shard of it, as a DTensor placed like the parameter.

    `params` in the optimizer's order. Handles torch optimizers ({"state": {i: ...}}) and optim.PerParameter
    ({"per_parameter": [{"state": {0: ...}}, ...]}); unsharded parameters keep their state as it is.
    """
    from torch.distributed.tensor import DTensor

    if "per_parameter" in state:
        per_param = [s["state"].get(0, {}) for s in state["per_parameter"]]
    else:
        per_param = [state["state"].get(i, {}) for i in range(len(params))]
    for p, values in zip(params, per_param, strict=True):
        if not isinstance(p, DTensor):
            continue
        for key, v in values.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                values[key] = _shard_like(v, p)
    return state


def _shard_like(full: Tensor, param) -> Tensor:
    """This rank's dim-0 chunk of `full` (torch.chunk's split, as fully_shard uses) as a DTensor like `param`."""
    from torch.distributed.tensor import DTensor, Shard

    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"expected FSDP's dim-0 sharding, got {param.placements}")
    mesh = param.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    chunk = -(-full.shape[0] // world)
    local = full.narrow(0, min(rank * chunk, full.shape[0]), param.to_local().shape[0])
    local = local.to(param.to_local().device).contiguous()
    return DTensor.from_local(local, mesh, param.placements, run_check=False, shape=full.shape, stride=full.stride())
