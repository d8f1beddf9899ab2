"""A run's state as named stateful parts, and a part's state as arrays and scalars of a shard.

A part is anything with ``state_dict()`` / ``load_state_dict(state)`` (tensors and plain
scalars, nested dicts allowed), as torch modules and optimizers have, and optionally
``check_state(state, where)`` to refuse a state it cannot load before anything changes.
Part ``name``'s tensor ``a/b`` is the shard's array ``name/a/b``; its scalar ``c`` the
attribute ``c`` of group ``name``. This module also holds the parts torch objects need:
:class:`ModelPart`, :class:`OptimizerPart` and :class:`RNGPart`.

Shard contents of a training run (HDF5 paths):

    model/position      (N,)  the flat trainable parameters
    model/buffers       (B,)  the flat floating-point buffers (BatchNorm statistics), if any
    model/other/<key>         every other state_dict entry (integer buffers, frozen parameters)
    optimizer/<i>/<key>       the local optimizer's per-parameter state (SGD: momentum)
    rng/torch_cpu, rng/torch_cuda   global torch generator states
    sync/...                  the synchroniser's state_dict (its own layout)
    loop/...                  where the training loop is (step, epoch, this epoch's sums)
    precision/scaler          fp16 only: the loss scaler's scale and growth counter
    precision/skips           fp16 only: the steps the loss scaler skipped, so far
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from psops_mpi.checkpoint.store import Shard
from psops_mpi.errors import UsageError
from psops_mpi.flat import FlatBuffers, FlatParams, load_into


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def flatten(name: str, state: dict[str, Any], shard: Shard) -> None:
    """Add part ``name``'s state to ``shard`` (tensors as CPU arrays, views where possible)."""
    for key, value in state.items():
        path = f"{name}/{key}"
        if isinstance(value, dict):
            flatten(path, value, shard)
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            shard.arrays[path] = _numpy(value)
        else:
            shard.scalars[path] = value


def unflatten(name: str, shard: Shard) -> dict[str, Any]:
    """Part ``name``'s state from ``shard``, nested as the part gave it (arrays as numpy)."""
    state: dict[str, Any] = {}
    prefix = name + "/"
    for table in (shard.arrays, shard.scalars):
        for path, value in table.items():
            if path.startswith(prefix):
                *groups, leaf = path[len(prefix):].split("/")
                node = state
                for group in groups:
                    node = node.setdefault(group, {})
                node[leaf] = value
    return state


def _np_dtype(tensor: torch.Tensor) -> np.dtype:
    return torch.empty(0, dtype=tensor.dtype).numpy().dtype


def check_like(template: dict[str, Any], state: dict[str, Any], where: str,
               prefix: str = "") -> None:
    """Raise UsageError unless ``state`` holds every key of ``template``, each tensor as an
    array of the same shape and dtype."""
    for key, want in template.items():
        path = prefix + key
        if not isinstance(state, dict) or key not in state:
            raise UsageError(f"{where}: {path!r} is missing")
        got = state[key]
        if isinstance(want, dict):
            check_like(want, got, where, path + "/")
        elif isinstance(want, torch.Tensor) and not (
                isinstance(got, np.ndarray) and got.shape == tuple(want.shape)
                and got.dtype == _np_dtype(want)):
            shape, dtype = getattr(got, "shape", "?"), getattr(got, "dtype", type(got).__name__)
            raise UsageError(f"{where}: array {path!r} is {shape} {dtype}, this run needs "
                             f"{tuple(want.shape)} {_np_dtype(want)}")


def check_state(name: str, part: Stateful, state: dict[str, Any], where: str) -> None:
    """Part ``name``'s own check if it has one, else: shaped like its current state, but for
    the keys the part lists in ``optional_state_keys`` (added since older checkpoints were
    written: the part loads them with a default)."""
    own = getattr(part, "check_state", None)
    if own is not None:
        own(state, where)
    else:
        optional = set(getattr(part, "optional_state_keys", ()))
        template = {k: v for k, v in part.state_dict().items() if k not in optional}
        check_like(template, state, where, f"{name}/")


class ModelPart:
    """A model whose parameters and float buffers are views of flat buffers: saved as the two
    flat vectors plus every other state_dict entry, with the names and shapes (the layout) that
    map them back to a state_dict without the model's code."""

    def __init__(self, model: nn.Module, flat: FlatParams, buffers: FlatBuffers) -> None:
        self.model, self.flat, self.buffers = model, flat, buffers

    def layout(self) -> dict[str, Any]:
        keys = list(self.model.state_dict().keys())
        params = [(n, list(p.shape)) for n, p in self.model.named_parameters() if p.requires_grad]
        buffers = [(n, list(b.shape), n in keys) for n, b in self.model.named_buffers()
                   if b.is_floating_point()]
        flat_names = {n for n, _ in params} | {n for n, _, _ in buffers}
        return {"params": params, "buffers": buffers,
                "other": [k for k in keys if k not in flat_names], "state_dict_keys": keys}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"position": self.flat.data}
        if self.buffers.data is not None:
            state["buffers"] = self.buffers.data
        every = self.model.state_dict()
        other = {key: every[key] for key in self.layout()["other"]}
        if other:
            state["other"] = other
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_into(self.flat.data, state["position"])
        if self.buffers.data is not None:
            load_into(self.buffers.data, state["buffers"])
        every = self.model.state_dict()
        for key, value in state.get("other", {}).items():
            load_into(every[key], value)


class OptimizerPart:
    """A torch optimizer's per-parameter state (SGD: the momentum buffers; AdamW: the step
    count and both moments), by parameter index: the model's order when ``params`` gives it
    (AdamW's groups list the parameters in another), else the groups'. Hyperparameters are
    not saved: they come from the config (the loop sets the rate)."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 params: list[torch.Tensor] | None = None) -> None:
        self.optimizer = optimizer
        self.params = params if params is not None else [
            p for group in optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"class": type(self.optimizer).__name__}
        for i, param in enumerate(self.params):
            if self.optimizer.state.get(param):
                state[str(i)] = dict(self.optimizer.state[param])
        return state

    def check_state(self, state: dict[str, Any], where: str) -> None:
        mine = type(self.optimizer).__name__
        if state.get("class") != mine:
            raise UsageError(f"{where}: optimizer state is for {state.get('class')}, this run "
                             f"uses {mine}")
        for index, entries in state.items():
            if index == "class":
                continue
            if not (index.isdigit() and int(index) < len(self.params)):
                raise UsageError(f"{where}: optimizer state {index!r} names no parameter of "
                                 "the model")
            shape = tuple(self.params[int(index)].shape)
            for key, value in entries.items():
                if isinstance(value, np.ndarray) and value.shape not in (shape, ()):
                    raise UsageError(f"{where}: optimizer state {index}/{key} is {value.shape}, "
                                     f"the parameter is {shape}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.state.clear()
        for index, entries in state.items():
            if index == "class":
                continue
            param = self.params[int(index)]
            self.optimizer.state[param] = {
                key: (torch.from_numpy(np.array(value)).to(
                    # Adam's step count stays on the CPU, as torch's own loading keeps it
                    "cpu" if key == "step" else param.device)
                      if isinstance(value, np.ndarray) else value)
                for key, value in entries.items()}


class RNGPart:
    """The global torch generators (CPU, and the rank's GPU when it has one)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        state = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def check_state(self, state: dict[str, Any], where: str) -> None:
        check_like({"torch_cpu": torch.get_rng_state()}, state, where, "rng/")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(torch.from_numpy(np.array(state["torch_cpu"])))
        if "torch_cuda" in state and self.device.type == "cuda":  # a GPU run resumed on GPUs
            torch.cuda.set_rng_state(torch.from_numpy(np.array(state["torch_cuda"])),
                                     self.device)
