"""Craft (Sun et al., WACV 2025) as a plug-in regularizer for every prompt trainer.

Importing this package registers the ``TRAINER.CRAFT`` config node and the regularizer factory;
``trainers/__init__.py`` imports it, so ``train.py`` always knows the keys. Switch it on with
``TRAINER.CRAFT.ENABLED True`` (see ``configs/trainers/Craft/``).
"""

from . import config, losses  # noqa: F401  (config registers TRAINER.CRAFT)
from .config import DEFAULTS, is_enabled
from .losses import mmd, static_alignment_loss, stochastic_alignment_loss
from .regularizer import CraftRegularizer, build_craft_regularizer

__all__ = ["DEFAULTS", "CraftRegularizer", "build_craft_regularizer", "is_enabled", "mmd",
           "static_alignment_loss", "stochastic_alignment_loss"]
