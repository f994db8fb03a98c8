"""This distribution's methods (installed as ``restore_plugins.trainers``); importing the package registers
every method, importing one method module registers that method only (see :mod:`restore.methods`)."""

from restore.methods import register_deferred

from . import (  # noqa: F401
    cocoop,
    coop,
    craft,
    ivlp,
    kgcoop,
    maple,
    mmrl,
    promptsrc,
    restore_trainer,
    vpt,
    zsclip,
)

register_deferred(__name__)  # methods first imported as another method's dependency (MaPLe, by RESTORE)
