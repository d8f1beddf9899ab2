"""What travels in a round: fp32 values as they are, or rounded to bf16 or to int8 with one
scale per block of values. Pure functions on tensors, no MPI (the exchange moves the bytes).

A message is a flat byte buffer. An int8 chunk of ``n`` values (a multiple of ``BLOCK``) is
its ``n / BLOCK`` float32 scales, then its ``n`` int8 codes: one contiguous message of
:func:`chunk_bytes` bytes. A bf16 chunk is the ``n`` values rounded to bfloat16.

Rounding to int8 is symmetric: a block's scale is its largest magnitude over 127, and every
value is rounded to the nearest multiple of it (ties to even). A block of zeros has scale 0
and decodes to zeros. Decoding the same bytes gives the same float32 values on every rank, so
sums formed from decoded pieces in the same order agree bit for bit.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019) is the caller's: it adds what
rounding dropped last time (:func:`encode` returns it) to what it sends next time.
"""

from __future__ import annotations

from typing import Literal

import torch

Dtype = Literal["fp32", "bf16", "int8"]
DTYPES: tuple[str, ...] = ("fp32", "bf16", "int8")
BLOCK = 128  # values per int8 scale: 4 bytes of scale per 128 bytes of codes (3%)
INT8_MAX = 127.0


def value_bytes(dtype: str) -> float:
    """Bytes a value costs on the wire in ``dtype``, its share of the int8 scales included."""
    return {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4.0 / BLOCK}[dtype]


def padded(numel: int, parts: int) -> int:
    """The smallest length >= ``numel`` that splits into ``parts`` chunks of whole blocks."""
    unit = parts * BLOCK
    return -(-numel // unit) * unit


def chunk_bytes(numel: int, dtype: str) -> int:
    """Bytes of one encoded chunk of ``numel`` values (a multiple of :data:`BLOCK` for int8)."""
    if dtype == "int8":
        if numel % BLOCK:
            raise ValueError(f"an int8 chunk holds whole blocks of {BLOCK} values, got {numel}")
        return numel + 4 * (numel // BLOCK)
    return numel * {"fp32": 4, "bf16": 2}[dtype]


def encode(values: torch.Tensor, out: torch.Tensor, dtype: str,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``values`` (float32, 1-D) into the byte buffer ``out`` (uint8, of
    :func:`chunk_bytes` bytes) and return what rounding dropped, ``values - decode(out)``
    (the error feedback's residual), written into ``residual`` when given (no allocation
    of the values' size then: encoding runs at every round)."""
    if residual is None:
        residual = torch.empty_like(values)
    if dtype == "fp32":
        out.view(torch.float32).copy_(values)
        return residual.zero_()
    if dtype == "bf16":
        rounded = out.view(torch.bfloat16)
        rounded.copy_(values)
        return torch.sub(values, rounded, out=residual)
    num_blocks = values.numel() // BLOCK
    scales = out[: 4 * num_blocks].view(torch.float32)
    codes = residual.view(num_blocks, BLOCK)  # the residual's memory is the scratch first
    torch.amax(torch.abs(values.view(num_blocks, BLOCK), out=codes), dim=1, out=scales)
    scales.div_(INT8_MAX)
    inverse = torch.where(scales > 0, scales.reciprocal(), torch.zeros_like(scales))
    torch.mul(values.view(num_blocks, BLOCK), inverse[:, None], out=codes).round_()
    out[4 * num_blocks:].view(torch.int8).copy_(residual)  # |codes| <= 127: exact
    codes.mul_(scales[:, None])  # decoded
    return torch.sub(values, residual, out=residual)


def decode(data: torch.Tensor, numel: int, dtype: str,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 values of a chunk of ``numel`` values encoded by :func:`encode`, written
    into ``out`` when given."""
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=data.device)
    if dtype == "fp32":
        return out.copy_(data.view(torch.float32)[:numel])
    if dtype == "bf16":
        return out.copy_(data.view(torch.bfloat16)[:numel])
    num_blocks = numel // BLOCK
    scales = data[: 4 * num_blocks].view(torch.float32)
    codes = data[4 * num_blocks: 4 * num_blocks + numel].view(torch.int8)
    blocks = out.view(num_blocks, BLOCK)
    blocks.copy_(codes.view(num_blocks, BLOCK))
    return blocks.mul_(scales[:, None]).view(numel)
