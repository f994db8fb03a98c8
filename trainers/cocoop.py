"""CoCoOp: conditional context optimisation (Zhou et al., CVPR 2022).

A meta-net ``Linear(vis_dim -> vis_dim // 16) -> ReLU -> Linear(-> ctx_dim)`` maps the normalised
image feature to a bias added to every context vector, so each image gets its own prompts and the
text tower runs once per image. Initialisation follows CoOp (``n_ctx`` = number of words of
``CTX_INIT`` when it is set).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from restore.clip.model import CLIP
from restore.methods import MethodSpec, register_method
from restore.official import OfficialRun
from restore.prompting.context import TextContext
from restore.prompting.deep import text_width
from restore.prompting.trainer import PromptModel, PromptOutput, PromptTrainer


class CoCoOpPromptLearner(nn.Module):
    """The learned context (``context.ctx``) and the meta-net producing per-image biases."""

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx: int, ctx_init: str) -> None:
        super().__init__()
        self.context = TextContext(clip_model, classnames, n_ctx=n_ctx, ctx_init=ctx_init, init_mode="all_words")
        if self.context.ctx is None:
            raise ValueError("CoCoOp needs N_CTX >= 1 (or a non-empty CTX_INIT)")
        vis_dim = clip_model.visual.output_dim
        hidden = max(1, vis_dim // 16)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, text_width(clip_model))),
        ]))

    def conditional_ctx(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image context ``ctx + meta_net(f)``: (B, n_ctx, ctx_dim) from normalised features (B, vis_dim)."""
        weight = self.meta_net.linear1.weight
        bias = self.meta_net(image_features.to(weight.dtype))
        return self.context.ctx.unsqueeze(0) + bias.unsqueeze(1)


class CoCoOpModel(PromptModel):
    """Image-conditional prompts; logits computed image by image (nothing cached for evaluation)."""

    official_keys = ((r"ctx", "prompt_learner.context.ctx"),
                     (r"meta_net\.(linear[12]\.(weight|bias))", r"prompt_learner.meta_net.\1"))

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str = "") -> None:
        super().__init__(clip_model, classnames)
        self.prompt_learner = CoCoOpPromptLearner(clip_model, classnames, n_ctx, ctx_init)

    @property
    def text_is_image_independent(self) -> bool:
        return False

    def encode_text(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Class text features (C, D) for one context (default: the learned ctx without image bias)."""
        context = self.prompt_learner.context
        return self.text_encoder(context(ctx), context.eot_index).features

    def forward(self, image: torch.Tensor) -> PromptOutput:
        image_features = F.normalize(self.encode_image(image).float(), dim=-1)
        ctx = self.prompt_learner.conditional_ctx(image_features)
        scale = self.logit_scale.float()
        logits, texts = [], []
        for ctx_i, feat_i in zip(ctx, image_features):
            text_i = F.normalize(self.encode_text(ctx_i).float(), dim=-1)
            logits.append(scale * feat_i @ text_i.t())
            texts.append(text_i)
        # Text features differ per image: (B, C, D) in extras, not in ``text_features`` (meant as (C, D)).
        return PromptOutput(torch.stack(logits), image_features, None, {"text_features_per_image": torch.stack(texts)})


class CoCoOp(PromptTrainer):
    """Conditional Context Optimization."""

    model_name = "prompt_learner"
    default_cfg: dict[str, Any] = {"N_CTX": 16, "CTX_INIT": "", "PREC": "auto"}

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        node = self.method_cfg
        return CoCoOpModel(clip_model, classnames, n_ctx=node.N_CTX, ctx_init=node.CTX_INIT)


#: The official code for parity runs (python -m restore.parity): fp32, batch 1 as its configs.
OFFICIAL = OfficialRun(repo="KaiyangZhou/CoOp", trainer="CoCoOp",
                       config="configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml", ours="CoCoOp",
                       our_config="configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
                       opts=("TRAINER.COCOOP.PREC", "fp32"), keys=CoCoOpModel.official_keys)


SPEC = register_method(MethodSpec("cocoop", "CoCoOp", configs={"base2new": ("CoCoOp/vit_b16_c4_ep10_batch1_ctxv1",)}), CoCoOp)
