"""VPT (deep visual prompt tuning, Jia et al. 2022) on CLIP, as in the MaPLe repository.

Learnable tokens in the image tower only; the class text is fixed: "<CTX_INIT> <class>." ("a
photo of a {}.") encoded once by the frozen text tower (see :class:`restore.prompting.model.DeepPromptModel`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from restore.clip.model import CLIP
from restore.methods import MethodSpec, register_method
from restore.options import Option, Options
from restore.clip.replay import BuildPrompts
from restore.official import OfficialRun
from restore.prompting.deep import IndependentPrompts
from restore.prompting.model import DeepPromptModel, PromptModel
from restore.prompting.official import OfficialKeys
from restore.prompting.trainer import BuildDraws, PromptTrainer, build_draws

from .ivlp import IVLP_OFFICIAL_KEYS


class VPTModel(DeepPromptModel):
    """Vision prompts at layers ``0..PROMPT_DEPTH_VISION-1``; fixed hand-written text."""

    official_keys: ClassVar[OfficialKeys] = IVLP_OFFICIAL_KEYS

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], method_cfg: Any,
                 initial: dict[str, list[torch.Tensor]] | None = None) -> None:
        super().__init__(clip_model, classnames)
        self.prompt_learner = IndependentPrompts(
            clip_model, classnames, n_ctx_text=0, n_ctx_vision=method_cfg.N_CTX_VISION, depth_text=0,
            depth_vision=method_cfg.PROMPT_DEPTH_VISION, ctx_init=method_cfg.CTX_INIT, initial=initial)


class VPT(PromptTrainer):
    """Visual Prompt Tuning (shallow with PROMPT_DEPTH_VISION 1, deep above)."""

    model_name = "prompt_learner"
    options = Options(
        Option("N_CTX_VISION", 2, "vision prompt tokens per layer", minimum=1),
        Option("CTX_INIT", "a photo of a", "the fixed text before the class name"),
        Option("PROMPT_DEPTH_VISION", 1, "prompted vision layers (1: shallow VPT, more: deep)", minimum=1))

    @classmethod
    def official_builds(cls, cfg: Any) -> list[BuildPrompts]:
        """The official VPT draws its prompts inside its CLIP build (vision only)."""
        node = cls.method_node(cfg)
        return [BuildPrompts(vision_ctx=node.N_CTX_VISION, vision_depth=node.PROMPT_DEPTH_VISION)]

    @classmethod
    def build_prompt_model(cls, cfg: Any, classnames: list[str], clip_model: CLIP,
                           draws: BuildDraws = None) -> PromptModel:
        return VPTModel(clip_model, classnames, cls.method_node(cfg), initial=build_draws(draws))


#: The official code for parity runs (python -m restore.parity): fp32, deep VPT at the parity CLIP's 3 layers.
OFFICIAL = OfficialRun(repo="muzairkhattak/multimodal-prompt-learning", trainer="VPT",
                       config="configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml", ours="VPT",
                       our_config="configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml",
                       opts=("TRAINER.VPT.PREC", "fp32", "TRAINER.VPT.PROMPT_DEPTH_VISION", "3"),
                       keys=IVLP_OFFICIAL_KEYS)


SPEC = register_method(MethodSpec("vpt", "VPT", configs={"base2new": ("VPT/vit_b16_c2_ep5_batch4_4",)}), VPT)
