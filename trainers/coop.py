"""CoOp: learned text context (Zhou et al., IJCV 2022).

One difference from the official code, on purpose: with both ``CSC True`` and a ``CTX_INIT``, each
class gets its own context initialised from the init words; the official code silently ignores
``CSC`` when ``CTX_INIT`` is set (one shared context). No published CoOp setting combines the two
(its class-specific runs use random init).
"""

from __future__ import annotations

from typing import Any

import torch

from restore.clip.model import CLIP
from restore.methods import MethodSpec, register_method
from restore.official import OfficialRun
from restore.prompting.context import TextContext
from restore.prompting.trainer import PromptModel, PromptTrainer


class CoOpModel(PromptModel):
    """``[SOS][ctx][class .][EOT]`` with a shared or class-specific learned context."""

    # CoOp (and KgCoOp) register the prompt learner alone; its frozen extras (KgCoOp's unused
    # bias_vectors and meta_net) are dropped with the class buffers.
    official_keys = ((r"ctx", "prompt_learner.ctx"),)

    def __init__(self, clip_model: CLIP, classnames: list[str], method_cfg: Any) -> None:
        super().__init__(clip_model, classnames)
        self.prompt_learner = TextContext(
            clip_model, classnames, n_ctx=method_cfg.N_CTX, ctx_init=method_cfg.CTX_INIT, init_mode="all_words",
            class_specific=method_cfg.CSC, class_token_position=method_cfg.CLASS_TOKEN_POSITION)

    def encode_text(self) -> torch.Tensor:
        return self.text_encoder(self.prompt_learner(), self.prompt_learner.eot_index).features


class CoOp(PromptTrainer):
    """Context Optimization."""

    model_name = "prompt_learner"
    default_cfg: dict[str, Any] = {"N_CTX": 16, "CSC": False, "CTX_INIT": "", "PREC": "auto",
                                   "CLASS_TOKEN_POSITION": "end"}

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        return CoOpModel(clip_model, classnames, self.method_cfg)


#: The official code for parity runs (python -m restore.parity).
OFFICIAL = OfficialRun(repo="KaiyangZhou/CoOp", trainer="CoOp", config="configs/trainers/CoOp/vit_b32.yaml",
                       ours="CoOp", our_config="configs/trainers/CoOp/vit_b32.yaml",
                       opts=("TRAINER.COOP.PREC", "fp32"), keys=CoOpModel.official_keys)


SPEC = register_method(MethodSpec("coop", "CoOp", configs={
    "base2new": ("CoOp/vit_b16_ep50_ctxv1",),
    "xd": ("CoOp/vit_b16_ep50_ctxv1",),
    "fewshot": ("CoOp/vit_b16_ep50",),
}, extras={"benchmark_reference": True}), CoOp)
