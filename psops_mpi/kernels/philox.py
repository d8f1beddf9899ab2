"""Philox4x32-10 (Salmon et al., SC'11) in plain torch: the definition of the fused op's draws.

Under a 64-bit key K (``swarm.rng_key(seed, round, rank)``), Philox block m — counter
(m mod 2^32, m >> 32, 0, 0), key (K mod 2^32, K >> 32) — gives element 2m its (r1, r2) from
output words 0 and 1 and element 2m+1 from words 2 and 3: one block per two elements, so a CPU
spends half the work a block per element would cost. A word u becomes ``(u >> 8) * 2^-24``:
24 random bits, exact in float32, so every draw lies in [0, 1) (the top value is 1 - 2^-24;
``tl.rand``'s conversion can round up to 1.0). The Triton kernel (``tl.randint4x``) and the C
CPU kernel compute the same numbers bit for bit; this module is their reference and the slow
fallback.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
NUM_ROUNDS = 10
UNIFORM_SCALE = 2.0**-24


def _mulhilo(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * c for a 32-bit constant a and uint32 values c (in int64).

    The product can pass 2^63: int64 multiplication wraps modulo 2^64 (two's complement),
    which keeps all 64 bits of the product, and the masks read both halves back unsigned.
    The known-answer tests check this on the machine at hand.
    """
    product = c * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of four uint32 counter words (int64 tensors) under a 64-bit key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(NUM_ROUNDS):
        hi0, lo0 = _mulhilo(ROUND_A, c0)
        hi1, lo1 = _mulhilo(ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + KEY_A) & _MASK32, (k1 + KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_pair(key: int, start: int, count: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """r1, r2 (float32, shape (count,)) for elements start .. start+count-1 under ``key``."""
    first, end = start >> 1, (start + count + 1) >> 1  # the Philox blocks these elements use
    block = torch.arange(first, end, dtype=torch.int64, device=device)
    zero = torch.zeros_like(block)
    w0, w1, w2, w3 = philox4x32((block & _MASK32, block >> 32, zero, zero), key)
    skip = start & 1  # an odd start begins with the second element of its block
    r1 = torch.stack((w0, w2), dim=1).view(-1)[skip:skip + count]
    r2 = torch.stack((w1, w3), dim=1).view(-1)[skip:skip + count]
    return (r1 >> 8).float() * UNIFORM_SCALE, (r2 >> 8).float() * UNIFORM_SCALE
