"""Zero-shot CLIP with the per-dataset hand-written templates (CoOp's ``ZeroshotCLIP``)."""

from __future__ import annotations

from typing import Any

import torch

from restore.clip.model import CLIP
from restore.methods import MethodSpec, register_method
from restore.official import OfficialRun
from restore.prompting.context import zeroshot_classifier
from restore.prompting.trainer import PromptModel, PromptTrainer


def dataset_templates(dataset_name: str, ensemble: bool = False) -> list[str]:
    """The hand-written template of a dataset; with ``ensemble`` also CoOp's 7 ImageNet templates."""
    from restore.datasets.templates import CUSTOM_TEMPLATES, IMAGENET_TEMPLATES_SELECT

    if dataset_name not in CUSTOM_TEMPLATES:
        raise KeyError(f"No hand-written template for dataset {dataset_name!r}; known: {sorted(CUSTOM_TEMPLATES)}")
    templates = [CUSTOM_TEMPLATES[dataset_name]]
    if ensemble:
        templates = list(IMAGENET_TEMPLATES_SELECT) + ([] if dataset_name == "ImageNet" else templates)
    return templates


class ZeroshotModel(PromptModel):
    """Fixed text classifier from templates; nothing is learned."""

    def __init__(self, clip_model: CLIP, classnames: list[str], templates: list[str]) -> None:
        super().__init__(clip_model, classnames)
        self.templates = templates
        self._weights: torch.Tensor | None = None

    def encode_text(self) -> torch.Tensor:
        device = self.clip.text_projection.device
        if self._weights is None or self._weights.device != device:
            self._weights = zeroshot_classifier(self.text_encoder, self.classnames, self.templates)
        return self._weights


class ZeroshotCLIP(PromptTrainer):
    """Evaluate CLIP with hand-written prompts (``--eval-only``; training just evaluates)."""

    model_name = "zeroshot"
    aliases = ("zsclip",)
    default_cfg: dict[str, Any] = {"PREC": "auto", "ENSEMBLE": False}

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        return ZeroshotModel(clip_model, classnames, dataset_templates(cfg.DATASET.NAME, self.method_cfg.ENSEMBLE))

    def train(self) -> None:  # type: ignore[override]
        self.test()


#: The official code for parity runs (python -m restore.parity --eval-only): CoOp's ZeroshotCLIP, fp32.
OFFICIAL = OfficialRun(repo="KaiyangZhou/CoOp", trainer="ZeroshotCLIP", config="configs/trainers/CoOp/vit_b32.yaml",
                       ours="ZeroshotCLIP", our_config="configs/trainers/ZeroshotCLIP/vit_b32.yaml",
                       our_opts=("TRAINER.ZEROSHOTCLIP.PREC", "fp32"))


SPEC = register_method(MethodSpec("zsclip", "ZeroshotCLIP", aliases=("clip", "zeroshotclip", "zeroshot"), published="CLIP",
                  configs={"base2new": ("ZeroshotCLIP/vit_b16",)}, trains=False), ZeroshotCLIP)
