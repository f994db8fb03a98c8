"""VPT (deep visual prompt tuning, Jia et al. 2022) on CLIP, as in the MaPLe repository.

Learnable tokens in the image tower only; the class text is fixed: "<CTX_INIT> <class>." ("a
photo of a {}.") encoded once by the frozen text tower (see :class:`trainers.ivlp.DeepPromptModel`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from restore.clip.model import CLIP
from restore.methods import MethodSpec, register_method
from restore.clip.replay import BuildPrompts
from restore.official import OfficialRun
from restore.prompting.deep import IndependentPrompts
from restore.prompting.trainer import PromptModel, PromptTrainer

from .ivlp import IVLP_OFFICIAL_KEYS, DeepPromptModel, build_draws


class VPTModel(DeepPromptModel):
    """Vision prompts at layers ``0..PROMPT_DEPTH_VISION-1``; fixed hand-written text."""

    official_keys = IVLP_OFFICIAL_KEYS

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], method_cfg: Any,
                 initial: dict[str, list[torch.Tensor]] | None = None) -> None:
        super().__init__(clip_model, classnames)
        self.prompt_learner = IndependentPrompts(
            clip_model, classnames, n_ctx_text=0, n_ctx_vision=method_cfg.N_CTX_VISION, depth_text=0,
            depth_vision=method_cfg.PROMPT_DEPTH_VISION, ctx_init=method_cfg.CTX_INIT, initial=initial)


class VPT(PromptTrainer):
    """Visual Prompt Tuning (shallow with PROMPT_DEPTH_VISION 1, deep above)."""

    model_name = "prompt_learner"
    default_cfg: dict[str, Any] = {"N_CTX_VISION": 2, "CTX_INIT": "a photo of a", "PREC": "auto",
                                   "PROMPT_DEPTH_VISION": 1}

    def official_builds(self) -> list[BuildPrompts]:
        """The official VPT draws its prompts inside its CLIP build (vision only)."""
        node = self.method_cfg
        return [BuildPrompts(vision_ctx=node.N_CTX_VISION, vision_depth=node.PROMPT_DEPTH_VISION)]

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        return VPTModel(clip_model, classnames, self.method_cfg, initial=build_draws(self))


#: The official code for parity runs (python -m restore.parity): fp32, deep VPT at the parity CLIP's 3 layers.
OFFICIAL = OfficialRun(repo="muzairkhattak/multimodal-prompt-learning", trainer="VPT",
                       config="configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml", ours="VPT",
                       our_config="configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml",
                       opts=("TRAINER.VPT.PREC", "fp32", "TRAINER.VPT.PROMPT_DEPTH_VISION", "3"),
                       keys=IVLP_OFFICIAL_KEYS)


SPEC = register_method(MethodSpec("vpt", "VPT", configs={"base2new": ("VPT/vit_b16_c2_ep5_batch4_4",)}), VPT)
