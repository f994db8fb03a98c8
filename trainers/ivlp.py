"""IVLP: independent vision-language deep prompts (Rasheed et al. / Khattak et al., MaPLe repo).

Also home of :class:`DeepPromptModel`, the small base every deep-prompt trainer builds on (VPT,
IVLP, PromptSRC, MaPLe and the RESTORE variants): it owns ``self.prompt_learner`` (a module with
``text_context``, ``text_deep()`` and ``vision_deep()``) and runs the shared prompted encoders.

The single-branch variants of the RESTORE paper are configs, not classes:
``N_CTX_VISION 0`` / ``PROMPT_DEPTH_VISION 0`` gives language-only prompting, ``N_CTX_TEXT 0`` /
``PROMPT_DEPTH_TEXT 0`` vision-only prompting (the text is then the fixed "<CTX_INIT> <class>.").
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from restore.clip.model import CLIP
from restore.methods import MethodSpec, register_method
from restore.clip.replay import BuildPrompts
from restore.official import OfficialRun
from restore.prompting.deep import IndependentPrompts
from restore.prompting.encoders import DeepTokens, EncoderOutput
from restore.prompting.official import OfficialKeys, shifted
from restore.prompting.trainer import PromptModel, PromptTrainer

#: The official IVLP / VPT / PromptSRC code keeps layer k's deep prompt in block k of each tower
#: (``VPT_shallow``, k >= 1) and the vision layer-0 prompt on the image encoder (``VPT``).
IVLP_OFFICIAL_KEYS: OfficialKeys = (
    (r"prompt_learner\.ctx", "prompt_learner.text_context.ctx"),
    (r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", shifted("prompt_learner.text_prompts.{}")),
    (r"image_encoder\.VPT", "prompt_learner.vision_prompts.0"),
    (r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", shifted("prompt_learner.vision_prompts.{}", offset=0)),
)


class DeepPromptModel(PromptModel):
    """Base for models whose prompts are layer-0 text context + deep tokens in either tower.

    Subclasses set ``self.prompt_learner`` (IndependentPrompts, CoupledPrompts or alike). Hooks,
    all identity / pass-through here, for methods built on top (e.g. RESTORE):

    * :meth:`text_deep` / :meth:`vision_deep`: the :class:`DeepTokens` groups given to each tower.
    * :meth:`adapt_text_features` / :meth:`adapt_image_features`: applied to the projected,
      un-normalised features (``(C, D)`` / ``(B, D)``) in training and evaluation, e.g. surgery
      adapters. They are applied after the text cache, so they may hold learnable parameters.
    * :meth:`encode_text_output` / :meth:`encode_image_output`: the full encoder outputs (hidden
      states with ``return_hidden=True``) for feature-shift analyses.

    When the text side has nothing to learn (vision-only prompting) the text features are computed
    once without gradient and reused, per device and dtype.
    """

    prompt_learner: nn.Module

    def __init__(self, clip_model: CLIP, classnames: Sequence[str]) -> None:
        super().__init__(clip_model, classnames)
        self._fixed_text: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # --- hooks ---
    def text_deep(self) -> list[DeepTokens]:
        return self.prompt_learner.text_deep()

    def vision_deep(self) -> list[DeepTokens]:
        return self.prompt_learner.vision_deep()

    def adapt_text_features(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def adapt_image_features(self, features: torch.Tensor) -> torch.Tensor:
        return features

    # --- encoders ---
    @property
    def text_is_learned(self) -> bool:
        """Whether the class text depends on learnable prompt tokens."""
        return self.prompt_learner.text_context.ctx is not None or len(self.text_deep()) > 0

    def encode_text_output(self, **kwargs: Any) -> EncoderOutput:
        context = self.prompt_learner.text_context
        return self.text_encoder(context(), context.eot_index, self.text_deep(), **kwargs)

    def encode_image_output(self, image: torch.Tensor, **kwargs: Any) -> EncoderOutput:
        return self.image_encoder(image, self.vision_deep(), **kwargs)

    def prompted_text_features(self) -> torch.Tensor:
        """Class text features before :meth:`adapt_text_features`."""
        if self.text_is_learned:
            return self.encode_text_output().features
        device = self.clip.text_projection.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (device, self.text_encoder.dtype, autocast)
        if self._fixed_text is None or self._fixed_text[0] != key:
            with torch.no_grad():
                self._fixed_text = (key, self.encode_text_output().features)
        return self._fixed_text[1]

    def encode_text(self) -> torch.Tensor:
        return self.adapt_text_features(self.prompted_text_features())

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.adapt_image_features(self.encode_image_output(image).features)


class IVLPModel(DeepPromptModel):
    """Independent per-layer prompts in both towers (a tower with 0 tokens or depth 0 is left alone)."""

    official_keys = IVLP_OFFICIAL_KEYS

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


def build_draws(trainer: PromptTrainer) -> dict[str, list[torch.Tensor]] | None:
    """What the first replayed official CLIP build drew (the initial deep prompts), if any."""
    draws = getattr(trainer, "official_build_draws", None)
    return draws[0] if draws else None


class IVLP(PromptTrainer):
    """Independent Vision-Language Prompting (both towers, or one of them via config)."""

    model_name = "VLPromptLearner"
    default_cfg: dict[str, Any] = {"N_CTX_VISION": 2, "N_CTX_TEXT": 2, "CTX_INIT": "a photo of a", "PREC": "auto",
                                   "PROMPT_DEPTH_VISION": 9, "PROMPT_DEPTH_TEXT": 9}

    def official_builds(self) -> list[BuildPrompts]:
        return ivlp_builds(self.method_cfg)

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        return IVLPModel(clip_model, classnames, self.method_cfg, initial=build_draws(self))



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
