"""Mixed precision of one rank (``--precision``): autocast around the forward pass and the
loss, and fp16's loss scaler. A stateful part of every checkpoint.

Only activations change dtype. The weights, their gradients, the optimizer's state, the flat
buffers the synchronisers exchange and the PSO state stay fp32: autocast casts copies of the
weights inside the forward, and the backward runs in the dtypes the forward chose and writes
fp32 gradients into the flat buffer.

fp16 overflows where bf16 does not, so it scales the loss (:class:`torch.amp.GradScaler`).
The scaled gradients are unscaled before the synchroniser sees them, so SSGD averages true
gradients. A step whose gradient is not finite is skipped and the scale halves; that is how
the scaler finds its scale at the start of a run (it starts at 2^16), so:

- PA, SlowMo, PSO-PS: the scaler of each rank decides for its own local step. Such a skip is
  counted in ``scaler_skips`` (summed over ranks) and is not a non-finite sync: the weights
  stay finite, and rounds look at weights and fitness as always.
- SSGD: every rank skips a step whose averaged gradient is not finite (``skipped_steps``),
  and every rank's scaler then halves alike, so the scalers stay equal on every rank. Such a
  skip counts towards ``--max-nonfinite`` only once the scale is 1 or below: above 1 the
  scale may be the cause, and the next step retries at half of it; at 1, scaling is not the
  cause (a real NaN from 2^16 stops the job after 16 + K skipped steps).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from psops_mpi.errors import UsageError

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                         "fp16": torch.float16}


def check_supported(name: str, device: torch.device) -> None:
    """Raise UsageError unless torch can autocast to ``name`` on ``device``: one tiny matmul
    under autocast must come out in that dtype."""
    dtype = DTYPES[name]
    if dtype is None:
        return
    if not torch.amp.is_autocast_available(device.type):
        raise UsageError(f"--precision {name}: torch {torch.__version__} has no autocast on "
                         f"the {device.type}; use --precision fp32")
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                         "bf16; use --precision fp16 or fp32")
    probe = torch.ones(2, 2, device=device)
    try:
        with torch.autocast(device.type, dtype=dtype):
            out = probe @ probe
    except RuntimeError as exc:
        raise UsageError(f"--precision {name} on the {device.type}: "
                         f"{str(exc).splitlines()[0]}") from None
    if out.dtype != dtype:
        raise UsageError(f"--precision {name}: torch {torch.__version__} autocasts to "
                         f"{out.dtype} on the {device.type}, not {dtype}; use --precision fp32")


class Precision:
    """Autocast and loss scaling of one rank, as ``--precision`` says.

    Args:
        name: fp32, bf16 or fp16.
        device: this rank's device; autocast and the scaler work on its type.

    Raises:
        UsageError: torch cannot autocast to that dtype on that device.
    """

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in DTYPES:
            raise UsageError(f"unknown precision {name!r}; choose one of: {', '.join(DTYPES)}")
        check_supported(name, device)
        self.name, self.device, self.dtype = name, device, DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
        self._skips = 0  # steps this rank's own scaler skipped

    @property
    def scaled(self) -> bool:
        """Whether the loss is scaled (fp16)."""
        return self.scaler.is_enabled()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Where the forward pass and the loss run (nothing changes for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of the scaled loss under fp16. The loop then calls
        :meth:`unscale_` before the synchroniser, so it and the exchange see true fp32
        gradients."""
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale in place (fp16; nothing otherwise)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, take: bool) -> None:
        """The optimizer step unless the synchroniser skips it (``take`` False) or, under
        fp16, this rank's unscaled gradient is not finite; then the scale is updated."""
        if not self.scaled:
            if take:
                optimizer.step()
            return
        if not take:
            self._back_off()
            return
        before = self.scaler.get_scale()  # GradScaler.step reads found_inf on the host anyway
        self.scaler.step(optimizer)  # skipped when the unscaled gradient is not finite
        self.scaler.update()
        self._skips += int(self.scaler.get_scale() < before)  # it backs off only on a skip

    def _back_off(self) -> None:
        """Every rank skips this step (SSGD: the averaged gradient is not finite), so every
        rank's scaler backs off alike, as its own skip would: scale times the backoff factor
        and the growth counter back to 0. SSGD's scalers stay equal on every rank."""
        state = self.scaler.state_dict()
        state.update(scale=state["scale"] * state["backoff_factor"], _growth_tracker=0)
        self.scaler.update(state["scale"])  # also forgets this step's own overflow check
        self.scaler.load_state_dict(state)

    def scale(self) -> float:
        """The current loss scale (1.0 without fp16); a host read."""
        return self.scaler.get_scale() if self.scaled else 1.0

    def counts(self) -> dict[str, int]:
        """This rank's events for the epoch metrics (summed over ranks): ``scaler_skips``
        under fp16, nothing otherwise."""
        return {"scaler_skips": self._skips} if self.scaled else {}

    # ---- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """fp16: the scaler's scale and growth counter, and the skips so far; else empty."""
        if not self.scaled:
            return {}
        return {"scaler": self.scaler.state_dict(), "skips": self._skips}

    def check_state(self, state: dict[str, Any], where: str) -> None:
        """Any state loads: one without a scaler (another precision, or a checkpoint older
        than --precision) starts this run's scaler afresh."""
        scaler = state.get("scaler")
        keys = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        if self.scaled and scaler is not None and (
                not isinstance(scaler, dict) or any(k not in scaler for k in keys)):
            raise UsageError(f"{where}: the loss scaler's state is incomplete")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = state.get("scaler")
        if not self.scaled or scaler is None:
            return
        self.scaler.load_state_dict({
            "scale": float(scaler["scale"]), "growth_factor": float(scaler["growth_factor"]),
            "backoff_factor": float(scaler["backoff_factor"]),
            "growth_interval": int(scaler["growth_interval"]),
            "_growth_tracker": int(scaler["_growth_tracker"])})
        self._skips = int(state.get("skips", 0))

    def on_resize(self, joins_anew: bool) -> None:
        """A rank that joins a resized run anew has skipped nothing yet."""
        if joins_anew:
            self._skips = 0
