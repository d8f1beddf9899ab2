"""The manual (docs/, built by mkdocs) and the README say what the code does: the site builds
strictly (no broken link, page or API entry), the flag table is the generated one and its
defaults are the code's, the API reference covers every export, and every command in a code
block names flags that parse and scripts that exist."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import psops_mpi
from psops_mpi.cli import build_parser, flag_table, parse_config
from psops_mpi.config import PSO_PRESETS, PSOConfig, TrainConfig

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md")), REPO / "slurm" / "README.md",
         REPO / "bench" / "README.md"]
ROW = re.compile(r"^\| `(--[a-z0-9-]+)[^`]*` \| ([^|]+) \|", re.MULTILINE)
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")


def table_rows() -> dict[str, str]:
    return {flag: default.strip() for flag, default in ROW.findall((DOCS / "cli.md").read_text())}


def code_default(flag: str) -> object:
    name = flag[2:].replace("-", "_")
    for cfg in (TrainConfig(), PSOConfig()):
        if hasattr(cfg, name):
            return getattr(cfg, name)
    return None


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]')")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                          str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin",
                                           "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "reference" / "index.html").is_file()
    # a report the manual links to is served beside it
    assert (site / "repo" / "bench" / "results" / "REPORT" / "index.html").is_file()
    check_rendered(site)


def check_rendered(site: Path) -> None:
    """What a strict build passes and a reader sees: Python-Markdown folds a list item that
    follows a loose item (one with a code block or a second paragraph) into that item's last
    paragraph when no blank line comes first, so its "- " shows as text. No paragraph of
    any page may hold a list marker or a fence; every PSO-PS preset is a list item of its own
    on the algorithms page."""
    folded = []
    for page in sorted(site.rglob("*.html")):
        for paragraph in re.findall(r"<p>(.*?)</p>", page.read_text(), re.DOTALL):
            folded += [f"{page.relative_to(site)}: {line.strip()[:80]}"
                       for line in paragraph.splitlines() if re.match(r"\s*(- |\* |```)", line)]
    assert not folded, "list items or fences rendered as text:\n" + "\n".join(folded)
    items = re.findall(r"<li>\s*(?:<p>)?\s*<strong><code>(\w+)</code></strong>",
                       (site / "algorithms" / "index.html").read_text())
    assert [i for i in items if i in PSO_PRESETS] == list(PSO_PRESETS)


def test_the_api_reference_covers_every_export() -> None:
    entries = re.findall(r"^::: ([\w.]+)$", (DOCS / "reference.md").read_text(), re.MULTILINE)
    documented = {entry.rsplit(".", 1)[1]: entry for entry in entries}
    assert set(documented) == set(psops_mpi.__all__)
    for name, entry in documented.items():
        module = entry.rsplit(".", 1)[0]
        assert getattr(psops_mpi, name) is getattr(importlib.import_module(module), name)


def test_every_flag_is_documented_and_every_documented_flag_exists() -> None:
    parser_flags = {opt for action in build_parser()._actions for opt in action.option_strings
                    if opt.startswith("--") and opt != "--help"}
    assert set(table_rows()) == parser_flags


@pytest.mark.parametrize("flag", sorted(table_rows()))
def test_documented_default_matches_the_code(flag: str) -> None:
    documented = table_rows()[flag].strip("`")
    value = code_default(flag)
    if value is None or value is False:
        assert documented in ("none", "off"), (flag, documented)
    elif flag == "--model":
        assert documented == value == "auto"
    else:
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert documented == shown, (flag, documented, value)


def test_the_flag_table_is_the_generated_one() -> None:
    """Regenerate it with `python -m psops_mpi.cli` after changing a setting."""
    assert flag_table() in (DOCS / "cli.md").read_text()


def shell_lines(text: str) -> list[str]:
    """The lines of a page's code blocks (continuations joined) and its inline code spans
    that start like a command."""
    spans = [" ".join(span.split()) for span in INLINE.findall(FENCE.sub("", text))]
    lines = [line for block in FENCE.findall(text)
             for line in block.replace("\\\n", " ").splitlines()]
    return lines + [s for s in spans if re.match(r"(mpiexec|srun|python|bash) ", s)]


def split_chain(line: str) -> list[list[str]]:
    """A shell line's commands (split at &&, ;, | and redirections); none for a line that
    is not shell (sample output with an unclosed quote)."""
    lexer = shlex.shlex(line.split(" # ")[0], posix=True, punctuation_chars=True)
    lexer.wordchars += "$.:/=-~*[],{}"
    try:
        words = list(lexer)
    except ValueError:
        return []
    out: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", "||", ";", "|", "&", ">", "2>", "<"):
            out.append([])
        else:
            out[-1].append(word)
    return [c for c in out if c]


def commands() -> list[tuple[str, list[str]]]:
    """(page, words) for every shell command the pages show."""
    return [(page.name, command) for page in PAGES for line in shell_lines(page.read_text())
            for command in split_chain(line)]


def training_flags(words: list[str]) -> list[str] | None:
    for i, word in enumerate(words):
        if word == "psops-train" or (word == "psops_mpi.train" and words[i - 1] == "-m"):
            return words[i + 1:]
    return None


def test_the_pages_show_commands() -> None:
    trains = [c for _, c in commands() if training_flags(c) is not None]
    assert len(trains) >= 6  # the checks below check something


@pytest.mark.parametrize(("page", "words"), [
    pc for pc in commands() if training_flags(pc[1]) is not None and "..." not in pc[1]])
def test_every_training_command_shown_parses(page: str, words: list[str]) -> None:
    parse_config(training_flags(words))  # raises (exit code 2) on an unknown flag or bad value


@pytest.mark.parametrize(("page", "words"), [
    pc for pc in commands() if {"python", "bash"} & set(pc[1])])
def test_every_script_and_module_shown_exists(page: str, words: list[str]) -> None:
    for i, word in enumerate(words[:-1]):
        nxt = words[i + 1]
        if word in ("python", "bash") and re.match(r"(bench|examples|tests|slurm)/", nxt):
            assert (REPO / nxt).is_file(), (page, " ".join(words))
        if word == "-m" and words[i - 1] == "python" and nxt not in ("pip", "pytest", "mkdocs"):
            assert importlib.util.find_spec(nxt) is not None, (page, " ".join(words))
