"""Data-parallel training under `torchrun`: DDP (replicated weights) or FSDP2 (`fully_shard`: weights,
gradients and optimizer states sharded across ranks). One code path: a single process is world_size 1.
NCCL on CUDA, gloo on CPU; nothing else changes between the two."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.train.settings import Strategy


@dataclass
class Cluster:
    """Where this process sits: rank among world_size processes, its device, and how weights are shared."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: Literal["single", "ddp", "fsdp"] = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_cluster(device: torch.device, strategy: Strategy = "auto") -> Cluster:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a single process otherwise.

    `auto` picks DDP; pass `fsdp` to shard. CUDA ranks use cuda:LOCAL_RANK and NCCL; CPU ranks use gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy not in ("auto", "ddp", "fsdp"):
        raise LlmkitError(f"unknown distributed strategy {strategy!r}; use auto, ddp or fsdp")
    if world_size == 1:
        return Cluster(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Cluster(rank=dist.get_rank(), world_size=world_size, device=device,
                   strategy="fsdp" if strategy == "fsdp" else "ddp")


def shut_down(cluster: Cluster) -> None:
    if cluster.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, cluster: Cluster, param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP-wrap, or shard every block and then the root with FSDP2 (params cast to `param_dtype` for compute,
    gradients reduced in fp32). A single process gets the model back unchanged."""
    if cluster.strategy == "single":
        return model
    if cluster.strategy == "ddp":
        device_ids = [cluster.device.index] if cluster.device.type == "cuda" else None
        # A mixture-of-experts layer may route no token to some expert in a step: DDP must expect unused parameters.
        has_experts = getattr(getattr(model, "config", None), "n_experts", 0) > 0
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=has_experts)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    options = {"mp_policy": policy} if policy else {}
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile and DDP wrappers (FSDP2 shards in place and needs no unwrapping)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, cluster: Cluster, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps; sync on the last one."""
    inner = getattr(model, "_orig_mod", model)
    if cluster.strategy == "ddp" and not enabled:
        with inner.no_sync():
            yield
        return
    if cluster.strategy == "fsdp":
        inner.set_requires_gradient_sync(enabled)
    yield


def all_reduce_mean(values: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """The mean of a tensor over ranks (the tensor itself in a single process)."""
    if cluster.world_size == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / cluster.world_size


def all_reduce_sum(values: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    if cluster.world_size == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(cluster: Cluster) -> None:
    if cluster.world_size > 1:
        dist.barrier()


def full_state_dict(model: nn.Module, cluster: Cluster) -> dict[str, torch.Tensor]:
    """Every weight, whole and on the CPU (gathered from the shards under FSDP; every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    plain = unwrap(model)
    if cluster.strategy != "fsdp":
        return {name: tensor.detach().cpu() for name, tensor in plain.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(plain, options=options)


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], cluster: Cluster) -> None:
    """Load whole weights into a plain, DDP or FSDP2-sharded model (each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    plain = unwrap(model)
    if cluster.strategy != "fsdp":
        plain.load_state_dict(state_dict)
        return
    set_model_state_dict(plain, state_dict, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every optimizer state whole and on the CPU, keyed by parameter name: {"state": {name: {entry: value}},
    "param_groups": [{hyper-parameters, "params": [names]}]}. Gathered from the shards under FSDP2, so every rank
    must call this; only rank 0's copy is complete (the others may be empty), and only rank 0 writes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(unwrap(model), optimizer, options=options)


def local_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's optimizer state keyed by parameter name (FSDP2 entries are DTensors whose `.shape` is the whole
    shape); fresh optimizers get zero states first, so it shows which entries a loaded state must provide."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole, name-keyed optimizer state (as `full_optimizer_state_dict` returns it) on every rank: a plain
    or DDP optimizer takes it as is, an FSDP2 rank keeps its own shard of each tensor, so the number of ranks may
    differ from the saving run's. Every rank reads the same files, so a bad file fails on every rank alike."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state["state"] and not optimizer.state:  # a stateless optimizer (LOMO): only the hyper-parameters
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({key: value for key, value in saved.items() if key != "params"})
        return
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
    # The full-state path flattens and rebuilds the groups, turning tuples (AdamW's betas) into lists: put them back.
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update({key: value for key, value in saved.items() if isinstance(value, tuple)})
