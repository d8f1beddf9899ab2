"""Unit tests of the text pieces: the fortunes byte-level corpus and the gpt models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from psops_mpi.data import DEFAULT_DATA_DIRS, load_dataset
from psops_mpi.data.formats import (
    _FORTUNE_DELIMITER,
    FORTUNE_CONTEXT,
    FORTUNE_SEPARATOR,
    _fortune_entries,
    _is_fortune_test_entry,
)
from psops_mpi.errors import UsageError
from psops_mpi.models import apply_speed_settings, build_model, num_parameters
from psops_mpi.tasks import LanguageModel

FORTUNES = Path(DEFAULT_DATA_DIRS["fortunes"])
needs_fortunes = pytest.mark.skipif(not FORTUNES.is_dir(),
                                    reason="Debian's fortunes package is not installed")
T, VOCAB = FORTUNE_CONTEXT, 256


def _usage_error(call: Callable[[], object]) -> str:
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def _stream(x: torch.Tensor, y: torch.Tensor) -> bytes:
    """The bytes the windows were cut from: each window is x's row and y's last byte."""
    return bytes(torch.cat([x, y[:, -1:]], 1).flatten().tolist())


def _model(name: str, context: int = T) -> torch.nn.Module:
    return build_model(name, (context,), VOCAB, "fortunes", LanguageModel())


# ---------------------------------------------------------------------------- corpus

def _write_corpus(folder: Path, num_entries: int = 300) -> list[bytes]:
    """Two fortune files (one entry in both), strfile's index, a .u8 twin that is not a copy,
    and a subfolder, as the package has them; returns the entries in load order."""
    entries = [f"Fortune {i}: {'x' * (i % 50)} the end.\n".encode() for i in range(num_entries)]
    half = num_entries // 2
    folder.mkdir()
    (folder / "alpha").write_bytes(b"%\n".join(entries[:half]) + b"%\n")
    (folder / "beta").write_bytes(b"%\n".join([entries[0], *entries[half:]]) + b"%\n")
    (folder / "alpha.dat").write_bytes(bytes(range(256)))
    (folder / "alpha.u8").write_bytes(b"NOT READ\n%\n")
    (folder / "off").mkdir()
    (folder / "off" / "gamma").write_bytes(b"NOT READ EITHER\n%\n")
    return entries


def test_fortunes_windows_are_the_joined_entries_of_each_split(tmp_path: Path) -> None:
    entries = _write_corpus(tmp_path / "f")
    ds = load_dataset("fortunes", str(tmp_path / "f"))
    assert (ds.task, ds.num_classes, ds.augment, ds.input_shape) == (
        "language-model", VOCAB, False, (T,))
    test = [e for e in entries if _is_fortune_test_entry(e)]
    train = [e for e in entries if not _is_fortune_test_entry(e)]
    assert 0 < len(test) < len(entries) / 10
    for x, y, kept in ((ds.x_train, ds.y_train, train), (ds.x_test, ds.y_test, test)):
        joined = np.frombuffer(FORTUNE_SEPARATOR.join(kept), np.uint8).astype(np.int64)
        windows = torch.from_numpy(joined[: len(joined) // (T + 1) * (T + 1)]).view(-1, T + 1)
        assert len(windows) > 0
        assert torch.equal(x, windows[:, :-1]) and torch.equal(y, windows[:, 1:])


def test_fortunes_missing_or_empty_folder_says_how_to_get_it(tmp_path: Path) -> None:
    message = _usage_error(lambda: load_dataset("fortunes", str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere") in message and "apt-get install fortunes" in message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cookie.dat").write_bytes(b"\0" * 24)
    (tmp_path / "empty" / "blank").write_bytes(b"\n%\n  \n%\n")
    message = _usage_error(lambda: load_dataset("fortunes", str(tmp_path / "empty")))
    assert str(tmp_path / "empty") in message and "apt-get install fortunes" in message
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "one").write_bytes(b"Too short.\n%\n")
    message = _usage_error(lambda: load_dataset("fortunes", str(tmp_path / "short")))
    assert str(tmp_path / "short") in message and "apt-get install fortunes" in message


@needs_fortunes
def test_the_real_fortunes_load_as_shifted_byte_windows() -> None:
    ds = load_dataset("fortunes", None)
    assert ds.task == "language-model" and ds.num_classes == VOCAB
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == T
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.min()) >= 0 and int(x.max()) < VOCAB and int(y.max()) < VOCAB
    assert len(ds.x_train) > 15_000 and 0.03 < len(ds.x_test) / len(ds.x_train) < 0.08


@needs_fortunes
def test_no_real_test_entry_is_in_the_training_windows() -> None:
    ds = load_dataset("fortunes", None)
    # the training stream, cut back into entries (the last one may be cut by the window end)
    pieces = _FORTUNE_DELIMITER.split(_stream(ds.x_train, ds.y_train))[:-1]
    tests = {e for e in _fortune_entries(FORTUNES) if _is_fortune_test_entry(e)}
    assert len(pieces) > 10_000 and len(tests) > 500
    assert not tests & set(pieces)
    assert not any(_is_fortune_test_entry(p) for p in pieces)
    test_pieces = _FORTUNE_DELIMITER.split(_stream(ds.x_test, ds.y_test))[:-1]
    assert set(test_pieces) <= tests


# ---------------------------------------------------------------------------- gpt

def test_gpt_sizes_and_output_shape() -> None:
    torch.manual_seed(0)
    model = _model("gpt")
    assert num_parameters(model) == 3_257_856
    assert 2_000_000 < num_parameters(model) < 5_000_000
    tiny = _model("gpt-tiny")
    assert num_parameters(tiny) == 124_672
    x = torch.randint(0, VOCAB, (3, T))
    assert model(x).shape == (3, T, VOCAB) and tiny(x).shape == (3, T, VOCAB)
    assert tiny(x[:, :17]).shape == (3, 17, VOCAB)  # shorter contexts work too
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt", "gpt-tiny"])
def test_gpt_is_causal(name: str) -> None:
    torch.manual_seed(1)
    model = _model(name).eval()
    x = torch.randint(0, VOCAB, (2, T))
    changed = x.clone()
    changed[:, 50] = (x[:, 50] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.allclose(before[:, :50], after[:, :50], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 50:], after[:, 50:])


def test_gpt_init_comes_from_the_global_rng_only() -> None:
    torch.manual_seed(7)
    first = _model("gpt-tiny").state_dict()
    torch.manual_seed(7)
    second = _model("gpt-tiny").state_dict()
    torch.manual_seed(8)
    third = _model("gpt-tiny").state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["tokens.weight"], third["tokens.weight"])


def test_gpt_under_bf16_autocast_and_with_channels_last_off() -> None:
    torch.manual_seed(2)
    model = _model("gpt-tiny")
    assert not apply_speed_settings(model, "auto", False, (T,), torch.device("cpu"))
    x = torch.randint(0, VOCAB, (2, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = LanguageModel().loss(out, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_gpt_needs_token_sequences() -> None:
    message = _usage_error(lambda: build_model("gpt", (1, 40), 10))
    assert "gpt" in message


def _batch(num: int) -> tuple[torch.Tensor, torch.Tensor]:
    if FORTUNES.is_dir():
        ds = load_dataset("fortunes", None)
        return ds.x_train[:num], ds.y_train[:num]
    text = b"The quick brown fox jumps over the lazy dog.\n%\n" * (num * (T + 1) // 40 + 1)
    windows = torch.tensor(list(text[: num * (T + 1)])).view(num, T + 1)
    return windows[:, :-1], windows[:, 1:]


def test_a_few_adamw_steps_on_fortunes_lower_the_loss() -> None:
    torch.manual_seed(4)
    model, task = _model("gpt-tiny"), LanguageModel()
    x, y = _batch(16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = task.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - np.log(VOCAB)) < 0.3  # a near-uniform start
    assert losses[-1] < losses[0] - 1.5, losses
