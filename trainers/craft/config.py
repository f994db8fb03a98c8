"""``TRAINER.CRAFT.*``: the Craft plug-in's config keys (off by default) and their checks.

The node is added to every config by :func:`restore.engine.config.extend_cfg` through
``register_config_extender``, so any trainer YAML may switch Craft on. Defaults follow the
official code (craft.md §3, §6, §7): alignment weights 1, CLIP's logit scale, one static image
anchor per class from <= 200 train images per class (random seed 1, test transform), MMD off
(the OOD configs set it to 1) with Gaussian bandwidths sigma^2 in {10, 15, 20, 50}.
"""

from __future__ import annotations

from typing import Any

from restore.engine.config import ConfigError, add_node, register_config_extender

NODE = "TRAINER.CRAFT"

DEFAULTS: dict[str, Any] = {
    "ENABLED": False,
    # --- alignment losses (in-distribution / base-to-novel) ---
    # L_Aligned(Static): batch (stochastic) text anchors classified against the static image anchors.
    "WEIGHT_STATIC": 1.0,
    # L_Aligned(Stochastic): batch images classified against the batch's text anchors (image -> text).
    "WEIGHT_STOCHASTIC": 1.0,
    # Optional reverse direction of the stochastic term (batch text -> batch images); not in the code.
    "WEIGHT_STOCHASTIC_T2I": 0.0,
    # Softmax temperature of every anchor similarity; 0 = CLIP's own logit scale (1 / exp(logit_scale)).
    "TEMPERATURE": 0.0,
    # Stochastic text anchors: "template" (the dataset's hand-written template with the sample's class
    # name, encoded with the host's deep text prompts: the official code), "class" (the host's prompted
    # class text features of the batch labels; for CoCoOp the ones conditioned on each sample's own
    # image), "auto" (template when the host has deep text prompts or
    # an ``encode_sentences`` hook, else class).
    "STOCHASTIC_TEXT": "auto",
    # Template for "template" mode ("" = the dataset's hand-written one, restore.datasets.templates).
    "TEMPLATE": "",
    # Targets of the stochastic term: "index" (sample i <-> text i, same-class pairs are negatives, as
    # the code) or "class" (every same-class text of the batch is a positive, soft targets).
    "CONTRAST_TARGETS": "index",
    # --- static image anchors ---
    # "" = <OUTPUT_DIR>/craft_anchors.pt (computed automatically when missing).
    "ANCHOR_PATH": "",
    # Anchors per class (k-means per class; 1 = the class mean, as the code).
    "ANCHOR_CLUSTERS": 1,
    # Train images per class the anchors are computed from (-1 = all); code: 200.
    "ANCHOR_NUM_SHOTS": 200,
    # Seed of that per-class sample and of k-means; code: 1.
    "ANCHOR_SEED": 1,
    # Image transform for the anchor features: "test" (resize + centre crop, as the code) or "train".
    "ANCHOR_TRANSFORM": "test",
    "ANCHOR_BATCH_SIZE": 100,
    "ANCHOR_KMEANS_ITERS": 100,
    # --- MMD between anchor-aligned source and unlabelled target features (OOD) ---
    "MMD_WEIGHT": 0.0,
    # Gaussian kernel sum over these values of sigma^2: k(d2) = sum exp(-d2 / (2 sigma^2)).
    "MMD_BANDWIDTHS": [10.0, 15.0, 20.0, 50.0],
    # Per-domain, per-column min-max scaling of the features before the MMD (as the code).
    "MMD_MINMAX": True,
    # Registered dataset of the unlabelled target images (e.g. "ImageNetSketch"); labels are never used.
    "TARGET_DATASET": "",
    # Its DATASET.ROOT ("" = the run's DATASET.ROOT).
    "TARGET_ROOT": "",
    # Target images per class drawn once (seeded) from its train split (-1 = all); code: 16.
    "TARGET_NUM_SHOTS": 16,
    # "train" (the run's training augmentation, as the code's TrainerXU) or "test".
    "TARGET_TRANSFORM": "train",
    # Unlabelled batch size (0 = DATALOADER.TRAIN_X.BATCH_SIZE, as the code).
    "TARGET_BATCH_SIZE": 0,
    # Seed of the target sample and loader order (-1 = SEED, or 1 when SEED < 0).
    "TARGET_SEED": -1,
}

STOCHASTIC_TEXT_MODES = ("auto", "template", "class")
CONTRAST_TARGET_MODES = ("index", "class")
TRANSFORM_MODES = ("train", "test")


@register_config_extender
def extend_cfg(cfg: Any) -> Any:
    """Add ``TRAINER.CRAFT`` with its defaults (missing keys only)."""
    return add_node(cfg, NODE, DEFAULTS)


def craft_node(cfg: Any) -> Any | None:
    """The ``TRAINER.CRAFT`` node, or None when the config has none (e.g. after ``clean_cfg``)."""
    trainer = cfg.get("TRAINER") if hasattr(cfg, "get") else None
    return None if trainer is None else trainer.get("CRAFT")


def is_enabled(cfg: Any) -> bool:
    node = craft_node(cfg)
    return bool(node is not None and node.get("ENABLED", False))


def check(node: Any) -> None:
    """Raise a one-sentence ConfigError for values Craft cannot use."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"TRAINER.CRAFT.{key} = {node[key]!r}: {why}")

    for key in ("WEIGHT_STATIC", "WEIGHT_STOCHASTIC", "WEIGHT_STOCHASTIC_T2I", "MMD_WEIGHT", "TEMPERATURE"):
        if float(node[key]) < 0:
            raise bad(key, "must be >= 0")
    if node.STOCHASTIC_TEXT not in STOCHASTIC_TEXT_MODES:
        raise bad("STOCHASTIC_TEXT", f"must be one of {STOCHASTIC_TEXT_MODES}")
    if node.CONTRAST_TARGETS not in CONTRAST_TARGET_MODES:
        raise bad("CONTRAST_TARGETS", f"must be one of {CONTRAST_TARGET_MODES}")
    for key in ("ANCHOR_TRANSFORM", "TARGET_TRANSFORM"):
        if node[key] not in TRANSFORM_MODES:
            raise bad(key, f"must be one of {TRANSFORM_MODES}")
    if int(node.ANCHOR_CLUSTERS) < 1:
        raise bad("ANCHOR_CLUSTERS", "must be >= 1")
    if int(node.ANCHOR_BATCH_SIZE) < 1:
        raise bad("ANCHOR_BATCH_SIZE", "must be >= 1")
    if float(node.MMD_WEIGHT) > 0:
        if not node.TARGET_DATASET:
            raise bad("TARGET_DATASET", "MMD_WEIGHT > 0 needs the unlabelled target dataset's registered name "
                                        "(e.g. ImageNetSketch)")
        bands = list(node.MMD_BANDWIDTHS)
        if not bands or any(float(b) <= 0 for b in bands):
            raise bad("MMD_BANDWIDTHS", "must be a non-empty list of positive sigma^2 values")
