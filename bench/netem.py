"""Emulated cluster links on one machine: a network namespace whose loopback is rate-limited.

On one machine MPI ranks talk through shared memory (tens of Gbit/s), so communication is
nearly free and any speedup from communicating less is understated. :class:`EmulatedLink`
makes a network namespace, brings its loopback up and shapes it with a token-bucket filter
(``tc qdisc ... tbf rate 1gbit``); jobs started through :meth:`EmulatedLink.wrap` run inside
it with MPICH forced onto TCP (``MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp
MPIR_CVAR_NOLOCAL=1``), and gloo (bench/ddp_ssgd.py) uses the same loopback. Measured with a
40 MB Bcast between 2 ranks: 1.00 Gbit/s at ``1gbit``, 9.95-9.99 Gbit/s at ``10gbit``.

What it emulates: the rate applies to all traffic on the namespace's loopback together, so
the P ranks share one link of that rate (as if every node hung off one switch port), rather
than each node having a link of its own. Traffic that crosses the real fabric's bisection
behaves like this; per-node links would give P/2 to P times more aggregate bandwidth to a
ring allreduce. No delay is added (``netem`` is not available here).

Needs root (``ip netns``, ``tc``); without it, or without iproute2, :func:`open_link` raises
:class:`LinkSetupError` with a one-line reason. The namespace is always deleted on
:meth:`close` (``with`` block, or signal-driven exit of the caller); a namespace left behind by
a killed process (SIGKILL) is named ``psops-bench-<pid>`` and removed by the next run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

NS_PREFIX = "psops-bench-"
MPICH_TCP_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "MPIR_CVAR_NOLOCAL": "1"}
TBF_BURST = "256kb"  # enough for 10 Gbit/s with the kernel's timer; measured above
TBF_LATENCY = "50ms"  # queue limit of the bucket, not an added delay
RATE_PATTERN = re.compile(r"^\d+(\.\d+)?(gbit|mbit)$")


class LinkSetupError(RuntimeError):
    """The emulated link cannot be set up (no root, no iproute2, ...): one line for the user."""


def is_emulated(link: str) -> bool:
    """'shm' is the machine as it is; a rate such as '1gbit' or '100mbit' is emulated."""
    return link != "shm"


def check_link_name(link: str) -> None:
    if link != "shm" and not RATE_PATTERN.match(link):
        raise ValueError(f"link {link!r} must be 'shm' or a rate such as 1gbit, 10gbit, 500mbit")


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        reason = " ".join((res.stderr or res.stdout).split()) or f"exit code {res.returncode}"
        raise LinkSetupError(f"`{' '.join(cmd)}` failed: {reason}")


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces of earlier runs whose process is gone (killed with SIGKILL)."""
    removed = []
    netns = Path("/run/netns")
    if not netns.is_dir():
        return removed
    for entry in netns.iterdir():
        pid = entry.name.removeprefix(NS_PREFIX)
        if entry.name.startswith(NS_PREFIX) and pid.isdigit() and not _pid_alive(int(pid)):
            subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, timeout=30)
            removed.append(entry.name)
    return removed


class EmulatedLink:
    """One network namespace with a shaped loopback; the rate can change between jobs."""

    def __init__(self) -> None:
        self.name = f"{NS_PREFIX}{os.getpid()}"
        self.rate: str | None = None
        self.open = False

    def setup(self) -> None:
        if os.geteuid() != 0:
            raise LinkSetupError("emulated links need root (ip netns, tc tbf); run as root or "
                                 "use --links shm")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise LinkSetupError(f"emulated links need iproute2's `{tool}` "
                                     f"(apt-get install iproute2), or use --links shm")
        remove_stale_namespaces()
        _run(["ip", "netns", "add", self.name])
        self.open = True
        _run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"])

    def set_rate(self, rate: str) -> None:
        """Shape the namespace's loopback to ``rate`` (tc syntax: 1gbit, 10gbit, 500mbit)."""
        check_link_name(rate)
        if rate != self.rate:
            _run(["ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev", "lo",
                  "root", "tbf", "rate", rate, "burst", TBF_BURST, "latency", TBF_LATENCY])
            self.rate = rate

    def wrap(self, cmd: list[str]) -> list[str]:
        """The command run inside the namespace, with MPICH on TCP over the shaped loopback."""
        env = [f"{k}={v}" for k, v in MPICH_TCP_ENV.items()]
        return ["ip", "netns", "exec", self.name, "env", *env, *cmd]

    def close(self) -> None:
        if self.open:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
            self.open = False

    def __enter__(self) -> EmulatedLink:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(link: str) -> str:
    """How a link was made, for reports."""
    if not is_emulated(link):
        return "shm: one machine as it is (MPICH over shared memory; gloo over TCP loopback)"
    return (f"{link}: network namespace, loopback shaped by `tc qdisc tbf rate {link} burst "
            f"{TBF_BURST} latency {TBF_LATENCY}` (shared by all ranks), MPICH over "
            f"ofi/tcp ({' '.join(f'{k}={v}' for k, v in MPICH_TCP_ENV.items())}), gloo over "
            "the same loopback")
