"""Base classes for every CLIP prompt-learning trainer.

A method provides two things: a :class:`PromptModel` subclass (its prompt modules, how it
encodes images and class texts, and its loss) and a thin registered :class:`PromptTrainer`
subclass (config node, which model to build). Everything else lives here once: loading CLIP,
freezing it, precision (auto / fp32 / fp16 / amp / bf16), the optimisation step, learnable-only
checkpoints with metadata checks, text features cached for evaluation, and plug-in
regularizers (Craft) that attach to any trainer by config.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from restore.clip.model import CLIP
from restore.clip.replay import BuildPrompts, replay_openai_build
from restore.engine.config import add_node
from restore.engine.distributed import average_gradients
from restore.engine.evaluator import compute_accuracy
from restore.engine.optim import build_lr_scheduler, build_optimizer
from restore.engine.trainer import TrainerX
from restore.engine.utils import CheckpointError

from .encoders import PromptedTextEncoder, PromptedVisionEncoder
from .official import OfficialKeys, is_official_state, rename_official_state

PRECISIONS = ("auto", "fp32", "fp16", "amp", "bf16")
FROZEN_PREFIXES = ("clip.", "frozen_")


@dataclass
class PromptOutput:
    """A forward pass: logits plus the L2-normalised features regularizers may need."""

    logits: torch.Tensor
    image_features: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class PromptModel(nn.Module):
    """Frozen CLIP (``self.clip``) + prompted encoders + the method's learnable modules.

    Parameters under ``clip.`` or any attribute whose name starts with ``frozen_`` are frozen and
    never saved; everything else registered on the model is learned and checkpointed. Buffers
    that depend on the class list must be registered with ``persistent=False``.
    """

    #: How the method's official code names the learned tensors in its checkpoints (see
    #: :mod:`restore.prompting.official`); empty: official checkpoints are not read.
    official_keys: ClassVar[OfficialKeys] = ()

    def __init__(self, clip_model: CLIP, classnames: Sequence[str]) -> None:
        super().__init__()
        self.clip = clip_model
        self.classnames = list(classnames)
        # Views over self.clip's towers; kept out of the module tree so weights are not listed twice.
        object.__setattr__(self, "text_encoder", PromptedTextEncoder(clip_model))
        object.__setattr__(self, "image_encoder", PromptedVisionEncoder(clip_model))
        self._cached_text: torch.Tensor | None = None

    # --- to override ---
    def encode_text(self) -> torch.Tensor:
        """Class text features (C, D), not normalised."""
        raise NotImplementedError

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image features (B, D), not normalised."""
        return self.image_encoder(image).features

    def loss(self, output: PromptOutput, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's training loss and the scalars to log (default: cross-entropy)."""
        loss = F.cross_entropy(output.logits.float(), label)
        return loss, {"loss": loss.item()}

    # --- shared ---
    def train(self, mode: bool = True) -> "PromptModel":
        """Set the training mode, except that frozen BatchNorm layers (a ResNet image tower) always
        stay in eval mode: they use their pretrained statistics and never update them, as in CoOp,
        where only the prompt learner is switched to training."""
        super().train(mode)
        for name, child in self.named_children():
            if self.is_frozen_name(name + "."):
                for module in child.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def text_features(self) -> torch.Tensor:
        """Class text features, from the evaluation cache when one is active."""
        return self._cached_text if self._cached_text is not None else self.encode_text()

    def forward(self, image: torch.Tensor) -> PromptOutput:
        image_features = F.normalize(self.encode_image(image).float(), dim=-1)
        text_features = F.normalize(self.text_features().float(), dim=-1)
        logits = self.logit_scale.float() * image_features @ text_features.t()
        return PromptOutput(logits, image_features, text_features)

    @property
    def text_is_image_independent(self) -> bool:
        """False for conditional methods (CoCoOp): then nothing is cached for evaluation."""
        return True

    @contextlib.contextmanager
    def inference_cache(self) -> Iterator[None]:
        """Compute the class text features once for a whole evaluation (they do not depend on images)."""
        if not self.text_is_image_independent:
            yield
            return
        with torch.no_grad():
            self._cached_text = self.encode_text()
        try:
            yield
        finally:
            self._cached_text = None

    def is_frozen_name(self, name: str) -> bool:
        return name.startswith(FROZEN_PREFIXES)

    def freeze(self) -> list[str]:
        """Freeze CLIP and ``frozen_*`` modules; returns the names of the learnable parameters."""
        learnable = []
        for name, param in self.named_parameters():
            param.requires_grad_(not self.is_frozen_name(name))
            if param.requires_grad:
                learnable.append(name)
        return learnable

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Only what is learned (plus persistent method state such as RESTORE's coefficients)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not self.is_frozen_name(k)}

    def complete_official_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the entries an official checkpoint has no counterpart for (e.g. PromptSRC's GPA sums)."""
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a learnable-only state dict, or an official-code checkpoint of the same method (renamed,
        frozen weights and class buffers dropped); missing, unexpected or mis-shaped keys are clear errors."""
        expected = self.checkpoint_state()
        official = bool(self.official_keys) and is_official_state(state)  # our own keys never match it
        if official:
            state = self.complete_official_state(rename_official_state(state, self.official_keys))
            print(f"{source}: a checkpoint of the official {type(self).__name__} code; read its {len(state)} "
                  "learned tensors (frozen CLIP weights and class-dependent buffers dropped)")
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            origin = ("It is an official-code checkpoint written with other settings (N_CTX, depth, trainer)."
                      if official else
                      "It was written by another trainer or with other prompt settings (N_CTX, depth).")
            raise CheckpointError(
                f"{source} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}. {origin}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(value.shape)} but this model expects "
                    f"{tuple(expected[key].shape)} (different class count with class-specific context, or "
                    "another backbone / prompt setting).")
        self.load_state_dict(state, strict=False)


Regularizer = Callable[["PromptTrainer", torch.Tensor, torch.Tensor, PromptOutput], tuple[torch.Tensor, dict[str, float]]]
RegularizerFactory = Callable[[Any, "PromptTrainer"], "Regularizer | None"]
_REGULARIZER_FACTORIES: list[RegularizerFactory] = []


def register_regularizer(factory: RegularizerFactory) -> RegularizerFactory:
    """Register a factory ``(cfg, trainer) -> regularizer or None`` consulted by every PromptTrainer."""
    if factory not in _REGULARIZER_FACTORIES:
        _REGULARIZER_FACTORIES.append(factory)
    return factory


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run really uses: CPU always runs fp32; ``auto`` is bf16 where the GPU supports
    it (no loss scaling, no fp16 overflow) and fp16 with a GradScaler otherwise (e.g. V100, T4)."""
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device (None: run in fp32)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


class PromptTrainer(TrainerX):
    """A TrainerX for CLIP prompt learning; subclasses implement :meth:`build_prompt_model`.

    Class attributes: ``model_name`` (the registered name, i.e. the checkpoint folder) and
    ``default_cfg`` (the trainer's own ``TRAINER.<NAME>`` node, declared once).
    """

    model_name = "prompt_learner"
    default_cfg: dict[str, Any] = {"PREC": "auto"}
    @classmethod
    def cfg_node_name(cls) -> str:
        return cls.__name__.upper()

    @classmethod
    def extend_cfg(cls, cfg: Any) -> None:
        add_node(cfg, f"TRAINER.{cls.cfg_node_name()}", dict(cls.default_cfg))

    @property
    def method_cfg(self) -> Any:
        return self.cfg.TRAINER[self.cfg_node_name()]

    def check_cfg(self, cfg: Any) -> None:
        node = cfg.TRAINER.get(self.cfg_node_name())
        if node is None:
            raise ValueError(f"cfg.TRAINER.{self.cfg_node_name()} is missing: call restore.engine.config.extend_cfg(cfg) "
                             "in your train.py's extend_cfg (see README, 'Use a trainer in your own codebase').")
        if node.PREC not in PRECISIONS:
            raise ValueError(f"TRAINER.{self.cfg_node_name()}.PREC must be one of {PRECISIONS}, got {node.PREC!r}")

    def build_prompt_model(self, cfg: Any, classnames: list[str], clip_model: CLIP) -> PromptModel:
        raise NotImplementedError

    def load_backbone(self) -> CLIP:
        from restore.clip import load_clip

        cfg = self.cfg
        clip_model = load_clip(cfg.MODEL.BACKBONE.NAME, cache_dir=cfg.MODEL.BACKBONE.CACHE_DIR or None).model
        resolution = clip_model.visual.input_resolution
        if tuple(cfg.INPUT.SIZE) != (resolution, resolution):
            raise ValueError(f"INPUT.SIZE {tuple(cfg.INPUT.SIZE)} does not match the backbone's input resolution "
                             f"{resolution}; set INPUT.SIZE ({resolution}, {resolution}).")
        return clip_model

    def official_builds(self) -> Sequence[BuildPrompts]:
        """What the method's official code draws inside its CLIP build(s): one :class:`BuildPrompts` per
        build, in order (default: one plain build, as CoOp's). See
        :func:`restore.clip.replay.replay_openai_build`."""
        return [BuildPrompts()]

    def replay_official_build(self, clip_model: CLIP) -> list[dict[str, list[torch.Tensor]]]:
        """Advance the global RNG as the official code's CLIP build(s) would, so the tensors drawn next
        get the official initial values for the same seed; returns what each build drew inside."""
        config = getattr(clip_model, "config", None)
        if config is None:
            return []
        return [replay_openai_build(config, build) for build in self.official_builds()]

    def replay_official_draws_after_model(self, clip_model: CLIP) -> None:
        """Draw from the global RNG what the official code draws after our learnable tensors are made
        (tensors it creates but never trains, another CLIP build...), so the batches that follow are
        the official ones; nothing by default."""

    def build_model(self) -> None:
        cfg = self.cfg
        classnames = self.dm.dataset.classnames
        print(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
        clip_model = self.load_backbone()
        self.official_build_draws = self.replay_official_build(clip_model)
        requested = self.method_cfg.PREC
        self.precision = resolve_precision(requested, self.device)
        self.autocast_dtype = autocast_dtype(self.precision, self.device)
        if self.device.type != "cuda" and requested not in ("fp32", "auto"):
            print(f"Note: PREC {requested} needs CUDA; running in fp32 on {self.device}")
        elif requested == "auto":
            print(f"Precision: PREC auto -> {self.precision} on {self.device}")
        print(f"Building {type(self).__name__}")
        self.model = self.build_prompt_model(cfg, classnames, clip_model)
        self.replay_official_draws_after_model(clip_model)
        learnable = self.model.freeze()
        print(f"Parameters to be updated: {sorted(learnable)}")
        n_learn = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        print(f"# learnable parameters: {n_learn:,}")
        if cfg.MODEL.INIT_WEIGHTS:
            from restore.engine.utils import load_pretrained_weights

            load_pretrained_weights(self.model, cfg.MODEL.INIT_WEIGHTS)
        self.model.to(self.device)
        self.apply_precision(self.precision, self.autocast_dtype)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = build_optimizer(params, cfg.OPTIM) if params else None
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM) if params else None
        self.register_model(self.model_name, self.model, self.optim, self.sched)
        use_scaler = self.device.type == "cuda" and self.precision in ("fp16", "amp")
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.regularizers = [r for r in (f(cfg, self) for f in _REGULARIZER_FACTORIES) if r is not None]

    def apply_precision(self, precision: str, dtype: torch.dtype | None) -> None:
        """Run under autocast to ``dtype`` (None: fp32), with frozen CLIP stored in ``dtype`` for
        ``fp16``/``bf16`` (``amp`` keeps fp32 weights; ``logit_scale`` stays fp32, see CLIP.cast);
        learnable tensors stay fp32 either way."""
        self.precision, self.autocast_dtype = precision, dtype
        if dtype is not None and precision in ("fp16", "bf16"):
            self.model.clip.cast(dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def parse_batch_train(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def compute_loss(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], PromptOutput]:
        """Model forward + method loss + every active plug-in regularizer."""
        output = self.model(image)
        loss, summary = self.model.loss(output, label)
        for regularizer in self.regularizers:
            extra, extra_summary = regularizer(self, image, label, output)
            loss = loss + extra
            summary.update(extra_summary)
        summary["loss"] = loss.item()
        return loss, summary, output

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Zero grad, backward (scaled when needed), step."""
        self.detect_anomaly(loss)
        self.optim.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            average_gradients(self.model)  # DDP: average grads over ranks (no-op in one process)
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            loss.backward()
            average_gradients(self.model)  # DDP: average grads over ranks (no-op in one process)
            self.optim.step()

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        image, label = self.parse_batch_train(batch)
        with self.autocast():
            loss, summary, output = self.compute_loss(image, label)
        self.optimizer_step(loss)
        summary = {"loss": summary.pop("loss"), **summary, "acc": compute_accuracy(output.logits, label)[0].item()}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    @torch.no_grad()
    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(input).logits.float()

    def inference_context(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast())
        stack.enter_context(self.model.inference_cache())
        return stack

    def capture_rng_state(self) -> dict[str, Any]:
        """The engine's RNG states plus each plug-in regularizer's stream state (e.g. Craft's targets)."""
        state = super().capture_rng_state()
        state["regularizers"] = [r.state_dict() if hasattr(r, "state_dict") else {}
                                 for r in getattr(self, "regularizers", [])]
        return state

    def restore_rng_state(self, state: dict[str, Any] | None) -> None:
        super().restore_rng_state(state)
        for regularizer, saved in zip(getattr(self, "regularizers", []), (state or {}).get("regularizers", [])):
            if saved and hasattr(regularizer, "load_state_dict"):
                regularizer.load_state_dict(saved)

    def checkpoint_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return self._models[name].checkpoint_state()

    def load_checkpoint_state_dict(self, name: str, state_dict: dict[str, torch.Tensor], path: str) -> None:
        self._models[name].load_checkpoint_state(state_dict, path)

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"trainer": type(self).__name__, "backbone": self.cfg.MODEL.BACKBONE.NAME,
                "num_classes": self.num_classes}

    def check_checkpoint_metadata(self, checkpoint: dict[str, Any], path: str) -> None:
        trainer = checkpoint.get("trainer")
        if trainer is not None and trainer != type(self).__name__:
            raise CheckpointError(f"{path} was written by trainer {trainer!r}, not {type(self).__name__!r}. "
                                  "Use the same --trainer (and config) as for training.")
        backbone = checkpoint.get("backbone")
        if backbone is not None and backbone != self.cfg.MODEL.BACKBONE.NAME:
            raise CheckpointError(f"{path} was trained with backbone {backbone!r}, but MODEL.BACKBONE.NAME is "
                                  f"{self.cfg.MODEL.BACKBONE.NAME!r}. Use the training backbone.")
