"""What reaches a user as one plain line instead of a traceback, and which config key an error belongs to.

Two kinds of error end as one line on stderr (exit status 2):

* :class:`DmmError`, raised by dmm wherever it checks the user's input or files;
* :class:`ConfigError`, made by the CLI from an exception that a class the user configured (a system, a
  data module, a network, an optimiser, a callback) raised while it was built or before its first batch
  finished. :func:`blame` finds that class's config key in the traceback.

Anything else is taken for a bug and keeps its traceback; so does everything when ``DMM_TRACEBACK=1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sysconfig
import traceback
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

TRACEBACK_ENV = "DMM_TRACEBACK"
"""Set to 1 to see the traceback behind a one-line error."""

PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    AssertionError,
    AttributeError,
    ImportError,
    LookupError,  # KeyError, IndexError
    NameError,
    NotImplementedError,
    RecursionError,
    SyntaxError,
    TypeError,
)
"""Exceptions that point at code rather than at a setting when dmm's (or the user's own) code raises them."""

_DMM = Path(__file__).resolve().parent
_LIBRARIES = {Path(sysconfig.get_paths()[name]).resolve() for name in ("stdlib", "platstdlib", "purelib", "platlib")}


class DmmError(Exception):
    """A problem with the user's input or files; the message says what to do about it.

    The CLI prints it as one line on stderr and exits with status 2, without a traceback.
    """


class ConfigError(DmmError):
    """A class the user configured failed; the message names its config key and the cause."""

    def __init__(self, key: str, label: str, cause: BaseException) -> None:
        lines = str(cause).strip().splitlines() or [""]
        reason = f"{type(cause).__name__}: {lines[0]}" + (" …" if len(lines) > 1 else "")
        super().__init__(f"--{key} ({label}): {reason} (set {TRACEBACK_ENV}=1 for the traceback)")
        self.key, self.cause = key, cause


class Owner(NamedTuple):
    """A config key and what it configured: an instance (matched by identity) or a class (by exact type)."""

    key: str
    target: Any
    label: str


def chain(error: BaseException | None) -> Iterator[BaseException]:
    """The error, then its causes and contexts, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def user_error(error: BaseException | None) -> DmmError | None:
    """The DmmError behind an exception, also when a library wrapped it (jsonargparse, Lightning)."""
    return next((e for e in chain(error) if isinstance(e, DmmError)), None)


def is_bug(error: BaseException) -> bool:
    """A programming error (see ``PROGRAMMING_ERRORS``) whose innermost frame is dmm's code or the user's own.

    One raised inside torch or another installed library (``nn.Linear`` built with a tuple, say) comes from
    what it was given, i.e. from the config; one raised in dmm's code (or a module of the user's) is a bug.
    """
    deepest = list(chain(error))[-1]
    if not isinstance(deepest, PROGRAMMING_ERRORS):
        return False
    frames = [frame for frame, _ in traceback.walk_tb(deepest.__traceback__)]
    while len(frames) > 1 and frames[-1].f_code.co_name in ("__getattr__", "__getattribute__"):
        frames.pop()  # a failed attribute lookup (nn.Module raises it in torch) belongs to the code looking up
    if not frames:
        return True
    path = Path(frames[-1].f_code.co_filename).resolve()
    in_library = any(path.is_relative_to(root) for root in _LIBRARIES) and not path.is_relative_to(_DMM)
    return not in_library


def blame(error: BaseException, owners: Sequence[Owner]) -> Owner | None:
    """The owner whose method runs in the innermost traceback frame that runs a method of any owner.

    The frames of the deepest cause are searched first, innermost first, so an optimiser built inside a
    system's ``configure_optimizers`` is blamed on the optimiser's key rather than the system's. Instances
    are tried before classes in each frame.
    """
    for link in reversed(list(chain(error))):
        frames = [frame for frame, _ in traceback.walk_tb(link.__traceback__)]
        for frame in reversed(frames):
            obj = frame.f_locals.get("self")
            if obj is None:
                continue
            for owner in owners:
                if obj is owner.target or (isinstance(owner.target, type) and type(obj) is owner.target):
                    return owner
    return None


def walk(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every node of a parsed or built config, list items as ``key[i]``."""
    yield key, node
    if isinstance(node, argparse.Namespace):  # jsonargparse's Namespace is one
        node = vars(node)
    if isinstance(node, dict):
        for name, value in node.items():
            yield from walk(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{key}[{i}]")


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _dataclass_arguments(cls: type) -> list[tuple[str, type]]:
    """(name, class) of the ``__init__`` arguments of ``cls`` typed as a dataclass (configured as nested keys)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: nothing to add
        return []
    return [(name, hint) for name, hint in hints.items() if isinstance(hint, type) and dataclasses.is_dataclass(hint)]


def config_owners(config: Any, groups: Mapping[str, type], built: Any = None) -> list[Owner]:
    """What the user configured, by config key, for :func:`blame`.

    Args:
        config: the parsed config (nested namespaces); every node with a ``class_path`` names a class.
        groups: key -> class of the config's class groups without a ``class_path`` (``checkpoint``, callbacks).
        built: the instantiated config, whose objects are matched by identity (tried first).
    """
    owners = []
    if built is not None:
        plain = (argparse.Namespace, dict, list, tuple, str, int, float, bool, type(None))
        owners += [
            Owner(key, value, type(value).__name__)
            for key, value in walk(built)
            if key and not isinstance(value, plain)
        ]
    classes = []
    for key, value in walk(config):
        class_path = getattr(value, "class_path", None) if isinstance(value, argparse.Namespace) else None
        cls = _import(class_path) if isinstance(class_path, str) else None
        if cls is not None:
            classes.append((Owner(key, cls, class_path), f"{key}.init_args."))
    classes += [(Owner(key, cls, cls.__name__), f"{key}.") for key, cls in groups.items()]
    for owner, prefix in classes:
        owners.append(owner)
        owners += [Owner(prefix + name, hint, hint.__name__) for name, hint in _dataclass_arguments(owner.target)]
    return owners
