"""Reading pickled files (checkpoints, caches, anchors) without running code from them.

A pickle can name any importable function and call it while loading, so nothing here unpickles
arbitrary objects. ``torch.save`` files load with ``torch.load(weights_only=True)``; checkpoints may
also hold the few kinds of objects the original Dassl writes (optimizer and LR-scheduler objects,
``collections.defaultdict``, numpy scalars and dtypes), allowed by name for the duration of one load
only. A refused file is reported naming the first class or function it refers to that is not
allowed; the names are read from the pickle's opcodes, nothing is executed. A file that cannot be
parsed (empty, truncated, not a pickle) is reported as corrupted and never retried another way.

Full unpickling of a refused checkpoint is an explicit opt-in: :func:`trusted_checkpoints` (what
``train.py --trust-checkpoint`` turns on), which prints a warning for every file it unpickles.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import os.path as osp
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import torch
from restore.log import get_logger

logger = get_logger(__name__)

__all__ = ["ForbiddenGlobalError", "allow_globals", "checkpoint_safe_globals", "checkpoints_trusted",
           "corrupted_sentence", "file_globals", "pickle_globals", "refused_sentence", "safe_torch_load",
           "trusted_checkpoints"]

_TRUSTED = False
TRUST_WARNING = ("WARNING: trusted checkpoints are on (--trust-checkpoint): checkpoint files that a safe load refuses "
                 "are fully unpickled with torch.load(weights_only=False), which runs any code they contain")


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A restricted unpickler met a class or function it does not allow (``name`` is ``module.qualname``)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


@contextlib.contextmanager
def trusted_checkpoints(enabled: bool = True) -> Iterator[None]:
    """Within the block, checkpoints that a safe load refuses are fully unpickled (with a warning each).

    With ``enabled`` False it changes nothing. Prints :data:`TRUST_WARNING` on entry when enabled.
    """
    global _TRUSTED
    previous = _TRUSTED
    if enabled:
        logger.info(TRUST_WARNING)
    _TRUSTED = previous or enabled
    try:
        yield
    finally:
        _TRUSTED = previous


def checkpoints_trusted() -> bool:
    """True inside :func:`trusted_checkpoints` (the process-wide default of ``load_checkpoint(trust=None)``)."""
    return _TRUSTED


# ------------------------------------------------------------------ reading global names statically

_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def _python3_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 resolves it (protocols 0-2 write ``__builtin__``, ``copy_reg``, ...)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _scan(stream: BinaryIO, names: list[str]) -> Any:
    """Append the globals of the next pickle in ``stream`` to ``names`` (stream order) and return its
    last pushed constant (a legacy file's magic number); raises on malformed or truncated data."""
    memo: dict[int, Any] = {}
    recent: list[Any] = [None, None]  # the last two values pushed (constants, else None), for STACK_GLOBAL
    for op, arg, _ in pickletools.genops(stream):
        kind = op.name
        if kind == "STOP":
            return recent[-1]
        if kind in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            names.append(_python3_name(module, name))
            top = None
        elif kind == "STACK_GLOBAL":
            module, name = recent
            names.append(_python3_name(module, name) if isinstance(module, str) and isinstance(name, str)
                         else "<a class named at run time>")
            top = None
        elif kind == "MEMOIZE":
            memo[len(memo)] = recent[-1]
            continue
        elif kind in _PUT_OPS:
            memo[arg] = recent[-1]
            continue
        elif kind in _GET_OPS:
            top = memo.get(arg)
        elif op.stack_after:
            top = arg if isinstance(arg, (str, int)) and not isinstance(arg, bool) else None
        else:
            continue
        recent = [recent[-1], top]
    raise EOFError("pickle data ends before its STOP opcode")


def pickle_globals(stream: BinaryIO) -> tuple[list[str], bool]:
    """The classes and functions a pickle refers to, in order, read without executing anything, and
    whether it parsed to its end (False: empty, truncated or not a pickle).

    ``torch.save``'s legacy (non-zip) format is five pickles in a row, then raw tensor bytes: after
    its magic number, all five are read.
    """
    names: list[str] = []
    expected, parsed = 1, 0
    while parsed < expected:
        try:
            value = _scan(stream, names)
        except Exception:  # noqa: BLE001 - malformed, truncated or empty
            return names, False
        parsed += 1
        if parsed == 1 and value == torch.serialization.MAGIC_NUMBER:
            expected = 5
    return names, True


def file_globals(path: str) -> tuple[list[str], bool]:
    """:func:`pickle_globals` of a file: a ``torch.save`` zip archive's ``data.pkl``, else the raw file."""
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
            f.seek(0)
            if not is_zip:
                return pickle_globals(f)
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if member is None:
                return [], False
            with archive.open(member) as data:
                return pickle_globals(data)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, EOFError):
        return [], False


# ------------------------------------------------------------------ what a checkpoint may hold


def _plain_dict(default_factory: Any = None) -> dict:
    """A pickled ``collections.defaultdict`` (an optimizer object's state) rebuilt as a plain dict.

    torch's safe unpickler fills only plain dicts; the factory is never called.
    """
    return {}


@functools.cache
def checkpoint_safe_globals() -> tuple[tuple[Any, str], ...]:
    """(object, pickled name) pairs a checkpoint may refer to besides tensors and plain containers.

    The original Dassl saves ``scheduler.state_dict()``, which for its warmup schedulers holds the
    successor scheduler *object* (StepLR, MultiStepLR or CosineAnnealingLR) together with its
    optimizer object (Adam, SGD, RMSprop, RAdam or AdamW, whose ``collections.defaultdict`` state
    comes back as a plain dict; only the scheduler's own numbers are ever read from it). Dassl's
    warmup scheduler classes are mapped to this library's, so their names resolve without Dassl
    installed. Numpy scalars and dtypes cover results stored as numpy numbers. Nothing else.
    """
    import numpy as np

    from . import optim as ours

    pairs: list[tuple[Any, str]] = [(_plain_dict, "collections.defaultdict"), (dict, "builtins.dict")]
    for cls in (torch.optim.Adam, torch.optim.SGD, torch.optim.RMSprop, torch.optim.RAdam, torch.optim.AdamW):
        pairs.append((cls, f"{cls.__module__}.{cls.__qualname__}"))  # build_optimizer's classes
    for name in ("StepLR", "MultiStepLR", "CosineAnnealingLR"):  # build_lr_scheduler's (warmup successors)
        pairs.append((getattr(torch.optim.lr_scheduler, name), f"torch.optim.lr_scheduler.{name}"))
    for name in ("_BaseWarmupScheduler", "ConstantWarmupScheduler", "LinearWarmupScheduler"):
        cls = getattr(ours, name)
        pairs += [(cls, f"dassl.optim.lr_scheduler.{name}"), (cls, f"{cls.__module__}.{name}")]
    core = getattr(np, "_core", None) or np.core
    pairs += [(core.multiarray.scalar, "numpy.core.multiarray.scalar"),
              (core.multiarray.scalar, "numpy._core.multiarray.scalar"), (np.dtype, "numpy.dtype")]
    for kind in sorted({type(np.dtype(t)) for t in set(np.sctypeDict.values())}, key=str):  # what a dtype is built as
        pairs.append((kind, f"{kind.__module__}.{kind.__qualname__}"))
    return tuple(pairs)


@contextlib.contextmanager
def allow_globals(pairs: Sequence[tuple[Any, str]]) -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` rebuild ``pairs`` inside the block only (torch's list is restored)."""
    present = set(torch.serialization.get_safe_globals())
    missing = [p for p in pairs if p not in present]
    if not missing:
        yield
        return
    with torch.serialization.safe_globals(missing):
        yield


def _allowed_names(extra: Sequence[tuple[Any, str]]) -> set[str]:
    from torch import _weights_only_unpickler as wo

    names = {name for _, name in extra}
    for getter in ("_get_allowed_globals", "_get_user_allowed_globals"):
        names |= set(getattr(wo, getter, dict)())
    return names


# ------------------------------------------------------------------ messages and the loader


def refused_sentence(path: str, name: str, expected: str, advice: str) -> str:
    """One sentence: ``path`` refers to ``name``, which ``expected`` (the kind of file) does not contain; what to do."""
    return (f"Refusing to load {path}: it refers to {name}, which {expected} does not contain and whose unpickling "
            f"could run code; {advice}.")


def corrupted_sentence(path: str, what: str, advice: str) -> str:
    """One sentence: ``path`` is corrupted (empty, truncated or not a ``what``); what to do."""
    return f"{path} is corrupted (empty, truncated or not {what}): {advice}."


def safe_torch_load(path: str, *, what: str, expected: str, corrupted_advice: str, refused_advice: str,
                    extra_globals: Sequence[tuple[Any, str]] = (), trust: bool = False,
                    error: type[Exception] = RuntimeError) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, ``extra_globals`` allowed; errors as one sentence.

    A file referring to anything else raises ``error`` naming the first such global, unless
    ``trust``: then it is fully unpickled after a warning line. A file that does not parse raises
    ``error`` calling it corrupted; it is never retried with full unpickling.
    """
    if osp.isdir(path):
        raise error(f"{path} is a folder, not {what}.")
    try:
        with allow_globals(extra_globals), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # plain pickles: refused below
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - classified below, reported as one sentence
        failure = err
    names, complete = file_globals(path)
    allowed = _allowed_names(extra_globals)
    unknown = next((n for n in names if n not in allowed), None)
    if unknown is None or not complete:  # a truncated file is corrupted, whatever it refers to
        raise error(corrupted_sentence(path, what, corrupted_advice)) from failure
    if not trust:
        raise error(refused_sentence(path, unknown, expected, refused_advice)) from None
    logger.info(f"WARNING: fully unpickling {path} (trusted checkpoints): it refers to {unknown}, which a safe load "
          "refuses; any code in it runs now")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001
        raise error(corrupted_sentence(path, what, corrupted_advice)) from None
