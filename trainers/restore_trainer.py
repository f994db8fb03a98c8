"""RESTORE: feature-shift consistency and guided surgery for multi-modal prompt learning (ECCV 2024).

Registered as ``RESTORE`` (config node ``TRAINER.RESTORE``, checkpoint folder
``MultiModalPromptLearner`` as in the official ``MaPLe_FSA``). Built on MaPLe's coupled prompts
(``BASE "maple"``, default) or on PromptSRC (``BASE "promptsrc"``: IVLP prompts, PromptSRC's
self-consistency losses and Gaussian prompt aggregation, reused from :mod:`trainers.promptsrc`).
``BASE "ivlp"`` (keys under ``IVLP``, with ``USE_SURGERY False``) is the paper's "IVLP + L_fs"
analysis variant (Fig. 4): the loss alone on IVLP's independent prompts, depth 12.

Loss::

    L = L_base + FS_WEIGHT * sum_k (s_t,k - s_v,k)^2          (fp32; L_base = CE, or PromptSRC's loss)

(the shifts and the surgery mix are computed in fp32 whatever the working precision; under DDP the
feature-mode shifts are those of the global batch)

over the prompted layers ``k`` (``FS_LAYERS "deep"``: layers 1..depth-1, the official choice;
``"prompted"`` adds layer 0). The per-layer shift ``s`` has two definitions (``SHIFT``):

* ``"prompt"`` (default; reproduces the published numbers): the official code's proxy, the
  Frobenius norm of the prompt tokens' Gram matrix ``||P_k P_k^T||_F`` (n x n, same value as the
  d x d Gram) divided by its value at the first training step. The reference values are
  persistent buffers (``fs_ref_text``/``fs_ref_vision``), so they are saved in checkpoints and a
  resumed run keeps them (the official code re-captures them on resume, resetting the loss).
* ``"feature"`` (paper, Eq. 6): the relative change of each block's output with vs without the
  prompts on the same input, measured by :mod:`restore.prompting.shift` during the training
  forward (one extra no-grad pass of every prompted block). ``FEATURE_NORM "first_step"`` divides by
  the value averaged over the first ``FEATURE_REF_STEPS`` steps (also persistent buffers).

Surgery (paper §3.5, official ``Feature_Calibrator``): one residual adapter per modality on the
projected features, ``A(x) = x + W2 act(W1 LN(x))`` (hidden ``ADAPTER_HIDDEN``, or
``ADAPTER_RATIO * embed_dim``: 4 -> 512-2048-512 as official, < 1 for a bottleneck), mixed as
``f' = r A(f) + (1 - r) f``. ``r_t``, ``r_v`` (``text_ratio``/``vision_ratio``) are persistent
buffers: saved, restored for evaluation (the checkpoint's values win over the config's, as in the
official code), never trained. Their schedule (``RATIO_SCHEDULE``):

* ``"one_shot"`` (official): after epoch index ``RATIO_UPDATE_EPOCH`` (-1: ``MAX_EPOCH // 3``),
  ``r_t += RATIO_STEP_TEXT * mean_k S_t,k`` and ``r_v += RATIO_STEP_VISION * mean_k S_v,k`` with the
  *raw* (un-normalised) shifts: current Gram norms in prompt mode, the epoch's mean feature shift in
  feature mode (re-tune the steps there: 0.02/0.005 are calibrated to Gram norms ~0.3/~1.1);
* ``"per_epoch"``: the same update after every epoch;
* ``"fixed"``: never updated (the unguided "+Surgery" ablation).

The buffer ``ratio_updated_epoch`` records the last epoch whose update was applied, and the update
runs before that epoch's checkpoint is written, so resuming never applies an update twice nor
skips one.

Per-dataset settings (official run lists): the method's dataset overrides,
``configs/trainers/RESTORE/dataset_overrides/<protocol>.yaml``, applied by the launcher
(:func:`restore.methods.apply_dataset_overrides`; ``python -m restore.methods --overrides dtd`` prints them).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from restore.clip.model import CLIP, LayerNorm, QuickGELU
from restore.engine.distributed import mean_over_ranks
from restore.log import get_logger
from restore.methods import MethodSpec, register_method
from restore.options import Option, Options
from restore.prompting.model import DeepPromptModel, PromptModel, PromptOutput
from restore.prompting.official import OfficialKeys
from restore.prompting.shift import observe_shift
from restore.prompting.trainer import BuildDraws, PromptTrainer
from restore.official import OfficialRun

from .ivlp import IVLPModel
from .maple import MaPLeModel, maple_num_params
from .promptsrc import PromptSRCModel, attach_gpa, gpa_end_of_epoch

__all__ = ["RESTORE", "RestoreMaPLeModel", "RestorePromptSRCModel", "RestoreIVLPModel", "ShiftGuidedSurgery",
           "SurgeryAdapter", "gram_norms",
           "restore_num_params", "adapter_num_params", "SPEC", "benchmark_shift_modes",
           "SHIFT_MODES", "RATIO_SCHEDULES"]

logger = get_logger(__name__)

SHIFT_MODES = ("prompt", "feature")
RATIO_SCHEDULES = ("one_shot", "per_epoch", "fixed")
FS_LAYER_SETS = ("deep", "prompted")
FEATURE_NORMS = ("none", "first_step")
BASES = ("maple", "promptsrc", "ivlp")



# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def gram_norms(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """``||P P^T||_F`` per prompt tensor ``P`` (n, d), in fp32: the official shift proxy, shape (K,)."""
    if not tokens:
        return torch.zeros(0)
    values = []
    for p in tokens:
        p = p.float().reshape(-1, p.shape[-1])
        values.append(torch.linalg.matrix_norm(p @ p.t()))
    return torch.stack(values)


class SurgeryAdapter(nn.Module):
    """``A(x) = x + W2 act(W1 LN(x) + b1) + b2`` on projected features (official ``Feature_Calibrator``).

    ``final_act`` adds the trailing QuickGELU of the PromptSRC bytecode build. Default PyTorch init
    (not zero-init), as in the official code.
    """

    def __init__(self, dim: int, hidden: int, final_act: bool = False) -> None:
        super().__init__()
        self.ln = LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.act = QuickGELU()
        self.down = nn.Linear(hidden, dim)
        self.final_act = QuickGELU() if final_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.final_act(self.down(self.act(self.up(self.ln(x)))))

    def mix(self, x: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
        """``r A(x) + (1 - r) x`` in fp32 (a bf16 ratio would round away the guided increment): identity at r = 0."""
        r = ratio.float() if isinstance(ratio, torch.Tensor) else float(ratio)
        return r * self(x).float() + (1 - r) * x.float()


def adapter_hidden_dim(embed_dim: int, hidden: int, ratio: float) -> int:
    if hidden > 0:
        return int(hidden)
    if ratio <= 0:
        raise ValueError(f"TRAINER.RESTORE.ADAPTER_RATIO must be > 0 when ADAPTER_HIDDEN is 0, got {ratio}")
    return max(1, int(round(embed_dim * ratio)))


def adapter_num_params(dim: int, hidden: int) -> int:
    """LN (2 d) + up (d h + h) + down (h d + d)."""
    return 2 * dim + dim * hidden + hidden + hidden * dim + dim


def restore_num_params(n_ctx: int = 2, depth: int = 9, text_width: int = 512, vision_width: int = 768,
                       embed_dim: int = 512, hidden: int = 2048, surgery: bool = True) -> int:
    """Trainable parameters of RESTORE on MaPLe (ViT-B/16 defaults: 3,555,072 + 2 x 2,100,736 = 7,756,544)."""
    total = maple_num_params(n_ctx, depth, text_width, vision_width)
    return total + (2 * adapter_num_params(embed_dim, hidden) if surgery else 0)


# --------------------------------------------------------------------------------------------
# What RESTORE adds to a deep-prompt model, as one composed module
# --------------------------------------------------------------------------------------------

#: Checkpoint keys written before the additions moved under ``restore.`` (mapped on load).
_LEGACY_KEYS = ("fs_ref_text", "fs_ref_vision", "fs_ref_steps", "text_ratio", "vision_ratio", "ratio_updated_epoch",
                "text_adapter.", "visual_adapter.")


class ShiftGuidedSurgery(nn.Module):
    """Feature-shift consistency state + surgery adapters + guided ratios (the ``restore.`` submodule).

    It knows nothing of the prompts: the host model gives it the per-layer shifts (Gram norms of
    the prompt tokens, or the feature shifts observed in the forward) and the projected features.
    """

    def __init__(self, node: Any, embed_dim: int, text_depth: int, vision_depth: int) -> None:
        super().__init__()
        self.shift_mode = str(node.SHIFT)
        self.fs_weight = float(node.FS_WEIGHT)
        first = 1 if node.FS_LAYERS == "deep" else 0
        self.fs_layers = list(range(first, min(text_depth, vision_depth)))
        if self.fs_weight > 0 and not self.fs_layers:
            raise ValueError(f"RESTORE's feature-shift loss needs prompted layers in both towers for FS_LAYERS "
                             f"{node.FS_LAYERS!r}; the prompt depths are {text_depth} (text) / {vision_depth} (vision).")
        self.feature_norm = str(node.FEATURE_NORM) if self.shift_mode == "feature" else "first_step"
        self.ref_steps = max(1, int(node.FEATURE_REF_STEPS)) if self.shift_mode == "feature" else 1
        self.feature_eps = float(node.FEATURE_EPS)
        self.ratio_schedule = str(node.RATIO_SCHEDULE)
        self.ratio_update_epoch = int(node.RATIO_UPDATE_EPOCH)
        self.ratio_step_text = float(node.RATIO_STEP_TEXT)
        self.ratio_step_vision = float(node.RATIO_STEP_VISION)
        self.use_surgery = bool(node.USE_SURGERY)
        k = len(self.fs_layers)
        self.register_buffer("fs_ref_text", torch.zeros(k))
        self.register_buffer("fs_ref_vision", torch.zeros(k))
        self.register_buffer("fs_ref_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("text_ratio", torch.tensor(float(node.TEXT_RATIO)))
        self.register_buffer("vision_ratio", torch.tensor(float(node.VISION_RATIO)))
        self.register_buffer("ratio_updated_epoch", torch.tensor(-1, dtype=torch.long))
        self.text_adapter: SurgeryAdapter | None = None
        self.visual_adapter: SurgeryAdapter | None = None
        if self.use_surgery:
            hidden = adapter_hidden_dim(embed_dim, int(node.ADAPTER_HIDDEN), float(node.ADAPTER_RATIO))
            self.text_adapter = SurgeryAdapter(embed_dim, hidden, bool(node.ADAPTER_FINAL_ACT))
            self.visual_adapter = SurgeryAdapter(embed_dim, hidden, bool(node.ADAPTER_FINAL_ACT))
        self._epoch_shift_sum = [0.0, 0.0]
        self._epoch_shift_count = 0

    # --- surgery ---
    def adapt_text(self, features: torch.Tensor) -> torch.Tensor:
        return self.text_adapter.mix(features, self.text_ratio) if self.text_adapter is not None else features

    def adapt_image(self, features: torch.Tensor) -> torch.Tensor:
        return self.visual_adapter.mix(features, self.vision_ratio) if self.visual_adapter is not None else features

    # --- shifts ---
    def gram_shifts(self, text: dict[int, torch.Tensor], vision: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gram-norm proxy shifts of the FS layers from per-layer prompt tokens: text (K,), vision (K,)."""
        return gram_norms([text[k] for k in self.fs_layers]), gram_norms([vision[k] for k in self.fs_layers])

    @property
    def needs_feature_shift(self) -> bool:
        guided = self.use_surgery and self.ratio_schedule != "fixed"
        return self.shift_mode == "feature" and (self.fs_weight > 0 or guided)

    @torch.no_grad()
    def _update_reference(self, s_t: torch.Tensor, s_v: torch.Tensor) -> None:
        n = int(self.fs_ref_steps)
        if n >= self.ref_steps:
            return
        self.fs_ref_text.mul_(n).add_(s_t.detach().to(self.fs_ref_text)).div_(n + 1)
        self.fs_ref_vision.mul_(n).add_(s_v.detach().to(self.fs_ref_vision)).div_(n + 1)
        self.fs_ref_steps.fill_(n + 1)

    def normalised_shifts(self, s_t: torch.Tensor, s_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Divide by the first-step references (captured here while training), unless FEATURE_NORM is none."""
        if self.feature_norm == "none":
            return s_t, s_v
        if self.training:
            self._update_reference(s_t, s_v)
        if int(self.fs_ref_steps) == 0:
            raise RuntimeError("The feature-shift references are captured by the first training step; "
                               "call the model in train mode first (or load a checkpoint).")
        ref_t = self.fs_ref_text.to(s_t.device).clamp_min(1e-12)
        ref_v = self.fs_ref_vision.to(s_v.device).clamp_min(1e-12)
        return s_t / ref_t, s_v / ref_v

    def consistency(self, s_t: torch.Tensor, s_v: torch.Tensor) -> torch.Tensor:
        """``sum_k (s_t,k - s_v,k)^2`` of the normalised shifts, in fp32."""
        n_t, n_v = self.normalised_shifts(s_t.float(), s_v.float())
        return ((n_t - n_v) ** 2).sum()

    def record_feature_shift(self, s_t: torch.Tensor, s_v: torch.Tensor) -> None:
        """Accumulate a training step's feature shifts for the epoch's guided update."""
        if self.shift_mode == "feature" and s_t.numel():
            self._epoch_shift_sum[0] += float(s_t.detach().mean())
            self._epoch_shift_sum[1] += float(s_v.detach().mean())
            self._epoch_shift_count += 1

    # --- guided ratios ---
    def reset_epoch_stats(self) -> None:
        self._epoch_shift_sum = [0.0, 0.0]
        self._epoch_shift_count = 0

    def mean_feature_shifts(self) -> tuple[float, float] | None:
        """The epoch's mean feature shifts (None before any feature-mode step)."""
        if self._epoch_shift_count == 0:
            return None
        return self._epoch_shift_sum[0] / self._epoch_shift_count, self._epoch_shift_sum[1] / self._epoch_shift_count

    def ratio_update_due(self, epoch: int, max_epoch: int) -> bool:
        if not self.use_surgery or self.ratio_schedule == "fixed":
            return False
        last = int(self.ratio_updated_epoch)
        if self.ratio_schedule == "per_epoch":
            return epoch > last
        target = self.ratio_update_epoch if self.ratio_update_epoch >= 0 else max_epoch // 3
        return epoch == target and last < 0

    @torch.no_grad()
    def update_ratios(self, means: tuple[float, float], epoch: int) -> tuple[float, float]:
        """``r += step * mean shift`` per modality, recorded as applied after ``epoch``; returns the increments."""
        d_t, d_v = self.ratio_step_text * means[0], self.ratio_step_vision * means[1]
        self.text_ratio.add_(d_t)
        self.vision_ratio.add_(d_v)
        self.ratio_updated_epoch.fill_(epoch)
        return d_t, d_v


def build_shift_guided_surgery(model: DeepPromptModel, node: Any, text_depth: int,
                               vision_depth: int) -> ShiftGuidedSurgery:
    """The composed module for ``model``, on the device of its CLIP."""
    clip = model.clip
    return ShiftGuidedSurgery(node, clip.text_projection.shape[1], text_depth, vision_depth).to(
        clip.text_projection.device)


class RestoreModel(DeepPromptModel):
    """What every RESTORE model does with its ``self.restore`` (a :class:`ShiftGuidedSurgery`).

    Subclasses are the deep-prompt bases with RESTORE composed in; they implement
    :meth:`layer_prompt_tokens` (per-layer text and vision prompt tensors for the proxy).
    """

    restore: ShiftGuidedSurgery
    # The official RESTORE code (MaPLe_FSA) released no weights and its adapter names are not
    # documented: its checkpoints are not read.
    official_keys: ClassVar[OfficialKeys] = ()

    @property
    def fs_layers(self) -> list[int]:
        return self.restore.fs_layers

    def adapt_text_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.restore.adapt_text(super().adapt_text_features(features))

    def adapt_image_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.restore.adapt_image(super().adapt_image_features(features))

    def layer_prompt_tokens(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        raise NotImplementedError

    def prompt_shifts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw proxy shifts (Gram norms) of the FS layers: text (K,), vision (K,), all in fp32.

        Autocast is off here, so prompts derived from the learnable fp32 ones (MaPLe's projected
        vision prompts) are computed in fp32 too, not in the working precision of the forward.
        """
        with torch.autocast(device_type=self.restore.text_ratio.device.type, enabled=False):
            return self.restore.gram_shifts(*self.layer_prompt_tokens())

    def forward(self, image: torch.Tensor) -> PromptOutput:
        surgery = self.restore
        if not (self.training and surgery.needs_feature_shift):
            return super().forward(image)
        with observe_shift(self, surgery.fs_layers, surgery.fs_layers, eps=surgery.feature_eps) as rec:
            output = super().forward(image)
        device = output.logits.device
        # under DDP: the global batch's shifts (equal shards), so L_fs, its references and the
        # guided ratio update are those of one process
        output.extras["shift_text"] = mean_over_ranks(rec.text.vector(surgery.fs_layers, device))
        output.extras["shift_vision"] = mean_over_ranks(rec.vision.vector(surgery.fs_layers, device))
        return output

    def raw_shifts(self, output: PromptOutput | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.restore.shift_mode == "prompt":
            return self.prompt_shifts()
        if output is None or "shift_text" not in output.extras:
            raise RuntimeError("feature-mode shifts come from a training forward (model.train())")
        return output.extras["shift_text"], output.extras["shift_vision"]

    def fs_loss(self, output: PromptOutput | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sum_k (s_t,k - s_v,k)^2`` (normalised shifts, fp32) and the raw shifts."""
        s_t, s_v = self.raw_shifts(output)
        s_t, s_v = s_t.float(), s_v.float()
        return self.restore.consistency(s_t, s_v), s_t, s_v

    def loss(self, output: PromptOutput, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, summary = super().loss(output, label)
        surgery = self.restore
        if surgery.fs_weight > 0:
            fs, s_t, s_v = self.fs_loss(output)
            loss = loss + surgery.fs_weight * fs
            summary["loss_fs"] = fs.item()
            summary["loss"] = loss.item()
        elif surgery.needs_feature_shift:
            s_t, s_v = self.raw_shifts(output)
        else:
            return loss, summary
        surgery.record_feature_shift(s_t, s_v)
        return loss, summary

    def mean_raw_shifts(self) -> tuple[float, float] | None:
        """The shift means driving the ratio update (None when unknown, e.g. no feature-mode step yet)."""
        if self.restore.shift_mode == "prompt":
            with torch.no_grad():
                s_t, s_v = self.prompt_shifts()
            return (float(s_t.mean()), float(s_v.mean())) if s_t.numel() else None
        return self.restore.mean_feature_shifts()

    def maybe_update_ratios(self, epoch: int, max_epoch: int) -> tuple[float, float] | None:
        """Apply the guided update after epoch ``epoch`` (0-based) if due; returns the increments."""
        if not self.restore.ratio_update_due(epoch, max_epoch):
            return None
        means = self.mean_raw_shifts()
        if means is None:
            logger.info("Note: no feature shift measured this epoch; surgery ratios not updated")
            return None
        return self.restore.update_ratios(means, epoch)

    def upgrade_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints written before the composed module keep loading: top-level keys move under ``restore.``."""
        return {("restore." + k if k.startswith(_LEGACY_KEYS) else k): v for k, v in state.items()}


class RestoreMaPLeModel(RestoreModel, MaPLeModel):
    """RESTORE on MaPLe's coupled prompts (the official ``MaPLe_FSA``)."""

    # MaPLe_FSA's names: MaPLe's prompt learner, Feature_Calibrator adapters (post_ln, FFN.0, FFN.2)
    # and the calibration ratios as parameters.
    official_keys = (*MaPLeModel.official_keys,
                     (r"(?:restore\.)?(text|visual)_adapter\.post_ln\.(weight|bias)", r"restore.\1_adapter.ln.\2"),
                     (r"(?:restore\.)?(text|visual)_adapter\.FFN\.0\.(weight|bias)", r"restore.\1_adapter.up.\2"),
                     (r"(?:restore\.)?(text|visual)_adapter\.FFN\.2\.(weight|bias)", r"restore.\1_adapter.down.\2"),
                     (r"text_cali_ratio", "restore.text_ratio"), (r"vis_cali_ratio", "restore.vision_ratio"))

    def complete_official_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MaPLe_FSA stores no reference norms or ratio-update epoch: this model's current values."""
        own = self.checkpoint_state()
        extra: dict[str, torch.Tensor] = {k: own[k] for k in ("restore.fs_ref_text", "restore.fs_ref_vision", "restore.fs_ref_steps",
                                     "restore.ratio_updated_epoch") if k in own and k not in state}
        ratios = {k: v.to(own[k].dtype) for k, v in state.items() if k in ("restore.text_ratio", "restore.vision_ratio")}
        return {**state, **ratios, **extra}

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], node: Any) -> None:
        super().__init__(clip_model, classnames, n_ctx=node.N_CTX, depth=node.PROMPT_DEPTH, ctx_init=node.CTX_INIT)
        depth = int(node.PROMPT_DEPTH)
        self.restore = build_shift_guided_surgery(self, node, depth, depth)

    def layer_prompt_tokens(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        learner = self.prompt_learner
        text = {0: learner.ctx, **{k + 1: p for k, p in enumerate(learner.deep_text_tokens())}}
        deep_vision = self.deep_vision_tokens()
        vision: dict[int, torch.Tensor] = {k + 1: p for k, p in enumerate(deep_vision)}
        if 0 in self.fs_layers:
            vision[0] = learner.proj(learner.ctx)
        return text, vision


def _independent_prompt_node(node: Any, name: str) -> Any:
    """TRAINER.RESTORE's sub-node ``name`` (IVLP-style prompt keys) with the shared CTX_INIT."""
    prompts = node[name].clone()
    prompts.defrost()
    prompts.CTX_INIT = node.CTX_INIT
    return prompts


def _independent_depths(prompts: Any) -> tuple[int, int]:
    use_text = prompts.N_CTX_TEXT > 0 and prompts.PROMPT_DEPTH_TEXT > 0
    use_vision = prompts.N_CTX_VISION > 0 and prompts.PROMPT_DEPTH_VISION > 0
    return (int(prompts.PROMPT_DEPTH_TEXT) if use_text else 0, int(prompts.PROMPT_DEPTH_VISION) if use_vision else 0)


def _independent_prompt_tokens(learner: Any) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    text: dict[int, torch.Tensor] = {k + 1: p for k, p in enumerate(learner.text_prompts)}
    if learner.text_context.ctx is not None:
        text[0] = learner.text_context.ctx
    vision = {k: p for k, p in enumerate(learner.vision_prompts)}
    return text, vision


class RestorePromptSRCModel(RestoreModel, PromptSRCModel):
    """RESTORE on PromptSRC: IVLP prompts, PromptSRC's regularisers on the surgery-adapted features."""

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], node: Any) -> None:
        prompts = _independent_prompt_node(node, "PROMPTSRC")
        super().__init__(clip_model, classnames, prompts)
        self.restore = build_shift_guided_surgery(self, node, *_independent_depths(prompts))

    def layer_prompt_tokens(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        return _independent_prompt_tokens(self.prompt_learner)


class RestoreIVLPModel(RestoreModel, IVLPModel):
    """The feature-shift loss on IVLP's independent prompts (the paper's "IVLP + L_fs" analysis, Fig. 4)."""

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], node: Any) -> None:
        prompts = _independent_prompt_node(node, "IVLP")
        super().__init__(clip_model, classnames, prompts)
        self.restore = build_shift_guided_surgery(self, node, *_independent_depths(prompts))

    def layer_prompt_tokens(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        return _independent_prompt_tokens(self.prompt_learner)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------

class RESTORE(PromptTrainer):
    """RESTORE (node ``TRAINER.RESTORE``); see the module docstring for every key."""

    model_name = "MultiModalPromptLearner"
    options = Options(
        Option("BASE", "maple", "prompts RESTORE is built on (ivlp: the FS-loss analysis on IVLP prompts)",
               choices=BASES),
        Option("N_CTX", 2, "MaPLe base: prompt tokens per layer", minimum=1),
        Option("CTX_INIT", "a photo of a", "words whose embeddings initialise the layer-0 text context"),
        Option("PROMPT_DEPTH", 9, "MaPLe base: prompted layers 0..PROMPT_DEPTH-1", minimum=1),
        Option("SHIFT", "prompt", "shift definition: prompt (official Gram-norm proxy) or feature (paper, Eq. 6)",
               choices=SHIFT_MODES),
        Option("FS_WEIGHT", 1.0, "lambda of the feature-shift consistency loss (0 turns it off; DTD 0.5)", minimum=0),
        Option("FS_LAYERS", "deep", "layers in the loss: deep (1..depth-1, official) or prompted (0..depth-1)",
               choices=FS_LAYER_SETS),
        Option("FEATURE_NORM", "none", "feature mode: divide the shifts by their first-step values (first_step)",
               choices=FEATURE_NORMS),
        Option("FEATURE_REF_STEPS", 1, "feature mode + first_step: steps averaged into the reference", minimum=1),
        Option("FEATURE_EPS", 1e-6, "denominator epsilon of the relative feature shift", minimum=0),
        Option("USE_SURGERY", True, "add the surgery adapters on the projected features"),
        Option("TEXT_RATIO", 0.1, "initial text surgery ratio r_t (official TEXT_CALIB_R)"),
        Option("VISION_RATIO", 0.1, "initial vision surgery ratio r_v (official VIS_CALIB_R)"),
        Option("RATIO_SCHEDULE", "one_shot", "when the ratios grow with the measured shift", choices=RATIO_SCHEDULES),
        Option("RATIO_UPDATE_EPOCH", -1, "one_shot: 0-based epoch after which to update (-1: MAX_EPOCH // 3)"),
        Option("RATIO_STEP_TEXT", 0.02, "text ratio increment per unit of mean text shift"),
        Option("RATIO_STEP_VISION", 0.005, "vision ratio increment per unit of mean vision shift"),
        Option("ADAPTER_HIDDEN", 0, "hidden width of the surgery adapters (0: ADAPTER_RATIO * embed_dim)", minimum=0),
        Option("ADAPTER_RATIO", 4.0, "hidden width / embed_dim when ADAPTER_HIDDEN is 0 (4: official)", minimum=0),
        Option("ADAPTER_FINAL_ACT", False, "trailing QuickGELU in the adapters (PromptSRC bytecode build)"),
        Option("PROMPTSRC.N_CTX_TEXT", 4, "PromptSRC base: text prompt tokens per layer", minimum=0),
        Option("PROMPTSRC.N_CTX_VISION", 4, "PromptSRC base: vision prompt tokens per layer", minimum=0),
        Option("PROMPTSRC.PROMPT_DEPTH_TEXT", 9, "PromptSRC base: prompted text layers", minimum=0),
        Option("PROMPTSRC.PROMPT_DEPTH_VISION", 9, "PromptSRC base: prompted vision layers", minimum=0),
        Option("PROMPTSRC.TEXT_LOSS_WEIGHT", 25.0, "PromptSRC base: L1 weight to the frozen text features", minimum=0),
        Option("PROMPTSRC.IMAGE_LOSS_WEIGHT", 10.0, "PromptSRC base: L1 weight to the frozen image features",
               minimum=0),
        Option("PROMPTSRC.USE_GPA", True, "PromptSRC base: Gaussian prompt aggregation"),
        Option("PROMPTSRC.GPA_MEAN", 15.0, "PromptSRC base: mean epoch of the GPA weights"),
        Option("PROMPTSRC.GPA_STD", 1.0, "PromptSRC base: standard deviation of the GPA weights", minimum=0),
        Option("IVLP.N_CTX_TEXT", 2, "IVLP base: text prompt tokens per layer", minimum=0),
        Option("IVLP.N_CTX_VISION", 2, "IVLP base: vision prompt tokens per layer", minimum=0),
        Option("IVLP.PROMPT_DEPTH_TEXT", 12, "IVLP base: prompted text layers", minimum=0),
        Option("IVLP.PROMPT_DEPTH_VISION", 12, "IVLP base: prompted vision layers", minimum=0),
        Option("RESUME_RECAPTURE_REFS", False, "official quirk: a resumed run re-captures the feature-shift references"),
        Option("RATIO_UPDATE_AFTER_EVAL", False, "official quirk: update the ratios after the epoch's evaluation "
               "(skipped when it ran on val)"),
        removed={"USE_FS_LOSS": "FS_WEIGHT alone switches the feature-shift loss (FS_WEIGHT 0.0 turns it off); "
                                "delete USE_FS_LOSS from your config or options."},
    )

    @classmethod
    def build_prompt_model(cls, cfg: Any, classnames: list[str], clip_model: CLIP,
                           draws: BuildDraws = None) -> PromptModel:
        node = cls.method_node(cfg)
        if node.BASE == "maple":
            return RestoreMaPLeModel(clip_model, classnames, node)
        if node.BASE == "ivlp":
            return RestoreIVLPModel(clip_model, classnames, node)
        model = RestorePromptSRCModel(clip_model, classnames, node)
        if node.PROMPTSRC.USE_GPA:
            attach_gpa(model, cfg.OPTIM.MAX_EPOCH, float(node.PROMPTSRC.GPA_MEAN), float(node.PROMPTSRC.GPA_STD))
        return model

    def before_epoch(self) -> None:
        super().before_epoch()
        surgery = self.model.restore
        surgery.reset_epoch_stats()
        if surgery.use_surgery:
            logger.info(f"RESTORE surgery ratios: text {float(surgery.text_ratio):.6f}, "
                  f"vision {float(surgery.vision_ratio):.6f}")

    def before_train(self) -> None:
        super().before_train()
        if self.method_cfg.RESUME_RECAPTURE_REFS and self.start_epoch > 0:  # official quirk: references reset
            self.model.restore.fs_ref_steps.zero_()
            logger.info("RESTORE: resumed run re-captures the feature-shift references (RESUME_RECAPTURE_REFS)")

    def _update_ratios(self) -> None:
        model = self.model
        update = model.maybe_update_ratios(self.epoch, self.max_epoch)
        if update is not None:
            logger.info(f"RESTORE guided update after epoch {self.epoch + 1}: text ratio +{update[0]:.6f} -> "
                  f"{float(model.restore.text_ratio):.6f}, vision ratio +{update[1]:.6f} -> "
                  f"{float(model.restore.vision_ratio):.6f}")

    def after_epoch(self) -> None:
        model = self.model
        official_timing = bool(self.method_cfg.RATIO_UPDATE_AFTER_EVAL)
        if not official_timing:
            self._update_ratios()
        if getattr(model, "gpa", None) is not None:
            gpa_end_of_epoch(model, self.epoch, self.max_epoch)
        super().after_epoch()
        # official quirk: the update runs after the epoch's checkpoint and evaluation, and only if the
        # model is still in training mode, so a run that evaluated on val (best_val) never updates
        if official_timing and model.training:
            self._update_ratios()
        elif official_timing and model.restore.ratio_update_due(self.epoch, self.max_epoch):
            logger.info("RESTORE: surgery ratios not updated (model in eval mode after the validation; "
                  "RATIO_UPDATE_AFTER_EVAL)")

    def results_metadata(self) -> dict[str, Any]:
        meta = dict(super().results_metadata())
        model = self.model.restore
        meta["restore"] = {"base": self.method_cfg.BASE, "shift": model.shift_mode, "fs_weight": model.fs_weight,
                           "surgery": model.use_surgery, "ratio_schedule": model.ratio_schedule,
                           "text_ratio": float(model.text_ratio), "vision_ratio": float(model.vision_ratio),
                           "ratio_updated_epoch": int(model.ratio_updated_epoch)}
        return meta


_OVERRIDES = "RESTORE/dataset_overrides/"
SPEC = register_method(MethodSpec(
    "restore", "RESTORE", published="MaPLe+RESTORE",
    published_by_config={"vit_b16_c2_ep10_batch4_2+2ctx_ivlp": None,  # the paper's IVLP + L_fs analysis: no row
                         "vit_b16_c2_ep10_batch4_4+4ctx_promptsrc": "PromptSRC+RESTORE"},
    configs={"base2new": ("RESTORE/vit_b16_c2_ep10_batch4_2ctx",),
             "xd": ("RESTORE/vit_b16_c2_ep10_batch4_2ctx_cross_datasets",)},
    dataset_overrides={"base2new": _OVERRIDES + "base2new.yaml", "few_shot": _OVERRIDES + "base2new.yaml",
                       "cross_dataset": _OVERRIDES + "cross_dataset.yaml",
                       "domain_generalization": _OVERRIDES + "cross_dataset.yaml"},
    extras={"benchmark_pair": {"baseline": "MaPLe", "variants": {"feature": {"SHIFT": "feature"}}}},
), RESTORE)


#: The official code for parity runs (python -m restore.parity): ``MaPLe_FSA`` of Yaphabates/RESTORE_, in fp32
#: (its PREC is read from TRAINER.MAPLE; ``.half()`` a no-op), PROMPT_DEPTH 3 = the parity CLIP's layers,
#: the official DTD run's ratios and lambda (run_maple_fsa.sh), which are also our DTD defaults.
OFFICIAL = OfficialRun(
    repo="Yaphabates/RESTORE_", trainer="MaPLe_FSA", config="configs/trainers/MaPLe_FSA/vit_b16_c2_ep5_batch4_2ctx.yaml",
    ours="RESTORE", our_config="configs/trainers/RESTORE/vit_b16_c2_ep10_batch4_2ctx.yaml",
    official_opts=("TRAINER.MAPLE.PREC", "fp32", "TRAINER.MAPLE_FSA.PREC", "fp32", "TRAINER.MAPLE_FSA.PROMPT_DEPTH", "3",
                   "--vis_calib_r", "0.15", "--text_calib_r", "0.1", "--fs_loss_r", "0.5"),
    our_opts=("TRAINER.RESTORE.PREC", "fp32", "TRAINER.RESTORE.PROMPT_DEPTH", "3", "TRAINER.RESTORE.VISION_RATIO", "0.15",
              "TRAINER.RESTORE.TEXT_RATIO", "0.1", "TRAINER.RESTORE.FS_WEIGHT", "0.5"),
    keys=RestoreMaPLeModel.official_keys)


def benchmark_shift_modes(arch: str = "tiny", num_classes: int = 50, batch_size: int = 4, steps: int = 5,
                          warmup: int = 2, device: str = "cpu", precision: str = "fp32",
                          modes: Sequence[str] = ("prompt", "feature")) -> dict[str, float]:
    """Milliseconds per training step (forward + loss + backward + SGD step) for each SHIFT mode.

    ``arch``: "tiny" (the test CLIP) or "vit_b16" (ViT-B/16 widths, random weights: same cost as the
    real backbone). ``precision`` "fp16"/"bf16" autocast on CUDA. Returns ``{mode: ms_per_step}``,
    plus ``"feature_overhead"`` (ratio - 1) when both modes are measured.
    """
    import time

    from restore.clip.model import TINY_CONFIG, CLIPConfig
    from restore.engine.config import extend_cfg, get_cfg_default

    configs = {"tiny": TINY_CONFIG,
               "vit_b16": CLIPConfig(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                     vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                                     transformer_heads=8, transformer_layers=12)}
    dev = torch.device(device)
    torch.manual_seed(0)
    clip = CLIP(configs[arch]).eval().to(dev)
    classnames = [f"class number {i}" for i in range(num_classes)]
    cfg = get_cfg_default()
    extend_cfg(cfg)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if dev.type == "cuda" else None
    images = torch.randn(batch_size, 3, clip.visual.input_resolution, clip.visual.input_resolution, device=dev)
    labels = torch.randint(0, num_classes, (batch_size,), device=dev)
    models: dict[str, RestoreMaPLeModel] = {}
    optims: dict[str, torch.optim.Optimizer] = {}
    times: dict[str, list[float]] = {}
    for mode in modes:
        node = cfg.TRAINER.RESTORE.clone()
        node.SHIFT = mode
        model = RestoreMaPLeModel(clip, classnames, node).to(dev)
        model.freeze()
        models[mode] = model
        model.train()
        optims[mode] = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times[mode] = []
    for step in range(warmup + steps):  # modes interleaved step by step: fair under a varying machine load
        for mode in modes:
            model, optim = models[mode], optims[mode]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False):
                loss, _ = model.loss(model(images), labels)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times[mode].append(time.perf_counter() - start)
    results = {mode: 1000 * sorted(t)[len(t) // 2] for mode, t in times.items()}  # medians
    if "prompt" in results and "feature" in results:
        results["feature_overhead"] = results["feature"] / results["prompt"] - 1
    return results
