"""Craft (Sun et al., WACV 2025) as a plug-in regularizer for every prompt trainer.

Importing this package registers the ``TRAINER.CRAFT`` config node and the regularizer factory;
``register_all`` of the trainers package imports it, so the launcher always knows the keys; the
method ``craft`` (script name) is MaPLe with Craft switched on by its configs. Switch it on with
``TRAINER.CRAFT.ENABLED True`` (see ``configs/trainers/Craft/``).
"""

from restore.methods import MethodSpec, register_method  # noqa: E402,I001

from . import config, losses  # noqa: F401  (config registers TRAINER.CRAFT)
from .config import DEFAULTS, is_enabled
from .losses import mmd, static_alignment_loss, stochastic_alignment_loss
from .regularizer import CraftRegularizer, build_craft_regularizer

# Cross-dataset / DG use the OOD config (ImageNet source + unlabelled ImageNet-Sketch target, as the official code).
SPEC = register_method(MethodSpec("craft", "MaPLe", label="MaPLe+Craft", aliases=("maple+craft",), configs={
    "base2new": ("Craft/maple_vit_b16_c2_ep5_batch4_2ctx",),
    "xd": ("Craft/maple_vit_b16_c2_ep2_batch128_2ctx_ood",),
}))

__all__ = ["DEFAULTS", "CraftRegularizer", "build_craft_regularizer", "is_enabled", "mmd",
           "static_alignment_loss", "stochastic_alignment_loss"]
