"""One rank's training state as a :class:`Shard` and back: model, swarm, optimizer, RNG, loop.

Shard contents (HDF5 paths; scalars are attributes of the file's root):

    model/position      (N,)  the flat trainable parameters (the particle's position)
    model/buffers       (B,)  the flat floating-point buffers (BatchNorm statistics), if any
    model/other/<key>         every other state_dict entry (integer buffers, frozen parameters)
    swarm/velocity, swarm/pbest, swarm/gbest   (N,)   PSO-PS only
    optimizer/<i>/<key>       the local optimizer's per-parameter tensors (SGD: momentum)
    rng/torch_cpu, rng/torch_cuda               global torch generator states
    loop/epoch_sums     (3,)  this epoch's training loss sum, correct count, sample count
    scalars: rank, world_size, step, epoch, step_in_epoch, evaluated, elapsed_s,
             sync.* (counters), swarm.* (round, fitnesses, owner), optimizer.class
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from psops_mpi.checkpoint.store import Shard
from psops_mpi.config import UsageError
from psops_mpi.sync import PSOSync, Synchronizer


@dataclass
class LoopPosition:
    """Where the training loop stands: after ``step`` steps, ``step_in_epoch`` of them in
    ``epoch``; ``evaluated`` once that epoch's end-of-epoch round and evaluation ran."""

    step: int
    epoch: int
    step_in_epoch: int
    epoch_sums: torch.Tensor
    elapsed_s: float
    evaluated: bool = False


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def model_layout(sync: Synchronizer) -> dict[str, Any]:
    """Names and shapes of what the flat buffers hold, so a checkpoint maps back to a
    state_dict without the model's code, and a different architecture is noticed."""
    model = sync.model
    keys = list(model.state_dict().keys())
    params = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    buffers = [(n, list(b.shape), n in keys) for n, b in model.named_buffers()
               if b.is_floating_point()]
    flat_names = {n for n, _ in params} | {n for n, _, _ in buffers}
    return {"params": params, "buffers": buffers,
            "other": [k for k in keys if k not in flat_names], "state_dict_keys": keys}


def capture(sync: Synchronizer, position: LoopPosition) -> Shard:
    """This rank's whole training state, as arrays (CPU views where possible) and scalars."""
    shard = Shard()
    arrays, scalars = shard.arrays, shard.scalars
    arrays["model/position"] = _np(sync.flat.data)
    if sync.buffers.data is not None:
        arrays["model/buffers"] = _np(sync.buffers.data)
    state = sync.model.state_dict()
    for key in model_layout(sync)["other"]:
        arrays[f"model/other/{key}"] = _np(state[key])
    if isinstance(sync, PSOSync):
        swarm = sync.swarm
        arrays.update({"swarm/velocity": _np(swarm.v), "swarm/pbest": _np(swarm.pbest),
                       "swarm/gbest": _np(swarm.gbest)})
        scalars.update({f"swarm.{k}": v for k, v in swarm.scalar_state().items()})
    _capture_optimizer(sync, shard)
    arrays["rng/torch_cpu"] = _np(torch.get_rng_state())
    if sync.flat.data.is_cuda:
        arrays["rng/torch_cuda"] = _np(torch.cuda.get_rng_state(sync.flat.data.device))
    arrays["loop/epoch_sums"] = _np(position.epoch_sums.double())
    scalars.update({"rank": sync.rank, "world_size": sync.world_size, "step": position.step,
                    "epoch": position.epoch, "step_in_epoch": position.step_in_epoch,
                    "evaluated": position.evaluated, "elapsed_s": position.elapsed_s})
    scalars.update({f"sync.{k}": v for k, v in sync.checkpoint_state().items()})
    return shard


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _capture_optimizer(sync: Synchronizer, shard: Shard) -> None:
    optimizer = sync.optimizer
    shard.scalars["optimizer.class"] = type(optimizer).__name__
    for i, param in enumerate(_optimizer_params(optimizer)):
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                shard.arrays[f"optimizer/{i}/{key}"] = _np(value)
            else:  # None (SGD without momentum) or a plain number
                shard.scalars[f"optimizer.{i}.{key}"] = value


# ---- checking a shard against the model before anything is changed

def _expect(shard: Shard, name: str, shape: tuple, dtype: np.dtype, where: str) -> None:
    array = shard.arrays.get(name)
    if array is None:
        raise UsageError(f"{where}: array {name!r} is missing")
    if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
        raise UsageError(f"{where}: array {name!r} is {tuple(array.shape)} {array.dtype}, "
                         f"this model needs {tuple(shape)} {dtype}")


SCALARS = ("rank", "world_size", "step", "epoch", "step_in_epoch", "evaluated", "elapsed_s",
           "sync.steps", "sync.rounds", "sync.steps_since_round", "sync.comm_bytes",
           "sync.comm_s", "sync.comm_calls", "optimizer.class")
PSO_SCALARS = ("swarm.round", "swarm.pbest_fitness", "swarm.gbest_fitness",
               "swarm.gbest_owner", "sync.loss_sum", "sync.last_fitness")


def check_shard(shard: Shard, sync: Synchronizer, where: str) -> None:
    """Raise UsageError unless ``shard`` fits this model, optimizer and algorithm exactly."""
    pso = isinstance(sync, PSOSync)
    for name in SCALARS + (PSO_SCALARS if pso else ()):
        if name not in shard.scalars:
            raise UsageError(f"{where}: attribute {name!r} is missing")
    flat = sync.flat.data
    dtype = _np(flat[:1]).dtype
    _expect(shard, "model/position", (sync.flat.numel,), dtype, where)
    for name in ("swarm/velocity", "swarm/pbest", "swarm/gbest") if pso else ():
        _expect(shard, name, (sync.flat.numel,), dtype, where)
    if sync.buffers.data is not None:
        data = sync.buffers.data
        _expect(shard, "model/buffers", tuple(data.shape), _np(data[:1]).dtype, where)
    state = sync.model.state_dict()
    for key in model_layout(sync)["other"]:
        _expect(shard, f"model/other/{key}", tuple(state[key].shape),
                _np(state[key].reshape(-1)[:1]).dtype, where)
    _expect(shard, "rng/torch_cpu", tuple(torch.get_rng_state().shape), np.dtype(np.uint8), where)
    _expect(shard, "loop/epoch_sums", (3,), np.dtype(np.float64), where)
    _check_optimizer(shard, sync, where)


def _check_optimizer(shard: Shard, sync: Synchronizer, where: str) -> None:
    name = type(sync.optimizer).__name__
    if shard.scalars["optimizer.class"] != name:
        raise UsageError(f"{where}: optimizer state is for {shard.scalars['optimizer.class']}, "
                         f"this run uses {name}")
    params = _optimizer_params(sync.optimizer)
    for key in shard.scalars:
        if not key.startswith("optimizer.") or key == "optimizer.class":
            continue
        index = key.split(".")[1] if key.count(".") >= 2 else ""
        if not (index.isdigit() and int(index) < len(params)):
            raise UsageError(f"{where}: optimizer state {key!r} names no parameter of the model")
    for key, array in shard.arrays.items():
        if not key.startswith("optimizer/"):
            continue
        index = key.split("/")[1]
        if not index.isdigit() or int(index) >= len(params):
            raise UsageError(f"{where}: optimizer state {key!r} names no parameter of the model")
        shape = tuple(params[int(index)].shape)
        if array.shape not in (shape, ()):
            raise UsageError(f"{where}: optimizer state {key!r} is {array.shape}, the parameter "
                             f"is {shape}")


# ---- restoring (after every rank agreed that its shard is good: nothing here may fail)

def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    # np.array, not np.ascontiguousarray: that one turns 0-d values into 1-d arrays.
    return torch.from_numpy(np.array(array, order="C")).to(like.device)


def restore_model(sync: Synchronizer, shard: Shard) -> None:
    """Position, float buffers and the other state_dict entries."""
    sync.flat.data.copy_(_tensor(shard.arrays["model/position"], sync.flat.data))
    if sync.buffers.data is not None:
        sync.buffers.data.copy_(_tensor(shard.arrays["model/buffers"], sync.buffers.data))
    state = sync.model.state_dict()
    for key in model_layout(sync)["other"]:
        state[key].copy_(_tensor(shard.arrays[f"model/other/{key}"], state[key]))


def restore_optimizer(sync: Synchronizer, shard: Shard) -> None:
    """Replace the optimizer's per-parameter state by the shard's (empty: fresh state)."""
    optimizer = sync.optimizer
    optimizer.state.clear()
    params = _optimizer_params(optimizer)
    for key, array in shard.arrays.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            param = params[int(index)]
            optimizer.state[param][name] = _tensor(array, param)
    for key, value in shard.scalars.items():
        if key.startswith("optimizer.") and key != "optimizer.class":
            _, index, name = key.split(".", 2)
            optimizer.state[params[int(index)]][name] = value


def restore_rng(sync: Synchronizer, shard: Shard) -> None:
    torch.set_rng_state(torch.from_numpy(shard.arrays["rng/torch_cpu"].copy()))
    cuda_state = shard.arrays.get("rng/torch_cuda")
    if cuda_state is not None and sync.flat.data.is_cuda:
        torch.cuda.set_rng_state(torch.from_numpy(cuda_state.copy()), sync.flat.data.device)


def restore_swarm(sync: PSOSync, shard: Shard) -> None:
    swarm = sync.swarm
    swarm.v.copy_(_tensor(shard.arrays["swarm/velocity"], swarm.v))
    swarm.pbest.copy_(_tensor(shard.arrays["swarm/pbest"], swarm.pbest))
    swarm.gbest.copy_(_tensor(shard.arrays["swarm/gbest"], swarm.gbest))
    swarm.restore_scalar_state({k[len("swarm."):]: v for k, v in shard.scalars.items()
                                if k.startswith("swarm.")})


def sync_scalars(shard: Shard) -> dict[str, Any]:
    return {k[len("sync."):]: v for k, v in shard.scalars.items() if k.startswith("sync.")}
