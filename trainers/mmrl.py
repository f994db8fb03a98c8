"""MMRL: Multi-Modal Representation Learning for vision-language models (Guo & Gu, CVPR 2025).

Method (MMRL, Guo et al., CVPR 2025):

* A shared, learnable representation space ``R`` (K tokens of dimension d_r, N(0, 0.02^2)).
  For every layer j of ``REP_LAYERS`` (1-based, contiguous, default 6..12) a Linear map per
  modality turns ``R`` into K vision tokens (width d_v) and K text tokens (width d_t). The
  per-layer maps of one modality start as copies of a single default-initialised Linear.
* At the first rep layer the tokens are *inserted* right after CLS (vision) and right after BOT
  (text); at the following rep layers the previous layer's K outputs are *replaced*. The text
  causal mask covers the grown sequence and the EOT index moves by K (both done by the shared
  encoders through ``DeepTokens(first_layer=J-1, position=1, insert=True)``).
* Read-outs: class feature ``f_c = ln_post(CLS) @ visual.proj`` (frozen), representation
  feature ``f_r = mean_k(ln_post(rep_k)) @ proj_rep`` (new trainable 768x512 projection, Gaussian
  std d_v^-0.5), text feature ``w = ln_final(EOT) @ text_projection`` of the fixed hand-written
  template of the dataset (no learned context). Logits use a fixed scale of 100.
* Loss ``alpha*CE(z_c) + (1-alpha)*CE(z_r) + lambda*[(1 - mean cos(f_c, f_0)) + (1 - mean cos(w, w_0))]``
  with f_0 the frozen CLIP image features of the same augmented batch and w_0 the frozen CLIP
  text features of the template prompts (computed once, when the model is built).
* Decoupled inference: seen classes use ``alpha*z_c + (1-alpha)*z_r`` (logits, as the official
  code; ``MIX probs`` mixes probabilities as the paper writes), new classes and new datasets use
  ``z_c`` only. The rule is :func:`resolve_inference` (PROTOCOL x SUBSAMPLE_CLASSES x INFERENCE).

Per-dataset lambda / d_r: the method's dataset overrides
(``configs/trainers/MMRL/dataset_overrides/base2new.yaml``, also used for few-shot), applied by the
launcher after the config files and before the command-line opts, as the official train.py, so an
explicit option still wins. MMRL* (d_r 32) uses the same values: EuroSAT keeps d_r 2048, as in the
paper's d_r ablation.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from restore.clip.model import CLIP
from restore.clip.replay import BuildPrompts
from restore.clip.tokenizer import tokenize
from restore.log import get_logger
from restore.methods import MethodSpec, register_method
from restore.options import Option, Options
from restore.official import OfficialRun
from restore.prompting.context import clean_classname, encode_fixed_prompts
from restore.prompting.encoders import DeepTokens, EncoderOutput, LayerObserver
from restore.prompting.model import PromptModel, PromptOutput
from restore.prompting.trainer import BuildDraws, PromptTrainer

logger = get_logger(__name__)

__all__ = ["MMRL", "MMRLModel", "RepresentationLearner", "mmrl_loss", "mix_logits", "resolve_inference",
           "rep_layer_span", "SPEC", "PROTOCOLS", "INFERENCE_MODES", "MIX_MODES"]

PROTOCOLS = ("base2new", "cross_dataset", "domain_generalization", "few_shot")
INFERENCE_MODES = ("auto", "class", "mixed")
MIX_MODES = ("logits", "probs")
#: The official code multiplies cosine similarities by a fixed 100 (CLIP's logit_scale is unused).
LOGIT_SCALE = 100.0
REP_TOKENS = "rep_tokens"



# --------------------------------------------------------------------------------------------
# Decoupled inference rule
# --------------------------------------------------------------------------------------------
def resolve_inference(protocol: str, subsample_classes: str, inference: str = "auto",
                      evaluating_source: bool = True) -> str:
    """Which logits an evaluation uses: ``"mixed"`` (class + representation) or ``"class"``.

    ``inference`` other than ``"auto"`` is returned as is. ``"auto"`` follows the official code:

    ================================  ======================  ===========================
    PROTOCOL                          condition               logits
    ================================  ======================  ===========================
    base2new                          SUBSAMPLE_CLASSES base  mixed
    base2new                          new / all               class
    few_shot                          always                  mixed
    cross_dataset, domain_generaliz.  source dataset          mixed
    cross_dataset, domain_generaliz.  any target dataset      class
    ================================  ======================  ===========================

    ``evaluating_source`` says whether the evaluated dataset is the one the weights were trained
    on; the trainer derives it from the training run / checkpoint metadata, never from a name.
    """
    if inference not in INFERENCE_MODES:
        raise ValueError(f"TRAINER.MMRL.INFERENCE must be one of {INFERENCE_MODES}, got {inference!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"PROTOCOL must be one of {PROTOCOLS}, got {protocol!r}")
    if inference != "auto":
        return inference
    if protocol == "base2new":
        return "mixed" if subsample_classes == "base" else "class"
    if protocol == "few_shot":
        return "mixed"
    return "mixed" if evaluating_source else "class"


def mix_logits(logits_class: torch.Tensor, logits_rep: torch.Tensor, alpha: float, mix: str = "logits") -> torch.Tensor:
    """Fuse the two heads: ``alpha*z_c + (1-alpha)*z_r`` ("logits", official code) or
    ``log(alpha*softmax(z_c) + (1-alpha)*softmax(z_r))`` ("probs", the paper's equation; a
    log-probability, so softmax/argmax of the result is the mixed probability)."""
    if mix == "logits":
        return alpha * logits_class + (1.0 - alpha) * logits_rep
    if mix == "probs":
        log_a = math.log(alpha) if alpha > 0 else -math.inf
        log_b = math.log(1.0 - alpha) if alpha < 1 else -math.inf
        return torch.logaddexp(F.log_softmax(logits_class, dim=-1) + log_a, F.log_softmax(logits_rep, dim=-1) + log_b)
    raise ValueError(f"TRAINER.MMRL.MIX must be one of {MIX_MODES}, got {mix!r}")


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def mmrl_loss(logits_class: torch.Tensor, logits_rep: torch.Tensor, label: torch.Tensor,
              image_features: torch.Tensor, teacher_image_features: torch.Tensor | None,
              text_features: torch.Tensor, teacher_text_features: torch.Tensor | None,
              alpha: float, reg_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``alpha*CE(z_c) + (1-alpha)*CE(z_r) + reg_weight*(L_cos^v + L_cos^t)``.

    ``L_cos^v = 1 - mean_b cos(f_c,b, f_0,b)`` over the batch, ``L_cos^t = 1 - mean_c cos(w_c, w_0,c)``
    over the classes. With ``reg_weight == 0`` the teachers may be ``None``.
    """
    ce_class = F.cross_entropy(logits_class.float(), label)
    ce_rep = F.cross_entropy(logits_rep.float(), label)
    loss = alpha * ce_class + (1.0 - alpha) * ce_rep
    parts = {"loss_ce_class": ce_class, "loss_ce_rep": ce_rep}
    if reg_weight != 0:
        if teacher_image_features is None or teacher_text_features is None:
            raise ValueError("REG_WEIGHT != 0 needs the frozen CLIP teacher features")
        cos_v = 1.0 - F.cosine_similarity(image_features.float(), teacher_image_features.float(), dim=-1).mean()
        cos_t = 1.0 - F.cosine_similarity(text_features.float(), teacher_text_features.float(), dim=-1).mean()
        loss = loss + reg_weight * (cos_v + cos_t)
        parts.update({"loss_cos_v": cos_v, "loss_cos_t": cos_t})
    return loss, parts


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def rep_layer_span(rep_layers: Sequence[int], depth: int) -> tuple[int, int]:
    """``(first block index (0-based), number of layers)`` of 1-based, contiguous REP_LAYERS."""
    layers = [int(layer) for layer in rep_layers]
    if not layers:
        raise ValueError("TRAINER.MMRL.REP_LAYERS is empty; MMRL needs at least one layer (default [6, ..., 12])")
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(f"TRAINER.MMRL.REP_LAYERS must be increasing consecutive layer numbers, got {layers}")
    if layers[0] < 1 or layers[-1] > depth:
        raise ValueError(f"TRAINER.MMRL.REP_LAYERS {layers} are 1-based layer numbers and must lie in 1..{depth} "
                         f"for this backbone")
    return layers[0] - 1, len(layers)


class RepresentationLearner(nn.Module):
    """The shared representation space ``R`` (K x d_r) and its per-layer maps to both towers.

    ``compound_rep_tokens_r2vproj[j]`` / ``..._r2tproj[j]`` map R to the vision / text tokens of the
    j-th rep layer. Each list starts as deep copies of one default-initialised Linear (with bias),
    as in the official code: identical initial weights, independent parameters.
    """

    def __init__(self, n_tokens: int, rep_dim: int, text_width: int, vision_width: int, n_layers: int) -> None:
        super().__init__()
        if n_tokens < 1 or rep_dim < 1 or n_layers < 1:
            raise ValueError(f"MMRL needs N_REP_TOKENS, REP_DIM and REP_LAYERS >= 1, "
                             f"got {n_tokens}, {rep_dim}, {n_layers}")
        self.compound_rep_tokens = nn.Parameter(nn.init.normal_(torch.empty(n_tokens, rep_dim), std=0.02))
        to_vision = nn.Linear(rep_dim, vision_width)
        to_text = nn.Linear(rep_dim, text_width)
        self.compound_rep_tokens_r2vproj = nn.ModuleList([copy.deepcopy(to_vision) for _ in range(n_layers)])
        self.compound_rep_tokens_r2tproj = nn.ModuleList([copy.deepcopy(to_text) for _ in range(n_layers)])

    @property
    def n_tokens(self) -> int:
        return self.compound_rep_tokens.shape[0]

    def text_tokens(self) -> list[torch.Tensor]:
        return [layer(self.compound_rep_tokens) for layer in self.compound_rep_tokens_r2tproj]

    def vision_tokens(self) -> list[torch.Tensor]:
        return [layer(self.compound_rep_tokens) for layer in self.compound_rep_tokens_r2vproj]

    def forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.text_tokens(), self.vision_tokens()


class MMRLModel(PromptModel):
    """Frozen CLIP + representation learner + trainable representation projection ``proj_rep``.

    Learnable: ``representation_learner.*`` and ``proj_rep`` (everything under ``clip.`` is frozen).
    ``inference`` ("class" | "mixed") selects the evaluation logits; the trainer sets it per run.
    """

    official_keys = ((r"representation_learner\.(.+)", r"representation_learner.\1"),
                     (r"image_encoder\.proj_rep", "proj_rep"))

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], template: str, n_rep_tokens: int = 5,
                 rep_dim: int = 512, rep_layers: Sequence[int] = (6, 7, 8, 9, 10, 11, 12), alpha: float = 0.7,
                 reg_weight: float = 1.0, mix: str = "logits", inference: str = "mixed",
                 proj_rep: torch.Tensor | None = None) -> None:
        super().__init__(clip_model, classnames)
        if "{}" not in template:
            raise ValueError(f"The MMRL text template must contain '{{}}' for the class name, got {template!r}")
        if mix not in MIX_MODES:
            raise ValueError(f"TRAINER.MMRL.MIX must be one of {MIX_MODES}, got {mix!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"TRAINER.MMRL.ALPHA must be in [0, 1], got {alpha}")
        depth_t, depth_v = self.text_encoder.num_layers, self.image_encoder.num_layers
        self.first_layer, n_layers = rep_layer_span(rep_layers, min(depth_t, depth_v))
        self.alpha, self.reg_weight, self.mix, self.inference = float(alpha), float(reg_weight), mix, inference
        width_v, width_t = self.image_encoder.width, self.text_encoder.width
        embed_dim = clip_model.visual.proj.shape[1]
        self.representation_learner = RepresentationLearner(n_rep_tokens, rep_dim, width_t, width_v, n_layers)
        # P_v^r: a new random projection (the official code does not start it from visual.proj; it draws it
        # inside its CLIP build, so the trainer passes that draw as ``proj_rep``).
        if proj_rep is None:
            proj_rep = torch.randn(width_v, embed_dim) * width_v ** -0.5
        self.proj_rep = nn.Parameter(proj_rep.clone())
        self.template = template
        self.prompts = [template.format(clean_classname(name)) for name in self.classnames]
        # Class-dependent buffers are not saved, so a checkpoint loads for other class lists.
        self.register_buffer("token_ids", tokenize(self.prompts), persistent=False)
        # Frozen CLIP teacher w_0: the same template prompts through CLIP without rep tokens, once.
        teacher = F.normalize(encode_fixed_prompts(self.text_encoder, self.prompts), dim=-1)
        self.register_buffer("teacher_text_features", teacher, persistent=False)

    # --- tokens and encoders ---
    def text_deep(self, tokens: Sequence[torch.Tensor] | None = None) -> list[DeepTokens]:
        tokens = self.representation_learner.text_tokens() if tokens is None else tokens
        return [DeepTokens(list(tokens), first_layer=self.first_layer, position=1, insert=True, name=REP_TOKENS)]

    def vision_deep(self, tokens: Sequence[torch.Tensor] | None = None) -> list[DeepTokens]:
        tokens = self.representation_learner.vision_tokens() if tokens is None else tokens
        return [DeepTokens(list(tokens), first_layer=self.first_layer, position=1, insert=True, name=REP_TOKENS)]

    def encode_text_output(self, return_hidden: bool = False, observer: LayerObserver | None = None) -> EncoderOutput:
        """Text tower over the template prompts with rep tokens after BOT (EOT index + K)."""
        embeddings = self.text_encoder.embed(self.token_ids)
        return self.text_encoder(embeddings, self.token_ids.argmax(dim=-1), self.text_deep(),
                                 return_hidden=return_hidden, observer=observer or self.observer("text"))

    def encode_text(self) -> torch.Tensor:
        return self.encode_text_output().features

    def encode_image_output(self, image: torch.Tensor, return_hidden: bool = False,
                            observer: LayerObserver | None = None) -> EncoderOutput:
        """Image tower with rep tokens after CLS."""
        return self.image_encoder(image, self.vision_deep(), return_hidden=return_hidden,
                                  observer=observer or self.observer("vision"))

    def image_features_pair(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_c, f_r), not normalised: CLS through the frozen proj, mean of LN'd rep tokens through proj_rep."""
        f_c, f_r, _ = self._image_features(image, teacher=False)
        return f_c, f_r

    def _image_features(self, image: torch.Tensor,
                        teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(f_c, f_r, f_0 or None): with ``teacher``, the frozen CLIP's normalised features of the same images
        come from the same pass (the blocks before the rep tokens run once for both)."""
        out = self.image_encoder(image, self.vision_deep(), observer=self.observer("vision"), plain=teacher)
        rep = out.tokens[:, out.slots[REP_TOKENS]].mean(dim=1)
        f_0 = F.normalize(out.plain_features.float(), dim=-1) if out.plain_features is not None else None
        return out.features, rep @ self.proj_rep.to(rep.dtype), f_0

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_features_pair(image)[0]

    @torch.no_grad()
    def teacher_image_features(self, image: torch.Tensor) -> torch.Tensor:
        """f_0: the frozen CLIP image embedding (no rep tokens), L2-normalised."""
        return F.normalize(self.image_encoder(image).features.float(), dim=-1)

    # --- forward / loss ---
    def forward(self, image: torch.Tensor) -> PromptOutput:
        f_c, f_r, f_0 = self._image_features(image, teacher=self.training and self.reg_weight != 0)
        f_c, f_r = F.normalize(f_c.float(), dim=-1), F.normalize(f_r.float(), dim=-1)
        w = F.normalize(self.text_features().float(), dim=-1)
        logits_class = LOGIT_SCALE * f_c @ w.t()
        logits_rep = LOGIT_SCALE * f_r @ w.t()
        fused = mix_logits(logits_class, logits_rep, self.alpha, self.mix)
        extras: dict[str, Any] = {"logits_class": logits_class, "logits_rep": logits_rep, "rep_features": f_r}
        if self.training:
            logits = fused  # training accuracy is logged from the fused head, as in the official code
            if f_0 is not None:
                extras["teacher_image_features"] = f_0
        else:
            if self.inference not in ("class", "mixed"):
                raise ValueError(f"MMRLModel.inference must be 'class' or 'mixed', got {self.inference!r}")
            logits = fused if self.inference == "mixed" else logits_class
        return PromptOutput(logits, f_c, w, extras)

    def loss(self, output: PromptOutput, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = mmrl_loss(
            output.extras["logits_class"], output.extras["logits_rep"], label, output.image_features,
            output.extras.get("teacher_image_features"), output.text_features,
            self.teacher_text_features, self.alpha, self.reg_weight)
        return loss, {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class MMRL(PromptTrainer):
    """Multi-Modal Representation Learning (node ``TRAINER.MMRL``).

    Keys: ALPHA (0.7), REG_WEIGHT (lambda), REP_LAYERS (1-based, [6..12]), REP_DIM (d_r, 512; MMRL*: 32;
    EuroSAT 2048 under both, from its per-dataset yaml),
    N_REP_TOKENS (K, 5), PREC, TEMPLATE ("" = the dataset's hand-written template),
    INFERENCE ("auto" | "class" | "mixed", see :func:`resolve_inference`) and MIX ("logits" | "probs").
    """

    model_name = "MultiModalRepresentationLearner"
    options = Options(
        Option("ALPHA", 0.7, "weight of the class-token logits against the representation-token ones",
               minimum=0.0, maximum=1.0),
        Option("REG_WEIGHT", 1.0, "weight of the regularisation to the frozen CLIP features (lambda)", minimum=0),
        Option("REP_LAYERS", [6, 7, 8, 9, 10, 11, 12], "1-based layers that get representation tokens"),
        Option("REP_DIM", 512, "width of the shared representation space (d_r)", minimum=1),
        Option("N_REP_TOKENS", 5, "representation tokens per layer (K)", minimum=1),
        Option("PREC", "amp", "working precision on CUDA (auto: bf16 where supported, else fp16); CPU runs fp32",
               choices=("auto", "fp32", "fp16", "amp", "bf16")),
        Option("TEMPLATE", "", "text template with {} for the class (empty: the dataset's template)"),
        Option("INFERENCE", "auto", "decoupled inference head (auto: by protocol and split)", choices=INFERENCE_MODES),
        Option("MIX", "logits", "how the two heads are mixed", choices=MIX_MODES))

    def check_cfg(self, cfg: Any) -> None:
        super().check_cfg(cfg)
        if cfg.PROTOCOL not in PROTOCOLS:
            raise ValueError(f"PROTOCOL must be one of {PROTOCOLS} for MMRL's decoupled inference, "
                             f"got {cfg.PROTOCOL!r}")

    _checkpoint_dataset: str | None = None  # set on the instance when a checkpoint is loaded
    _loaded_checkpoint = False

    @classmethod
    def official_builds(cls, cfg: Any) -> list[BuildPrompts]:
        """The official code builds CLIP twice (MMRL's, then the zero-shot one); each build draws proj_rep."""
        return [BuildPrompts(vision_proj_extra=True)] * 2

    @classmethod
    def build_prompt_model(cls, cfg: Any, classnames: list[str], clip_model: CLIP,
                           draws: BuildDraws = None) -> PromptModel:
        from restore.datasets.templates import configured_template

        node = cls.method_node(cfg)
        template = node.TEMPLATE or configured_template(cfg)
        logger.info(f"MMRL text template: {template!r}")
        extra = draws[0].get("vision_proj_extra") if draws else None
        proj_rep = extra[0] if extra else None  # drawn inside the official CLIP build
        return MMRLModel(clip_model, classnames, template, n_rep_tokens=node.N_REP_TOKENS, rep_dim=node.REP_DIM,
                         rep_layers=node.REP_LAYERS, alpha=node.ALPHA, reg_weight=node.REG_WEIGHT, mix=node.MIX,
                         proj_rep=proj_rep)

    # --- decoupled inference ---
    def evaluating_source(self) -> bool:
        """True when the evaluated dataset is the one the weights were trained on.

        Weights trained (or resumed) in this run were trained on cfg.DATASET; loaded weights carry
        the training dataset in their checkpoint metadata.
        """
        if not self._loaded_checkpoint:
            return True
        return self._checkpoint_dataset == self.cfg.DATASET.NAME

    def inference_mode(self) -> str:
        return resolve_inference(self.cfg.PROTOCOL, self.cfg.DATASET.SUBSAMPLE_CLASSES, self.method_cfg.INFERENCE,
                                 self.evaluating_source())

    @torch.no_grad()
    def test(self, split: str | None = None) -> float:
        model = cast(MMRLModel, self.model)
        model.inference = self.inference_mode()
        head = "class + representation" if model.inference == "mixed" else "class token only"
        mix = f", mixing {model.mix}" if model.inference == "mixed" else ""
        logger.info(f"MMRL decoupled inference: {head}{mix} (PROTOCOL {self.cfg.PROTOCOL}, SUBSAMPLE_CLASSES "
              f"{self.cfg.DATASET.SUBSAMPLE_CLASSES}, INFERENCE {self.method_cfg.INFERENCE})")
        return super().test(split)

    def results_metadata(self) -> dict[str, Any]:
        return {**super().results_metadata(), "mmrl_inference": self.model.inference, "mmrl_mix": self.model.mix}

    # --- checkpoints record where the weights were trained ---
    def checkpoint_metadata(self) -> dict[str, Any]:
        return {**super().checkpoint_metadata(), "dataset": self.cfg.DATASET.NAME,
                "subsample_classes": self.cfg.DATASET.SUBSAMPLE_CLASSES, "protocol": self.cfg.PROTOCOL}

    def check_checkpoint_metadata(self, checkpoint: dict[str, Any], path: str) -> None:
        super().check_checkpoint_metadata(checkpoint, path)
        self._loaded_checkpoint = True
        self._checkpoint_dataset = checkpoint.get("dataset")


SPEC = register_method(MethodSpec(
    "mmrl", "MMRL",
    published_by_config={"vit_b16_base2new_light": "MMRL*"},  # d_r 32: MMRL paper Tab. 4 / Tab. 6
    configs={
        "base2new": ("MMRL/vit_b16_base2new",),
        "base2new:imagenet": ("MMRL/vit_b16_base2new_imagenet",),
        "xd": ("MMRL/vit_b16_cross_dataset",),
        "dg": ("MMRL/vit_b16_domain_generalization",),
        "fewshot": ("MMRL/vit_b16_few_shot",),
        "fewshot:imagenet": ("MMRL/vit_b16_few_shot_imagenet",),
        # CFG=<name> on ImageNet: its own file (batch 32, 5 epochs), as without CFG
        "vit_b16_base2new:imagenet": ("MMRL/vit_b16_base2new_imagenet",),
        "vit_b16_base2new_light:imagenet": ("MMRL/vit_b16_base2new_light_imagenet",),  # MMRL*
        "vit_b16_few_shot:imagenet": ("MMRL/vit_b16_few_shot_imagenet",),
    },
    dataset_overrides={"base2new": "MMRL/dataset_overrides/base2new.yaml",
                       "few_shot": "MMRL/dataset_overrides/base2new.yaml"},
), MMRL)


#: The official code for parity runs (python -m restore.parity): fp32, REP_LAYERS 2..3 (the parity CLIP has
#: 3 layers), the official B2N task (DTD's lambda 6 comes from each side's per-dataset settings).
OFFICIAL = OfficialRun(repo="yunncheng/MMRL", trainer="MMRL", config="configs/trainers/MMRL/vit_b16.yaml", ours="MMRL",
                       our_config="configs/trainers/MMRL/vit_b16_base2new.yaml",
                       opts=("TRAINER.MMRL.PREC", "fp32", "TRAINER.MMRL.REP_LAYERS", "[2, 3]"),
                       official_opts=("TASK", "B2N"), keys=MMRLModel.official_keys)
