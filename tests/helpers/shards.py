"""Damaging checkpoint shards the way a disk or a copy can: one value changed inside an array,
with the HDF5 structure intact, so only the checksum can tell."""

from __future__ import annotations

from pathlib import Path

import h5py


def flip_in_dataset(path: Path, name: str = "model/position", index: int = 0) -> None:
    """Flip a bit of element ``index`` of dataset ``name`` in the file's bytes: in the data
    region (found with h5py's ``get_offset``), not the header. h5py then still opens the file
    and returns the array with that one element changed (a float's exponent bit: by far)."""
    with h5py.File(path, "r") as fh:
        dataset = fh[name]
        offset = dataset.id.get_offset()  # None for chunked or compact storage
        itemsize = dataset.dtype.itemsize
        assert offset is not None and index < dataset.size, (name, offset, dataset.shape)
    data = bytearray(path.read_bytes())
    data[offset + (index + 1) * itemsize - 1] ^= 0x40  # little-endian: the high byte
    path.write_bytes(bytes(data))
