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
  prompts on the same input, measured by :mod:`restore.analysis.feature_shift` during the training
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

from typing import Any, Sequence

import torch
from torch import nn

from restore.analysis.feature_shift import observe_shift
from restore.clip.model import CLIP, LayerNorm, QuickGELU
from restore.engine.distributed import mean_over_ranks
from restore.methods import MethodSpec, register_method
from restore.official import OfficialRun
from restore.prompting.trainer import PromptModel, PromptOutput, PromptTrainer

from .ivlp import IVLPModel
from .maple import MaPLeModel, maple_num_params
from .promptsrc import PromptSRCModel, attach_gpa, gpa_end_of_epoch

__all__ = ["RESTORE", "RestoreMaPLeModel", "RestorePromptSRCModel", "RestoreIVLPModel", "SurgeryAdapter", "gram_norms",
           "restore_num_params", "adapter_num_params", "SPEC", "benchmark_shift_modes",
           "SHIFT_MODES", "RATIO_SCHEDULES"]

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
# The model: what RESTORE adds to a deep-prompt model
# --------------------------------------------------------------------------------------------

class RestoreMixin:
    """Feature-shift consistency loss + surgery adapters + guided ratios, on a DeepPromptModel.

    The host class provides ``prompt_learner``, ``adapt_*_features`` hooks, ``forward``/``loss`` and
    :meth:`layer_prompt_tokens` (per-layer text and vision prompt tensors for the proxy).
    """

    fs_layers: list[int]
    # Official checkpoints are read for the MaPLe host only (RestoreMaPLeModel, the official MaPLe_FSA).
    official_keys: tuple = ()

    def _setup_restore(self, node: Any, text_depth: int, vision_depth: int) -> None:
        self.shift_mode = str(node.SHIFT)
        self.fs_weight = float(node.FS_WEIGHT) if bool(node.USE_FS_LOSS) else 0.0
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
        reg = self.register_buffer  # type: ignore[attr-defined]
        reg("fs_ref_text", torch.zeros(k))
        reg("fs_ref_vision", torch.zeros(k))
        reg("fs_ref_steps", torch.zeros((), dtype=torch.long))
        reg("text_ratio", torch.tensor(float(node.TEXT_RATIO)))
        reg("vision_ratio", torch.tensor(float(node.VISION_RATIO)))
        reg("ratio_updated_epoch", torch.tensor(-1, dtype=torch.long))
        if self.use_surgery:
            clip = self.clip  # type: ignore[attr-defined]
            dim = clip.text_projection.shape[1]
            hidden = adapter_hidden_dim(dim, int(node.ADAPTER_HIDDEN), float(node.ADAPTER_RATIO))
            device = clip.text_projection.device
            self.text_adapter = SurgeryAdapter(dim, hidden, bool(node.ADAPTER_FINAL_ACT)).to(device)
            self.visual_adapter = SurgeryAdapter(dim, hidden, bool(node.ADAPTER_FINAL_ACT)).to(device)
        self._epoch_shift_sum = [0.0, 0.0]
        self._epoch_shift_count = 0

    # --- surgery (DeepPromptModel hooks) ---
    def adapt_text_features(self, features: torch.Tensor) -> torch.Tensor:
        features = super().adapt_text_features(features)  # type: ignore[misc]
        return self.text_adapter.mix(features, self.text_ratio) if self.use_surgery else features

    def adapt_image_features(self, features: torch.Tensor) -> torch.Tensor:
        features = super().adapt_image_features(features)  # type: ignore[misc]
        return self.visual_adapter.mix(features, self.vision_ratio) if self.use_surgery else features

    # --- shifts ---
    def layer_prompt_tokens(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        raise NotImplementedError

    def prompt_shifts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw proxy shifts (Gram norms) of the FS layers: text (K,), vision (K,), all in fp32.

        Autocast is off here, so prompts derived from the learnable fp32 ones (MaPLe's projected
        vision prompts) are computed in fp32 too, not in the working precision of the forward.
        """
        device_type = self.text_ratio.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            text, vision = self.layer_prompt_tokens()
            return gram_norms([text[k] for k in self.fs_layers]), gram_norms([vision[k] for k in self.fs_layers])

    @property
    def needs_feature_shift(self) -> bool:
        guided = self.use_surgery and self.ratio_schedule != "fixed"
        return self.shift_mode == "feature" and (self.fs_weight > 0 or guided)

    def forward(self, image: torch.Tensor) -> PromptOutput:
        if not (self.training and self.needs_feature_shift):  # type: ignore[attr-defined]
            return super().forward(image)  # type: ignore[misc]
        with observe_shift(self, self.fs_layers, self.fs_layers, eps=self.feature_eps) as rec:  # type: ignore[arg-type]
            output = super().forward(image)  # type: ignore[misc]
        device = output.logits.device
        # under DDP: the global batch's shifts (equal shards), so L_fs, its references and the
        # guided ratio update are those of one process
        output.extras["shift_text"] = mean_over_ranks(rec.text.vector(self.fs_layers, device))
        output.extras["shift_vision"] = mean_over_ranks(rec.vision.vector(self.fs_layers, device))
        return output

    def raw_shifts(self, output: PromptOutput | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shift_mode == "prompt":
            return self.prompt_shifts()
        if output is None or "shift_text" not in output.extras:
            raise RuntimeError("feature-mode shifts come from a training forward (model.train())")
        return output.extras["shift_text"], output.extras["shift_vision"]

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
        if self.training:  # type: ignore[attr-defined]
            self._update_reference(s_t, s_v)
        if int(self.fs_ref_steps) == 0:
            raise RuntimeError("The feature-shift references are captured by the first training step; "
                               "call the model in train mode first (or load a checkpoint).")
        ref_t = self.fs_ref_text.to(s_t.device).clamp_min(1e-12)
        ref_v = self.fs_ref_vision.to(s_v.device).clamp_min(1e-12)
        return s_t / ref_t, s_v / ref_v

    def fs_loss(self, output: PromptOutput | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sum_k (s_t,k - s_v,k)^2`` (normalised shifts, fp32) and the raw shifts."""
        s_t, s_v = self.raw_shifts(output)
        s_t, s_v = s_t.float(), s_v.float()
        n_t, n_v = self.normalised_shifts(s_t, s_v)
        return ((n_t - n_v) ** 2).sum(), s_t, s_v

    def loss(self, output: PromptOutput, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, summary = super().loss(output, label)  # type: ignore[misc]
        if self.fs_weight > 0:
            fs, s_t, s_v = self.fs_loss(output)
            loss = loss + self.fs_weight * fs
            summary["loss_fs"] = fs.item()
            summary["loss"] = loss.item()
        elif self.needs_feature_shift:
            s_t, s_v = self.raw_shifts(output)
        else:
            return loss, summary
        if self.shift_mode == "feature" and s_t.numel():
            self._epoch_shift_sum[0] += float(s_t.detach().mean())
            self._epoch_shift_sum[1] += float(s_v.detach().mean())
            self._epoch_shift_count += 1
        return loss, summary

    # --- guided ratios ---
    def reset_epoch_stats(self) -> None:
        self._epoch_shift_sum = [0.0, 0.0]
        self._epoch_shift_count = 0

    def mean_raw_shifts(self) -> tuple[float, float] | None:
        """The shift means driving the ratio update (None when unknown, e.g. no feature-mode step yet)."""
        if self.shift_mode == "prompt":
            with torch.no_grad():
                s_t, s_v = self.prompt_shifts()
            return (float(s_t.mean()), float(s_v.mean())) if s_t.numel() else None
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
    def maybe_update_ratios(self, epoch: int, max_epoch: int) -> tuple[float, float] | None:
        """Apply the guided update after epoch ``epoch`` (0-based) if due; returns the increments."""
        if not self.ratio_update_due(epoch, max_epoch):
            return None
        means = self.mean_raw_shifts()
        if means is None:
            print("Note: no feature shift measured this epoch; surgery ratios not updated")
            return None
        d_t, d_v = self.ratio_step_text * means[0], self.ratio_step_vision * means[1]
        self.text_ratio.add_(d_t)
        self.vision_ratio.add_(d_v)
        self.ratio_updated_epoch.fill_(epoch)
        return d_t, d_v


class RestoreMaPLeModel(RestoreMixin, MaPLeModel):
    """RESTORE on MaPLe's coupled prompts (the official ``MaPLe_FSA``)."""

    # MaPLe_FSA's names: MaPLe's prompt learner, Feature_Calibrator adapters (post_ln, FFN.0, FFN.2)
    # and the calibration ratios as parameters.
    official_keys = (*MaPLeModel.official_keys,
                     (r"(text|visual)_adapter\.post_ln\.(weight|bias)", r"\1_adapter.ln.\2"),
                     (r"(text|visual)_adapter\.FFN\.0\.(weight|bias)", r"\1_adapter.up.\2"),
                     (r"(text|visual)_adapter\.FFN\.2\.(weight|bias)", r"\1_adapter.down.\2"),
                     (r"text_cali_ratio", "text_ratio"), (r"vis_cali_ratio", "vision_ratio"))

    def complete_official_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MaPLe_FSA stores no reference norms or ratio-update epoch: this model's current values."""
        own = self.checkpoint_state()
        extra = {k: own[k] for k in ("fs_ref_text", "fs_ref_vision", "fs_ref_steps", "ratio_updated_epoch")
                 if k in own and k not in state}
        ratios = {k: v.to(own[k].dtype) for k, v in state.items() if k in ("text_ratio", "vision_ratio")}
        return {**state, **ratios, **extra}

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], node: Any) -> None:
        super().__init__(clip_model, classnames, n_ctx=node.N_CTX, depth=node.PROMPT_DEPTH, ctx_init=node.CTX_INIT)
        depth = int(node.PROMPT_DEPTH)
        self._setup_restore(node, depth, depth)

    def layer_prompt_tokens(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        learner = self.prompt_learner
        text = {0: learner.ctx, **{k + 1: p for k, p in enumerate(learner.deep_text_tokens())}}
        deep_vision = self.deep_vision_tokens()
        vision: dict[int, torch.Tensor] = {k + 1: p for k, p in enumerate(deep_vision)}
        if 0 in self.fs_layers:
            vision[0] = learner.proj(learner.ctx)
        return text, vision


class IVLPPromptsRestoreMixin(RestoreMixin):
    """RESTORE on IVLP's independent prompts, configured by the sub-node ``prompt_node`` of TRAINER.RESTORE."""

    prompt_node: str

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], node: Any) -> None:
        prompts = node[self.prompt_node].clone()
        prompts.defrost()
        prompts.CTX_INIT = node.CTX_INIT
        super().__init__(clip_model, classnames, prompts)  # type: ignore[call-arg]
        use_text = prompts.N_CTX_TEXT > 0 and prompts.PROMPT_DEPTH_TEXT > 0
        use_vision = prompts.N_CTX_VISION > 0 and prompts.PROMPT_DEPTH_VISION > 0
        self._setup_restore(node, int(prompts.PROMPT_DEPTH_TEXT) if use_text else 0,
                            int(prompts.PROMPT_DEPTH_VISION) if use_vision else 0)

    def layer_prompt_tokens(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        learner = self.prompt_learner  # type: ignore[attr-defined]
        text: dict[int, torch.Tensor] = {k + 1: p for k, p in enumerate(learner.text_prompts)}
        if learner.text_context.ctx is not None:
            text[0] = learner.text_context.ctx
        vision = {k: p for k, p in enumerate(learner.vision_prompts)}
        return text, vision


class RestorePromptSRCModel(IVLPPromptsRestoreMixin, PromptSRCModel):
    """RESTORE on PromptSRC: IVLP prompts, PromptSRC's regularisers on the surgery-adapted features."""

    prompt_node = "PROMPTSRC"


class RestoreIVLPModel(IVLPPromptsRestoreMixin, IVLPModel):
    """The feature-shift loss on IVLP's independent prompts (the paper's "IVLP + L_fs" analysis, Fig. 4)."""

    prompt_node = "IVLP"


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------

class RESTORE(PromptTrainer):
    """RESTORE (node ``TRAINER.RESTORE``); see the module docstring for every key."""

    model_name = "MultiModalPromptLearner"
    default_cfg: dict[str, Any] = {
        "BASE": "maple",               # "maple" | "promptsrc" | "ivlp" (the FS-loss analysis on IVLP)
        "N_CTX": 2,                    # MaPLe base: tokens per layer
        "CTX_INIT": "a photo of a",
        "PROMPT_DEPTH": 9,             # MaPLe base: prompted layers 0..8
        "PREC": "auto",
        "SHIFT": "prompt",             # "prompt" (official proxy) | "feature" (paper definition)
        "USE_FS_LOSS": True,
        "FS_WEIGHT": 1.0,              # lambda (official FS_LOSS_R; DTD 0.5)
        "FS_LAYERS": "deep",           # "deep" (layers 1..depth-1, official) | "prompted" (0..depth-1)
        "FEATURE_NORM": "none",        # feature mode: "none" | "first_step"
        "FEATURE_REF_STEPS": 1,        # feature mode + first_step: steps averaged into the reference
        "FEATURE_EPS": 1e-6,
        "USE_SURGERY": True,
        "TEXT_RATIO": 0.1,             # initial r_t (official TEXT_CALIB_R; per-dataset yaml)
        "VISION_RATIO": 0.1,           # initial r_v (official VIS_CALIB_R; per-dataset yaml)
        "RATIO_SCHEDULE": "one_shot",  # "one_shot" | "per_epoch" | "fixed"
        "RATIO_UPDATE_EPOCH": -1,      # one_shot: 0-based epoch after which to update (-1: MAX_EPOCH // 3)
        "RATIO_STEP_TEXT": 0.02,
        "RATIO_STEP_VISION": 0.005,
        "ADAPTER_HIDDEN": 0,           # hidden width of the surgery adapters (0: ADAPTER_RATIO * embed_dim)
        "ADAPTER_RATIO": 4.0,          # 4 -> 512-2048-512 (official); e.g. 0.25 for a bottleneck
        "ADAPTER_FINAL_ACT": False,    # trailing QuickGELU (PromptSRC bytecode build)
        # official quirks (docs/parity.md), off by default:
        "RESUME_RECAPTURE_REFS": False,  # True: a resumed run re-captures the shift references (official)
        "RATIO_UPDATE_AFTER_EVAL": False,  # True: update after the epoch's evaluation, skipped if it ran (official)
        "PROMPTSRC": {                 # BASE promptsrc: PromptSRC's own keys (official PromptSRC defaults)
            "N_CTX_TEXT": 4, "N_CTX_VISION": 4, "PROMPT_DEPTH_TEXT": 9, "PROMPT_DEPTH_VISION": 9,
            "TEXT_LOSS_WEIGHT": 25.0, "IMAGE_LOSS_WEIGHT": 10.0, "USE_GPA": True, "GPA_MEAN": 15.0, "GPA_STD": 1.0,
        },
        "IVLP": {                      # BASE ivlp: IVLP's prompt keys (the official analysis yaml: 2+2 tokens, depth 12)
            "N_CTX_TEXT": 2, "N_CTX_VISION": 2, "PROMPT_DEPTH_TEXT": 12, "PROMPT_DEPTH_VISION": 12,
        },
    }

    def check_cfg(self, cfg: Any) -> None:
        super().check_cfg(cfg)
        node = cfg.TRAINER.RESTORE
        for key, allowed in (("BASE", BASES), ("SHIFT", SHIFT_MODES), ("RATIO_SCHEDULE", RATIO_SCHEDULES),
                             ("FS_LAYERS", FS_LAYER_SETS), ("FEATURE_NORM", FEATURE_NORMS)):
            if node[key] not in allowed:
                raise ValueError(f"TRAINER.RESTORE.{key} must be one of {allowed}, got {node[key]!r}")
        if node.FS_WEIGHT < 0:
            raise ValueError(f"TRAINER.RESTORE.FS_WEIGHT must be >= 0, got {node.FS_WEIGHT}")

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        node = self.method_cfg
        if node.BASE == "maple":
            return RestoreMaPLeModel(clip_model, classnames, node)
        if node.BASE == "ivlp":
            return RestoreIVLPModel(clip_model, classnames, node)
        clip_model.to(getattr(self, "device", torch.device("cpu")))  # PromptSRC's teacher text on the device
        model = RestorePromptSRCModel(clip_model, classnames, node)
        if node.PROMPTSRC.USE_GPA:
            attach_gpa(model, cfg.OPTIM.MAX_EPOCH, float(node.PROMPTSRC.GPA_MEAN), float(node.PROMPTSRC.GPA_STD))
        return model

    def before_epoch(self) -> None:
        super().before_epoch()
        model = self.model
        model.reset_epoch_stats()
        if model.use_surgery:
            print(f"RESTORE surgery ratios: text {float(model.text_ratio):.6f}, vision {float(model.vision_ratio):.6f}")

    def before_train(self) -> None:
        super().before_train()
        if self.method_cfg.RESUME_RECAPTURE_REFS and self.start_epoch > 0:  # official quirk: references reset
            self.model.fs_ref_steps.zero_()
            print("RESTORE: resumed run re-captures the feature-shift references (RESUME_RECAPTURE_REFS)")

    def _update_ratios(self) -> None:
        model = self.model
        update = model.maybe_update_ratios(self.epoch, self.max_epoch)
        if update is not None:
            print(f"RESTORE guided update after epoch {self.epoch + 1}: text ratio +{update[0]:.6f} -> "
                  f"{float(model.text_ratio):.6f}, vision ratio +{update[1]:.6f} -> {float(model.vision_ratio):.6f}")

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
        elif official_timing and model.ratio_update_due(self.epoch, self.max_epoch):
            print("RESTORE: surgery ratios not updated (model in eval mode after the validation; "
                  "RATIO_UPDATE_AFTER_EVAL)")

    def results_metadata(self) -> dict[str, Any]:
        meta = dict(super().results_metadata())
        model = self.model
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
    models, optims, times = {}, {}, {}
    for mode in modes:
        node = cfg.TRAINER.RESTORE.clone()
        node.SHIFT = mode
        model = RestoreMaPLeModel(clip, classnames, node).to(dev)
        model.freeze()
        models[mode] = model.train()
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


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainers.restore_trainer --benchmark [--arch vit_b16 --classes 50 --device cuda]`` times both
    SHIFT modes."""
    import argparse

    parser = argparse.ArgumentParser(description="Time the two feature-shift modes (--benchmark)")
    parser.add_argument("--benchmark", action="store_true", help="ms/step of SHIFT prompt vs feature")
    parser.add_argument("--arch", default="tiny", choices=["tiny", "vit_b16"])
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args(argv)
    if args.benchmark:
        res = benchmark_shift_modes(args.arch, args.classes, args.batch, args.steps, device=args.device,
                                    precision=args.precision)
        print(f"arch {args.arch}, {args.classes} classes, batch {args.batch}, {args.device} {args.precision}: "
              f"prompt {res['prompt']:.1f} ms/step, feature {res['feature']:.1f} ms/step "
              f"(+{100 * res['feature_overhead']:.0f}%)")
        return 0
    parser.error("pass --benchmark (per-dataset values: python -m restore.methods --overrides DATASET)")
    return 2


if __name__ == "__main__":
    raise SystemExit(_main())
