"""The command line and TOML files, derived from the config dataclasses.

Every field of :class:`~psops_mpi.config.TrainConfig` (and of its nested
:class:`~psops_mpi.config.PSOConfig`) is one ``--kebab-case`` flag: its type, choices
(``Literal[...]``), default and help text (the field's docstring) come from the field, so a
new setting is one field and nothing else. ``python -m psops_mpi.cli`` prints the manual's
flag table from the same source.

A small derivation over ``dataclasses.fields`` rather than a library such as tyro: our flags
are flat (``--w``, not ``--pso.w``), bad input must come out as one UsageError line on every
rank, and it costs no dependency.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from psops_mpi.config import PSOConfig, TrainConfig
from psops_mpi.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class Setting:
    """One flag, as derived from one config field."""

    name: str
    kind: type
    choices: tuple[str, ...] | None
    default: Any
    metavar: str | tuple[str, ...] | None
    doc: str
    nargs: int | None = None
    """Values the flag takes (a ``tuple[...]`` field); None: one."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def shown_default(self) -> str:
        if self.default is None or self.default is False:
            return "none" if self.default is None else "off"
        if isinstance(self.default, tuple):
            return " ".join(map(str, self.default))
        return str(self.default)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (attribute docstrings, as tyro reads
    them), whitespace folded to single spaces."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _plain_type(kind: Any) -> tuple[type, tuple[str, ...] | None, int | None]:
    """(argparse type, choices, nargs) of a field annotation: X | None -> X; Literal -> str;
    tuple[X, X] -> X twice."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) is Literal:
        return str, typing.get_args(kind), None
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        return args[0], None, len(args)
    return kind, None, None


@functools.cache
def settings(cls: type = TrainConfig) -> tuple[Setting, ...]:
    """Every flag of ``cls`` in field order; a nested config dataclass adds its own fields."""
    hints, docs, defaults = typing.get_type_hints(cls), field_docs(cls), cls()
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(settings(hints[f.name]))
            continue
        kind, choices, nargs = _plain_type(hints[f.name])
        out.append(Setting(f.name, kind, choices, getattr(defaults, f.name),
                           f.metadata.get("metavar"), docs[f.name], nargs))
    return tuple(out)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through the usual bad-input path, not usage text
        raise UsageError(message)

    def print_help(self, file=None) -> None:  # once per job, not once per rank
        from mpi4py import MPI  # only when asked: the config stays importable without MPI

        if MPI.COMM_WORLD.Get_rank() == 0:
            super().print_help(file)


def program_name() -> str:
    """How the user started us: the console script, or ``python -m psops_mpi.train``."""
    script = Path(sys.argv[0]).name
    return script if script == "psops-train" else "python -m psops_mpi.train"


def build_parser() -> argparse.ArgumentParser:
    """Flags map one to one onto the config fields; defaults live there (not repeated here:
    an absent flag is absent from the parsed namespace)."""
    from psops_mpi import __version__

    parser = _Parser(prog=program_name(), argument_default=argparse.SUPPRESS,
                     description="Data-parallel training over MPI with PSO-PS, PA or SSGD.")
    parser.add_argument("--config", metavar="FILE.toml",
                        help="settings file; flags given here override it")
    parser.add_argument("--version", action="version", version=f"psops_mpi {__version__}")
    for s in settings():
        help_text = f"{s.doc} (default: {s.shown_default})"
        if s.kind is bool:
            parser.add_argument(s.flag, action="store_true", help=help_text)
        else:
            parser.add_argument(s.flag, type=s.kind, choices=s.choices, metavar=s.metavar,
                                nargs=s.nargs, help=help_text)
    return parser


def flag_table() -> str:
    """The manual's table of flags (docs/cli.md), from the same fields as the parser."""
    rows = ["| flag | default | meaning |", "|---|---|---|",
            "| `--config FILE.toml` | none | settings file; flags given here override it |",
            "| `--version` | none | print the version and exit |"]
    for s in settings():
        shown = s.flag
        if s.choices:
            shown += " {" + ",".join(s.choices) + "}"
        elif isinstance(s.metavar, tuple):
            shown += " " + " ".join(s.metavar)
        elif s.kind is not bool:
            shown += " " + (s.metavar or s.name.upper())
        default = (s.shown_default if s.shown_default in ("none", "off")
                   else f"`{s.shown_default}`")
        rows.append(f"| `{shown}` | {default} | {s.doc.replace('|', '/')} |")
    return "\n".join(rows)


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file into the flat key space of the command line.

    Keys may be written with '-' or '_'. PSO keys may sit at the top level or in a ``[pso]``
    table. Unknown keys are an error, so a typo never passes silently.
    """
    try:
        with Path(path).open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "pso" and isinstance(value, dict):
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    unknown = sorted(set(flat) - {s.name for s in settings()})
    if unknown:
        raise UsageError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return flat


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Make a validated TrainConfig from flat settings (TOML values overridden by flags)."""
    pso_names = {f.name for f in dataclasses.fields(PSOConfig)}
    pso = {k: v for k, v in values.items() if k in pso_names}
    top = {k: v for k, v in values.items() if k not in pso_names}
    try:
        return TrainConfig(**top, pso=PSOConfig.from_preset(
            pso.pop("pso_preset", PSOConfig().pso_preset), **pso))
    except TypeError as exc:  # a wrongly typed value from TOML, e.g. a string for an int
        raise UsageError(f"bad setting: {exc}") from None


def parse_config(argv: list[str] | None) -> TrainConfig:
    """Flags over the TOML file over the defaults, validated."""
    given = vars(build_parser().parse_args(argv))
    values = load_toml(given.pop("config")) if "config" in given else {}
    values.update(given)
    return build_config(values)


if __name__ == "__main__":
    print(flag_table())
