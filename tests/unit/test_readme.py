"""The README's flag table matches the command line and the defaults in config.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from psops_mpi.cli import build_parser, flag_table
from psops_mpi.config import PSOConfig, TrainConfig

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(--[a-z0-9-]+)[^`]*` \| ([^|]+) \|", re.MULTILINE)


def readme_rows() -> dict[str, str]:
    text = README.read_text()
    section = text.split("## Command-line flags", 1)[1].split("\n## ", 1)[0]
    return {flag: default.strip() for flag, default in ROW.findall(section)}


def code_default(flag: str) -> object:
    name = flag[2:].replace("-", "_")
    for cfg in (TrainConfig(), PSOConfig()):
        if hasattr(cfg, name):
            return getattr(cfg, name)
    return None


def test_every_flag_is_documented_and_every_documented_flag_exists() -> None:
    parser_flags = {opt for action in build_parser()._actions for opt in action.option_strings
                    if opt.startswith("--") and opt != "--help"}
    assert set(readme_rows()) == parser_flags


@pytest.mark.parametrize("flag", sorted(readme_rows()))
def test_documented_default_matches_the_code(flag: str) -> None:
    documented = readme_rows()[flag].strip("`")
    value = code_default(flag)
    if value is None or value is False:
        assert documented in ("none", "off"), (flag, documented)
    elif flag == "--model":
        assert documented == value == "auto"
    else:
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert documented == shown, (flag, documented, value)


def test_the_readme_table_is_the_generated_one() -> None:
    """Regenerate it with `python -m psops_mpi.cli` after changing a setting."""
    assert flag_table() in README.read_text()
