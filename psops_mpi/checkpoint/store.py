"""Files of a checkpoint: names, atomic writes, checksums, HDF5 shards and the metadata file.

A shard is a flat mapping ``{"model/position": ndarray, ...}`` plus scalars named the same way
(``"sync/steps"``: attribute ``steps`` of group ``sync``; a name without ``/`` is an attribute
of the file's root); this module turns it into an HDF5 file and back, and never runs code from
a file (HDF5 holds plain arrays; the metadata is JSON). Every way a file can be bad becomes one
:class:`~psops_mpi.errors.UsageError` line naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Shared file systems (Lustre, GPFS, NFS) often lack the POSIX locks HDF5 takes by default;
# must be set before h5py loads the library. Files are also opened with locking=False.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

import h5py
import numpy as np

from psops_mpi.errors import UsageError
from psops_mpi.metrics import jsonable

FORMAT = "psops_mpi-checkpoint"
VERSION = 2  # 2: one group per stateful part (psops_mpi 0.2)
METADATA = "metadata.json"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"
# Test hook: when set to a step, every rank stops for an hour in the middle of writing its
# shard of that step's checkpoint (after the first array, file still open) and leaves a
# marker file, so a test can kill the job at that moment. Never set it in real runs.
PAUSE_ENV = "PSOPS_MPI_TEST_PAUSE_IN_CHECKPOINT"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.h5"


@dataclass
class Shard:
    """One rank's state: arrays by HDF5 path and scalars (int, float, bool, str, None) by
    ``group/name`` path."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)


# ---- durable file operations

def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a crash of the node."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic_text(path: Path, text: str) -> None:
    """Write under a temporary name, flush to disk, then move into place."""
    part = path.with_name(path.name + ".part")
    with part.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)


# ---- shards

def _pause_for_test(step: int, folder: Path, rank: int) -> None:
    """Tests: every rank (``STEP``) or one (``STEP@RANK``) sleeps inside the write."""
    if os.environ.get(PAUSE_ENV) in (str(step), f"{step}@{rank}"):
        (folder / f"paused-rank-{rank}").touch()
        time.sleep(3600)


def write_shard(path: Path, shard: Shard, step: int) -> tuple[str, int]:
    """Write ``shard`` to ``path`` (via a temporary name), fsynced; return (sha256, bytes).

    The HDF5 file is built in memory and written with plain file I/O: HDF5 fails badly on a
    disk that fills under it (errors in destructors, then a segmentation fault, measured
    with h5py 3 on a full tmpfs), where a plain write raises one OSError. It costs one
    shard's size in memory while it is written, as reading a shard does.

    Raises:
        OSError: the file could not be written.
    """
    image = io.BytesIO()
    with h5py.File(image, "w") as fh:
        for name, array in shard.arrays.items():
            fh.create_dataset(name, data=array)
        for name, value in shard.scalars.items():
            group, _, leaf = name.rpartition("/")
            owner = fh.require_group(group) if group else fh
            owner.attrs[leaf] = h5py.Empty("f8") if value is None else value
    data = image.getbuffer()
    part = path.with_name(path.name + ".part")
    with part.open("wb") as out:
        half = len(data) // 2
        out.write(data[:half])
        _pause_for_test(step, path.parent, int(shard.scalars.get("rank", 0)))
        out.write(data[half:])
        out.flush()
        os.fsync(out.fileno())
    os.replace(part, path)
    return hashlib.sha256(data).hexdigest(), len(data)


def _scalar(value: Any) -> Any:
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def read_shard(path: Path, sha256: str, size: int) -> Shard:
    """Read a shard whole, check its size and checksum, then parse it from memory.

    Parsing the very bytes that were checked means nothing can change between check and use.
    """
    if not path.is_file():
        raise UsageError(f"checkpoint shard {path} is missing")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read checkpoint shard {path}: {exc.strerror}") from None
    if len(raw) != size:
        raise UsageError(f"checkpoint shard {path} has {len(raw)} bytes, the metadata says "
                         f"{size}: the file is truncated or was replaced")
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise UsageError(f"checkpoint shard {path} does not match its checksum in {METADATA}: "
                         "the file is damaged")
    shard = Shard()
    try:
        with h5py.File(io.BytesIO(raw), "r") as fh:
            shard.scalars = {k: _scalar(v) for k, v in fh.attrs.items()}
            fh.visititems(lambda name, obj: _collect(shard, name, obj))
    except Exception as exc:  # h5py raises OSError, KeyError, ValueError... for bad files
        raise UsageError(f"checkpoint shard {path} is not a readable HDF5 file "
                         f"({type(exc).__name__})") from None
    return shard


def _collect(shard: Shard, name: str, obj: h5py.HLObject) -> None:
    if isinstance(obj, h5py.Dataset):
        shard.arrays[name] = np.asarray(obj[()])  # 0-d datasets read as numpy scalars
    else:
        shard.scalars.update({f"{name}/{k}": _scalar(v) for k, v in obj.attrs.items()})


def verify_shard_file(path: Path, sha256: str, size: int) -> None:
    """Check a shard's size and checksum without parsing it."""
    if not path.is_file():
        raise UsageError(f"checkpoint shard {path} is missing")
    try:
        good = path.stat().st_size == size and sha256_of(path) == sha256
    except OSError as exc:
        raise UsageError(f"cannot read checkpoint shard {path}: {exc.strerror}") from None
    if not good:
        raise UsageError(f"checkpoint shard {path} does not match its size and checksum in "
                         f"{METADATA}: the file is damaged or truncated")


# ---- metadata

def write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    # inf/NaN become null: a fitness of null means "none yet"
    write_atomic_text(folder / METADATA, json.dumps(jsonable(meta), indent=1) + "\n")


REQUIRED_KEYS = {"format": str, "version": int, "step": int, "progress": (int, float),
                 "world_size": int, "shards": list, "config": dict}


def read_metadata(folder: Path) -> dict[str, Any]:
    """The metadata of the checkpoint in ``folder``, checked for what every reader needs (the
    parts' own keys are checked by whoever reads them)."""
    path = folder / METADATA
    if not path.is_file():
        raise UsageError(f"{folder} is not a complete checkpoint: it has no {METADATA}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {type(exc).__name__}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{path} is not a psops_mpi checkpoint's metadata")
    version = meta.get("version")
    if isinstance(version, int) and version != VERSION:
        newer = version > VERSION
        raise UsageError(
            f"{path} has format version {version}; this psops_mpi reads version {VERSION}: "
            + ("upgrade psops_mpi" if newer else "finish that run with the psops_mpi release "
               "that wrote it (0.1), or start this one fresh with --resume none"))
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UsageError(f"{path}: field {key!r} is missing or has the wrong type")
    shards = meta["shards"]
    if len(shards) != meta["world_size"] or not all(
            isinstance(s, dict) and isinstance(s.get("sha256"), str)
            and isinstance(s.get("bytes"), int) and s.get("rank") == i
            and isinstance(s.get("summary", {}), dict)
            for i, s in enumerate(shards)):
        raise UsageError(f"{path}: the shard list does not match world size "
                         f"{meta['world_size']}")
    return meta


# ---- finding checkpoints

def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder in ``root`` named step-N holding a metadata file, oldest
    first. Folders still being written have temporary names and no metadata: never listed.

    Age is the training progress the metadata records (epochs done, fractions included), not
    the step number: after a resume at another world size the step counter is rescaled, so a
    newer checkpoint may have a smaller step; equal progress (a resize that trained nothing
    yet) goes by the time the metadata was written. A metadata file that cannot be read counts
    as the newest, so that loading it reports the damage instead of silently falling back to
    an older checkpoint.
    """
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / METADATA).is_file():
            step = int(match.group(1))
            found.append((_progress(entry), _mtime(entry), step, entry))
    return [(step, folder) for _, _, step, folder in sorted(found)]


def _mtime(folder: Path) -> int:
    try:
        return (folder / METADATA).stat().st_mtime_ns
    except OSError:
        return 0


def _progress(folder: Path) -> float:
    try:
        return float(json.loads((folder / METADATA).read_text(encoding="utf-8"))["progress"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf
