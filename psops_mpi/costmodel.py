"""The cost of one synchronisation round, per algorithm and exchange, on a link of latency
alpha and time per byte beta (Hockney's model: a message of n bytes costs alpha + n beta).

``--exchange auto`` picks PSO-PS's exchange with it at start (:func:`choose_exchange`), and
``bench/scaling_model.py`` fits alpha and beta to measured runs, checks the model against
measured epochs and projects it to 16-1024 ranks. The MPI library picks the cheaper of its
algorithms, so each collective costs the cheaper of two forms:

* allreduce: reduce-scatter + allgather by recursive halving and doubling (Rabenseifner's,
  MPICH's choice for all but small messages), 2 ceil(log2 P) alpha + 2(P-1)/P n beta; or
  recursive doubling, ceil(log2 P) (alpha + n beta) (a ring has the first one's bytes and
  more messages);
* allgather (ring): (P-1) (alpha + n beta), n the block of one rank;
* broadcast: binomial tree, ceil(log2 P) (alpha + n beta); or scatter + allgather (MPICH's
  large-message broadcast), (ceil(log2 P) + P - 1) alpha + 2(P-1)/P n beta;
* MINLOC: an allreduce of 16 bytes.

A round for N float32 parameters: SSGD, an allreduce of the gradient every step; PA and
SlowMo, an allreduce of the weights every ``n`` steps; PSO-PS ``allgather``, one allgather of
N+1 floats (the particle and its fitness); PSO-PS ``best``, MINLOC and a broadcast of the best
particle, plus an allreduce of N+1 floats when the rule needs the swarm's mean (the centre
rule, or c3 > 0).

Encoded rounds (``--exchange-dtype bf16`` or ``int8``) send :func:`psops_mpi.codec.value_bytes`
a value instead of 4, in an Alltoall and an Allgather with the bytes of Rabenseifner's
allreduce; PSO-PS's centre rule sends the best particle in the Allgather too (no MINLOC and
no broadcast: ``pso-best-mean`` costs the mean's collectives plus (P-1)/P of the particle).
A round left in flight (``--overlap``) exposes only what is left of it when it lands:
:func:`exposed_round_time`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from psops_mpi.codec import value_bytes

FLOAT = 4  # bytes per parameter
MINLOC_BYTES = 16  # MPI.DOUBLE_INT, padded
METHODS = ("ssgd", "pa", "slowmo", "pso-allgather", "pso-best", "pso-best-mean")
# An allgather receive buffer above this many bytes per rank is never chosen by auto.
MAX_GATHER_BYTES = 1 << 30


@dataclass(frozen=True)
class Link:
    """Latency (s per message) and bandwidth (bytes per s) between two ranks.

    ``shared``: one link of that bandwidth carries every rank's bytes together (ranks behind
    one switch port, or this machine's emulated links), so a collective costs the bytes all
    ranks send over the bandwidth; otherwise every rank has a link of its own and a
    collective costs the bytes one rank sends on its critical path.
    """

    name: str
    alpha: float
    bandwidth: float
    shared: bool = False

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth


def gbit(rate: float) -> float:
    """Bytes per second of a link of ``rate`` Gbit/s."""
    return rate * 1e9 / 8


# Links as a cluster's fabric gives them (latency: a typical MPI ping-pong over the network).
LINKS = {
    "1gbit": Link("1 Gbit/s Ethernet", 50e-6, gbit(1)),
    "10gbit": Link("10 Gbit/s Ethernet", 20e-6, gbit(10)),
    "100gbit": Link("100 Gbit/s InfiniBand", 2e-6, gbit(100)),
    "400gbit": Link("400 Gbit/s InfiniBand", 1.5e-6, gbit(400)),
}
# What auto assumes. The choice hardly depends on it: the two exchanges' costs cross where a
# message's latency equals its transfer time (alpha x bandwidth: 6-75 KB on every link above).
DEFAULT_LINK = LINKS["10gbit"]


@dataclass(frozen=True)
class Form:
    """One algorithm of a collective: messages on its critical path, bytes one rank sends on
    it, and bytes all ranks send together."""

    messages: float
    rank_bytes: float
    total_bytes: float

    def seconds(self, link: Link) -> float:
        sent = self.total_bytes if link.shared else self.rank_bytes
        return self.messages * link.alpha + sent * link.beta


def log2_ceil(p: int) -> int:
    return max(1, math.ceil(math.log2(p)))


def allreduce_forms(n: float, p: int) -> tuple[Form, ...]:
    """Rabenseifner's reduce-scatter + allgather, and recursive doubling."""
    hops = log2_ceil(p)
    return (Form(2 * hops, 2 * (p - 1) / p * n, 2 * (p - 1) * n),
            Form(hops, hops * n, p * hops * n))


def allgather_forms(n_block: float, p: int) -> tuple[Form, ...]:
    """The ring."""
    return (Form(p - 1, (p - 1) * n_block, p * (p - 1) * n_block),)


def bcast_forms(n: float, p: int) -> tuple[Form, ...]:
    """A binomial tree, and scatter + ring allgather (MPICH's for large messages)."""
    hops = log2_ceil(p)
    return (Form(hops, hops * n, (p - 1) * n),
            Form(hops + p - 1, 2 * (p - 1) / p * n, (p - 1) / p * n + (p - 1) * n))


def _cheapest(forms: tuple[Form, ...], p: int, link: Link) -> float:
    return 0.0 if p == 1 else min(form.seconds(link) for form in forms)


def allreduce(n: float, p: int, link: Link) -> float:
    """Seconds of an allreduce of ``n`` bytes over ``p`` ranks."""
    return _cheapest(allreduce_forms(n, p), p, link)


def allgather(n_block: float, p: int, link: Link) -> float:
    """Seconds of an allgather of ``n_block`` bytes from each of ``p`` ranks."""
    return _cheapest(allgather_forms(n_block, p), p, link)


def bcast(n: float, p: int, link: Link) -> float:
    """Seconds of a broadcast of ``n`` bytes to ``p`` ranks."""
    return _cheapest(bcast_forms(n, p), p, link)


def round_time(method: str, n_params: int, p: int, link: Link, dtype: str = "fp32") -> float:
    """Seconds of one round of ``method`` (one of :data:`METHODS`; SSGD: one step's
    allreduce) for ``n_params`` parameters on ``p`` ranks, sent as ``dtype``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if dtype != "fp32":
        return _encoded_round_time(method, n_params, p, link, dtype)
    n = n_params * FLOAT
    if method in ("ssgd", "pa", "slowmo"):
        return allreduce(n, p, link)
    if method == "pso-allgather":
        return allgather(n + FLOAT, p, link)
    cost = allreduce(MINLOC_BYTES, p, link) + bcast(n, p, link)
    if method == "pso-best-mean":
        cost += allreduce(n + FLOAT, p, link)
    return cost


def _encoded_round_time(method: str, n_params: int, p: int, link: Link, dtype: str) -> float:
    """An Alltoall then an Allgather of encoded chunks (the best particle's too, for
    PSO-PS): Rabenseifner's messages and bytes at the codec's bytes per value."""
    if p == 1:
        return 0.0
    if method not in ("pa", "slowmo", "pso-best-mean"):
        raise ValueError(f"{method} sends no encoded round")
    n = n_params * value_bytes(dtype)
    share = (p - 1) / p
    sent = 2 * share * n + (share * n if method == "pso-best-mean" else 0.0)
    form = Form(2 * (p - 1), sent, p * sent)  # pairwise Alltoall and ring Allgather
    return form.seconds(link)


def exposed_round_time(method: str, n_params: int, p: int, link: Link, dtype: str = "fp32",
                       hidden_s: float = 0.0) -> float:
    """Seconds a round costs the ranks when it is left in flight for ``hidden_s`` of
    computation (``--overlap-steps`` x the time of a step): what is left of it then; 0 when
    it is all hidden (blocking: ``hidden_s`` 0, the whole round)."""
    return max(0.0, round_time(method, n_params, p, link, dtype) - hidden_s)


def round_bytes(method: str, n_params: int, p: int, dtype: str = "fp32") -> float:
    """Bytes one rank sends per round, as psops_mpi's counters count them (the encoded
    rounds' headers and padding left out: under 1% of a model of a million parameters)."""
    if dtype != "fp32" and p > 1:
        n = n_params * value_bytes(dtype)
        share = (p - 1) / p
        return 2 * share * n + (share * n if method == "pso-best-mean" else 0.0)
    n = n_params * FLOAT
    ring = 2 * (p - 1) / p
    return {"ssgd": ring * n, "pa": ring * n, "slowmo": ring * n,
            "pso-allgather": (p - 1) * (n + FLOAT), "pso-best": n + MINLOC_BYTES,
            "pso-best-mean": n + MINLOC_BYTES + ring * (n + FLOAT)}[method]


def memory_bytes(method: str, n_params: int, p: int) -> float:
    """Bytes per rank beyond the model, its gradient and the local momentum: SlowMo's anchor
    and slow momentum; PSO-PS's velocity and personal and global best, the centre rule's
    anchor and mean, and the allgather's receive buffer of P particles."""
    n = n_params * FLOAT
    return {"ssgd": 0.0, "pa": 0.0, "slowmo": 2 * n, "pso-allgather": 3 * n + p * (n + FLOAT),
            "pso-best": 3 * n, "pso-best-mean": 4 * n + (n + FLOAT)}[method]


def pso_method(exchange: str, needs_mean: bool) -> str:
    """PSO-PS's round in :data:`METHODS` for ``exchange`` (``allgather`` or ``best``) and a
    rule that needs the swarm's mean or not."""
    if exchange == "allgather":
        return "pso-allgather"
    return "pso-best-mean" if needs_mean else "pso-best"


def choose_exchange(world_size: int, numel: int, needs_mean: bool,
                    link: Link = DEFAULT_LINK, dtype: str = "fp32") -> str:
    """``allgather`` or ``best``: PSO-PS's exchange with the smaller round time on ``link``
    for ``numel`` parameters on ``world_size`` ranks (``needs_mean``: the rule needs the
    swarm's mean, which ``best`` gets with an extra allreduce). An allgather whose receive
    buffer would pass :data:`MAX_GATHER_BYTES` per rank is never chosen, nor one of encoded
    values (``dtype`` bf16 or int8: the mean and the best particle travel encoded)."""
    if world_size <= 1:
        return "allgather"
    if dtype != "fp32":
        return "best"
    if world_size * (numel + 1) * FLOAT > MAX_GATHER_BYTES:
        return "best"
    best = round_time(pso_method("best", needs_mean), numel, world_size, link)
    return "best" if best < round_time("pso-allgather", numel, world_size, link) else "allgather"
