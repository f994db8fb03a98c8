"""Registered trainers; importing this package registers every method.

MMRL and RESTORE are registered by name and imported on first lookup: their modules also run as
``python -m trainers.mmrl`` / ``python -m trainers.restore_trainer``, which must not find them imported.
"""

from restore.engine.registry import TRAINER_REGISTRY

from . import cocoop, coop, ivlp, kgcoop, maple  # noqa: F401

TRAINER_REGISTRY.register_lazy("MMRL", "trainers.mmrl")
from . import promptsrc, vpt, zsclip  # noqa: F401
import restore.craft  # noqa: F401,E402  registers TRAINER.CRAFT and the Craft regularizer

# (module name avoids shadowing the top-level restore package)
TRAINER_REGISTRY.register_lazy("RESTORE", "trainers.restore_trainer")
