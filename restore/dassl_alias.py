"""Make ``import dassl...`` resolve to this engine where the real Dassl is not installed.

Opt in once per environment (the one-liner)::

    python -m restore.dassl_alias install      # writes restore_dassl_alias.pth into site-packages
    python -m restore.dassl_alias uninstall

or in code, before the first ``import dassl``: ``import restore.dassl_alias as a; a.activate()``.
If a real ``dassl`` package is importable, nothing is shadowed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
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
            module.__version__ = "0.6.3"
        exported = []
        for source, names in _MODULES[module.__name__]:
            src = importlib.import_module(source)
            if names is None:
                names = list(getattr(src, "__all__", [n for n in vars(src) if not n.startswith("_")]))
            for name in names:
                setattr(module, name, getattr(src, name))
                exported.append(name)
        module.__all__ = exported


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _MODULES:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(), is_package=fullname in _PACKAGES)
        if fullname in _PACKAGES:
            spec.submodule_search_locations = []
        return spec


def real_dassl_installed() -> bool:
    """True if a ``dassl`` other than this alias can be imported."""
    finders = [f for f in sys.meta_path if not isinstance(f, _AliasFinder)]
    for finder in finders:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is not None and find_spec("dassl", None) is not None:
            return True
    return False


def activate() -> bool:
    """Install the alias finder unless a real Dassl is importable; returns True if the alias is active."""
    if any(isinstance(f, _AliasFinder) for f in sys.meta_path):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "uninstall", "status"])
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
        print("real Dassl installed" if real_dassl_installed() else "no real Dassl; alias available")
    return 0


if __name__ == "__main__":
    sys.exit(main())
