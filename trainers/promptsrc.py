"""PromptSRC: self-regulating prompts (Khattak et al., ICCV 2023).

IVLP prompts (4+4 tokens, depth 9/9 by default) trained with

    L = CE + TEXT_LOSS_WEIGHT * L1(t, t_teacher) + IMAGE_LOSS_WEIGHT * L1(v, v_zs)
        + KL(p_zs || p) summed over batch and classes / (B * C)

where t, v are the normalised prompted features, ``t_teacher`` the frozen CLIP text features of the
classes averaged over a template ensemble, ``v_zs`` the frozen CLIP (prompt-free) image features
of the same images and ``p_zs`` the zero-shot probabilities ``softmax(scale * v_zs @ t_teacher^T)``.
Then Gaussian prompt aggregation (GPA): the learnable weights at the end of epoch ``e`` (1-based)
are averaged with weights ``N(e; GPA_MEAN, GPA_STD)`` normalised over ``e = 1..MAX_EPOCH``, and
the average replaces them after the last epoch (so the last checkpoint holds it).

Reuse from other trainers (RESTORE's PromptSRC variant):

* :func:`self_consistency_losses` computes the three regularisers from features and logits;
  :class:`PromptSRCModel` calls it in ``loss`` on ``output`` (so subclasses that adapt features
  through ``adapt_*_features`` regularise the adapted features).
* :func:`attach_gpa` + :func:`gpa_end_of_epoch` add GPA to any :class:`PromptModel`; its state
  (running sum per learnable tensor and the count of aggregated epochs) lives in persistent
  buffers of ``model.gpa``, so it is checkpointed every epoch and training resumes exactly.

Teacher templates: :data:`TEACHER_TEMPLATES` is the official 60-template ensemble (the first 60
of CLIP's 80 ImageNet prompt-engineering templates, ``restore.datasets.templates``), averaged as the
official code does: the raw text features' mean over templates, normalised once (not CLIP's
normalise-then-average ensembling); computed once per run.
Differences from the official code, on purpose: GPA aggregates only learnable tensors (not the
frozen CLIP), is resume-safe, and works in every precision (fp32 / fp16 / amp / bf16).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from restore.clip.model import CLIP
from restore.datasets.templates import CLIP_IMAGENET_TEMPLATES_60
from restore.methods import MethodSpec, register_method
from restore.clip.replay import BuildPrompts, replay_openai_build
from restore.official import OfficialRun
from restore.prompting.context import zeroshot_classifier
from restore.prompting.trainer import PromptModel, PromptOutput, PromptTrainer

from .ivlp import IVLPModel, build_draws, ivlp_builds

TEACHER_TEMPLATES: list[str] = list(CLIP_IMAGENET_TEMPLATES_60)


# --------------------------------------------------------------------------- losses

def self_consistency_losses(logits: torch.Tensor, text_features: torch.Tensor, image_features: torch.Tensor,
                            teacher_text: torch.Tensor, zs_image_features: torch.Tensor,
                            zs_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """PromptSRC's unweighted regularisers (fp32).

    Args:
        logits: (B, C) prompted logits.
        text_features / teacher_text: (C, D) prompted and frozen class text features.
        image_features / zs_image_features: (B, D) prompted and frozen image features.
        zs_logits: (B, C) zero-shot logits.
    All features are L2-normalised here, so un-normalised inputs are fine.

    Returns:
        ``{"text": mean |t - t_teacher|, "image": mean |v - v_zs|, "kl": KL(p_zs || p) summed / (B*C)}``.
    """
    t = F.normalize(text_features.float(), dim=-1)
    t0 = F.normalize(teacher_text.float(), dim=-1)
    v = F.normalize(image_features.float(), dim=-1)
    v0 = F.normalize(zs_image_features.float(), dim=-1)
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(zs_logits.float(), dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum() / logits.numel()
    return {"text": (t - t0).abs().mean(), "image": (v - v0).abs().mean(), "kl": kl}


def promptsrc_loss(output: PromptOutput, label: torch.Tensor, teacher_text: torch.Tensor, text_weight: float,
                   image_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + weighted regularisers from a forward whose ``extras`` hold ``zs_image_features`` and ``zs_logits``."""
    ce = F.cross_entropy(output.logits.float(), label)
    terms = self_consistency_losses(output.logits, output.text_features, output.image_features, teacher_text,
                                    output.extras["zs_image_features"], output.extras["zs_logits"])
    loss = ce + text_weight * terms["text"] + image_weight * terms["image"] + terms["kl"]
    summary = {"loss": loss.item(), "loss_ce": ce.item(), "loss_text": terms["text"].item(),
               "loss_image": terms["image"].item(), "loss_kl": terms["kl"].item()}
    return loss, summary


# --------------------------------------------------------------------------- GPA

def gpa_weights(max_epoch: int, mean: float, std: float) -> list[float]:
    """``w[a-1] ∝ exp(-(a - mean)^2 / (2 std^2))`` for ``a = 1..max_epoch``, summing to 1 (computed stably)."""
    if max_epoch < 1 or std <= 0:
        raise ValueError(f"GPA needs MAX_EPOCH >= 1 and GPA_STD > 0, got {max_epoch} and {std}")
    logs = [-((a - mean) ** 2) / (2.0 * std ** 2) for a in range(1, max_epoch + 1)]
    top = max(logs)
    exps = [math.exp(v - top) for v in logs]
    total = sum(exps)
    return [e / total for e in exps]


class GaussianPromptAggregation(nn.Module):
    """Running Gaussian-weighted sum of a model's learnable tensors, kept in persistent buffers.

    Buffers: ``sum__<param name with . -> __>`` (fp32, one per learnable tensor) and ``epochs``
    (how many epochs were aggregated). Not a parameter holder: it reads and writes the model's.
    """

    def __init__(self, names_and_params: Sequence[tuple[str, torch.Tensor]], weights: Sequence[float]) -> None:
        super().__init__()
        self.names = [name for name, _ in names_and_params]
        self.weights = [float(w) for w in weights]
        for name, param in names_and_params:
            self.register_buffer(self._key(name), torch.zeros(param.shape, dtype=torch.float32, device=param.device))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(name: str) -> str:
        return "sum__" + name.replace(".", "__")

    @property
    def max_epoch(self) -> int:
        return len(self.weights)

    def running_sum(self, name: str) -> torch.Tensor:
        return getattr(self, self._key(name))

    @torch.no_grad()
    def accumulate(self, model: nn.Module, epoch: int | None = None) -> float:
        """Add ``w[epoch] * param`` for every tracked tensor (``epoch`` 0-based, default: the next one)."""
        done = int(self.epochs)
        epoch = done if epoch is None else epoch
        if epoch != done:
            raise RuntimeError(f"GPA has aggregated {done} epochs but is asked to add epoch {epoch + 1}; the "
                               "checkpoint and the training loop disagree (resume from the same output folder).")
        if epoch >= self.max_epoch:
            raise RuntimeError(f"GPA was set up for {self.max_epoch} epochs; cannot add epoch {epoch + 1}")
        weight = self.weights[epoch]
        params = dict(model.named_parameters())
        for name in self.names:
            self.running_sum(name).add_(params[name].detach().float(), alpha=weight)
        self.epochs.fill_(epoch + 1)
        return weight

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Copy the aggregate into the model's tensors (in their own dtype)."""
        params = dict(model.named_parameters())
        for name in self.names:
            params[name].copy_(self.running_sum(name).to(params[name].dtype))


def attach_gpa(model: PromptModel, max_epoch: int, mean: float, std: float) -> GaussianPromptAggregation:
    """Give ``model`` a ``gpa`` submodule tracking all its learnable tensors (call after the model is complete)."""
    tracked = [(n, p) for n, p in model.named_parameters() if not model.is_frozen_name(n)]
    model.gpa = GaussianPromptAggregation(tracked, gpa_weights(max_epoch, mean, std))
    return model.gpa


def gpa_end_of_epoch(model: PromptModel, epoch: int, max_epoch: int) -> None:
    """Aggregate epoch ``epoch`` (0-based); after the last one load the aggregate into the model."""
    gpa: GaussianPromptAggregation = model.gpa  # type: ignore[assignment]
    if gpa.max_epoch != max_epoch:
        raise RuntimeError(f"GPA weights were built for {gpa.max_epoch} epochs but training runs {max_epoch}")
    gpa.accumulate(model, epoch)
    if epoch + 1 == max_epoch:
        gpa.apply(model)
        print(f"GPA: loaded the Gaussian-weighted average of {max_epoch} epochs into the prompts")


# --------------------------------------------------------------------------- model and trainer

class PromptSRCModel(IVLPModel):
    """IVLP prompts + the frozen teachers PromptSRC regularises towards.

    ``frozen_teacher_text`` (C, D, normalised, class-dependent, not saved) is computed once at
    construction, on the device CLIP is on. In training mode ``forward`` also returns the frozen
    prompt-free image features and the zero-shot logits in ``output.extras``.
    """

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], method_cfg: Any,
                 teacher_templates: Sequence[str] = TEACHER_TEMPLATES,
                 initial: dict[str, list[torch.Tensor]] | None = None) -> None:
        super().__init__(clip_model, classnames, method_cfg, initial=initial)
        self.text_loss_weight = float(method_cfg.TEXT_LOSS_WEIGHT)
        self.image_loss_weight = float(method_cfg.IMAGE_LOSS_WEIGHT)
        self.register_buffer("frozen_teacher_text", zeroshot_classifier(
            self.text_encoder, classnames, list(teacher_templates), normalize_per_template=False), persistent=False)

    def complete_official_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official checkpoint after the last epoch holds the GPA aggregate: it is both the
        prompts and their running sum, with every epoch aggregated (as our own last checkpoint)."""
        gpa: GaussianPromptAggregation = self.gpa  # type: ignore[assignment]
        completed = dict(state)
        for name in gpa.names:
            if name in state:
                completed["gpa." + gpa._key(name)] = state[name].float()
        completed["gpa.epochs"] = torch.tensor(gpa.max_epoch, dtype=torch.long)
        return completed

    def zero_shot(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised frozen image features (B, D) and zero-shot logits (B, C), without gradient."""
        with torch.no_grad():
            zs = F.normalize(self.image_encoder(image).features.float(), dim=-1)
            logits = self.logit_scale.float() * zs @ self.frozen_teacher_text.float().t()
        return zs, logits

    def forward(self, image: torch.Tensor) -> PromptOutput:
        output = super().forward(image)
        if self.training:
            zs, zs_logits = self.zero_shot(image)
            output.extras.update(zs_image_features=zs, zs_logits=zs_logits)
        return output

    def loss(self, output: PromptOutput, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if "zs_logits" not in output.extras:
            return super().loss(output, label)
        return promptsrc_loss(output, label, self.frozen_teacher_text, self.text_loss_weight, self.image_loss_weight)


class PromptSRC(PromptTrainer):
    """Self-regulating prompts with Gaussian prompt aggregation."""

    model_name = "VLPromptLearner"
    default_cfg: dict[str, Any] = {"N_CTX_VISION": 4, "N_CTX_TEXT": 4, "CTX_INIT": "a photo of a", "PREC": "auto",
                                   "PROMPT_DEPTH_VISION": 9, "PROMPT_DEPTH_TEXT": 9, "TEXT_LOSS_WEIGHT": 25,
                                   "IMAGE_LOSS_WEIGHT": 10, "GPA_MEAN": 15, "GPA_STD": 1}
    # Integers as in the official defaults, so the official yamls and ``TRAINER.PROMPTSRC.GPA_MEAN 15``
    # merge under yacs' strict typing.

    def create_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptSRCModel:
        """The model without GPA (subclasses return their own PromptSRCModel subclass)."""
        return PromptSRCModel(clip_model, classnames, self.method_cfg, initial=build_draws(self))

    def official_builds(self) -> list[BuildPrompts]:
        """The official code draws the deep prompts inside its IVLP CLIP build ..."""
        return ivlp_builds(self.method_cfg)

    @torch.no_grad()
    def replay_official_draws_after_model(self, clip_model: CLIP) -> None:
        """... and builds two prompt-free CLIPs (its teachers) after creating the text context."""
        config = getattr(clip_model, "config", None)
        if config is not None:
            replay_openai_build(config)
            replay_openai_build(config)

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        clip_model.to(getattr(self, "device", torch.device("cpu")))  # teacher text features on the training device
        model = self.create_model(cfg, classnames, clip_model)
        node = self.method_cfg
        attach_gpa(model, cfg.OPTIM.MAX_EPOCH, float(node.GPA_MEAN), float(node.GPA_STD))
        return model

    def after_epoch(self) -> None:
        gpa_end_of_epoch(self.model, self.epoch, self.max_epoch)
        super().after_epoch()


#: The official code for parity runs (python -m restore.parity): fp32 (``.half()`` no-op), prompt depths at
#: the parity CLIP's 3 layers.
OFFICIAL = OfficialRun(repo="muzairkhattak/PromptSRC", trainer="PromptSRC",
                       config="configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml", ours="PromptSRC",
                       our_config="configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml",
                       opts=("TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "3",
                             "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "3"), keys=PromptSRCModel.official_keys)


SPEC = register_method(MethodSpec("promptsrc", "PromptSRC", configs={
    "base2new": ("PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx",),
    "xd": ("PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets",),
    "fewshot": ("PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot",),
}), PromptSRC)
