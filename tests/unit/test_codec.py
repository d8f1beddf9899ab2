"""What travels: bf16 and int8 with a scale per block, and error feedback over many rounds."""

from __future__ import annotations

import pytest
import torch

from psops_mpi import codec


def encoded(values: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the decoded values, the residual) of one encoding of ``values``."""
    data = torch.empty(codec.chunk_bytes(values.numel(), dtype), dtype=torch.uint8)
    residual = codec.encode(values, data, dtype)
    return codec.decode(data, values.numel(), dtype), residual


def test_int8_rounds_each_block_to_its_own_scale() -> None:
    """Two blocks of very different size: each keeps 8 bits of its own range (one shared
    scale would round the small block to zeros), and decode + residual is the input."""
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(codec.BLOCK, generator=gen) * 1e-4
    large = torch.randn(codec.BLOCK, generator=gen) * 10
    values = torch.cat([small, large])
    decoded, residual = encoded(values, "int8")
    for part in (slice(0, codec.BLOCK), slice(codec.BLOCK, None)):
        step = values[part].abs().max() / 127
        assert (decoded[part] - values[part]).abs().max() <= step / 2 * (1 + 1e-6)
        assert decoded[part].abs().max() > 0
    assert torch.equal(decoded + residual, values)  # exact here: the residual is values - decoded
    assert torch.equal(residual, values - decoded)


def test_a_block_of_zeros_and_the_bytes_per_value() -> None:
    decoded, residual = encoded(torch.zeros(2 * codec.BLOCK), "int8")
    assert not decoded.any() and not residual.any()
    assert codec.chunk_bytes(1024, "int8") == 1024 + 4 * 1024 // codec.BLOCK
    assert codec.chunk_bytes(1024, "bf16") == 2048 and codec.chunk_bytes(1024, "fp32") == 4096
    assert codec.value_bytes("int8") / codec.value_bytes("fp32") < 0.26
    assert codec.padded(1000, 4) == 1024 and codec.padded(1024, 4) == 1024
    with pytest.raises(ValueError, match="whole blocks"):
        codec.chunk_bytes(100, "int8")


def test_bf16_keeps_eight_bits_of_mantissa() -> None:
    values = torch.linspace(-3, 3, 256)
    decoded, residual = encoded(values, "bf16")
    assert torch.equal(decoded, values.to(torch.bfloat16).float())
    assert (residual.abs() <= values.abs() * 2**-8).all()


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_error_feedback_loses_nothing_over_many_rounds(dtype: str) -> None:
    """Send the same values every round, as a slow drift does: one large value sets each
    block's scale, the others are a third of a scale unit. Without error feedback int8
    rounds them to nothing every round, and the receiver never sees the drift; with it, the
    receiver's total after R rounds stays within one round's rounding of the true total,
    for every R up to 300 (bounded, not growing with R)."""
    values = torch.full((2 * codec.BLOCK,), 0.3 / 127)
    values[0] = values[codec.BLOCK] = 1.0  # scale 1/127 in both blocks
    unit = 1.0 / 127
    residual = torch.zeros_like(values)
    total_true = torch.zeros_like(values, dtype=torch.float64)
    total_fed = torch.zeros_like(total_true)
    total_plain = torch.zeros_like(total_true)
    errors = []
    for _ in range(300):
        total_true += values
        decoded, residual = encoded(values + residual, dtype)
        total_fed += decoded
        total_plain += encoded(values, dtype)[0]
        errors.append((total_fed - total_true).abs().max().item())
    assert max(errors) <= 0.5 * unit * 1.01  # one round's rounding at most, at every round
    assert max(errors[-100:]) <= 2 * max(errors[:100])  # and it does not grow
    lost = (total_true - total_plain).abs().max().item()
    assert lost > 50 * max(errors)  # without feedback every round's rounding adds up
    if dtype == "int8":
        assert not (total_plain[1:codec.BLOCK]).any()  # without feedback: lost entirely
        assert (total_true - total_plain).abs().max().item() == pytest.approx(300 * 0.3 * unit)
