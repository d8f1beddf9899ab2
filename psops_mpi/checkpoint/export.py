"""Taking the result out of a checkpoint: the global best as a PyTorch state_dict, and a
readable summary. Neither needs MPI nor the model's code: the metadata names every tensor."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psops_mpi.checkpoint import store
from psops_mpi.config import UsageError


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete one in a checkpoint directory."""
    folder = Path(path)
    if (folder / store.METADATA).is_file():
        return folder
    found = store.complete_checkpoints(folder)
    if found:
        return found[-1][1]
    raise UsageError(f"{path} is neither a complete checkpoint nor a folder of them")


def answer_shard(meta: dict[str, Any]) -> tuple[int, bool]:
    """(shard to read, whether its global best is the answer). PSO-PS: the global best's
    owner (its BatchNorm statistics go with it); PA/SSGD, or PSO-PS before the first round:
    rank 0's position (equal on all ranks after a round)."""
    owner = meta["gbest"].get("owner", -1)
    if meta["algo"] == "pso-ps" and isinstance(owner, int) and 0 <= owner < meta["world_size"]:
        return owner, True
    return 0, False


def _slices(flat: np.ndarray, entries: list, what: str) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, shape, *_ in entries:
        count = math.prod(shape)
        out[name] = flat[offset:offset + count].reshape(shape)
        offset += count
    if offset != flat.size:
        raise UsageError(f"the checkpoint's {what} layout ({offset} values) does not match its "
                         f"arrays ({flat.size} values)")
    return out


def export_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """The answer of the run in checkpoint ``path`` as a state_dict for its model."""
    folder = resolve(path)
    meta = store.read_metadata(folder)
    index, use_gbest = answer_shard(meta)
    entry = meta["shards"][index]
    shard = store.read_shard(folder / store.shard_name(index), entry["sha256"], entry["bytes"])
    layout = meta["layout"]
    try:
        position = shard.arrays["swarm/gbest" if use_gbest else "model/position"]
        tensors = _slices(position, layout["params"], "parameter")
        buffers = shard.arrays.get("model/buffers", np.zeros(0, position.dtype))
        tensors.update({name: array for name, array in
                        _slices(buffers, layout["buffers"], "buffer").items()
                        if name in layout["state_dict_keys"]})
        tensors.update({key: shard.arrays[f"model/other/{key}"] for key in layout["other"]})
        return OrderedDict((key, torch.from_numpy(np.array(tensors[key])))
                           for key in layout["state_dict_keys"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {folder} lacks what a state_dict needs ({exc})") from None


def inspect_lines(path: str | Path) -> tuple[list[str], bool]:
    """A readable summary, and whether every shard matched its checksum."""
    folder = resolve(path)
    meta = store.read_metadata(folder)
    gbest = meta["gbest"]
    lines = [
        f"checkpoint   {folder} (written {meta.get('created', '?')})",
        f"position     step {meta['step']}, epoch {meta['epoch'] + 1}, step "
        f"{meta['step_in_epoch']} of {meta['steps_per_epoch']}, round {meta.get('round')}",
        f"run          {meta['algo']} on {meta['dataset']}, model {meta['model']}, "
        f"{meta['num_params']:,} {meta['dtype']} parameters, {meta['world_size']} rank(s)",
    ]
    if meta["algo"] == "pso-ps":
        lines.append(f"global best  fitness {store.fitness(gbest.get('fitness')):.6g} "
                     f"(rank {gbest.get('owner')})")
    lines.append("rank  personal best fitness        bytes  sha256")
    all_ok = True
    for entry in meta["shards"]:
        try:
            store.verify_shard_file(folder / store.shard_name(entry["rank"]), entry["sha256"],
                                    entry["bytes"])
            status = "ok"
        except UsageError:
            status, all_ok = "DAMAGED OR MISSING", False
        fit = entry.get("pbest_fitness")
        fit_text = "-" if fit is None else f"{fit:.6g}"
        lines.append(f"{entry['rank']:>4}  {fit_text:>21}  {entry['bytes']:>11,}  {status}")
    lines.append("config")
    config = meta["config"]
    for key, value in {**config, **config.get("pso", {})}.items():
        if key != "pso":
            lines.append(f"  {key} = {value!r}")
    return lines, all_ok
