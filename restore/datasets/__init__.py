"""The user-facing dataset catalogue and tools: benchmark facts (catalog), preparation, synthetic copies, templates."""

from .templates import (
    CLIP_IMAGENET_TEMPLATES_60,
    CUSTOM_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    dataset_template,
    template_for,
)

__all__ = ["CLIP_IMAGENET_TEMPLATES_60", "CUSTOM_TEMPLATES", "IMAGENET_TEMPLATES_SELECT", "dataset_template", "template_for"]
