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
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from restore.clip.model import CLIP
from restore.clip.replay import BuildPrompts, replay_openai_build
from restore.engine.config import add_node, register_removed_key
from restore.engine.distributed import average_gradients
from restore.engine.evaluator import compute_accuracy
from restore.engine.optim import build_lr_scheduler, build_optimizer
from restore.engine.trainer import TrainerX
from restore.engine.utils import CheckpointError
from restore.log import get_logger
from restore.options import Option, Options

from .model import PromptModel, PromptOutput

#: What the replayed official CLIP build(s) drew, one mapping per build (see ``replay_openai_build``).
BuildDraws = Optional[Sequence[dict[str, list[torch.Tensor]]]]


def build_draws(draws: BuildDraws) -> dict[str, list[torch.Tensor]] | None:
    """What the first replayed official CLIP build drew (initial prompts drawn inside it), if any."""
    return draws[0] if draws else None

logger = get_logger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "amp", "bf16")
COMMON_OPTIONS = Options(
    Option("PREC", "auto", "working precision on CUDA (auto: bf16 where supported, else fp16); CPU runs fp32",
           choices=PRECISIONS))


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
    ``options`` (the trainer's own ``TRAINER.<NAME>`` keys with types and help, declared once;
    ``PREC`` is added for every trainer, see :func:`all_options`).
    """

    model_name = "prompt_learner"
    options: ClassVar[Options] = Options()
    @classmethod
    def cfg_node_name(cls) -> str:
        return cls.__name__.upper()

    @classmethod
    def all_options(cls) -> Options:
        """The trainer's declared options plus the ones every PromptTrainer has (``PREC``)."""
        legacy = getattr(cls, "default_cfg", None)  # an undocumented dict of defaults (older plugins)
        if isinstance(legacy, dict):
            return COMMON_OPTIONS + Options(*(Option(k, v, "(no help text)") for k, v in legacy.items()
                                              if not isinstance(v, dict))) + cls.options
        return COMMON_OPTIONS + cls.options

    @classmethod
    def extend_cfg(cls, cfg: Any) -> None:
        options = cls.all_options()
        add_node(cfg, f"TRAINER.{cls.cfg_node_name()}", options.defaults())
        for key, sentence in options.removed.items():
            register_removed_key(cfg, f"TRAINER.{cls.cfg_node_name()}.{key}", sentence)

    @classmethod
    def method_node(cls, cfg: Any) -> Any:
        """The trainer's own config node, ``cfg.TRAINER.<NAME>``."""
        return cfg.TRAINER[cls.cfg_node_name()]

    @property
    def method_cfg(self) -> Any:
        return self.method_node(self.cfg)

    def check_cfg(self, cfg: Any) -> None:
        node = cfg.TRAINER.get(self.cfg_node_name())
        if node is None:
            raise ValueError(f"cfg.TRAINER.{self.cfg_node_name()} is missing: call restore.engine.config.extend_cfg(cfg) "
                             "in your train.py's extend_cfg (see README, 'Use a trainer in your own codebase').")
        self.all_options().validate(node, f"TRAINER.{self.cfg_node_name()}")

    @classmethod
    def build_prompt_model(cls, cfg: Any, classnames: list[str], clip_model: CLIP,
                           draws: BuildDraws = None) -> PromptModel:
        """The method's model from CLIP, the class names and the config (no trainer, data or device needed):
        ``TRAINER_REGISTRY.get(name).build_prompt_model(cfg, classnames, clip)``. ``draws``: what the
        replayed official CLIP build(s) drew (see :meth:`replay_official_build`), for the official initial
        values of prompts the official code creates inside its CLIP build."""
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

    @classmethod
    def official_builds(cls, cfg: Any) -> Sequence[BuildPrompts]:
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
        return [replay_openai_build(config, build) for build in self.official_builds(self.cfg)]

    def replay_official_draws_after_model(self, clip_model: CLIP) -> None:
        """Draw from the global RNG what the official code draws after our learnable tensors are made
        (tensors it creates but never trains, another CLIP build...), so the batches that follow are
        the official ones; nothing by default."""

    def build_model(self) -> None:
        cfg = self.cfg
        classnames = self.dm.dataset.classnames
        logger.info(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
        clip_model = self.load_backbone()
        self.official_build_draws = self.replay_official_build(clip_model)
        clip_model = clip_model.to(self.device)  # methods may compute teacher features while building
        requested = self.method_cfg.PREC
        self.precision = resolve_precision(requested, self.device)
        self.autocast_dtype = autocast_dtype(self.precision, self.device)
        if self.device.type != "cuda" and requested not in ("fp32", "auto"):
            logger.info(f"Note: PREC {requested} needs CUDA; running in fp32 on {self.device}")
        elif requested == "auto":
            logger.info(f"Precision: PREC auto -> {self.precision} on {self.device}")
        logger.info(f"Building {type(self).__name__}")
        drawn = self.official_build_draws
        extra = {"draws": drawn} if any(len(v) for d in drawn for v in d.values()) else {}  # optional for methods
        self.model = self.build_prompt_model(cfg, classnames, clip_model, **extra)
        self.replay_official_draws_after_model(clip_model)
        learnable = self.model.freeze()
        logger.info(f"Parameters to be updated: {sorted(learnable)}")
        n_learn = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(f"# learnable parameters: {n_learn:,}")
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
