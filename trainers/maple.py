"""MaPLe: multi-modal prompt learning with coupled vision prompts (Khattak et al., CVPR 2023).

Text prompts at layers ``0..PROMPT_DEPTH-1``; the vision prompt of each layer is a learned linear
map of that layer's text prompt (:class:`restore.prompting.deep.CoupledPrompts`).

Reusing :class:`MaPLeModel` (RESTORE subclasses it)
----------------------------------------------------
* ``self.prompt_learner``: the :class:`CoupledPrompts` (``ctx``, ``proj``, ``compound_prompts_text``,
  ``compound_prompt_projections``; ``deep_text_tokens()`` / ``deep_vision_tokens()``).
* :meth:`MaPLeModel.deep_vision_tokens`: the vision prompts of layers ``1..depth-1`` fed to the
  image tower; override it to substitute them (default: the projections of the text prompts).
* :meth:`adapt_text_features` / :meth:`adapt_image_features` (from
  :class:`trainers.ivlp.DeepPromptModel`): identity here; override to add surgery adapters on the
  projected features before L2 normalisation (training and evaluation alike).
* :meth:`encode_text_output` / :meth:`encode_image_output`: full encoder outputs (``return_hidden``).
* ``loss(output, label)`` is cross-entropy; override and call ``super().loss`` to add terms.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from restore.clip.model import CLIP
from restore.methods import MethodSpec, register_method
from restore.official import OfficialRun
from restore.prompting.deep import CoupledPrompts
from restore.prompting.encoders import DeepTokens
from restore.prompting.trainer import PromptModel, PromptTrainer

from .ivlp import DeepPromptModel


def maple_num_params(n_ctx: int, depth: int, text_width: int, vision_width: int) -> int:
    """Learnable parameters of MaPLe's prompt learner: ctx, proj, deep text prompts and their maps."""
    linear = text_width * vision_width + vision_width
    return n_ctx * text_width + linear + (depth - 1) * (n_ctx * text_width + linear)


class MaPLeModel(DeepPromptModel):
    """Frozen CLIP + :class:`CoupledPrompts`; see the module docstring for the hooks."""

    prompt_learner: CoupledPrompts
    official_keys = ((r"prompt_learner\.ctx", "prompt_learner.text_context.ctx"),
                     (r"prompt_learner\.((proj|compound_prompts_text|compound_prompt_projections)(\..+)?)",
                      r"prompt_learner.\1"))

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx: int = 2, depth: int = 9,
                 ctx_init: str = "a photo of a") -> None:
        super().__init__(clip_model, classnames)
        self.prompt_learner = CoupledPrompts(clip_model, classnames, n_ctx=n_ctx, depth=depth, ctx_init=ctx_init)

    def deep_vision_tokens(self) -> list[torch.Tensor]:
        """Vision prompts of layers ``1..depth-1`` (each ``(n_ctx, vision_width)``)."""
        return self.prompt_learner.deep_vision_tokens()

    def vision_deep(self) -> list[DeepTokens]:
        return self.prompt_learner.vision_deep(self.deep_vision_tokens())


class MaPLe(PromptTrainer):
    """Multi-modal Prompt Learning."""

    model_name = "MultiModalPromptLearner"
    default_cfg: dict[str, Any] = {"N_CTX": 2, "CTX_INIT": "a photo of a", "PREC": "auto", "PROMPT_DEPTH": 9}

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        node = self.method_cfg
        return MaPLeModel(clip_model, classnames, n_ctx=node.N_CTX, depth=node.PROMPT_DEPTH, ctx_init=node.CTX_INIT)


#: The official code for parity runs (python -m restore.parity): fp32 with ``.half()`` as a no-op (the
#: official code halves layers unconditionally); PROMPT_DEPTH 3 = the parity CLIP's 3 layers.
OFFICIAL = OfficialRun(repo="muzairkhattak/multimodal-prompt-learning", trainer="MaPLe",
                       config="configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml", ours="MaPLe",
                       our_config="configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml",
                       opts=("TRAINER.MAPLE.PREC", "fp32", "TRAINER.MAPLE.PROMPT_DEPTH", "3"),
                       keys=MaPLeModel.official_keys)


SPEC = register_method(MethodSpec("maple", "MaPLe", configs={
    "base2new": ("MaPLe/vit_b16_c2_ep5_batch4_2ctx",),
    "xd": ("MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets",),
}, published_by_config={
    # at RESTORE's schedule (10 epochs): like-for-like with the RESTORE paper's re-run MaPLe row
    "vit_b16_c2_ep10_batch4_2ctx": "MaPLe",
    # MaPLe's official schedule (5 epochs): MaPLe's own published numbers
    "vit_b16_c2_ep5_batch4_2ctx": "MaPLe (MaPLe paper)",
}), MaPLe)
