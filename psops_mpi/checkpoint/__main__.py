"""Work with checkpoints from the shell, without MPI:

    python -m psops_mpi.checkpoint export CKPT OUT.pt   # the run's answer as a state_dict
    python -m psops_mpi.checkpoint inspect CKPT         # step, world size, summaries, config

CKPT is one ``step-N`` folder or a ``--checkpoint-dir`` (then its newest checkpoint). The
exported file loads with ``model.load_state_dict(torch.load("OUT.pt"))``. Bad input: one line
on stderr and exit code 2; ``inspect`` exits 1 when a shard fails its checksum.
"""

from __future__ import annotations

import argparse
import sys

import torch

from psops_mpi.checkpoint.export import export_state_dict, inspect_lines, resolve
from psops_mpi.errors import UsageError, error_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m psops_mpi.checkpoint",
                     description="Export or inspect psops_mpi checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the global best as a state_dict")
    export.add_argument("checkpoint", help="a step-N folder or a checkpoint directory")
    export.add_argument("out", help="the .pt file to write")
    inspect = commands.add_parser("inspect", help="print a summary")
    inspect.add_argument("checkpoint", help="a step-N folder or a checkpoint directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "export":
            state = export_state_dict(args.checkpoint)
            try:
                torch.save(state, args.out)
            except OSError as exc:
                raise UsageError(f"cannot write {args.out}: {exc.strerror}") from None
            numel = sum(t.numel() for t in state.values())
            print(f"wrote {args.out}: {len(state)} tensors, {numel:,} values, from "
                  f"{resolve(args.checkpoint)}")
            return 0
        lines, all_ok = inspect_lines(args.checkpoint)
        print("\n".join(lines))
        return 0 if all_ok else 1
    except UsageError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
