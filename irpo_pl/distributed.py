"""Scaling out: FSDP2 sharding under Lightning's ModelParallelStrategy, on GPUs (NCCL) or CPU processes (gloo).

Lightning's own "fsdp" strategy (FSDP1) refuses CPUs; FSDP2 (`fully_shard`) under
ModelParallelStrategy does not, so `--trainer.strategy fsdp` means that here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from irpo_pl.run_dir import replace_dir


def resolve_strategy(trainer_options: dict) -> dict:
    """Trainer options with the user-facing name "fsdp" replaced by an FSDP2 strategy."""
    if trainer_options.get("strategy") != "fsdp":
        return trainer_options
    devices = trainer_options.get("devices", 1)
    try:
        processes = int(devices) * int(trainer_options.get("num_nodes", 1))
    except (TypeError, ValueError):
        raise ValueError(f"--trainer.strategy fsdp needs --trainer.devices as a number of devices per node, got {devices!r}") from None
    # Pure data parallelism: every process holds a 1/N shard of each block.
    return {**trainer_options, "strategy": AtomicModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)}


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy, except that a checkpoint appears whole or not at all.

    Its checkpoint is a folder of shards (torch.distributed.checkpoint) that every process writes
    in place, then rank 0 adds meta.pt: a kill in the middle of a save left a folder that failed to
    load (or mixed two steps' shards), and so every rerun failed. Here the processes write the folder
    beside its place and rank 0 moves it in once all are done, as run_dir does for every other file.
    """

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        final = Path(self.broadcast(str(filepath)))
        partial = final.with_name(final.name + ".partial")
        if self.global_rank == 0:  # clear what an earlier, killed save left
            shutil.rmtree(partial, ignore_errors=True)
            partial.unlink(missing_ok=True)
        self.barrier("checkpoint")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint")  # every shard and meta.pt written
        if self.global_rank == 0 and partial.is_dir():
            replace_dir(partial, final)
        elif self.global_rank == 0:  # a single file, when save_distributed_checkpoint is off
            os.replace(partial, final)
        self.barrier("checkpoint")


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group.

    The loop joins the process group before anything depends on the rank (irpo_pl.cli connects
    every process first), so this is the launcher's answer whatever the launcher.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's `value`, on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shard(model: nn.Module, mesh, mixed_precision: bool = False) -> None:
    """fully_shard every decoder block, then the root; generate() is registered so it unshards like forward()."""
    if isinstance(model, FSDPModule):
        reshard(model)  # sharded in an earlier phase, in the same process group
        return
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} to shard (no _no_split_modules)")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "generate")


def shard_from_rank0(model: nn.Module, mesh, mixed_precision: bool = False) -> None:
    """Shard a model that only rank 0 has read: the others built it on the meta device and receive their shards.

    So one process per run reads the weights from disk, not every process a whole copy. The
    weights go out from rank 0 with torch.distributed.checkpoint's state-dict helpers; buffers
    that no state dict holds (rotary frequencies, say) are broadcast as they are.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    full_state = model.state_dict() if rank == 0 else {}
    shard(model, mesh, mixed_precision)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device(mesh.device_type)
    if rank != 0:
        model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def reshard(model: nn.Module) -> None:
    """Back to shards after forward passes without gradients (sampling, evaluation, the reference pre-pass).

    They leave the root's parameters gathered, as plain tensors (under inference mode, inference
    tensors, which training's gathers cannot reuse): an optimizer built then would hold those
    copies and never update the embeddings and final norm. Does nothing to an unsharded model.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_share(model: nn.Module) -> tuple[int, int]:
    """(parameters held by this process, parameters of the whole model)."""
    local = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        local += parameter.to_local().numel() if hasattr(parameter, "to_local") else parameter.numel()
    return local, total


def full_state_dict(model: nn.Module) -> dict | None:
    """The whole model's weights on CPU, gathered from every shard (a collective: all processes call it)."""
    if not isinstance(model, FSDPModule):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
