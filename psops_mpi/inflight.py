"""Collectives in flight: started at a round, finished some steps later.

A :class:`Pending` is a non-blocking collective (or a short chain of them) that a rank starts
and then leaves running while it trains. MPI moves the data only while the rank is inside an
MPI call, so the synchroniser calls :meth:`Pending.test` after every backward pass and every
optimizer step: each call lets MPI push whatever the network takes and returns at once.
Measured on an emulated 1 Gbit/s link (4 ranks on 2 cores, a 4.4 MB Iallreduce, 16 steps of
mlp-wide between rounds, medians of 3 runs), one test per step left 54 ms of a 203 ms exchange
to wait for at the next round, against 155 ms with no test at all; a thread testing every
millisecond hid nearly all of it but made the steps 31% slower, for the same time in all
(docs/performance.md).

Only :mod:`psops_mpi.exchange` starts these (and calls MPI on their buffers); this module
holds what they do once started:
:class:`Requests` (MPI requests and a step to run when they are done) and
:class:`QuantizedMean` (the mean of the ranks' vectors from quantized pieces, summed in fp32:
an Alltoall of encoded chunks, each rank's chunk summed, then an Allgather of the encoded
sums).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from psops_mpi import codec

# bytes before every encoded chunk: the sender's weight (1, or 0: left out) and its fitness,
# two float32 (the second half: the count and a spare)
HEADER = 8


# starts a collective on (what this rank sends, where every rank's lands): the exchange's
Start = Callable[[torch.Tensor, torch.Tensor], MPI.Request]


class Pending:
    """A collective in flight. :meth:`test` advances it without blocking and says whether it
    is done; :meth:`wait` blocks until it is. Both run the collective's finishing step (a
    division, a decode) exactly once, on the call that sees it done. ``count``: the ranks a
    mean was taken over, where the collective forms one; ``fitness``: every rank's, where
    the collective brings them."""

    done = False
    count = 0.0
    fitness: np.ndarray | None = None

    def test(self) -> bool:
        raise NotImplementedError

    def wait(self) -> None:
        raise NotImplementedError


class Done(Pending):
    """A collective that finished when it started (one rank, or a blocking call), or one
    whose result a checkpoint kept (``count`` as it was)."""

    done = True

    def __init__(self, count: float = 0.0, fitness: np.ndarray | None = None) -> None:
        self.count, self.fitness = count, fitness

    def test(self) -> bool:
        return True

    def wait(self) -> None:
        return


class Both(Pending):
    """Collectives started one after the other and finished together."""

    def __init__(self, *parts: Pending) -> None:
        self.parts = parts
        self.count = parts[0].count if parts else 0.0

    def test(self) -> bool:
        if not self.done:
            self.done = all([part.test() for part in self.parts])  # test every one
            self.count = self.parts[0].count
        return self.done

    def wait(self) -> None:
        for part in self.parts:
            part.wait()
        self.count = self.parts[0].count
        self.done = True


class Requests(Pending):
    """MPI requests started together, and ``then``: what to do once all are complete."""

    def __init__(self, requests: list[MPI.Request], then: Callable[[], None] | None = None
                 ) -> None:
        self.requests, self.then = requests, then

    def _finish(self) -> None:
        self.done = True
        if self.then is not None:
            self.then()

    def test(self) -> bool:
        if not self.done and MPI.Request.Testall(self.requests):
            self._finish()
        return self.done

    def wait(self) -> None:
        if not self.done:
            MPI.Request.Waitall(self.requests)
            self._finish()


class MeanSpace:
    """The buffers of a :class:`QuantizedMean`, allocated once: a round must not allocate
    (fresh pages cost more than the encoding here).

    Args:
        size: the ranks.
        numel: the padded length of a vector (``size`` chunks of whole codec blocks).
        dtype: the codec.
        with_best: the second half also carries the best particle's chunk.
    """

    def __init__(self, size: int, numel: int, dtype: str, with_best: bool) -> None:
        self.size, self.dtype, self.with_best = size, dtype, with_best
        self.chunk = numel // size
        self.code_bytes = codec.chunk_bytes(self.chunk, dtype)
        self.msg = HEADER + self.code_bytes  # the first half: one chunk to each rank
        self.msg2 = self.msg + (self.code_bytes if with_best else 0)  # the second half
        self.send = torch.empty(size * self.msg, dtype=torch.uint8)
        self.recv = torch.empty_like(self.send)
        self.own = torch.empty(self.msg2, dtype=torch.uint8)
        self.gathered = torch.empty(size * self.msg2, dtype=torch.uint8)
        self.total = torch.empty(self.chunk, dtype=torch.float32)
        self.piece = torch.empty(self.chunk, dtype=torch.float32)

    def bytes_sent(self) -> int:
        """Bytes one rank sends in both halves (to the P-1 others)."""
        return (self.size - 1) * (self.msg + self.msg2)


class QuantizedMean(Pending):
    """The weighted mean of every rank's vector, formed in fp32 from quantized pieces, and,
    with :attr:`MeanSpace.with_best`, the vector of the rank whose fitness is lowest.

    Phase 1: each rank splits its (padded) vector into P chunks, encodes them and sends chunk
    j to rank j (Ialltoall), each behind a header of its weight (0 leaves a rank out: a
    non-finite one) and its fitness. Rank j decodes the P pieces of its chunk and sums them
    in rank order in fp32, divides by the total weight, adds its residual of the last round
    (error feedback on the sum), and encodes the result. Phase 2: every rank receives every
    encoded sum (Iallgather), and with it the best rank's encoded chunk as rank j received
    it, and decodes them: the same bytes on every rank, so the same mean (and best vector)
    bit for bit. Every rank also holds every rank's fitness (:attr:`fitness`): the best one
    is the same everywhere, with no MINLOC.

    Args:
        alltoall: starts phase 1 (an Ialltoall).
        allgather: starts phase 2 (an Iallgather).
        space: the buffers.
        values: this rank's vector (float32, the padded length).
        weight: 1 to take part, 0 to be left out (send zeros).
        fitness: this rank's fitness (inf: never the best).
        residual: where what rounding dropped from ``values`` goes (float32, its length).
        sum_residual: this rank's residual of its chunk of the sum (float32, a chunk, on the
            CPU), updated in place.
        out: where the mean lands (float32, the padded length); may be ``values`` itself,
            which is read only here.
        best_out: where the best vector lands (with_best).
    """

    def __init__(self, alltoall: Start, allgather: Start, space: MeanSpace,
                 values: torch.Tensor, weight: float, fitness: float, residual: torch.Tensor,
                 sum_residual: torch.Tensor, out: torch.Tensor,
                 best_out: torch.Tensor | None = None) -> None:
        self.allgather, self.space, self.out, self.best_out = allgather, space, out, best_out
        self.sum_residual = sum_residual
        self.fitness = np.full(space.size, np.inf, dtype=np.float32)
        chunk, msg = space.chunk, space.msg
        for j in range(space.size):
            part = space.send[j * msg:(j + 1) * msg]
            part[:HEADER].view(torch.float32).copy_(torch.tensor([weight, fitness]))
            piece = slice(j * chunk, (j + 1) * chunk)
            codec.encode(values[piece], part[HEADER:], space.dtype, residual[piece])
        self.phase = 1
        self.request = alltoall(space.send, space.recv)

    def _advance(self) -> None:
        """Phase 1 done: sum this rank's chunk and start phase 2; phase 2 done: decode."""
        space = self.space
        if self.phase == 1:
            self._reduce()
            self.phase = 2
            self.request = self.allgather(space.own, space.gathered)
        else:
            self._decode()
            self.done = True

    def _reduce(self) -> None:
        space, msg, cb = self.space, self.space.msg, self.space.code_bytes
        headers = space.recv.view(space.size, msg)[:, :HEADER].contiguous().view(torch.float32)
        weights = headers[:, 0].tolist()
        self.fitness = headers[:, 1].numpy().copy()
        total = space.total.zero_()
        for k, weight in enumerate(weights):  # rank order: the same sum wherever it is formed
            if weight:
                piece = space.recv[k * msg + HEADER:(k + 1) * msg]
                total += codec.decode(piece, space.chunk, space.dtype, space.piece)
        count = sum(weights)
        own = space.own
        own[:HEADER].view(torch.float32).copy_(torch.tensor([count, 0.0]))
        if count:
            total.div_(count).add_(self.sum_residual)
        codec.encode(total, own[HEADER:HEADER + cb], space.dtype,
                     self.sum_residual if count else space.piece)
        if space.with_best:
            best = best_index(self.fitness)
            own[HEADER + cb:] = space.recv[best * msg + HEADER:(best + 1) * msg] if best >= 0 \
                else 0

    def _decode(self) -> None:
        space, chunk, cb = self.space, self.space.chunk, self.space.code_bytes
        for j in range(space.size):
            part = space.gathered[j * space.msg2:(j + 1) * space.msg2]
            self.count = float(part[:HEADER].view(torch.float32)[0])
            piece = slice(j * chunk, (j + 1) * chunk)
            codec.decode(part[HEADER:HEADER + cb], chunk, space.dtype, self.out[piece])
            if self.best_out is not None:
                codec.decode(part[HEADER + cb:], chunk, space.dtype, self.best_out[piece])


    def test(self) -> bool:
        while not self.done and self.request.Test():
            self._advance()
        return self.done

    def wait(self) -> None:
        while not self.done:
            self.request.Wait()
            self._advance()


def best_index(fitness: np.ndarray) -> int:
    """The rank of the lowest finite fitness (ties: the lowest rank), or -1 if none is."""
    finite = np.isfinite(fitness)
    if not finite.any():
        return -1
    return int(np.argmin(np.where(finite, fitness, np.inf)))
