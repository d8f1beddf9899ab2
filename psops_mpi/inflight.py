"""Collectives in flight: started at a round, finished some steps later.

A :class:`Pending` is a non-blocking collective (or a short chain of them) that a rank starts
and then leaves running while it trains. MPI moves the data only while the rank is inside an
MPI call, so the synchroniser calls :meth:`Pending.test` after every backward pass and every
optimizer step: each call lets MPI push whatever the network takes and returns at once.
Measured on an emulated 1 Gbit/s link (4 ranks, a 4.4 MB Iallreduce, 16 steps of mlp-wide
between rounds), one test per step left 20 ms of a 201 ms exchange to wait for at the next
round, against 155 ms with no test at all; a thread testing every millisecond hid all of it but
took 13% more compute time from the rank (docs/performance.md).

Only :mod:`psops_mpi.exchange` starts these; this module holds what they do once started:
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

HEADER = 4  # bytes before every encoded chunk: the sender's weight (1, or 0: left out), a float32


def mpi_buffer(tensor: torch.Tensor) -> torch.Tensor | np.ndarray:
    """What to hand to mpi4py: a numpy view of a CPU tensor (mpi4py reads numpy's buffer
    protocol about 20 us faster per call than a tensor's DLPack export, which matters for
    every-step SSGD on small models), else the tensor itself (CUDA, or dtypes numpy lacks)."""
    if tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    return tensor


class Pending:
    """A collective in flight. :meth:`test` advances it without blocking and says whether it
    is done; :meth:`wait` blocks until it is. Both run the collective's finishing step (a
    division, a decode) exactly once, on the call that sees it done. ``count``: the ranks a
    mean was taken over, where the collective forms one."""

    done = False
    count = 0.0

    def test(self) -> bool:
        raise NotImplementedError

    def wait(self) -> None:
        raise NotImplementedError


class Done(Pending):
    """A collective that finished when it started (one rank, or a blocking call), or one
    whose result a checkpoint kept (``count`` as it was)."""

    done = True

    def __init__(self, count: float = 0.0) -> None:
        self.count = count

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


class QuantizedMean(Pending):
    """The weighted mean of every rank's vector, formed in fp32 from quantized pieces.

    Phase 1: each rank splits its (padded) vector into P chunks, encodes them and sends chunk
    j to rank j (Ialltoall), each behind a header with the sender's weight (0 leaves a rank
    out: a non-finite one). Rank j decodes the P pieces of its chunk and sums them in rank
    order in fp32, divides by the total weight, adds its residual of the last round (error
    feedback on the sum), and encodes the result. Phase 2: every rank receives every encoded
    sum (Iallgather), behind a header with the count, and decodes them: the same bytes on
    every rank, so the same mean bit for bit.

    Args:
        comm: the communicator.
        values: this rank's vector (float32, padded to :func:`codec.padded` for P chunks).
        weight: 1 to take part, 0 to be left out (send zeros).
        dtype: the codec, ``bf16`` or ``int8``.
        sum_residual: this rank's residual of its chunk of the sum (float32, chunk length, on
            the CPU), updated in place.
        out: where the mean lands (float32, the padded length); may be ``values`` itself,
            which is read only here.
        residual: where what rounding dropped from ``values`` goes (float32, its length).
    """

    def __init__(self, comm: MPI.Comm, values: torch.Tensor, weight: float, dtype: str,
                 sum_residual: torch.Tensor, out: torch.Tensor, residual: torch.Tensor) -> None:
        self.comm, self.dtype, self.out = comm, dtype, out
        self.size = comm.Get_size()
        self.chunk = values.numel() // self.size
        self.msg = HEADER + codec.chunk_bytes(self.chunk, dtype)
        self.sum_residual = sum_residual
        self.count = 0.0
        self.send = torch.empty(self.size * self.msg, dtype=torch.uint8)
        self.recv = torch.empty_like(self.send)
        for j in range(self.size):
            part = self.send[j * self.msg:(j + 1) * self.msg]
            part[:HEADER].view(torch.float32).fill_(weight)
            chunk = slice(j * self.chunk, (j + 1) * self.chunk)
            residual[chunk] = codec.encode(values[chunk], part[HEADER:], dtype)
        self.phase = 1
        self.request = comm.Ialltoall(mpi_buffer(self.send), mpi_buffer(self.recv))

    def _advance(self) -> None:
        """Phase 1 done: sum this rank's chunk and start phase 2; phase 2 done: decode."""
        if self.phase == 1:
            own = self._reduce()
            self.phase = 2
            self.request = self.comm.Iallgather(mpi_buffer(own), mpi_buffer(self.send))
        else:
            self._decode()
            self.done = True

    def _reduce(self) -> torch.Tensor:
        total = torch.zeros(self.chunk, dtype=torch.float32)
        count = 0.0
        for k in range(self.size):  # rank order: the same sum on every rank that forms it
            piece = self.recv[k * self.msg:(k + 1) * self.msg]
            weight = float(piece[:HEADER].view(torch.float32))
            if weight:
                total += codec.decode(piece[HEADER:], self.chunk, self.dtype)
                count += weight
        own = torch.empty(self.msg, dtype=torch.uint8)
        own[:HEADER].view(torch.float32).fill_(count)
        if count:
            total.div_(count).add_(self.sum_residual)
            self.sum_residual.copy_(codec.encode(total, own[HEADER:], self.dtype))
        else:
            codec.encode(total, own[HEADER:], self.dtype)  # zeros
        return own

    def _decode(self) -> None:
        for j in range(self.size):
            piece = self.send[j * self.msg:(j + 1) * self.msg]
            self.count = float(piece[:HEADER].view(torch.float32))
            self.out[j * self.chunk:(j + 1) * self.chunk] = codec.decode(
                piece[HEADER:], self.chunk, self.dtype)

    def test(self) -> bool:
        while not self.done and self.request.Test():
            self._advance()
        return self.done

    def wait(self) -> None:
        while not self.done:
            self.request.Wait()
            self._advance()
