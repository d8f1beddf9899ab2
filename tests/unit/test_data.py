"""Unit tests of psops_mpi.data: the file readers, their errors, sharding and augmentation.

Every dataset file is written here, in its real on-disk format, inside ``tmp_path``.
"""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from psops_mpi.cache import cache_dir
from psops_mpi.data import (
    DEFAULT_DATA_DIRS,
    Dataset,
    ShardedBatches,
    eval_shard,
    holdout_batch,
    load_dataset,
)
from psops_mpi.data.batches import _crop_flip
from psops_mpi.errors import UsageError
from tests.helpers.formats import (
    IDX_FILES,
    cifar_arrays,
    idx_bytes,
    write_cifar_bin,
    write_cifar_py,
    write_file,
    write_idx_set,
)

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _usage_error(call: Callable[[], object]) -> str:
    """Run ``call``, expect a UsageError, and return its one-line message."""
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- IDX writers

def test_mnist_gz_values_and_normalisation(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path)
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and not ds.augment
    raw = torch.from_numpy(arrays[IDX_FILES[0]]).float().unsqueeze(1)
    torch.testing.assert_close(ds.x_train, (raw / 255 - 0.1307) / 0.3081)
    assert ds.y_test.tolist() == arrays[IDX_FILES[3]].tolist()


def test_fashion_plain_files_in_torchvision_subfolder(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "FashionMNIST" / "raw", gz=False)
    ds = load_dataset("fashion-mnist", str(tmp_path))
    raw = torch.from_numpy(arrays[IDX_FILES[2]]).float().unsqueeze(1)
    torch.testing.assert_close(ds.x_test, (raw / 255 - 0.2860) / 0.3530)
    assert ds.y_train.tolist() == arrays[IDX_FILES[1]].tolist()


def _bad_magic(p: Path) -> None:
    p.write_bytes(b"\x00\x00\x08\x02" + p.read_bytes()[4:])


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-7])


def _trailing(p: Path) -> None:
    p.write_bytes(p.read_bytes() + b"\x00")


def _garbage(p: Path) -> None:
    p.write_bytes(b"garbage, not an IDX file at all")


def _mismatch(p: Path) -> None:
    p.write_bytes(idx_bytes(np.zeros(11, np.uint8)))  # 11 labels for 12 images


def _big_label(p: Path) -> None:
    p.write_bytes(idx_bytes(np.full(12, 10, np.uint8)))


@pytest.mark.parametrize("corrupt, target", [
    (_bad_magic, IDX_FILES[0]), (_truncated, IDX_FILES[0]), (_trailing, IDX_FILES[3]),
    (_garbage, IDX_FILES[1]), (_mismatch, IDX_FILES[1]), (_big_label, IDX_FILES[1]),
])
def test_corrupt_plain_idx_is_a_usage_error(tmp_path: Path, corrupt: Callable[[Path], None],
                                            target: str) -> None:
    write_idx_set(tmp_path, gz=False)
    corrupt(tmp_path / target)
    assert f"{tmp_path / target}" in _usage_error(lambda: load_dataset("mnist", str(tmp_path)))


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],  # truncated gzip stream
    lambda b: b"\x1f\x8b" + b"\xff" * 40,  # gzip magic followed by garbage
    lambda b: b"not gzip at all",
    lambda b: b[:20] + bytes(x ^ 0x5A for x in b[20:-8]) + b[-8:],  # corrupt deflate data
])
def test_corrupt_gzip_is_a_usage_error(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    write_idx_set(tmp_path)
    path = tmp_path / f"{IDX_FILES[0]}.gz"
    path.write_bytes(damage(path.read_bytes()))
    assert str(path) in _usage_error(lambda: load_dataset("mnist", str(tmp_path)))


def test_gzipped_payload_errors_name_the_gz_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    write_file(tmp_path / IDX_FILES[2], idx_bytes(np.zeros((5, 28, 27), np.uint8)), gz=True)
    message = _usage_error(lambda: load_dataset("mnist", str(tmp_path)))
    assert f"{IDX_FILES[2]}.gz" in message and "28x28" in message


def test_missing_folder_and_files_name_the_expected_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    message = _usage_error(lambda: load_dataset("mnist", str(missing)))
    assert str(missing) in message and all(f in message for f in IDX_FILES)
    write_idx_set(tmp_path)
    (tmp_path / f"{IDX_FILES[3]}.gz").unlink()
    message = _usage_error(lambda: load_dataset("fashion-mnist", str(tmp_path)))
    assert str(tmp_path) in message and all(f in message for f in IDX_FILES)
    assert "FashionMNIST" in message and "zalando" in message.lower()


def test_mnist_without_data_dir_asks_for_it() -> None:
    message = _usage_error(lambda: load_dataset("mnist", None))
    assert "--data-dir" in message and IDX_FILES[0] in message


def test_unknown_dataset_lists_the_choices() -> None:
    message = _usage_error(lambda: load_dataset("imagenet", None))
    assert "imagenet" in message and "cifar10" in message and "mnist1d" in message


@pytest.mark.skipif(not Path(DEFAULT_DATA_DIRS["fashion-mnist"]).is_dir(),
                    reason="Debian's dataset-fashion-mnist package is not installed")
def test_fashion_mnist_default_folder_loads_the_real_set() -> None:
    ds = load_dataset("fashion-mnist", None)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert abs(ds.x_train.mean().item()) < 0.01 and abs(ds.x_train.std().item() - 1) < 0.01
    assert ds.y_train.bincount().tolist() == [6000] * 10


# ---------------------------------------------------------------------------- CIFAR-10

def _cifar_expected(data: list[np.ndarray]) -> torch.Tensor:
    raw = torch.from_numpy(np.concatenate(data)).float().view(-1, 3, 32, 32)
    return (raw / 255 - CIFAR_MEAN) / CIFAR_STD


@pytest.mark.parametrize("style, sub", [("bytes", "cifar-10-batches-py"), ("str", ""),
                                        ("py2", "cifar-10-batches-py")])
def test_cifar_python_batches(tmp_path: Path, style: str, sub: str) -> None:
    data = write_cifar_py(tmp_path / "cifar-10-batches-py", style=style)
    ds = load_dataset("cifar10", str(tmp_path / sub))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.augment and ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_train, _cifar_expected(data[:5]))
    torch.testing.assert_close(ds.x_test, _cifar_expected(data[5:]))
    assert ds.y_test.tolist() == cifar_arrays(4, 5)[1]


def test_cifar_binary_batches(tmp_path: Path) -> None:
    data = write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    ds = load_dataset("cifar10", str(tmp_path))
    torch.testing.assert_close(ds.x_train, _cifar_expected(data[:5]))
    assert ds.y_train.tolist() == [v for k in range(5) for v in cifar_arrays(4, k)[1]]


class _Evil:
    """Unpickling this calls ``func(arg)``: what a booby-trapped batch would do."""

    def __init__(self, func: Callable[[str], object], arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.func, (self.arg,))


@pytest.mark.parametrize("attack", ["system", "exec"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path, attack: str) -> None:
    write_cifar_py(tmp_path)
    marker = tmp_path / "pwned"
    evil = (_Evil(os.system, f"touch '{marker}'") if attack == "system"
            else _Evil(exec, f"open({str(marker)!r}, 'w').close()"))
    target = tmp_path / "data_batch_3"
    target.write_bytes(pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2))
    message = _usage_error(lambda: load_dataset("cifar10", str(tmp_path)))
    assert str(target) in message and "not a plain CIFAR-10 batch" in message
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"\x80\x02garbage",
    b"",
    pickle.dumps([1, 2, 3], protocol=2),
    pickle.dumps({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4}, protocol=2),
    pickle.dumps({b"data": np.zeros((4, 3072), np.int16), b"labels": [0] * 4}, protocol=2),
    pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, protocol=2),
    pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, protocol=2),
    pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, -1]}, protocol=2),
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1, 2]]}, protocol=2),
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, protocol=2),
])
def test_corrupt_cifar_pickle_is_a_usage_error(tmp_path: Path, payload: bytes) -> None:
    write_cifar_py(tmp_path)
    (tmp_path / "test_batch").write_bytes(payload)
    message = _usage_error(lambda: load_dataset("cifar10", str(tmp_path)))
    assert str(tmp_path / "test_batch") in message


@pytest.mark.parametrize("damage", [lambda b: b[:-1], lambda b: b"", lambda b: b"\x0a" + b[1:]])
def test_corrupt_cifar_binary_is_a_usage_error(tmp_path: Path,
                                               damage: Callable[[bytes], bytes]) -> None:
    write_cifar_bin(tmp_path)
    path = tmp_path / "data_batch_2.bin"
    path.write_bytes(damage(path.read_bytes()))
    assert str(path) in _usage_error(lambda: load_dataset("cifar10", str(tmp_path)))


def test_cifar_missing_folder_files_and_data_dir(tmp_path: Path) -> None:
    assert "--data-dir" in _usage_error(lambda: load_dataset("cifar10", None))
    missing = tmp_path / "nowhere"
    assert str(missing) in _usage_error(lambda: load_dataset("cifar10", str(missing)))
    write_cifar_py(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    message = _usage_error(lambda: load_dataset("cifar10", str(tmp_path)))
    assert "data_batch_4" in message and "test_batch" in message and str(tmp_path) in message


# ---------------------------------------------------------------------------- generated sets

def _mnist1d_cache(folder: Path) -> Path:
    [path] = folder.glob("mnist1d-*.npz")
    return path


def test_mnist1d_is_made_once_then_read_from_the_cache_and_remade_when_bad(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSOPS_CACHE", str(tmp_path))
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    made = load_dataset("mnist1d", None)  # an empty cache: the mnist1d package makes it
    assert made.x_train.shape == (4000, 1, 40) and made.x_test.shape == (1000, 1, 40)
    assert made.x_train.dtype == torch.float32 and made.y_train.dtype == torch.int64
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    path = _mnist1d_cache(tmp_path)
    with np.load(path) as npz:  # what the next run reads: the very arrays
        assert np.array_equal(npz["x"], made.x_train[:, 0].numpy())
        arrays = {k: npz[k] for k in npz.files}
    np.savez(path.with_suffix(".tmp.npz"), **{**arrays, "x": np.zeros_like(arrays["x"])})
    path.with_suffix(".tmp.npz").replace(path)
    assert torch.count_nonzero(load_dataset("mnist1d", None).x_train) == 0  # read, not made
    path.write_bytes(b"not a zip file")
    again = load_dataset("mnist1d", None)
    assert torch.equal(again.x_train, made.x_train) and torch.equal(again.y_test, made.y_test)
    assert _mnist1d_cache(tmp_path).stat().st_size > 100_000  # made and written anew


def test_an_unwritable_cache_folder_falls_back_to_a_temporary_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a folder cannot be made below a file, even by root
    monkeypatch.setenv("PSOPS_CACHE", str(blocked / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fallback = tmp_path / f"psops_mpi-{os.getuid()}"
    assert cache_dir() == fallback
    shape = {"x": (4000, 40), "y": (4000,), "x_test": (1000, 40), "y_test": (1000,)}
    arrays = {k: np.full(n, 3, np.float32 if k.startswith("x") else np.int64)
              for k, n in shape.items()}
    np.savez(fallback / f"mnist1d-{importlib.metadata.version('mnist1d')}-v1.npz", **arrays)
    assert torch.all(load_dataset("mnist1d", None).x_test == 3)


def test_a_fallback_cache_folder_others_can_write_is_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSOPS_CACHE", str(tmp_path / "a-file" / "cache"))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"psops_mpi-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could put a library here for the CPU kernel to load
    chosen = cache_dir()
    assert chosen != shared and chosen.parent == tmp_path and chosen.stat().st_mode & 0o077 == 0


def test_synthetic_is_deterministic_and_learnable_shape() -> None:
    state = torch.get_rng_state()
    a, b = load_dataset("synthetic", None), load_dataset("synthetic", None)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.x_train.shape == (2048, 32) and a.x_test.shape == (512, 32)
    assert a.input_shape == (32,) and a.num_classes == 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert set(a.y_train.tolist()) == set(range(10))


# ---------------------------------------------------------------------------- batches

def _toy(n: int = 50, augment: bool = False) -> Dataset:
    """Sample i is filled with the value i, so a batch shows which samples it holds."""
    shape = (3, 8, 8) if augment else (2,)
    x = torch.arange(n, dtype=torch.float32).view(n, *[1] * len(shape)).expand(n, *shape)
    y = torch.arange(n) % 10
    return Dataset("toy", x.contiguous(), y, x[:7].contiguous(), y[:7], 10, augment)


def _ids(x: torch.Tensor) -> list[int]:
    return x.flatten(1)[:, 0].long().tolist()


def test_shards_are_disjoint_and_equal_in_steps() -> None:
    ds = _toy(50)
    loaders = [ShardedBatches(ds, r, 4, 5, seed=3) for r in range(4)]
    assert {b.batches_per_epoch for b in loaders} == {2}  # 12 samples per rank, 2 full batches
    shards = [set(b.shard_indices(0).tolist()) for b in loaders]
    assert all(len(s) == 12 for s in shards) and len(set().union(*shards)) == 48
    for b in loaders:
        batches = list(b.epoch(0))
        assert len(batches) == 2 and all(x.shape == (5, 2) for x, _ in batches)
        seen = [i for x, _ in batches for i in _ids(x)]
        assert set(seen) <= shards[b.rank] and len(set(seen)) == 10
        assert all(torch.equal(y, torch.tensor(_ids(x)) % 10) for x, y in batches)


def test_shuffle_depends_on_seed_and_epoch_only() -> None:
    ds = _toy(50)
    order = [_ids(x) for x, _ in ShardedBatches(ds, 1, 2, 4, seed=0).epoch(0)]
    assert order == [_ids(x) for x, _ in ShardedBatches(ds, 1, 2, 4, seed=0).epoch(0)]
    assert order != [_ids(x) for x, _ in ShardedBatches(ds, 1, 2, 4, seed=0).epoch(1)]
    assert order != [_ids(x) for x, _ in ShardedBatches(ds, 1, 2, 4, seed=1).epoch(0)]


@pytest.mark.parametrize("augment", [False, True])
def test_start_step_reproduces_the_tail_of_an_epoch(augment: bool) -> None:
    batches = ShardedBatches(_toy(40, augment), 0, 2, 3, seed=5)
    full = list(batches.epoch(2))
    tail = list(batches.epoch(2, start_step=4))
    assert len(full) == batches.batches_per_epoch == 6 and len(tail) == 2
    for (x1, y1), (x2, y2) in zip(full[4:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert list(batches.epoch(2, start_step=6)) == []
    _usage_error(lambda: batches.epoch(2, start_step=7))


def test_augmented_batches_are_cropped_or_flipped() -> None:
    ds = _toy(40, augment=True)
    x, _ = next(ShardedBatches(ds, 0, 1, 40, seed=0).epoch(0))
    plain = ds.x_train.index_select(0, ShardedBatches(ds, 0, 1, 40, seed=0).shard_indices(0))
    assert x.shape == plain.shape and not torch.equal(x, plain)


def test_augment_draws_are_one_per_epoch_from_seed_rank_and_epoch() -> None:
    ds = _toy(40, augment=True)
    batches = ShardedBatches(ds, 1, 2, 4, seed=3)
    offsets, flips = batches.augment_draws(2)
    assert offsets.shape == (5, 2, 4) and flips.shape == (5, 4) and flips.dtype == torch.bool
    assert offsets.device == ds.x_train.device and 0 <= offsets.min() <= offsets.max() <= 8
    again = batches.augment_draws(2)
    assert torch.equal(offsets, again[0]) and torch.equal(flips, again[1])
    for other in (ShardedBatches(ds, 0, 2, 4, seed=3).augment_draws(2),  # another rank
                  batches.augment_draws(3),  # another epoch
                  ShardedBatches(ds, 1, 2, 4, seed=4).augment_draws(2)):  # another seed
        assert not torch.equal(offsets, other[0])
    # Batch `step` is the plain batch cropped and flipped by row `step` of the draws.
    idx = batches.shard_indices(2)
    for step, (x, _) in enumerate(batches.epoch(2)):
        plain = ds.x_train.index_select(0, idx[step * 4:(step + 1) * 4])
        want = _crop_flip(plain, offsets[step, 0], offsets[step, 1], flips[step])
        assert torch.equal(x, want)


def test_augmentation_of_a_resumed_epoch_is_bit_identical() -> None:
    """Resuming at every step of an epoch gives the batches an uninterrupted epoch gave."""
    ds = _toy(40, augment=True)
    full = [x for x, _ in ShardedBatches(ds, 0, 1, 4, seed=9).epoch(1)]
    for start in range(len(full)):
        fresh = ShardedBatches(ds, 0, 1, 4, seed=9)  # a new process would build a new one
        tail = [x for x, _ in fresh.epoch(1, start_step=start)]
        assert len(tail) == len(full) - start
        assert all(torch.equal(a, b) for a, b in zip(full[start:], tail, strict=True))


def test_augmentation_needs_image_batches() -> None:
    x = torch.zeros(8, 5)
    flat = Dataset("toy", x, torch.zeros(8, dtype=torch.int64), x, torch.zeros(8), 10, True)
    assert "(N, C, H, W)" in _usage_error(lambda: next(ShardedBatches(flat, 0, 1, 2, 0).epoch(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmented_batches_on_cuda_need_no_host_sync_per_step() -> None:
    cpu = _toy(64, augment=True)
    ds = Dataset("toy", cpu.x_train.cuda(), cpu.y_train.cuda(), cpu.x_test.cuda(),
                 cpu.y_test.cuda(), 10, True)
    batches = ShardedBatches(ds, 0, 1, 8, seed=0)
    offsets, _ = batches.augment_draws(0)
    assert offsets.device.type == "cuda"
    epoch = batches.epoch(0)
    first = next(epoch)  # the epoch's shuffle and draws: once per epoch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [x for x, _ in epoch]  # a step that synchronised with the host would raise
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == batches.batches_per_epoch - 1 and first[0].is_cuda
    tail = [x for x, _ in ShardedBatches(ds, 0, 1, 8, seed=0).epoch(0, start_step=3)]
    assert all(torch.equal(a, b) for a, b in zip(rest[2:], tail, strict=True))


def test_sharding_errors() -> None:
    ds = _toy(10)
    assert "more ranks (11) than training samples (10)" in _usage_error(
        lambda: ShardedBatches(ds, 0, 11, 1, seed=0))
    message = _usage_error(lambda: ShardedBatches(ds, 0, 3, 4, seed=0))
    assert "--batch-size 4 is larger than each rank's shard of 3 samples" in message
    _usage_error(lambda: ShardedBatches(ds, 3, 3, 1, seed=0))
    _usage_error(lambda: ShardedBatches(ds, 0, 2, 0, seed=0))


def _all_views(img: torch.Tensor) -> list[torch.Tensor]:
    """Every pad-4 crop of one (C, H, W) image, unflipped and flipped: the reference."""
    _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    crops = [padded[:, i:i + h, j:j + w] for i in range(9) for j in range(9)]
    return crops + [c.flip(-1) for c in crops]


def test_augmented_batches_crop_and_flip_like_the_reference() -> None:
    x = torch.rand(64, 3, 6, 5) + 1  # no zeros, so padding is visible
    ds = Dataset("rand", x, torch.zeros(64, dtype=torch.int64), x[:2], torch.zeros(2), 10, True)
    batches = ShardedBatches(ds, 0, 1, 64, seed=0)
    out, _ = next(batches.epoch(0))
    plain = x.index_select(0, batches.shard_indices(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert sum(not torch.equal(o, i) for o, i in zip(out, plain, strict=True)) > 32
    for o, i in zip(out, plain, strict=True):
        assert any(torch.equal(o, view) for view in _all_views(i))


def test_crop_flip_centre_cases() -> None:
    x = torch.rand(5, 3, 8, 8)
    centre = torch.full((5,), 4)
    flip = torch.ones(5, dtype=torch.bool)
    torch.testing.assert_close(_crop_flip(x, centre, centre, flip), x.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(_crop_flip(x, centre, centre, ~flip), x, rtol=0, atol=0)


def test_holdout_batch_depends_on_seed_only() -> None:
    ds = _toy(30)
    x1, y1 = holdout_batch(ds, 8, seed=4)
    x2, y2 = holdout_batch(ds, 8, seed=4)
    assert x1.shape == (8, 2) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(set(_ids(x1))) == 8
    assert _ids(holdout_batch(ds, 8, seed=5)[0]) != _ids(x1)
    assert holdout_batch(ds, 100, seed=4)[0].shape == (30, 2)


@pytest.mark.parametrize("world_size", [1, 3, 7, 9])
def test_eval_shard_covers_the_test_set_once(world_size: int) -> None:
    ds = _toy(20)  # 7 test samples
    parts = [eval_shard(ds, r, world_size) for r in range(world_size)]
    assert [i for x, _ in parts for i in _ids(x)] == list(range(7))
    assert max(len(x) for x, _ in parts) - min(len(x) for x, _ in parts) <= 1
    assert all(torch.equal(y, torch.tensor(_ids(x)) % 10) for x, y in parts)
