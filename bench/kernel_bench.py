"""Fused PSO update against the plain-torch reference, measured against the memory's speed.

What it measures, for N float32 parameters (``--sizes``, default 1e5 .. 1e8) on one device
(``--device``: the GPU when there is one, else the CPU):

* ``fused`` -- ``psops_mpi.kernels.pso_update_fused_``: the custom op ``psops::pso_update_``
  (the C kernel on the CPU, the Triton kernel on CUDA), random r1, r2 made in the kernel.
* ``op`` -- the same update called as the operator ``torch.ops.psops.pso_update_``, the way
  ``torch.compile`` calls it. On CUDA, ``fused`` launches the Triton kernel directly in eager
  code, so ``op ms`` - ``fused ms`` is what the operator dispatch costs per call; on the CPU
  both take the operator.
* ``reference`` -- ``psops_mpi.swarm.pso_update_``: plain torch ops and ``torch.rand``.
* ``copy_`` -- ``dst.copy_(src)`` of N floats: the device's practical memory speed.

Both PSO variants run the same step (w=0.7, c1=c2=1.4, no vmax) with a new key each call, on
buffers from ``flat.flat_buffer`` as training uses them. Effective bandwidth is the least
traffic the step needs, 24 * N bytes (read x, v, p, g; write x, v), over the median time;
``copy_`` moves 8 * N bytes (read and write N floats). GB = 10**9 bytes. ``vs copy_`` is fused
bandwidth / copy_ bandwidth; ``speedup`` is reference time / fused time.

Method: first the fused op and the reference must agree on a small input (with r1 = r2 = 1),
else the run stops; then one warm-up call of each variant (the CPU kernel is compiled or
loaded then), then ``--repeats`` rounds in which the four variants run once each in an
order that rotates from round to round, so background load hits all of them alike; medians
over the rounds. CUDA
calls are timed with a synchronize before and after. A size is skipped, with a message, when
its ~9 N floats (four state tensors, the copy pair, the reference's temporaries) do not fit
in the free memory. Threads: torch's default unless ``--threads``.

Run it (prints a table, writes JSON to bench/results/kernel_<device>.json)::

    python bench/kernel_bench.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from psops_mpi.flat import flat_buffer
from psops_mpi.kernels import cpu_backend, pso_update_fused_
from psops_mpi.metrics import environment
from psops_mpi.swarm import pso_update_, rng_key

COEFFICIENTS = {"w": 0.7, "c1": 1.4, "c2": 1.4, "vmax": None}
FLOATS_NEEDED = 9  # per element, at the peak of a reference call (see the docstring)
GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e5,1e6,1e7,1e8", help="comma-separated N (1e7 ok)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per size")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="torch / kernel threads (default: torch's)")
    p.add_argument("--json", metavar="PATH",
                   help="results file (default bench/results/kernel_<device>.json)")
    return p.parse_args(argv)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return run


def check_agreement(device: torch.device) -> None:
    """Stop before timing if the fused op and the reference disagree here (unit r1 = r2 = 1)."""
    gen = torch.Generator().manual_seed(1)
    x, v, p, g = (torch.randn(4099, generator=gen).to(device) for _ in range(4))
    fused, ref = [x.clone(), v.clone()], [x.clone(), v.clone()]
    pso_update_fused_(*fused, p, g, **COEFFICIENTS, key=1, deterministic=True)
    pso_update_(*ref, p, g, **COEFFICIENTS, key=1, deterministic=True)
    if not all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(fused, ref, strict=True)):
        sys.exit("kernel_bench: the fused update disagrees with the reference on this device")


def measure(n: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant at size n."""
    gen = torch.Generator().manual_seed(n)
    x, v, p, g = (flat_buffer(n, torch.float32, device) for _ in range(4))
    for t in (x, p, g):
        t.copy_(torch.randn(n, generator=gen))
    src, dst = flat_buffer(n, torch.float32, device), flat_buffer(n, torch.float32, device)
    counter = iter(range(10**9))

    def fused() -> None:
        pso_update_fused_(x, v, p, g, **COEFFICIENTS, key=rng_key(0, next(counter), 0))

    def op() -> None:
        torch.ops.psops.pso_update_(x, v, p, g, COEFFICIENTS["w"], COEFFICIENTS["c1"],
                                    COEFFICIENTS["c2"], COEFFICIENTS["vmax"],
                                    rng_key(0, next(counter), 0), False)

    def reference() -> None:
        pso_update_(x, v, p, g, **COEFFICIENTS, key=rng_key(0, next(counter), 0))

    variants = {"fused": fused, "op": op, "reference": reference,
                "copy_": lambda: dst.copy_(src)}
    run = timer(device)
    for fn in variants.values():
        run(fn)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(repeats):
        turn = i % len(names)
        for name in names[turn:] + names[:turn]:
            times[name].append(run(variants[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(n: int, seconds: dict[str, float]) -> dict[str, float]:
    fused_bw = 24 * n / seconds["fused"] / GB
    copy_bw = 8 * n / seconds["copy_"] / GB
    return {
        "n": n, **{f"{k}_s": s for k, s in seconds.items()},
        "fused_GBps": fused_bw, "reference_GBps": 24 * n / seconds["reference"] / GB,
        "copy_GBps": copy_bw, "fused_vs_copy": fused_bw / copy_bw,
        "speedup": seconds["reference"] / seconds["fused"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = "triton" if device.type == "cuda" else f"cpu-{cpu_backend()}"
    print(f"device {device}, kernel {kernel}, {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds per size; GB/s = 10^9 bytes/s")
    print(f"{'N':>11} {'fused GB/s':>11} {'ref GB/s':>9} {'copy_ GB/s':>11} {'vs copy_':>9} "
          f"{'speedup':>8} {'fused ms':>9} {'op ms':>9} {'ref ms':>9}")
    check_agreement(device)
    rows, skipped = [], []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        need = FLOATS_NEEDED * 4 * n
        if need > 0.8 * free_bytes(device):
            print(f"{n:>11} skipped: needs ~{need / GB:.1f} GB, "
                  f"{free_bytes(device) / GB:.1f} GB free", flush=True)
            skipped.append(n)
            continue
        r = row(n, measure(n, device, args.repeats))
        rows.append(r)
        print(f"{n:>11} {r['fused_GBps']:>11.2f} {r['reference_GBps']:>9.2f} "
              f"{r['copy_GBps']:>11.2f} {r['fused_vs_copy']:>9.2f} {r['speedup']:>8.2f} "
              f"{r['fused_s'] * 1e3:>9.3f} {r['op_s'] * 1e3:>9.3f} "
              f"{r['reference_s'] * 1e3:>9.3f}", flush=True)
    out = Path(args.json or Path(__file__).parent / "results" / f"kernel_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {**environment(), "threads": torch.get_num_threads(), "kernel": kernel,
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                        else None, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "repeats": args.repeats, "rows": rows, "skipped_sizes": skipped,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
