"""A Dassl-compatible engine written for current PyTorch (no tensorboard, wilds or pandas needed)."""

from .config import clean_cfg, extend_cfg, get_cfg_default
from .registry import DATASET_REGISTRY, EVALUATOR_REGISTRY, TRAINER_REGISTRY, Registry
from .trainer import SimpleTrainer, TrainerBase, TrainerX, TrainerXU, build_trainer

__all__ = [
    "DATASET_REGISTRY", "EVALUATOR_REGISTRY", "TRAINER_REGISTRY", "Registry", "SimpleTrainer", "TrainerBase",
    "TrainerX", "TrainerXU", "build_trainer", "clean_cfg", "extend_cfg", "get_cfg_default",
]
