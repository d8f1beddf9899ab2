"""Dataset files: readers for IDX (MNIST, Fashion-MNIST), CIFAR-10 (python and binary), the
fortunes text corpus and the generated sets, each loaded whole as tensors on the rank's device.

Every loader checks its files strictly and reports a bad or missing file as one
:class:`~psops_mpi.config.UsageError` line naming the file, never as a raw traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import math
import pickle
import random
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from psops_mpi.cache import cache_dir, write_atomically
from psops_mpi.errors import UsageError


@dataclass
class Dataset:
    """A train/test split held as normalised float32 inputs and int64 labels on one device."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool
    """Whether training batches get a random pad-4 crop and horizontal flip (cifar10)."""
    task: str = "classification"
    """What the batches are for (a :mod:`psops_mpi.tasks` name): a language model's inputs
    and targets are (N, T) token ids, ``num_classes`` its vocabulary."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input sample."""
        return tuple(self.x_train.shape[1:])


DEFAULT_DATA_DIRS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist",
                                     "fortunes": "/usr/share/games/fortunes"}

_SOURCES = {
    "mnist": "Yann LeCun's MNIST page (http://yann.lecun.com/exdb/mnist/) or any MNIST mirror",
    "fashion-mnist": "Zalando's fashion-mnist repository "
    "(https://github.com/zalandoresearch/fashion-mnist) or Debian's dataset-fashion-mnist package",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html (python or binary version)",
    "fortunes": "Debian's fortunes package (apt-get install fortunes)",
}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_SUBDIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # torchvision's layout
_NORM = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_CIFAR_PY = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_CIFAR_BIN = tuple(f"{n}.bin" for n in _CIFAR_PY)
_NUM_CLASSES = 10
_SYNTHETIC_SEED = 1234  # fixed, so the synthetic set is the same whatever --seed says

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _normalise(images: np.ndarray, name: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1] then standardised per channel."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _NORM[name])
    return torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(mean).div_(std)


def _labels(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())


# ---------------------------------------------------------------------------- IDX (MNIST)

def _read_bytes(path: Path, source: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise UsageError(f"cannot read {path} ({_one_line(exc)}); "
                         f"replace it with a fresh copy from {source}") from None


def _parse_idx(buf: bytes, path: Path, ndim: int, source: str) -> np.ndarray:
    """Strictly parse one IDX file of uint8 data with ``ndim`` dimensions."""
    def bad(why: str) -> UsageError:
        return UsageError(f"{path} is not a valid IDX file ({why}); "
                          f"replace it with a fresh copy from {source}")

    header = 4 + 4 * ndim
    if len(buf) < header:
        raise bad(f"only {len(buf)} bytes, shorter than its {header}-byte header")
    magic, want = int.from_bytes(buf[:4], "big"), 0x800 | ndim
    if magic != want:
        raise bad(f"magic number 0x{magic:08x}, expected 0x{want:08x}")
    dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", count=ndim, offset=4))
    if len(buf) - header != math.prod(dims):
        raise bad(f"its header promises {math.prod(dims)} data bytes but it holds "
                  f"{len(buf) - header}")
    return np.frombuffer(buf, np.uint8, offset=header).reshape(dims)


def _find_idx_files(name: str, root: Path) -> list[Path]:
    expected = ", ".join(f"{f}.gz" for f in _IDX_FILES)
    if not root.is_dir():
        raise UsageError(f"{name} data folder {root} does not exist; point --data-dir at a "
                         f"folder holding {expected} (from {_SOURCES[name]})")
    folders = (root, root / _IDX_SUBDIRS[name] / "raw")
    for folder in folders:
        paths = [folder / f"{f}.gz" if (folder / f"{f}.gz").is_file() else folder / f
                 for f in _IDX_FILES]  # prefer the usual gzipped file, else the plain one
        if all(p.is_file() for p in paths):
            return paths
    raise UsageError(f"{name} files not found: expected {expected} (gzipped or plain) in "
                     f"{folders[0]} or {folders[1]}; get them from {_SOURCES[name]}")


def _idx_pair(images: Path, labels: Path, source: str) -> tuple[np.ndarray, np.ndarray]:
    x = _parse_idx(_read_bytes(images, source), images, 3, source)
    y = _parse_idx(_read_bytes(labels, source), labels, 1, source)
    if x.shape[1:] != (28, 28):
        raise UsageError(f"{images} holds {x.shape[1]}x{x.shape[2]} images, expected 28x28; "
                         f"replace it with a fresh copy from {source}")
    if len(x) != len(y):
        raise UsageError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; "
                         f"replace both with fresh copies from {source}")
    if len(y) and int(y.max()) >= _NUM_CLASSES:
        raise UsageError(f"{labels} holds label {int(y.max())}, expected 0..9; "
                         f"replace it with a fresh copy from {source}")
    return x[:, None], y


def _load_idx(name: str, data_dir: str | None) -> Split:
    if data_dir is None and name not in DEFAULT_DATA_DIRS:
        raise UsageError(f"the {name} dataset needs --data-dir pointing at a folder holding "
                         f"{', '.join(f'{f}.gz' for f in _IDX_FILES)} (from {_SOURCES[name]})")
    paths = _find_idx_files(name, Path(data_dir or DEFAULT_DATA_DIRS[name]).expanduser())
    x_tr, y_tr = _idx_pair(paths[0], paths[1], _SOURCES[name])
    x_te, y_te = _idx_pair(paths[2], paths[3], _SOURCES[name])
    return _normalise(x_tr, name), _labels(y_tr), _normalise(x_te, name), _labels(y_te)


# ---------------------------------------------------------------------------- CIFAR-10

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, 'latin1');
    # any other codec is not something a CIFAR batch needs.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codec {encoding!r}")
    return text.encode("latin1")


def _safe_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2 moved the array internals to numpy._core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    found = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode, ("codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        table.update({(f"{core}.multiarray", k): v for k, v in found.items()})
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the few globals a pickled numpy array needs; refuses anything else."""

    def __init__(self, fh: IO[bytes], path: Path) -> None:
        super().__init__(fh, encoding="bytes")
        self.path = path
        self.allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise UsageError(f"psops_mpi refuses to load {self.path}: it is not a plain CIFAR-10 "
                         f"batch (it asks for {module}.{name}); replace it with a fresh copy "
                         f"from {_SOURCES['cifar10']}")


def _item(batch: dict, key: str) -> object:
    return batch[key.encode()] if key.encode() in batch else batch.get(key)


def _cifar_batch_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = _CifarUnpickler(fh, path).load()
    except UsageError:
        raise
    except Exception as exc:  # a corrupt pickle can fail in many ways; report them all alike
        raise UsageError(f"cannot read {path} as a CIFAR-10 batch ({_one_line(exc)}); replace "
                         f"it with a fresh copy from {_SOURCES['cifar10']}") from None
    data = _item(batch, "data") if isinstance(batch, dict) else None
    labels = _item(batch, "labels") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072 and isinstance(labels, (list, tuple, np.ndarray))):
        raise UsageError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' "
                         f"(N x 3072 uint8) and 'labels'; get the files from "
                         f"{_SOURCES['cifar10']}")
    try:
        return data, np.asarray(labels)
    except ValueError:  # ragged nested lists: reported as bad labels by _cifar_batch
        return data, np.zeros(0)


def _cifar_batch_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path, _SOURCES["cifar10"])
    if not raw or len(raw) % 3073:
        raise UsageError(f"{path} holds {len(raw)} bytes, expected a non-zero multiple of "
                         f"3073 (1 label + 3072 pixels per image); replace it with a fresh "
                         f"copy from {_SOURCES['cifar10']}")
    records = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
    return records[:, 1:], records[:, 0]


def _cifar_batch(path: Path, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    data, labels = (_cifar_batch_bin if binary else _cifar_batch_py)(path)
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise UsageError(f"{path} holds {len(data)} images but its labels are not "
                         f"{len(data)} integers; replace it from {_SOURCES['cifar10']}")
    if len(labels) and not (labels.min() >= 0 and labels.max() < _NUM_CLASSES):
        raise UsageError(f"{path} holds labels outside 0..9; replace it with a fresh copy "
                         f"from {_SOURCES['cifar10']}")
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar(data_dir: str | None) -> tuple[list[Path], bool]:
    names = ", ".join(_CIFAR_PY)
    if data_dir is None or not Path(data_dir).expanduser().is_dir():
        where = "needs --data-dir" if data_dir is None else f"data folder {data_dir} not found"
        raise UsageError(f"cifar10 {where}: give the cifar-10-batches-py folder (or its parent) "
                         f"holding {names}, from {_SOURCES['cifar10']}")
    root = Path(data_dir).expanduser()
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-10-batches-bin"):
        for binary, files in ((False, _CIFAR_PY), (True, _CIFAR_BIN)):
            if all((folder / f).is_file() for f in files):
                return [folder / f for f in files], binary
    raise UsageError(f"cifar10 files not found: expected {names} (or the .bin versions) in "
                     f"{root}, {root / 'cifar-10-batches-py'} or {root / 'cifar-10-batches-bin'}"
                     f"; get them from {_SOURCES['cifar10']}")


def _load_cifar10(data_dir: str | None) -> Split:
    paths, binary = _find_cifar(data_dir)
    train = [_cifar_batch(p, binary) for p in paths[:-1]]
    x_te, y_te = _cifar_batch(paths[-1], binary)
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return (_normalise(x_tr, "cifar10"), _labels(y_tr),
            _normalise(x_te, "cifar10"), _labels(y_te))


# ---------------------------------------------------------------------------- fortunes (text)

FORTUNE_CONTEXT = 128
"""Tokens (bytes) per fortunes sample: x is a window of this many, y the same shifted by one."""
FORTUNE_VOCAB = 256  # byte-level: every UTF-8 byte is a token, no tokenizer
FORTUNE_SEPARATOR = b"%\n"
"""Joins a split's entries, as the fortune files do: the model learns where an entry ends."""
_FORTUNE_TEST_SHARE = 20  # one entry in 20 (by a hash of its text) is a test entry
_FORTUNE_DELIMITER = re.compile(rb"^%\n", re.MULTILINE)  # a line holding only "%"


def _fortune_files(folder: Path) -> list[Path]:
    """The plain fortune files of ``folder``, sorted: not the ``.dat`` indexes (strfile's),
    the ``.u8`` copies or links (UTF-8 twins of the plain files), subfolders or hidden files."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix not in (".dat", ".u8") and not p.name.startswith(".")
                  and p.is_file())


def _fortune_entries(folder: Path) -> list[bytes]:
    """Every distinct non-blank entry of the fortune files in ``folder``, in file order.

    Raises:
        UsageError: the folder is missing, a file cannot be read, or there is no entry.
    """
    hint = "install Debian's fortunes package (apt-get install fortunes) or point --data-dir " \
        "at a folder of fortune files"
    if not folder.is_dir():
        raise UsageError(f"fortunes data folder {folder} does not exist; {hint}")
    entries: dict[bytes, None] = {}  # an entry found twice (124 are) counts once
    for path in _fortune_files(folder):
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {path} ({_one_line(exc)}); {hint}") from None
        for entry in _FORTUNE_DELIMITER.split(text):
            if entry.strip():
                entries.setdefault(entry.rstrip(b"\n") + b"\n")
    if not entries:
        raise UsageError(f"fortunes data folder {folder} holds no fortune entries (text files "
                         f"of entries separated by lines holding only %); {hint}")
    return list(entries)


def _is_fortune_test_entry(entry: bytes) -> bool:
    """Whether ``entry`` belongs to the test split: fixed by its text (a CRC-32), so the split
    is the same on every rank and run, and an entry found twice is never on both sides."""
    return zlib.crc32(entry) % _FORTUNE_TEST_SHARE == 0


def _fortune_windows(entries: list[bytes], folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries joined by the separator, cut into non-overlapping windows of T + 1 bytes:
    (N, T) inputs and the (N, T) next bytes; the tail shorter than a window is dropped."""
    data = np.frombuffer(FORTUNE_SEPARATOR.join(entries), dtype=np.uint8)
    num_windows = len(data) // (FORTUNE_CONTEXT + 1)
    if num_windows == 0:
        raise UsageError(f"fortunes data folder {folder} holds too little text for a split of "
                         f"{FORTUNE_CONTEXT + 1}-byte windows; install Debian's fortunes package "
                         f"(apt-get install fortunes) or point --data-dir at more fortune files")
    windows = data[: num_windows * (FORTUNE_CONTEXT + 1)].reshape(num_windows, -1)
    tokens = torch.from_numpy(windows.astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _load_fortunes(data_dir: str | None) -> Split:
    """Byte-level next-token windows of the fortune cookies (Debian's fortunes package: about
    2.5 MB of English in some 15,000 entries); about one entry in 20 is held out for testing."""
    folder = Path(data_dir or DEFAULT_DATA_DIRS["fortunes"]).expanduser()
    entries = _fortune_entries(folder)  # 0.1 s: fast enough to need no cache
    test = [e for e in entries if _is_fortune_test_entry(e)]
    train = [e for e in entries if not _is_fortune_test_entry(e)]
    return (*_fortune_windows(train, folder), *_fortune_windows(test, folder))


# ---------------------------------------------------------------------------- generated sets

def _load_mnist1d(data_dir: str | None) -> Split:
    """MNIST-1D as its package makes it, from the cache when this version made it before.

    Making it takes about 4 s per process (importing scipy, then 5,000 interpolations): at 16
    ranks on one node that was most of a short run's start. The arrays are the same on every
    run, so the first run keeps them in :func:`psops_mpi.cache.cache_dir`, named by the
    package's version; a cache file that cannot be read as the expected arrays is made anew.
    """
    path = cache_dir() / f"mnist1d-{importlib.metadata.version('mnist1d')}-v1.npz"
    arrays = _read_mnist1d_cache(path)
    if arrays is None:
        arrays = _make_mnist1d()
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            write_atomically(path, lambda tmp: _save_npz(tmp, arrays))

    def x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).unsqueeze(1)

    return x(arrays["x"]), _labels(arrays["y"]), x(arrays["x_test"]), _labels(arrays["y_test"])


_MNIST1D_ARRAYS = {"x": ((4000, 40), np.float32), "y": ((4000,), np.int64),
                   "x_test": ((1000, 40), np.float32), "y_test": ((1000,), np.int64)}


def _make_mnist1d() -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # slow import; only needed here

    # make_dataset reseeds the global RNGs; loading data must not change the caller's streams.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(d[k], dtype=dtype) for k, (_, dtype) in _MNIST1D_ARRAYS.items()}


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if the file is missing or not what this loader writes."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _MNIST1D_ARRAYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    if any(arrays[k].shape != shape or arrays[k].dtype != dtype
           for k, (shape, dtype) in _MNIST1D_ARRAYS.items()):
        return None
    if not all(np.isfinite(arrays[k]).all() for k in ("x", "x_test")):
        return None
    return arrays


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as fh:  # a file object: np.savez would add ".npz" to a bare name
        np.savez(fh, **arrays)


def _load_synthetic(data_dir: str | None) -> Split:
    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    means = torch.randn(_NUM_CLASSES, 32, generator=g) * 1.5

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, _NUM_CLASSES, (n,), generator=g)
        return means[y] + torch.randn(n, 32, generator=g), y

    return (*draw(2048), *draw(512))


_LOADERS: dict[str, Callable[[str | None], Split]] = {
    "mnist1d": _load_mnist1d,
    "mnist": lambda d: _load_idx("mnist", d),
    "fashion-mnist": lambda d: _load_idx("fashion-mnist", d),
    "cifar10": _load_cifar10,
    "synthetic": _load_synthetic,
    "fortunes": _load_fortunes,
}


@dataclass(frozen=True)
class _Kind:
    """What a built-in set's tensors are: the classes (or vocabulary), augmentation, task."""

    num_classes: int = _NUM_CLASSES
    augment: bool = False
    task: str = "classification"


_KINDS: dict[str, _Kind] = {
    "cifar10": _Kind(augment=True),
    "fortunes": _Kind(num_classes=FORTUNE_VOCAB, task="language-model"),
}  # the others: ten classes, no augmentation


BUILT_IN_SETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, data_dir: str | None, device: torch.device | str = "cpu") -> Dataset:
    """Load a dataset by name and move it to ``device``.

    Args:
        name: one of mnist1d, mnist, fashion-mnist, cifar10, synthetic, fortunes.
        data_dir: folder with the dataset files (mnist, fashion-mnist, cifar10, fortunes);
            else ignored.
        device: where every tensor ends up.

    Raises:
        UsageError: unknown name, or missing or corrupt files.
    """
    if name not in _LOADERS:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(_LOADERS)}")
    x_tr, y_tr, x_te, y_te = _LOADERS[name](data_dir)
    kind = _KINDS.get(name, _Kind())
    return Dataset(name, x_tr.to(device), y_tr.to(device), x_te.to(device), y_te.to(device),
                   num_classes=kind.num_classes, augment=kind.augment, task=kind.task)
