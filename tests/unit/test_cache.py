"""psops_mpi.cache.write_atomically: a reader sees the old file or the whole new one, and a
write that fails leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from psops_mpi.cache import write_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.bin"
    write_atomically(target, lambda tmp: tmp.write_bytes(b"first"))
    assert target.read_bytes() == b"first"

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]
    write_atomically(target, lambda tmp: tmp.write_bytes(b"second"))
    assert target.read_bytes() == b"second"
