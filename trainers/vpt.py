"""VPT (deep visual prompt tuning, Jia et al. 2022) on CLIP, as in the MaPLe repository.

Learnable tokens in the image tower only; the class text is fixed: "<CTX_INIT> <class>." ("a
photo of a {}.") encoded once by the frozen text tower (see :class:`trainers.ivlp.DeepPromptModel`).
"""

from __future__ import annotations

from typing import Any, Sequence

from restore.clip.model import CLIP
from restore.methods import MethodSpec, register_method
from restore.prompting.deep import IndependentPrompts
from restore.prompting.trainer import PromptModel, PromptTrainer

from .ivlp import IVLP_OFFICIAL_KEYS, DeepPromptModel


class VPTModel(DeepPromptModel):
    """Vision prompts at layers ``0..PROMPT_DEPTH_VISION-1``; fixed hand-written text."""

    official_keys = IVLP_OFFICIAL_KEYS

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], method_cfg: Any) -> None:
        super().__init__(clip_model, classnames)
        self.prompt_learner = IndependentPrompts(
            clip_model, classnames, n_ctx_text=0, n_ctx_vision=method_cfg.N_CTX_VISION, depth_text=0,
            depth_vision=method_cfg.PROMPT_DEPTH_VISION, ctx_init=method_cfg.CTX_INIT)


class VPT(PromptTrainer):
    """Visual Prompt Tuning (shallow with PROMPT_DEPTH_VISION 1, deep above)."""

    model_name = "prompt_learner"
    default_cfg: dict[str, Any] = {"N_CTX_VISION": 2, "CTX_INIT": "a photo of a", "PREC": "auto",
                                   "PROMPT_DEPTH_VISION": 1}

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        return VPTModel(clip_model, classnames, self.method_cfg)


SPEC = register_method(MethodSpec("vpt", "VPT", configs={"base2new": ("VPT/vit_b16_c2_ep5_batch4_4",)}), VPT)
