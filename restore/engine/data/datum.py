"""The Datum record and the pickle format of CoOp's ``split_fewshot/*.pkl`` caches.

CoOp caches pickle Datum objects under the class path ``dassl.data.datasets.base_dataset.Datum``.
Reading goes through a restricted unpickler that maps that path (and ours) to :class:`Datum` and
refuses every other class, so a cache file cannot run code. Writing emits the Dassl class path, so
the real Dassl reads our caches too.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO

from ..serialization import ForbiddenGlobalError, corrupted_sentence, refused_sentence

DASSL_DATUM_MODULE = "dassl.data.datasets.base_dataset"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder, split file or image that is missing or malformed; the message says what to do."""


class CorruptSplitError(DatasetNotFoundError):
    """A split file whose content is malformed; the message names the file, so no folder layout is shown."""


class MissingImageError(FileNotFoundError, AssertionError):
    """A Datum pointing at a missing file (also an AssertionError, as Dassl's assert was)."""


class Datum:
    """One labelled image: path, class label, domain label and class name (Dassl semantics)."""

    def __init__(self, impath: str = "", label: int = 0, domain: int = 0, classname: str = "") -> None:
        if not isinstance(impath, str):
            raise MissingImageError(f"Datum impath must be a str, got {type(impath).__name__}: {impath!r}")
        if not os.path.isfile(impath):
            raise MissingImageError(
                f'No file found at "{impath}". Check DATASET.ROOT and the dataset layout (DATASETS.md).')
        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname

    @property
    def impath(self) -> str:
        return self._impath

    @property
    def label(self) -> int:
        return self._label

    @property
    def domain(self) -> int:
        return self._domain

    @property
    def classname(self) -> str:
        return self._classname

    def __repr__(self) -> str:
        return f"Datum(impath={self._impath!r}, label={self._label}, domain={self._domain}, classname={self._classname!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Datum):
            return NotImplemented
        return vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((self._impath, self._label, self._domain, self._classname))


# Globals a cache pickle may reference. Datum under Dassl's path or ours; a few inert builtins that
# old protocols use to rebuild containers and plain objects.
# (Under restore.dassl_alias, Datum.__module__ becomes Dassl's path, so plain pickles carry it too.)
_DATUM_PATHS = {(DASSL_DATUM_MODULE, "Datum"), (__name__, "Datum")}
# Protocols 0-2 name some of them the Python 2 way (``__builtin__``, ``copy_reg``).
_SAFE_GLOBALS = {
    (module, name)
    for module in ("builtins", "__builtin__")
    for name in ("object", "set", "frozenset", "list", "dict", "tuple", "int", "float", "str", "bytes", "bool",
                 "complex")
} | {("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")}


class DatumUnpickler(pickle.Unpickler):
    """Loads Datum caches written by Dassl or by us; refuses any other class (no code execution)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DATUM_PATHS:
            return Datum
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise ForbiddenGlobalError(f"Refusing to load {module}.{name} from a dataset cache: only Datum objects "
                                   "are allowed", f"{module}.{name}")


class DasslDatumPickler(pickle._Pickler):  # the Python pickler lets us write a global by name
    """Pickles Datum under ``dassl.data.datasets.base_dataset.Datum`` so the real Dassl can read it."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is Datum:
            if self.proto >= 4:
                self.save(DASSL_DATUM_MODULE)
                self.save("Datum")
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + f"{DASSL_DATUM_MODULE}\nDatum\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dumps_datum_cache(obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """Serialise a cache object (dicts/lists of Datum) with Dassl's class path for Datum."""
    buf = io.BytesIO()
    DasslDatumPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def load_datum_cache(file: str | BinaryIO) -> Any:
    """Read a cache pickle written by Dassl/CoOp or by :func:`dumps_datum_cache`, without Dassl installed.

    Raises DatasetNotFoundError (one sentence naming the file) for a file referring to anything but
    Datum and plain containers, and for an empty, truncated or unparsable file.
    """
    name = file if isinstance(file, str) else str(getattr(file, "name", "the dataset cache"))
    advice = "delete it (a cache, rebuilt on the next run)"
    try:
        if isinstance(file, str):
            with open(file, "rb") as f:
                return DatumUnpickler(f).load()
        return DatumUnpickler(file).load()
    except ForbiddenGlobalError as err:
        raise DatasetNotFoundError(refused_sentence(name, err.name, "a dataset cache", advice)) from None
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - any parse failure: empty, truncated or not a pickle
        raise DatasetNotFoundError(corrupted_sentence(name, "a dataset cache", advice)) from None
