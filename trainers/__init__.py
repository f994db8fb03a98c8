"""Registered trainers; importing this package registers every method."""

from . import cocoop, coop, ivlp, kgcoop, maple, mmrl, promptsrc, vpt, zsclip  # noqa: F401
import restore.craft  # noqa: F401,E402  registers TRAINER.CRAFT and the Craft regularizer
from . import restore_trainer  # noqa: F401  (module name avoids shadowing the top-level restore package)
