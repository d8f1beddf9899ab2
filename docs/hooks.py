"""mkdocs hooks: the manual's links to the repository's own files.

A page of ``docs/`` links to a file of the repository as ``../bench/results/REPORT.md``, the
path that works wherever the Markdown is read from the repository. The built site serves those
files under ``repo/``: a Markdown file (a report) as a page, anything else (a plot, a script,
JSON) as it is; the files a served report links to come along. A link to a file that does not
exist fails the build (``mkdocs build --strict``) like a broken link between pages. The API
reference's docstrings use Sphinx roles (:class:`X`); the rendered page keeps only the code.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files, InclusionLevel

REPO = Path(__file__).resolve().parents[1]
SERVED = "repo/"
UP_LINK = re.compile(r"(\]\()\.\./([^)#\s]+)")  # ](../path
# A Sphinx role in a docstring (:class:`X`), as the API reference renders it: the role's name
# is dropped, the code kept.
SPHINX_ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|exc|obj):(?=<code>)")
LOCAL_LINK = re.compile(r"\]\((?![a-z]+:|#|/)([^)#\s]+)")  # ](relative/path


def on_files(files: Files, config: Any) -> Files:
    """Every repository file the pages link to, and what the Markdown ones link to in turn."""
    todo = [(f.src_uri, f.abs_src_path) for f in files.documentation_pages()]
    seen: set[str] = set()
    while todo:
        src_uri, path = todo.pop()
        for target in _targets(src_uri, Path(path).read_text(encoding="utf-8")):
            if target in seen:
                continue
            seen.add(target)
            source = REPO / target
            if not source.is_file():
                raise PluginError(f"{src_uri} links to {target}, which is not a file of the "
                                  "repository")
            file = File.generated(config, SERVED + target, abs_src_path=str(source),
                                  inclusion=InclusionLevel.NOT_IN_NAV)
            files.append(file)
            if target.endswith(".md"):
                todo.append((file.src_uri, str(source)))
    return files


def _targets(src_uri: str, text: str) -> list[str]:
    """The repository files a page links to, as paths from the repository's root."""
    if src_uri.startswith(SERVED):
        return [_from_repo(src_uri, link) for link in LOCAL_LINK.findall(text)]
    return [target for _, target in UP_LINK.findall(text)]


def _from_repo(src_uri: str, link: str) -> str:
    """A served report's relative link, as a path from the repository's root."""
    folder = posixpath.dirname(src_uri.removeprefix(SERVED))
    return posixpath.normpath(posixpath.join(folder, link))


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri.startswith(SERVED):
        return markdown
    return UP_LINK.sub(lambda m: m.group(1) + SERVED + m.group(2), markdown)


def on_page_content(html: str, **kwargs: Any) -> str:
    return SPHINX_ROLE.sub("", html)
