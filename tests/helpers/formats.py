"""Dataset files in their real on-disk formats, written by tests (never downloaded).

IDX (MNIST, Fashion-MNIST; gzipped or plain) and CIFAR-10 (python pickles, including the
exact bytes Python 2's cPickle wrote, and the binary version).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000080N, big-endian dims, raw bytes."""
    header = struct.pack(">I", 0x800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_idx_set(
    folder: Path, gz: bool = True, n_train: int = 12, n_test: int = 5
) -> dict[str, np.ndarray]:
    """Write the four MNIST-style files; return the arrays written, keyed by base name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_FILES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_FILES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_file(folder / name, idx_bytes(arr), gz)
    return arrays


def cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote it: py2 str (SHORT_BINSTRING) keys and payload."""

    def s(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text

    def i(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    raw = data.tobytes()
    dtype = (
        b"cnumpy\ndtype\n("
        + s(b"u1")
        + i(0)
        + i(1)
        + b"tR("
        + i(3)
        + s(b"|")
        + b"NNN"
        + i(-1)
        + i(-1)
        + i(0)
        + b"tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n("
        + i(0)
        + b"t"
        + s(b"b")
        + b"tR("
        + i(1)
        + b"("
        + b"".join(i(d) for d in data.shape)
        + b"t"
        + dtype
        + b"\x89T"
        + struct.pack("<I", len(raw))
        + raw
        + b"tb"
    )
    return (
        b"\x80\x02}("
        + s(b"batch_label")
        + s(b"training batch 1 of 5")
        + s(b"labels")
        + b"]("
        + b"".join(i(v) for v in labels)
        + b"e"
        + s(b"data")
        + array
        + b"u."
    )


def write_cifar_py(folder: Path, n: int = 4, style: str = "bytes") -> list[np.ndarray]:
    """Write the six python-version batches; return the data arrays in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, name in enumerate(CIFAR_FILES):
        data, labels = cifar_arrays(n, k)
        if style == "py2":
            payload = py2_pickle(data, labels)
        else:
            key = (lambda t: t.encode()) if style == "bytes" else str
            payload = pickle.dumps({key("data"): data, key("labels"): labels}, protocol=2)
        (folder / name).write_bytes(payload)
        written.append(data)
    return written


def write_cifar_bin(folder: Path, n: int = 4) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, name in enumerate(CIFAR_FILES):
        data, labels = cifar_arrays(n, k)
        records = np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
        written.append(data)
    return written


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def write_fashion_pngs(root: Path, per_class: int, test_per_class: int) -> None:
    """Real Fashion-MNIST images as PNG files in torchvision's ImageFolder layout:
    ``root/{train,test}/<class>/<index>.png``, the first ``per_class`` images of each class
    from the training files and ``test_per_class`` from the test files."""
    from PIL import Image

    for split, prefix, count in (("train", "train", per_class), ("test", "t10k", test_per_class)):
        with gzip.open(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz") as fh:
            images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz") as fh:
            labels = np.frombuffer(fh.read(), np.uint8, offset=8)
        for label in range(10):
            folder = root / split / f"class-{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in np.flatnonzero(labels == label)[:count]:
                Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
