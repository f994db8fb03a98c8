"""KgCoOp: knowledge-guided context optimisation (Yao et al., CVPR 2023).

CoOp plus a penalty keeping the learned class text features close to the frozen CLIP features of
the dataset's hand-written prompt (:data:`KGCOOP_TEMPLATES`: CoOp's table with KgCoOp's own DTD
prompt "a photo of a {}, a type of texture."; "a photo of a {}." for unknown datasets):

    L = CE + W * (1 - (1/C) sum_i cos(w_i, w_i^clip))        (DISTANCE "cosine", the default)
    L = CE + W * (1/C) sum_i || w_i - w_i^clip ||^2           (DISTANCE "l2", the paper's Eq. 5)

The default is the form of the authors' released code, which produced the published numbers with
W 8.0; for unit vectors ``||a - b||^2 = 2 (1 - cos)``, so "l2" weighs the penalty twice as much at
the same W. Defaults (the paper's base-to-novel setting, ``vit_b16_ep100_ctxv1``): N_CTX 4 from
CTX_INIT "a photo of a" (CoOp-style init, so the 4 words set both), W 8.0, class token at the end,
no class-specific context.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from restore.clip.model import CLIP
from restore.datasets.templates import CUSTOM_TEMPLATES, dataset_template
from restore.methods import MethodSpec, register_method
from restore.clip.replay import replay_openai_build
from restore.official import OfficialRun
from restore.prompting.context import zeroshot_classifier
from restore.prompting.trainer import PromptModel, PromptOutput, PromptTrainer

from .coop import CoOpModel

DISTANCES = ("cosine", "l2")

#: KgCoOp's hand-written prompts: CoOp's, except DTD.
KGCOOP_TEMPLATES: dict[str, str] = {**CUSTOM_TEMPLATES, "DescribableTextures": "a photo of a {}, a type of texture."}


def kg_loss(text_features: torch.Tensor, clip_text_features: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """KgCoOp's penalty between learned (C, D) and hand-crafted (C, D) class features (both normalised here)."""
    learned = F.normalize(text_features.float(), dim=-1)
    fixed = F.normalize(clip_text_features.float(), dim=-1)
    if distance == "l2":
        return (learned - fixed).pow(2).sum(dim=-1).mean()
    if distance == "cosine":
        return 1.0 - (learned * fixed).sum(dim=-1).mean()
    raise ValueError(f"KGCOOP.DISTANCE must be one of {DISTANCES}, got {distance!r}")


class KgCoOpModel(CoOpModel):
    """CoOp's prompts + frozen hand-crafted text features (``frozen_clip_text``, class-dependent, not saved)."""

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], method_cfg: Any, template: str) -> None:
        super().__init__(clip_model, list(classnames), method_cfg)
        self.weight = float(method_cfg.W)
        self.distance = method_cfg.DISTANCE
        if self.distance not in DISTANCES:
            raise ValueError(f"KGCOOP.DISTANCE must be one of {DISTANCES}, got {self.distance!r}")
        self.template = template
        self.register_buffer("frozen_clip_text", zeroshot_classifier(self.text_encoder, classnames, [template]),
                             persistent=False)

    def loss(self, output: PromptOutput, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ce = F.cross_entropy(output.logits.float(), label)
        kg = kg_loss(output.text_features, self.frozen_clip_text, self.distance)
        loss = ce + self.weight * kg
        return loss, {"loss": loss.item(), "loss_ce": ce.item(), "loss_kg": kg.item()}


class KgCoOp(PromptTrainer):
    """Knowledge-guided Context Optimization."""

    model_name = "prompt_learner"
    default_cfg: dict[str, Any] = {"N_CTX": 4, "CSC": False, "CTX_INIT": "a photo of a", "PREC": "auto",
                                   "CLASS_TOKEN_POSITION": "end", "W": 8.0, "DISTANCE": "cosine"}

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        template = dataset_template(cfg.DATASET.NAME, KGCOOP_TEMPLATES)
        clip_model.to(getattr(self, "device", torch.device("cpu")))  # teacher features on the training device
        return KgCoOpModel(clip_model, classnames, self.method_cfg, template)

    @torch.no_grad()
    def replay_official_draws_after_model(self, clip_model: CLIP) -> None:
        """The official prompt learner then draws an unused ``bias_vectors`` (1, 512), builds a second
        CLIP (its teacher), an unused ``meta_net`` Linear(512, 512) and an unused bias-free adapter
        512 -> 128 -> 512 (widths hard-coded there)."""
        nn.init.normal_(torch.empty(1, 512), std=0.02)
        config = getattr(clip_model, "config", None)
        if config is not None:
            replay_openai_build(config)
        nn.Linear(512, 512)
        nn.Linear(512, 128, bias=False)
        nn.Linear(128, 512, bias=False)


#: The official code for parity runs (python -m restore.parity): htyao89/KgCoOp (its KgCoOp/ folder is the
#: checkout root), CoOp-node keys, fp32; its CTX_INIT True means "a photo of a" (4 tokens), W 8 as its runs.
OFFICIAL = OfficialRun(repo="htyao89/KgCoOp", trainer="KgCoOp", config="configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml",
                       ours="KgCoOp", our_config="configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml",
                       official_opts=("TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.W", "8.0", "TRAINER.COOP.PREC", "fp32"),
                       our_opts=("TRAINER.KGCOOP.PREC", "fp32"), keys=KgCoOpModel.official_keys)


SPEC = register_method(MethodSpec("kgcoop", "KgCoOp", configs={"base2new": ("KgCoOp/vit_b16_ep100_ctxv1",)}), KgCoOp)
