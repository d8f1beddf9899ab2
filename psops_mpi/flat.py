"""Tensors as views into one contiguous buffer, so a round sends the buffer as it is.

After ``FlatParams(model)``, every parameter's ``.data`` is a view into ``flat.data`` and its
``.grad`` a view into ``flat.grad``: an optimizer step writes straight into the buffer that
MPI sends, and a collective's result is the model's new weights with nothing copied back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

_HUGE_PAGE_BYTES = 4 << 20  # numpy asks the kernel for huge pages from this size on


def flat_buffer(numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed 1-D buffer. Large CPU buffers come from numpy, which advises the kernel to back
    them with transparent huge pages; torch's allocator does not, and with 4 KiB pages a
    10M-float Allgather or Allreduce ran 10-25% slower here (bench/exchange_bench.py)."""
    device = torch.device(device)
    probe = torch.empty((), dtype=dtype)
    if device.type == "cpu" and numel * probe.element_size() >= _HUGE_PAGE_BYTES:
        try:
            np_dtype = probe.numpy().dtype
        except TypeError:  # bfloat16 and others numpy cannot hold
            return torch.zeros(numel, dtype=dtype, device=device)
        return torch.from_numpy(np.zeros(numel, dtype=np_dtype))
    return torch.zeros(numel, dtype=dtype, device=device)


def _bind(tensors: Sequence[torch.Tensor], buffer: torch.Tensor) -> list[torch.Tensor]:
    """Copy each tensor into its slice of ``buffer`` and make the tensor a view of it."""
    views = []
    offset = 0
    for tensor in tensors:
        view = buffer[offset : offset + tensor.numel()].view_as(tensor)
        view.copy_(tensor.detach())
        tensor.data = view
        views.append(view)
        offset += tensor.numel()
    return views


def _common_dtype_device(tensors: Sequence[torch.Tensor], what: str) -> tuple:
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) != 1:
        raise ValueError(f"all {what} must share one dtype and device to be flattened, "
                         f"found {sorted(str(k) for k in kinds)}")
    return kinds.pop()


class FlatParams:
    """A model's trainable parameters (and their gradients) as one flat float buffer.

    Args:
        model: the model; its parameters become views of ``data``.
        extra: slots reserved after the parameters in the same allocation. PSO-PS keeps the
            particle's fitness there so ``packed`` = [weights ; fitness] goes out in one message.
    """

    def __init__(self, model: nn.Module, extra: int = 0) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        dtype, device = _common_dtype_device(self.params, "parameters")
        self.numel = sum(p.numel() for p in self.params)
        self.packed = flat_buffer(self.numel + extra, dtype, device)
        self.data = self.packed[: self.numel]
        _bind(self.params, self.data)
        self.grad = flat_buffer(self.numel, dtype, device)
        offsets = self._offsets()
        self._grad_views = [
            self.grad[o : o + p.numel()].view_as(p)
            for p, o in zip(self.params, offsets, strict=True)
        ]
        self.attach_grads()

    def _offsets(self) -> list[int]:
        offsets, total = [], 0
        for p in self.params:
            offsets.append(total)
            total += p.numel()
        return offsets

    def attach_grads(self) -> None:
        """Make every ``p.grad`` a view of ``grad`` again.

        ``optimizer.zero_grad()`` sets grads to None by default; autograd then allocates new
        tensors outside the buffer. Those are gathered into it (one copy when every parameter
        has a gradient) and replaced by views; grads that are views already cost nothing.
        """
        grads = [p.grad for p in self.params]
        if all(g is not None and g.data_ptr() != v.data_ptr()
               for g, v in zip(grads, self._grad_views, strict=True)):
            torch.cat([g.reshape(-1) for g in grads], out=self.grad)  # type: ignore[union-attr]
            for param, view in zip(self.params, self._grad_views, strict=True):
                param.grad = view
            return
        for param, view in zip(self.params, self._grad_views, strict=True):
            if param.grad is None:
                view.zero_()
            elif param.grad.data_ptr() != view.data_ptr():
                view.copy_(param.grad)
            else:
                continue
            param.grad = view


class FlatBuffers:
    """A model's floating-point buffers (BatchNorm running statistics) as one flat buffer.

    Integer buffers (``num_batches_tracked``) stay as they are: they are equal on every rank
    and averaging them means nothing. ``data`` is None when the model has no float buffers;
    ``packed`` is ``data`` plus ``extra`` slots after it in the same allocation (the finite
    flag of an average that leaves out non-finite ranks).
    """

    def __init__(self, model: nn.Module, extra: int = 0) -> None:
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.data: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        if self.buffers:
            dtype, device = _common_dtype_device(self.buffers, "floating-point buffers")
            total = sum(b.numel() for b in self.buffers)
            self.packed = flat_buffer(total + extra, dtype, device)
            self.data = self.packed[:total]
            _bind(self.buffers, self.data)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, from one reduction and one host read.

    The sum is NaN or inf as soon as one element is, and costs one read pass with no
    temporary (``torch.isfinite(t).all()`` writes a bool per element first: ten times slower
    on a CPU here). A sum that overflows reports non-finite too, which only happens when
    the values are near the float range's end, as diverged values are; half precision is
    summed in float32 so that a sum of ordinary values cannot overflow.
    """
    total = tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()
    return math.isfinite(total.item())  # the host read: about 4 us less than isfinite()


def load_into(dst: torch.Tensor, src: torch.Tensor | np.ndarray) -> None:
    """Copy a saved array (numpy, possibly read-only, or a tensor) into ``dst`` on its device."""
    if isinstance(src, np.ndarray):
        # np.array, not np.ascontiguousarray: that one turns 0-d values into 1-d arrays.
        src = torch.from_numpy(np.array(src, order="C"))
    dst.copy_(src.reshape(dst.shape))
