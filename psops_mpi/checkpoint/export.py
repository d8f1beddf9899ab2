"""Taking the result out of a checkpoint: the answer as a PyTorch state_dict, and a readable
summary. Neither needs MPI nor the model's code: the metadata names every tensor."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psops_mpi.checkpoint import store
from psops_mpi.errors import UsageError


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete one in a checkpoint directory."""
    folder = Path(path)
    if (folder / store.METADATA).is_file():
        return folder
    found = store.complete_checkpoints(folder)
    if found:
        return found[-1][1]
    raise UsageError(f"{path} is neither a complete checkpoint nor a folder of them")


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
    """The answer of the run in checkpoint ``path`` as a state_dict for its model: the weights
    its metadata names as the answer (what the synchroniser evaluates: one rank's array, or
    rank -1, the mean over all ranks), with the buffers of the rank that holds them (rank 0
    for a mean)."""
    folder = resolve(path)
    meta = store.read_metadata(folder)
    try:
        index, answer = int(meta["answer"]["rank"]), str(meta["answer"]["array"])
        layout = meta["layout"]
        entry = meta["shards"][max(index, 0)]  # -1: the mean over all ranks
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UsageError(f"checkpoint {folder}: its metadata lacks the answer or the model "
                         f"layout ({type(exc).__name__}: {exc})") from None
    shard = store.read_shard(folder / store.shard_name(max(index, 0)), entry["sha256"],
                             entry["bytes"])
    try:
        position = shard.arrays[answer] if index >= 0 else _mean_over_shards(folder, meta, answer)
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


def _mean_over_shards(folder: Path, meta: dict[str, Any], key: str) -> np.ndarray:
    """The mean of array ``key`` over every rank's shard (an answer of rank -1)."""
    total = None
    for entry in meta["shards"]:
        shard = store.read_shard(folder / store.shard_name(entry["rank"]), entry["sha256"],
                                 entry["bytes"])
        array = shard.arrays[key]
        total = array.astype(np.float64) if total is None else total + array
    assert total is not None
    return (total / len(meta["shards"])).astype(array.dtype)


def _shown(value: Any) -> str:
    if isinstance(value, float) or value is None:
        return "-" if value is None else f"{value:.6g}"
    return str(value)


def inspect_lines(path: str | Path) -> tuple[list[str], bool]:
    """A readable summary, and whether every shard matched its checksum."""
    folder = resolve(path)
    meta = store.read_metadata(folder)
    lines = [
        f"checkpoint   {folder} (written {meta.get('created', '?')})",
        f"position     step {meta['step']}, epoch {meta.get('epoch', 0) + 1}, step "
        f"{meta.get('step_in_epoch')} of {meta.get('steps_per_epoch')}, round {meta.get('round')}",
        f"run          {meta.get('algo')} on {meta.get('dataset')}, model {meta.get('model')}, "
        f"{meta.get('num_params', 0):,} {meta.get('dtype')} parameters, "
        f"{meta['world_size']} rank(s)",
    ]
    summary = meta.get("sync") or {}
    if summary:
        lines.append("synchroniser " + ", ".join(f"{k} {_shown(v)}" for k, v in summary.items()))
    columns = sorted({key for entry in meta["shards"] for key in entry.get("summary", {})})
    lines.append("rank  " + "".join(f"{c:>21}  " for c in columns) + "      bytes  sha256")
    all_ok = True
    for entry in meta["shards"]:
        try:
            store.verify_shard_file(folder / store.shard_name(entry["rank"]), entry["sha256"],
                                    entry["bytes"])
            status = "ok"
        except UsageError:
            status, all_ok = "DAMAGED OR MISSING", False
        cells = "".join(f"{_shown(entry.get('summary', {}).get(c)):>21}  " for c in columns)
        lines.append(f"{entry['rank']:>4}  {cells}{entry['bytes']:>11,}  {status}")
    lines.extend(_answer_lines(meta))
    legend = meta.get("legend") or {}  # the synchroniser's words; older checkpoints have none
    if legend:
        lines.append("what the figures are")
        lines.extend(f"  {key}: {text}" for key, text in legend.items())
    lines.append("config")
    config = meta["config"]
    for key, value in _flat_items(config):
        lines.append(f"  {key} = {value!r}")
    return lines, all_ok


def _answer_lines(meta: dict[str, Any]) -> list[str]:
    """Which weights ``export`` writes, as the metadata names them."""
    answer = meta.get("answer")
    if not isinstance(answer, dict):
        return []
    rank, array = answer.get("rank"), answer.get("array")
    where = (f"the mean of {array} over every rank" if rank == -1
             else f"{array} of rank {rank}")
    return [f"answer       {where} (what export writes)"]


def _flat_items(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """Settings with nested groups (a dict value) listed inline."""
    out: list[tuple[str, Any]] = []
    for key, value in config.items():
        out.extend(_flat_items(value) if isinstance(value, dict) else [(key, value)])
    return out
