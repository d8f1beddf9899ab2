"""Moving tensors between ranks: the only module that calls MPI collectives on tensors.

Every call takes contiguous buffers (mpi4py upper-case methods, no pickling) and counts the
bytes this rank sends and the seconds it spends in MPI. Byte counts follow the
bandwidth-optimal algorithms so the three training algorithms compare on equal terms:
ring allreduce sends 2(P-1)/P of the buffer, allgather (P-1) times the block, a broadcast
(pipelined) one buffer from the root and the same through each relay.

Where the ranks of a round first meet, the synchroniser calls :meth:`Exchange.arrive`: a
watched barrier (:mod:`psops_mpi.stall`) that names the ranks which do not come.

CUDA tensors are handed to MPI directly only when the caller says the MPI library is
CUDA-aware; otherwise they are staged through one pinned host buffer, allocated once:
synchronisers size it up front with :meth:`Exchange.reserve` for their largest message (it
still grows if a larger one comes).

A round can also be left in flight (``--overlap``): the ``start_*`` methods begin a
non-blocking collective on buffers the caller keeps untouched until it is done, and return a
:class:`~psops_mpi.inflight.Pending`; :meth:`Exchange.poke` lets MPI move its data (the
synchroniser calls it every step) and :meth:`Exchange.finish` waits for the rest. Their bytes
are counted when they start, their seconds (every start, poke and wait: the time this rank
spends in them, not the time the data is under way) as they are spent. CUDA tensors are
staged through pinned host buffers of their own, one per role, so that several collectives
can be in flight at once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
from mpi4py import MPI

from psops_mpi.inflight import Done, MeanSpace, Pending, QuantizedMean, Requests
from psops_mpi.stall import StallWatch, Where


def mpi_buffer(tensor: torch.Tensor) -> torch.Tensor | np.ndarray:
    """What to hand to mpi4py: a numpy view of a CPU tensor (mpi4py reads numpy's buffer
    protocol about 20 us faster per call than a tensor's DLPack export, which matters for
    every-step SSGD on small models), else the tensor itself (CUDA, or dtypes numpy lacks)."""
    if tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    return tensor


class _Watched:
    """A collective in flight as :meth:`StallWatch.wait` sees a request."""

    def __init__(self, pending: Pending) -> None:
        self.pending = pending

    def Test(self) -> bool:
        return self.pending.test()

    def Wait(self) -> None:
        self.pending.wait()


class Exchange:
    """Collectives on flat tensors over ``comm``, with byte and time counters.

    Args:
        comm: the communicator (never looked up globally).
        cuda_aware: pass CUDA tensors to MPI directly instead of staging them on the host.
        watch: reports ranks that do not arrive (default: the communicator's shared watch).
        in_flight: collectives will be left in flight (a collective call: every rank of
            ``comm`` makes the exchange at the same point).
    """

    def __init__(self, comm: MPI.Comm, cuda_aware: bool = False,
                 watch: StallWatch | None = None, in_flight: bool = False) -> None:
        self.comm = comm
        # Collectives left in flight run on a duplicate of comm: a chain of them (the encoded
        # mean's second half) starts when each rank sees the first half done, at different
        # moments, and must not meet the ranks' other collectives in a different order.
        self.flight_comm = comm.Dup() if in_flight and comm.Get_size() > 1 else comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.cuda_aware = cuda_aware
        self.watch = watch or StallWatch.of(comm)
        self.reset_counters()
        self._staging: torch.Tensor | None = None
        self._mirrors: dict[str, torch.Tensor] = {}

    def reset_counters(self) -> None:
        """Start counting bytes, seconds and calls from zero."""
        self.bytes_sent = 0
        self.seconds = 0.0
        self.calls = 0

    @contextmanager
    def _timed(self, nbytes: float):
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start
        self.bytes_sent += int(nbytes)
        self.calls += 1

    def reserve(self, numel: int, like: torch.Tensor) -> None:
        """Allocate the pinned staging buffer for messages of up to ``numel`` elements of
        ``like``'s dtype now, if ``like`` will need staging (CUDA, not CUDA-aware)."""
        if like.device.type == "cuda" and not self.cuda_aware:
            self._staging_for(numel, like.dtype)

    def _host(self, tensor: torch.Tensor, numel: int | None = None) -> torch.Tensor:
        """A tensor MPI may read and write: ``tensor`` itself on CPU or when CUDA-aware, else
        a slice of the pinned staging buffer."""
        if tensor.device.type == "cpu":
            return tensor
        torch.cuda.current_stream(tensor.device).synchronize()  # MPI must see finished writes
        if self.cuda_aware:
            return tensor
        return self._staging_for(tensor.numel() if numel is None else numel, tensor.dtype)

    def _staging_for(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of the pinned staging buffer, (re)allocated only if too small."""
        staging = self._staging
        if staging is None or staging.numel() < numel or staging.dtype != dtype:
            staging = torch.empty(numel, dtype=dtype, pin_memory=True)
            self._staging = staging
        return staging[:numel]

    @contextmanager
    def _in_place(self, buf: torch.Tensor, upload: bool = True):
        """Yield what MPI should work on in place for ``buf``; when that is a staging copy,
        fill it first (if ``upload``) and copy the result back after."""
        host = self._host(buf)
        staged = host is not buf
        if staged and upload:
            host.copy_(buf.view(-1))
        yield mpi_buffer(host)
        if staged:
            buf.view(-1).copy_(host)

    def arrive(self, where: Where) -> None:
        """Wait until every rank got here (a barrier whose wait is watched for missing
        ranks), so the collectives that follow cannot hang on a rank that never comes.
        Not counted as traffic; its seconds are: waiting for the slowest rank is part of
        what a synchronous round costs."""
        with self._spent():
            self.watch.arrive(where)

    def allreduce_finite_mean_(self, packed: torch.Tensor, finite: bool) -> int:
        """Average ``packed[:-1]`` over the ranks where ``finite`` is True, in one Allreduce.

        The last slot carries the flag: each rank sends ``[x ; 1]``, or zeros when its ``x`` is
        not finite (so a NaN cannot reach the sum), and the summed slot counts the ranks in
        the mean. Every rank, finite or not, receives the mean.

        Returns:
            The number of ranks with finite values; with none, ``packed[:-1]`` is all zeros.
        """
        numel = packed.numel() - 1
        if finite:
            packed[numel:].fill_(1.0)
        else:
            packed.zero_()
        if self.world_size > 1:
            nbytes = (packed.numel() * packed.element_size() * 2 * (self.world_size - 1)
                      / self.world_size)
            with self._timed(nbytes), self._in_place(packed) as mpi_buf:
                self.comm.Allreduce(MPI.IN_PLACE, mpi_buf)
        count = int(packed[numel].item())  # one host read per round
        if count > 1:
            packed[:numel].div_(count)
        return count

    def allreduce_mean_(self, buf: torch.Tensor) -> None:
        """Replace ``buf`` by its mean over all ranks, in place (one Allreduce)."""
        if self.world_size == 1:
            return
        nbytes = buf.numel() * buf.element_size() * 2 * (self.world_size - 1) / self.world_size
        with self._timed(nbytes), self._in_place(buf) as mpi_buf:
            self.comm.Allreduce(MPI.IN_PLACE, mpi_buf)
        buf.div_(self.world_size)

    def allgather(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Gather every rank's ``send`` into the rows of ``recv`` (shape (P, *send.shape))."""
        if self.world_size == 1:
            recv[0].copy_(send)
            return
        nbytes = send.numel() * send.element_size() * (self.world_size - 1)
        with self._timed(nbytes):
            if send.device.type == "cpu" or self.cuda_aware:
                self._host(send)  # synchronises the stream on CUDA
                self.comm.Allgather(mpi_buffer(send), mpi_buffer(recv))
                return
            # Staged: one pinned buffer holds [send ; recv] so both sides are host memory.
            host = self._host(send, send.numel() * (self.world_size + 1))
            host_send, host_recv = host[: send.numel()], host[send.numel() :]
            host_send.copy_(send.view(-1))
            self.comm.Allgather(mpi_buffer(host_send), mpi_buffer(host_recv))
            recv.view(-1).copy_(host_recv)

    def bcast_(self, buf: torch.Tensor, root: int) -> None:
        """Overwrite ``buf`` on every rank with the root's ``buf`` (one Bcast)."""
        if self.world_size == 1:
            return
        with (self._timed(buf.numel() * buf.element_size()),
              self._in_place(buf, upload=self.rank == root) as mpi_buf):
            self.comm.Bcast(mpi_buf, root=root)

    def minloc(self, value: float) -> tuple[float, int]:
        """The smallest ``value`` over all ranks and the lowest rank holding it (MINLOC)."""
        if self.world_size == 1:
            return value, self.rank
        # align=True gives the C layout of struct {double; int} that MPI.DOUBLE_INT describes.
        pair = np.dtype([("v", "f8"), ("r", "i4")], align=True)
        send = np.array([(value, self.rank)], dtype=pair)
        recv = np.empty_like(send)
        with self._timed(send.nbytes):
            self.comm.Allreduce([send, MPI.DOUBLE_INT], [recv, MPI.DOUBLE_INT], op=MPI.MINLOC)
        return float(recv["v"][0]), int(recv["r"][0])

    def allgather_scalar(self, value: float) -> np.ndarray:
        """Every rank's ``value`` (a float64 per rank, in rank order: one small Allgather)."""
        send = np.array([value], dtype=np.float64)
        if self.world_size == 1:
            return send
        recv = np.empty(self.world_size, dtype=np.float64)
        with self._timed(send.nbytes * (self.world_size - 1)):
            self.comm.Allgather(send, recv)
        return recv

    # ---- collectives left in flight

    def _mirror(self, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """What a collective in flight may work on for ``tensor``: the tensor itself on the
        CPU or when CUDA-aware, else a pinned host buffer of its own for ``role``."""
        if tensor.device.type == "cpu" or self.cuda_aware:
            if tensor.device.type == "cuda":
                torch.cuda.current_stream(tensor.device).synchronize()
            return tensor
        host = self._mirrors.get(role)
        if host is None or host.numel() != tensor.numel() or host.dtype != tensor.dtype:
            host = self._mirrors[role] = torch.empty(tensor.numel(), dtype=tensor.dtype,
                                                     pin_memory=True)
        return host

    @contextmanager
    def _spent(self):
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start

    def _started(self, nbytes: float) -> None:
        self.bytes_sent += int(nbytes)
        self.calls += 1

    def start_finite_mean(self, send: torch.Tensor, recv: torch.Tensor,
                          finite: bool) -> Pending:
        """:meth:`allreduce_finite_mean_` left in flight: ``send`` is ``[x ; flag slot]``
        (the flag is written here, or all of it zeroed when ``x`` is not finite); once done,
        ``recv`` holds ``[mean ; count]`` (zeros and 0 when no rank was finite)."""
        numel = send.numel() - 1
        if finite:
            send[numel:].fill_(1.0)
        else:
            send.zero_()

        def divide() -> None:
            if host_recv is not recv:
                recv.copy_(host_recv)
            count = float(recv[numel])
            if count > 1:
                recv[:numel].div_(count)

        if self.world_size == 1:
            recv.copy_(send)
            host_recv = recv
            divide()
            return Done()
        with self._spent():
            host_send, host_recv = self._mirror("mean-send", send), self._mirror("mean-recv", recv)
            if host_send is not send:
                host_send.copy_(send)
            request = self.flight_comm.Iallreduce(mpi_buffer(host_send), mpi_buffer(host_recv))
        self._started(send.numel() * send.element_size() * 2 * (self.world_size - 1)
                      / self.world_size)
        return Requests([request], divide)

    def start_allgather(self, send: torch.Tensor, recv: torch.Tensor) -> Pending:
        """:meth:`allgather` left in flight (``send`` kept as it is until done)."""
        if self.world_size == 1:
            recv[0].copy_(send)
            return Done()
        with self._spent():
            host_send, host_recv = (self._mirror("gather-send", send),
                                    self._mirror("gather-recv", recv.view(-1)))
            if host_send is not send:
                host_send.copy_(send)
            request = self.flight_comm.Iallgather(mpi_buffer(host_send), mpi_buffer(host_recv))
        self._started(send.numel() * send.element_size() * (self.world_size - 1))
        then = None if host_recv is recv.view(-1) else (lambda: recv.view(-1).copy_(host_recv))
        return Requests([request], then)

    def start_bcast(self, buf: torch.Tensor, root: int) -> Pending:
        """:meth:`bcast_` left in flight."""
        if self.world_size == 1:
            return Done()
        with self._spent():
            host = self._mirror("bcast", buf.view(-1))
            if host is not buf.view(-1) and self.rank == root:
                host.copy_(buf.view(-1))
            request = self.flight_comm.Ibcast(mpi_buffer(host), root=root)
        self._started(buf.numel() * buf.element_size())
        then = None if host is buf.view(-1) else (lambda: buf.view(-1).copy_(host))
        return Requests([request], then)

    def start_quantized_mean(self, space: MeanSpace, values: torch.Tensor, weight: float,
                             fitness: float, residual: torch.Tensor,
                             sum_residual: torch.Tensor, out: torch.Tensor,
                             best_out: torch.Tensor | None = None) -> Pending:
        """The weighted mean of every rank's ``values`` from pieces encoded in
        ``space.dtype`` (and the best rank's values), as
        :class:`~psops_mpi.inflight.QuantizedMean` describes; every buffer on the CPU.
        Bytes: the Alltoall's and the Allgather's, each (P-1)/P of the encoded vector (plus
        the best rank's, with it)."""
        with self._spent():
            pending = QuantizedMean(self._ialltoall, self._iallgather, space, values, weight,
                                    fitness, residual, sum_residual, out, best_out)
        self._started(space.bytes_sent())
        return pending

    def _ialltoall(self, send: torch.Tensor, recv: torch.Tensor) -> MPI.Request:
        return self.flight_comm.Ialltoall(mpi_buffer(send), mpi_buffer(recv))

    def _iallgather(self, send: torch.Tensor, recv: torch.Tensor) -> MPI.Request:
        return self.flight_comm.Iallgather(mpi_buffer(send), mpi_buffer(recv))

    def poke(self, pending: Pending) -> bool:
        """Let MPI move ``pending``'s data now, without blocking; True when it is done."""
        if pending.done:
            return True
        with self._spent():
            return pending.test()

    def finish(self, pending: Pending, where: Where) -> None:
        """Block until ``pending`` is done, watching for ranks that do not come (named as
        waited for at ``where``), and polling MPI all the while so that the data moves.
        Every rank calls it at the same point, done already or not: the watch numbers its
        waits alike on every rank."""
        with self._spent():
            self.watch.wait(_Watched(pending), where, busy=True)

    def counters(self) -> dict[str, float]:
        """Bytes sent, seconds in MPI and number of collectives so far on this rank."""
        return {"comm_bytes": self.bytes_sent, "comm_s": self.seconds, "comm_calls": self.calls}
