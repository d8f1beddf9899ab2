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

    The product can reach 2^64, past int64; splitting c into 16-bit halves keeps every
    intermediate below 2^49, so no overflow happens anywhere.
    """
    low_part = a * (c & 0xFFFF)  # < 2^48
    mid = a * (c >> 16) + (low_part >> 16)  # a*c == mid * 2^16 + (low_part & 0xFFFF)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (low_part & 0xFFFF)
    return hi, lo


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
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    block = index >> 1
    zero = torch.zeros_like(index)
    words = philox4x32((block & _MASK32, block >> 32, zero, zero), key)
    odd = (index & 1).bool()
    u1, u2 = torch.where(odd, words[2], words[0]), torch.where(odd, words[3], words[1])
    return (u1 >> 8).float() * UNIFORM_SCALE, (u2 >> 8).float() * UNIFORM_SCALE
