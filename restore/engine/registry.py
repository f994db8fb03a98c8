"""Name -> class registries with Dassl's semantics (key = class name, duplicate = error).

One exception to the duplicate error: a second copy of the same plugin class (same class name, same
module file name, e.g. a checkout's ``datasets.dtd`` and an installed ``restore_plugins.datasets.dtd``)
keeps the first one registered, so a checkout runs beside another checkout's installed package.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from typing import Any, Callable, Iterable

logger = logging.getLogger(__name__)


def closest_names(requested: str, available: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` names of ``available`` closest to ``requested`` (case-insensitive)."""
    available = list(available)
    lowered = {name.lower(): name for name in available}
    hits = difflib.get_close_matches(requested.lower(), list(lowered), n=n, cutoff=0.4)
    return [lowered[h] for h in hits]


def check_availability(requested: str, available: Iterable[str], what: str = "name") -> None:
    """Raise ValueError with a 'did you mean' hint when ``requested`` is not in ``available``."""
    available = list(available)
    if requested not in available:
        hint = closest_names(requested, available)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"Unknown {what} {requested!r}.{suggestion} Available: {sorted(available)}")


def is_copy(first: Any, second: Any) -> bool:
    """Two copies of one plugin class: the same qualified name in modules of the same file name."""
    def tail(obj: Any) -> str:
        return str(getattr(obj, "__module__", "")).rpartition(".")[2]
    return (getattr(first, "__qualname__", None) == getattr(second, "__qualname__", None)
            and tail(first) == tail(second) != "")


class Registry:
    """A mapping from class names to classes, filled by the ``register`` decorator."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._obj_map: dict[str, Any] = {}

    def _do_register(self, name: str, obj: Any, force: bool = False) -> None:
        known = self._obj_map.get(name)
        if name in self._obj_map and not force and known is not obj and not isinstance(known, _Lazy):
            if is_copy(known, obj):
                logger.debug("%s %s from %s: keeping the copy from %s", self._name, name, obj.__module__,
                             known.__module__)
                return
            raise KeyError(f'An object named "{name}" was already registered in "{self._name}" registry (by '
                           f'{getattr(known, "__module__", "?")}; again by {getattr(obj, "__module__", "?")})')
        self._obj_map[name] = obj

    def register_lazy(self, name: str, module: str) -> None:
        """Reserve ``name`` (and its place in the order) for an object that importing ``module`` registers,
        imported on the first lookup. For a module that also runs as ``python -m``: its package must not
        import it, or runpy warns that it was imported before running."""
        if name not in self._obj_map:
            self._obj_map[name] = _Lazy(module)

    def _resolve(self, names: Iterable[str]) -> None:
        for name in list(names):
            lazy = self._obj_map.get(name)
            if isinstance(lazy, _Lazy):
                importlib.import_module(lazy.module)
                if isinstance(self._obj_map.get(name), _Lazy):
                    raise KeyError(f'Importing {lazy.module} did not register "{name}" in "{self._name}" registry')

    def register(self, obj: Any = None, force: bool = False) -> Any:
        """Register ``obj`` under its ``__name__``; usable as ``@REG.register()`` or ``REG.register(cls)``."""
        if obj is None:
            def deco(func_or_class: Any) -> Any:
                self._do_register(func_or_class.__name__, func_or_class, force=force)
                return func_or_class
            return deco
        self._do_register(obj.__name__, obj, force=force)
        return obj

    def get(self, name: str) -> Any:
        """Return the object registered as ``name``; a miss raises KeyError naming close matches."""
        if name not in self._obj_map:
            hint = closest_names(name, self._obj_map)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise KeyError(
                f'Object name "{name}" does not exist in "{self._name}" registry.{suggestion} '
                f"Registered: {sorted(self._obj_map)}"
            )
        self._resolve([name])
        return self._obj_map[name]

    def registered_names(self) -> list[str]:
        return list(self._obj_map.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._obj_map

    def __len__(self) -> int:
        return len(self._obj_map)

    def items(self) -> list[tuple[str, Any]]:
        self._resolve(self._obj_map)
        return list(self._obj_map.items())


class _Lazy:
    """Placeholder of :meth:`Registry.register_lazy`: the module that registers the real object."""

    def __init__(self, module: str) -> None:
        self.module = module


TRAINER_REGISTRY = Registry("TRAINER")
DATASET_REGISTRY = Registry("DATASET")
EVALUATOR_REGISTRY = Registry("EVALUATOR")


def lookup_case_insensitive(registry: Registry, name: str) -> str:
    """Map ``maple`` to the registered ``MaPLe``, or a class's declared ``aliases`` (``zsclip``) to it."""
    if name in registry:
        return name
    for key, obj in registry.items():
        if key.lower() == name.lower() or name.lower() in getattr(obj, "aliases", ()):
            return key
    return name


Factory = Callable[..., Any]
