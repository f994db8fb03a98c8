"""IVLP: independent vision-language deep prompts (Rasheed et al. / Khattak et al., MaPLe repo).

The single-branch variants of the RESTORE paper are configs, not classes:
``N_CTX_VISION 0`` / ``PROMPT_DEPTH_VISION 0`` gives language-only prompting, ``N_CTX_TEXT 0`` /
``PROMPT_DEPTH_TEXT 0`` vision-only prompting (the text is then the fixed "<CTX_INIT> <class>.").
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
from restore.prompting.official import OfficialKeys, shifted
from restore.prompting.trainer import BuildDraws, PromptTrainer, build_draws

#: Where the official IVLP / VPT / PromptSRC code keeps the independent prompts: layer k's deep
#: prompt in block k of each tower (``VPT_shallow``, k >= 1), the vision layer-0 prompt on the image
#: encoder (``VPT``), the text layer-0 context as ``prompt_learner.ctx``.
IVLP_OFFICIAL_KEYS: OfficialKeys = (
    (r"prompt_learner\.ctx", "prompt_learner.text_context.ctx"),
    (r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", shifted("prompt_learner.text_prompts.{}")),
    (r"image_encoder\.VPT", "prompt_learner.vision_prompts.0"),
    (r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", shifted("prompt_learner.vision_prompts.{}", offset=0)),
)


class IVLPModel(DeepPromptModel):
    """Independent per-layer prompts in both towers (a tower with 0 tokens or depth 0 is left alone)."""

    official_keys: ClassVar[OfficialKeys] = IVLP_OFFICIAL_KEYS

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], method_cfg: Any,
                 initial: dict[str, list[torch.Tensor]] | None = None) -> None:
        super().__init__(clip_model, classnames)
        self.prompt_learner = IndependentPrompts(
            clip_model, classnames, n_ctx_text=method_cfg.N_CTX_TEXT, n_ctx_vision=method_cfg.N_CTX_VISION,
            depth_text=method_cfg.PROMPT_DEPTH_TEXT, depth_vision=method_cfg.PROMPT_DEPTH_VISION,
            ctx_init=method_cfg.CTX_INIT, initial=initial)


def ivlp_builds(node: Any) -> list[BuildPrompts]:
    """The official IVLP draws its deep prompts inside its CLIP build (``design_details``)."""
    return [BuildPrompts(vision_ctx=node.N_CTX_VISION, vision_depth=node.PROMPT_DEPTH_VISION,
                         language_ctx=node.N_CTX_TEXT, language_depth=node.PROMPT_DEPTH_TEXT)]


class IVLP(PromptTrainer):
    """Independent Vision-Language Prompting (both towers, or one of them via config)."""

    model_name = "VLPromptLearner"
    options = Options(
        Option("N_CTX_VISION", 2, "vision prompt tokens per layer (0: no vision prompts)", minimum=0),
        Option("N_CTX_TEXT", 2, "text prompt tokens per layer (0: no text prompts)", minimum=0),
        Option("CTX_INIT", "a photo of a", "words whose embeddings initialise the layer-0 text context"),
        Option("PROMPT_DEPTH_VISION", 9, "prompted vision layers, from layer 0 (0: none)", minimum=0),
        Option("PROMPT_DEPTH_TEXT", 9, "prompted text layers, from layer 0 (0: none)", minimum=0))

    @classmethod
    def official_builds(cls, cfg: Any) -> list[BuildPrompts]:
        return ivlp_builds(cls.method_node(cfg))

    @classmethod
    def build_prompt_model(cls, cfg: Any, classnames: list[str], clip_model: CLIP,
                           draws: BuildDraws = None) -> PromptModel:
        return IVLPModel(clip_model, classnames, cls.method_node(cfg), initial=build_draws(draws))


#: The official code for parity runs (python -m restore.parity): fp32; prompt depths capped at the parity
#: CLIP's 3 layers (opts given to both sides below). Variants: the single-branch configs.
OFFICIAL = OfficialRun(
    repo="muzairkhattak/multimodal-prompt-learning", trainer="IVLP",
    config="configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml", ours="IVLP",
    our_config="configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml",
    opts=("TRAINER.IVLP.PREC", "fp32", "TRAINER.IVLP.PROMPT_DEPTH_VISION", "3", "TRAINER.IVLP.PROMPT_DEPTH_TEXT", "3"),
    keys=IVLP_OFFICIAL_KEYS)
OFFICIAL_VARIANTS = {
    "language-only": OfficialRun(
        repo="muzairkhattak/multimodal-prompt-learning", trainer="IVLP",
        config="configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml", ours="IVLP",
        our_config="configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml",
        opts=("TRAINER.IVLP.PREC", "fp32", "TRAINER.IVLP.PROMPT_DEPTH_TEXT", "3"), keys=IVLP_OFFICIAL_KEYS),
    "vision-only": OfficialRun(  # the official IVLP refuses a text depth of 0 ("use VPT"): its VPT trainer
        repo="muzairkhattak/multimodal-prompt-learning", trainer="VPT",
        config="configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml", ours="IVLP",
        our_config="configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_vision_only.yaml",
        opts=("OPTIM.LR", "0.0025"),
        official_opts=("TRAINER.VPT.PREC", "fp32", "TRAINER.VPT.N_CTX_VISION", "4", "TRAINER.VPT.PROMPT_DEPTH_VISION", "3"),
        our_opts=("TRAINER.IVLP.PREC", "fp32", "TRAINER.IVLP.PROMPT_DEPTH_VISION", "3"), keys=IVLP_OFFICIAL_KEYS),
}


SPEC = register_method(MethodSpec("ivlp", "IVLP", aliases=("independentvl",),
                  configs={"base2new": ("IVLP/vit_b16_c2_ep5_batch4_2+2ctx",)}), IVLP)
