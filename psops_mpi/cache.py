"""psops_mpi's cache folder, for what is slow to make and the same every time: the compiled CPU
kernel (:mod:`psops_mpi.kernels.pso_cpu`) and the generated MNIST-1D set
(:mod:`psops_mpi.data.formats`).

Files are written atomically (a temporary file in the same folder, then a rename), so ranks
that start together and all make the same file never read a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """``$PSOPS_CACHE`` or ``~/.cache/psops_mpi`` (``$XDG_CACHE_HOME`` honoured); where that
    cannot be written (a read-only home, as on some compute nodes), a folder of this user
    under the system's temporary directory."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "psops_mpi"
    preferred = Path(os.environ.get("PSOPS_CACHE", default))
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"psops_mpi-{os.getuid()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    return fallback


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` into a temporary file next to ``target``, then rename it to ``target``.

    Raises:
        OSError: the folder cannot be written; no partial file is left behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
