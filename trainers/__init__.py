"""This distribution's methods (installed as ``restore_plugins.trainers``).

Importing one method module (``trainers.restore_trainer``) registers that method only, so a host
codebase with its own ``MaPLe`` or ``IVLP`` keeps them; :func:`register_all` (the entry point that
:func:`restore.methods.load_plugins` calls) registers every method.
"""

import importlib

METHOD_MODULES = ("coop", "cocoop", "ivlp", "vpt", "maple", "promptsrc", "kgcoop", "zsclip", "mmrl", "restore_trainer",
                  "craft")


def register_all() -> None:
    """Import and register every method of this package (idempotent)."""
    from restore.methods import register_deferred

    for name in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    register_deferred(__name__)  # methods first imported as another method's dependency (MaPLe, by RESTORE)
