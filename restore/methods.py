"""Self-describing methods: each trainer file declares a :class:`MethodSpec` beside its trainer.

The platform (protocol runner, aggregation, benchmark, analysis) knows no method by name: it reads
this registry. ``python -m restore.methods`` lists the registered methods.

Plugins are packages that call :func:`register_method` when imported. :func:`load_plugins` imports
those advertised under the entry-point group ``restore.plugins``: an entry point ``name = module``
names the installed module (``trainers = restore_plugins.trainers``) and, by its name, the same
package in a checkout (``trainers``), imported where the installed one is not. A plugin already
imported under the other name (the same files) is not imported twice.

Dataset overrides: a method's published per-dataset values, one YAML file per protocol mapping a
dataset key (``dtd``) to ``{option: value}``. They are applied once, as typed values, at this
precedence: defaults < dataset YAML < method dataset overrides < keys the method YAML pins
(``DATASET_OVERRIDES.PIN``) < command line. A CoOp-style codebase applies them with one call after
merging its command-line opts: ``restore.methods.apply_dataset_overrides(cfg, args.opts)``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import os.path as osp
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["MethodSpec", "register_method", "get_method", "list_methods", "load_plugins", "dataset_overrides",
           "apply_dataset_overrides", "config_path", "dataset_config", "ENTRY_POINT_GROUP", "PROTOCOLS"]

ENTRY_POINT_GROUP = "restore.plugins"
PLUGINS_ENV = "RESTORE_PLUGINS"
#: The values of ``cfg.PROTOCOL``.
PROTOCOLS = ("base2new", "cross_dataset", "domain_generalization", "few_shot")


@dataclass(frozen=True)
class MethodSpec:
    """How one method is named, configured and compared.

    ``key``: the scripts' lowercase name (``restore``); ``trainer``: the registered trainer class name;
    ``aliases``: more script names; ``label``: the display label (run folders, tables; default
    ``trainer``); ``published``: its row in the published tables (default ``label``; ``""`` = none);
    ``published_by_config``: a config name -> published row (``None``: no row) for variants.
    ``configs``: protocol (``base2new``, ``xd``, ``dg``, ``fewshot``), ``protocol:dataset`` or
    ``<config name>:<dataset>`` -> candidate configs ``"<folder>/<name>"`` under ``configs/trainers``.
    ``dataset_overrides``: ``cfg.PROTOCOL`` value -> a YAML file under ``configs/trainers``.
    ``opts``: fixed options per protocol; ``trains``: False for a method with nothing to learn;
    ``extras``: free-form hints for tools (e.g. the benchmark's paired comparisons).
    """

    key: str
    trainer: str
    label: str = ""
    aliases: tuple[str, ...] = ()
    published: Optional[str] = None
    published_by_config: Mapping[str, Optional[str]] = field(default_factory=dict)
    configs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    dataset_overrides: Mapping[str, str] = field(default_factory=dict)
    opts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    trains: bool = True
    extras: Mapping[str, Any] = field(default_factory=dict)
    config_root: str = ""

    @property
    def display(self) -> str:
        return self.label or self.trainer

    def published_row(self, config_name: str = "") -> Optional[str]:
        """The published-table row a run of this method with ``config_name`` is compared with."""
        if config_name in self.published_by_config:
            return self.published_by_config[config_name]
        return self.display if self.published is None else (self.published or None)


_METHODS: dict[str, MethodSpec] = {}


def _find_config_root(module_file: str) -> str:
    """The nearest ``configs`` folder (holding ``trainers/``) above a plugin module's file."""
    folder = osp.dirname(osp.abspath(module_file))
    for _ in range(4):
        candidate = osp.join(folder, "configs")
        if osp.isdir(osp.join(candidate, "trainers")):
            return candidate
        folder = osp.dirname(folder)
    return ""


def _importing_sibling(module: str) -> bool:
    """True while another module of ``module``'s package (not its ``__init__``) is importing it: a method
    module imported as a dependency of another method registers nothing."""
    package = module.rpartition(".")[0]
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name != module and package and name.rpartition(".")[0] == package:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


_DEFERRED: dict[str, tuple[MethodSpec, Any]] = {}


def register_method(spec: MethodSpec, trainer_cls: Any = None) -> MethodSpec:
    """Register ``spec`` (and ``trainer_cls`` in the trainer registry, under its class name).

    A trainer name the registry already holds for another class (a host codebase's own ``CoOp``) is
    kept: ours is not registered over it. A module imported by a sibling method module (MaPLe's, by
    RESTORE's) registers nothing until its package registers all (:func:`register_deferred`).
    """
    caller = sys._getframe(1).f_globals
    module = getattr(trainer_cls, "__module__", "") if trainer_cls is not None else str(caller.get("__name__", ""))
    if module == "__main__":
        where = str(caller.get("__file__", "this file"))
        sys.stderr.write(f"error: {where} is a method plugin, not a program: train it with `python train.py --trainer "
                         f"{spec.trainer} ...` and list its per-dataset values with `python -m restore.methods "
                         f"--overrides DATASET`\n")
        raise SystemExit(2)
    if not spec.config_root and caller.get("__file__"):
        spec = _replace(spec, config_root=_find_config_root(str(caller["__file__"])))
    if trainer_cls is not None and _importing_sibling(module):
        _DEFERRED[spec.key] = (spec, trainer_cls)
        return spec
    _DEFERRED.pop(spec.key, None)
    if spec.key not in _METHODS:
        _METHODS[spec.key] = spec
    if trainer_cls is not None:
        from restore.engine.registry import TRAINER_REGISTRY, is_copy

        known = TRAINER_REGISTRY._obj_map.get(trainer_cls.__name__)
        if known is None or type(known).__name__ == "_Lazy":
            TRAINER_REGISTRY._do_register(trainer_cls.__name__, trainer_cls, force=True)
        elif known is not trainer_cls:  # a host's own class is worth a line; another copy of ours is not
            logger.log(logging.DEBUG if is_copy(known, trainer_cls) else logging.INFO,
                       "Trainer %s is already registered (by %s): keeping it", trainer_cls.__name__,
                       getattr(known, "__module__", "?"))
    return spec


def register_deferred(package: str) -> None:
    """Register the methods of ``package`` that were imported only as dependencies of another method."""
    for key, (spec, cls) in list(_DEFERRED.items()):
        if cls.__module__.rpartition(".")[0] == package:
            del _DEFERRED[key]
            _METHODS.setdefault(key, spec)
            from restore.engine.registry import TRAINER_REGISTRY

            if cls.__name__ not in TRAINER_REGISTRY:
                TRAINER_REGISTRY.register(cls)


def _replace(spec: MethodSpec, **changes: Any) -> MethodSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def list_methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def get_method(name: str) -> MethodSpec:
    """The method named ``name``: its key, an alias, its label or its trainer class name (any case)."""
    wanted = name.strip().lower()
    if wanted in _METHODS:
        return _METHODS[wanted]
    for spec in _METHODS.values():
        if wanted in (a.lower() for a in spec.aliases) or wanted == spec.display.lower():
            return spec
    for spec in _METHODS.values():  # a trainer class shared by several methods: its own key first
        if wanted == spec.trainer.lower() and spec.key == wanted:
            return spec
    for spec in _METHODS.values():
        if wanted == spec.trainer.lower():
            return spec
    raise KeyError(f"Unknown method {name!r}; registered: {', '.join(_METHODS) or 'none (no plugin loaded)'}")


def find_method(trainer: str) -> Optional[MethodSpec]:
    """The method whose label or trainer is ``trainer`` (a run folder's method name), or None."""
    try:
        return get_method(trainer)
    except KeyError:
        return None


@functools.lru_cache(maxsize=None)
def _realpath(path: str) -> str:
    """``os.path.realpath`` remembered: the protocol runner asks about every loaded module's file many times."""
    return osp.realpath(path)


def _loaded_copy(module: str) -> Any:
    """``module`` itself, or a module already imported under another name from the same file; else None."""
    import importlib.util

    if module in sys.modules:
        return sys.modules[module]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(found, "origin", None)
    if not origin:
        return None
    origin = _realpath(origin)
    for loaded in list(sys.modules.values()):
        if _realpath(str(getattr(loaded, "__file__", None) or "")) == origin:
            return loaded
    return None


def _load(module: str, attr: str, loaded: list[str], quiet: bool = False) -> bool:
    """Import ``module`` (unless the same file is imported already) and call its ``attr``; False if absent."""
    target = _loaded_copy(module)
    if target is None:
        try:
            target = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and module.startswith(err.name):
                if not quiet:
                    logger.warning("Plugin module %s is not installed", module)
                return False
            raise
        loaded.append(module)
    if attr:
        getattr(target, attr)()
    return True


def load_plugins() -> list[str]:
    """Import the plugin modules named in ``$RESTORE_PLUGINS`` (comma-separated; a checkout's scripts set
    it) and every plugin advertised under :data:`ENTRY_POINT_GROUP`; the modules imported now."""
    from importlib.metadata import entry_points

    loaded: list[str] = []
    for target in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        module, _, attr = target.partition(":")
        _load(module, attr, loaded)
    try:
        points = entry_points(group=ENTRY_POINT_GROUP)  # type: ignore[call-arg]
    except TypeError:  # Python 3.9
        points = entry_points().get(ENTRY_POINT_GROUP, [])  # type: ignore[attr-defined,arg-type]
    for point in points:
        # the entry point's value is the installed module; its name, the same package in a checkout
        module, _, attr = point.value.partition(":")
        if not _load(module.strip(), attr.strip(), loaded, quiet=True):
            _load(point.name, attr.strip(), loaded)
    return loaded


# --------------------------------------------------------------------------- configs and overrides
def config_path(spec: MethodSpec, relative: str) -> str:
    """``configs/trainers/<relative>`` of the plugin that declared ``spec``."""
    return osp.join(spec.config_root, "trainers", relative)


def dataset_config(dataset: str, spec: Optional[MethodSpec] = None) -> str:
    """``configs/datasets/<dataset>.yaml`` of ``spec``'s plugin, else of any registered plugin; ``""`` if none."""
    roots = [spec.config_root] if spec is not None else []
    roots += [s.config_root for s in _METHODS.values()]
    for root in dict.fromkeys(r for r in roots if r):
        path = osp.join(root, "datasets", f"{dataset}.yaml")
        if osp.isfile(path):
            return path
    return ""


def _dataset_key(name: str) -> Optional[str]:
    from restore.datasets.catalog import resolve

    try:
        return resolve(name)
    except ValueError:
        return None


def dataset_overrides(spec: MethodSpec, dataset: str, protocol: str = "base2new") -> dict[str, Any]:
    """The method's override values for ``dataset`` (a key such as ``dtd`` or a class name such as
    ``DescribableTextures``) under ``protocol``, as ``{"TRAINER.X.KEY": value}``; ``{}`` where none."""
    relative = spec.dataset_overrides.get(protocol)
    if not relative:
        return {}
    path = config_path(spec, relative)
    if not osp.isfile(path):
        raise FileNotFoundError(f"{spec.trainer}'s dataset overrides {path} are missing: reinstall the package "
                                "or copy that file beside the method's configs.")
    from restore.engine.config import load_yaml

    table = load_yaml(path)
    key = _dataset_key(dataset) or dataset
    values = table.get(key) or table.get(dataset) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the entry for {key} must be a mapping of options to values.")
    return {str(k): v for k, v in values.items()}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def apply_dataset_overrides(cfg: Any, opts: Optional[Sequence[str]] = None,
                            spec: Optional[MethodSpec] = None) -> dict[str, Any]:
    """Apply the dataset overrides of ``cfg.TRAINER.NAME``'s method to ``cfg`` (typed, checked by yacs).

    ``opts``: the command-line opts (``KEY VALUE ...``): their keys keep their values; keys listed in
    ``cfg.DATASET_OVERRIDES.PIN`` (a method YAML's pins) stay too. Returns the values applied.
    Call it after merging the command-line opts; a frozen ``cfg`` is unfrozen for the merge and
    frozen again. A trainer without a registered method, or a dataset without values, changes nothing.
    """
    if spec is None:
        spec = find_method(str(cfg.TRAINER.NAME))
        if spec is None or spec.trainer != str(cfg.TRAINER.NAME) and spec.key != str(cfg.TRAINER.NAME).lower():
            return {}
    protocol = str(cfg.get("PROTOCOL", "base2new") or "base2new")
    values = dataset_overrides(spec, str(cfg.DATASET.NAME), protocol)
    kept = {str(k) for k in list(opts or [])[0::2]}
    pins = cfg.get("DATASET_OVERRIDES", {}).get("PIN", []) if "DATASET_OVERRIDES" in cfg else []
    kept |= set(str(k) for k in pins)
    applied = {k: v for k, v in values.items() if k not in kept}
    if not applied:
        return {}
    from yacs.config import CfgNode

    from restore.engine.config import ConfigError

    frozen = cfg.is_frozen()
    cfg.defrost()
    try:
        cfg.merge_from_other_cfg(CfgNode(_nest(applied)))
    except (KeyError, ValueError, AssertionError) as err:
        where = config_path(spec, spec.dataset_overrides[protocol])
        raise ConfigError(f"{where}: the values for {cfg.DATASET.NAME} do not fit the config "
                          f"({str(err).strip(chr(39))}): fix that entry.") from None
    finally:
        if frozen:
            cfg.freeze()
    logger.info("%s dataset overrides for %s: %s (%s; options on the command line override them)", spec.display,
                cfg.DATASET.NAME, " ".join(f"{k} {v}" for k, v in applied.items()), protocol)
    return applied


def _main(argv: Optional[Iterable[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m restore.methods",
                                     description="List the registered methods (plugins found through entry points)")
    parser.add_argument("--overrides", metavar="DATASET", default="",
                        help="also print each method's dataset overrides for this dataset (base2new)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    load_plugins()
    if not _METHODS:
        print("No method registered: install a plugin package (pip install restore-prompt installs ours).")
        return 1
    for spec in list_methods():
        protocols = ", ".join(k for k in spec.configs if ":" not in k) or "-"
        line = f"{spec.key:<10} --trainer {spec.trainer:<13} label {spec.display:<12} protocols {protocols}"
        if args.overrides:
            values = dataset_overrides(spec, args.overrides)
            line += "  " + (" ".join(f"{k} {v}" for k, v in values.items()) or "(no overrides)")
        print(line)
    return 0


if __name__ == "__main__":  # the registry lives in the imported module, not in this __main__ copy
    raise SystemExit(importlib.import_module("restore.methods")._main(sys.argv[1:]))
