"""A user's own code named on the command line as ``package.module:function`` (``--model``,
``--dataset``): imported and called with one line for each way it can fail."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from psops_mpi.errors import UsageError


def summary(exc: BaseException) -> str:
    """One-line 'Type: first line of message', so errors stay one line on stderr."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_callable(kind: str, spec: str) -> Callable[..., Any]:
    """Import ``package.module:function`` and return the function (``kind``: what it makes,
    for the messages)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{kind} {spec!r} must have the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # SyntaxError, ImportError or whatever the module raises
        raise UsageError(f"{kind} {spec!r}: cannot import module {module_name!r}: "
                         f"{summary(exc)}") from None
    if not hasattr(module, attr):
        raise UsageError(f"{kind} {spec!r}: module {module_name!r} has no attribute {attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise UsageError(f"{kind} {spec!r}: {attr!r} is not callable")
    return factory


def call_factory(kind: str, spec: str, factory: Callable[..., Any], **offered: Any) -> Any:
    """Call ``factory`` with those of the ``offered`` keyword arguments it takes (all of
    them if it takes ``**kwargs``); whatever it raises becomes one line."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: offer everything
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        offered = {k: v for k, v in offered.items() if k in names}
    try:
        return factory(**offered)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{kind} {spec!r}: the factory raised {summary(exc)}") from None


def torchvision_or_none() -> Any:
    """The torchvision module, or None where it does not import (its PyPI wheel beside
    torch's CPU build raises at import, and not only ImportError)."""
    try:
        import torchvision
        from torchvision.transforms import v2  # noqa: F401 - present since 0.15
    except Exception:
        return None
    return torchvision
