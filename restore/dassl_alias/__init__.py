"""Make ``import dassl...`` resolve to this engine where the real Dassl is not installed.

Opt in once per environment (the one-liner)::

    python -m restore.dassl_alias install      # writes restore_dassl_alias.pth into site-packages
    python -m restore.dassl_alias uninstall

or for one process only, nothing written (``torchrun ... -m restore.dassl_alias run train.py ...`` too)::

    python -m restore.dassl_alias run train.py --root DATA ...   # or: run -m package.module args...

or in code, before the first ``import dassl``: ``import restore.dassl_alias as a; a.activate()``.
If a real ``dassl`` package is importable, nothing is shadowed. (``run`` covers the process and its
forked children, e.g. Linux DataLoader workers; a child started with the ``spawn`` method re-imports
the script without the alias, for that use ``install``.)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import sysconfig
import types

# dassl module -> list of (restore module, names or None for "everything public").
_MODULES: dict[str, list[tuple[str, list[str] | None]]] = {
    "dassl": [],
    "dassl.config": [("restore.engine.config", ["get_cfg_default", "clean_cfg"])],
    "dassl.config.defaults": [("restore.engine.config", ["_C"])],
    "dassl.engine": [("restore.engine.trainer", ["TrainerBase", "SimpleTrainer", "TrainerX", "TrainerXU", "build_trainer"]),
                     ("restore.engine.registry", ["TRAINER_REGISTRY"])],
    "dassl.engine.trainer": [("restore.engine.trainer", None)],
    "dassl.engine.build": [("restore.engine.registry", ["TRAINER_REGISTRY"]), ("restore.engine.trainer", ["build_trainer"])],
    "dassl.data": [("restore.engine.data", ["DataManager", "DatasetWrapper"])],
    "dassl.data.data_manager": [("restore.engine.data", ["DataManager", "DatasetWrapper", "build_data_loader"])],
    "dassl.data.datasets": [("restore.engine.data", ["Datum", "DatasetBase", "build_dataset"]),
                            ("restore.engine.registry", ["DATASET_REGISTRY"])],
    "dassl.data.datasets.base_dataset": [("restore.engine.data", ["Datum", "DatasetBase"])],
    "dassl.data.datasets.build": [("restore.engine.data", ["build_dataset"]), ("restore.engine.registry", ["DATASET_REGISTRY"])],
    "dassl.data.transforms": [("restore.engine.data", ["build_transform", "INTERPOLATION_MODES"])],
    "dassl.data.transforms.transforms": [("restore.engine.data", ["build_transform", "INTERPOLATION_MODES"])],
    "dassl.evaluation": [("restore.engine.evaluator", ["build_evaluator", "EvaluatorBase", "Classification"]),
                         ("restore.engine.registry", ["EVALUATOR_REGISTRY"])],
    "dassl.evaluation.evaluator": [("restore.engine.evaluator", None)],
    "dassl.metrics": [("restore.engine.evaluator", ["compute_accuracy"])],
    "dassl.metrics.accuracy": [("restore.engine.evaluator", ["compute_accuracy"])],
    "dassl.optim": [("restore.engine.optim", ["build_optimizer", "build_lr_scheduler"])],
    "dassl.optim.optimizer": [("restore.engine.optim", ["build_optimizer", "AVAILABLE_OPTIMIZERS"])],
    "dassl.optim.lr_scheduler": [("restore.engine.optim", None)],
    "dassl.utils": [("restore.engine.utils", None), ("restore.engine.registry", ["Registry"])],
    "dassl.utils.tools": [("restore.engine.utils", None)],
    "dassl.utils.logger": [("restore.engine.utils", ["Logger", "setup_logger"])],
    "dassl.utils.meters": [("restore.engine.utils", ["AverageMeter", "MetricMeter"])],
    "dassl.utils.registry": [("restore.engine.registry", ["Registry"])],
    "dassl.utils.torchtools": [("restore.engine.utils", None)],
}
_PACKAGES = {name.rsplit(".", 1)[0] for name in _MODULES if "." in name} | {"dassl"}
PTH_NAME = "restore_dassl_alias.pth"


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__dict__["__restore_alias__"] = True
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == "dassl":
            setattr(module, "__version__", "0.6.3")
        exported = []
        for source, names in _MODULES[module.__name__]:
            src = importlib.import_module(source)
            if names is None:
                names = list(getattr(src, "__all__", [n for n in vars(src) if not n.startswith("_")]))
            for name in names:
                setattr(module, name, getattr(src, name))
                exported.append(name)
        setattr(module, "__all__", exported)
        if "Datum" in exported:
            _adopt_dassl_datum_path(module)


def _adopt_dassl_datum_path(module: types.ModuleType) -> None:
    """Give Datum Dassl's class path, so a plain ``pickle.dump`` (CoOp's few-shot cache) writes
    ``dassl.data.datasets.base_dataset.Datum``, which the real Dassl loads (restore's own caches do
    this explicitly). Pickle resolves the path through this alias, so it round-trips here too."""
    from restore.engine.data.datum import DASSL_DATUM_MODULE, Datum

    if module.__name__ != DASSL_DATUM_MODULE:
        importlib.import_module(DASSL_DATUM_MODULE)  # in sys.modules before pickle looks the path up
    Datum.__module__ = DASSL_DATUM_MODULE


class _AliasFinder(importlib.abc.MetaPathFinder):
    # a marker, not isinstance: a finder installed by another copy of this module (an older .pth
    # or checkout) has another _AliasFinder class
    _restore_dassl_alias = True

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _MODULES:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(), is_package=fullname in _PACKAGES)
        if fullname in _PACKAGES:
            spec.submodule_search_locations = []
        return spec


def _is_alias_finder(finder: object) -> bool:
    return bool(getattr(type(finder), "_restore_dassl_alias", False))


def real_dassl_installed() -> bool:
    """True if a ``dassl`` other than this alias can be imported."""
    finders = [f for f in sys.meta_path if not _is_alias_finder(f)]
    for finder in finders:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is not None and find_spec("dassl", None) is not None:
            return True
    return False


def activate() -> bool:
    """Install the alias finder unless a real Dassl is importable; returns True if the alias is active."""
    if any(_is_alias_finder(f) for f in sys.meta_path):
        return True
    if real_dassl_installed():
        return False
    sys.meta_path.append(_AliasFinder())
    return True


def default_site_dir() -> str:
    return sysconfig.get_paths()["purelib"]


def install(site_dir: str | None = None) -> str:
    """Write the ``.pth`` file that activates the alias at interpreter start-up; returns its path."""
    path = os.path.join(site_dir or default_site_dir(), PTH_NAME)
    with open(path, "w") as f:
        f.write("import restore.dassl_alias as _a; _a.activate()\n")
    return path


def uninstall(site_dir: str | None = None) -> bool:
    path = os.path.join(site_dir or default_site_dir(), PTH_NAME)
    if os.path.exists(path):
        os.remove(path)
        return True
    return False


def run(argv: list[str]) -> int:
    """Activate the alias in this process and run ``script.py args...`` (or ``-m module args...``) as
    ``__main__``, as ``python script.py args...`` would."""
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print("usage: python -m restore.dassl_alias run (script.py | -m module) [args ...]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if not activate():
        print("A real Dassl is installed: running with it, not with the alias.", file=sys.stderr)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script.py` does
        runpy.run_path(argv[0], run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "run":
        return run(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "uninstall", "status"],
                        help="or: run script.py args... (see above)")
    parser.add_argument("--site-dir", default=None, help="where to write the .pth file (default: site-packages)")
    args = parser.parse_args(argv)
    if args.action == "install":
        if real_dassl_installed():
            print("A real Dassl is installed: the alias would never be used; nothing written.")
            return 1
        print(f"Wrote {install(args.site_dir)}: `import dassl` now uses restore's engine.")
    elif args.action == "uninstall":
        print("Removed." if uninstall(args.site_dir) else "Nothing to remove.")
    else:
        pth = os.path.join(args.site_dir or default_site_dir(), PTH_NAME)
        if real_dassl_installed():
            print("real Dassl installed: `import dassl` uses it (the alias stays inactive)")
        elif os.path.exists(pth):
            print(f"alias installed ({pth}): `import dassl` uses restore's engine")
        else:
            print("no real Dassl; alias not installed (`install`, or `run script.py` for one process)")
    return 0

