"""The shared model bases of every prompt-learning method.

:class:`PromptModel` is frozen CLIP plus the prompted encoders plus a method's learnable modules;
:class:`DeepPromptModel` specialises it for layer-0 text context plus per-layer deep tokens in
either tower (VPT, IVLP, MaPLe, PromptSRC and the methods built on them). Both let an observer
see every block of the prompted forward (:meth:`PromptModel.observing`), which is how feature
shifts are measured during training and analysis.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from restore.clip.model import CLIP
from restore.engine.utils import CheckpointError
from restore.log import get_logger

from .encoders import (
    DeepTokens,
    EncoderOutput,
    LayerObserver,
    PromptedTextEncoder,
    PromptedVisionEncoder,
)
from .official import OfficialKeys, is_official_state, rename_official_state

logger = get_logger(__name__)

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
    text_encoder: PromptedTextEncoder
    image_encoder: PromptedVisionEncoder

    def __init__(self, clip_model: CLIP, classnames: Sequence[str]) -> None:
        super().__init__()
        self.clip = clip_model
        self.classnames = list(classnames)
        # Views over self.clip's towers; kept out of the module tree so weights are not listed twice.
        object.__setattr__(self, "text_encoder", PromptedTextEncoder(clip_model))
        object.__setattr__(self, "image_encoder", PromptedVisionEncoder(clip_model))
        self._cached_text: torch.Tensor | None = None
        self._observers: dict[str, LayerObserver] = {}

    # --- to override ---
    def encode_text(self) -> torch.Tensor:
        """Class text features (C, D), not normalised."""
        raise NotImplementedError

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image features (B, D), not normalised."""
        return self.image_encoder(image, observer=self.observer("vision")).features

    def loss(self, output: PromptOutput, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's training loss and the scalars to log (default: cross-entropy)."""
        loss = F.cross_entropy(output.logits.float(), label)
        return loss, {"loss": loss.item()}

    # --- observation ---
    @contextlib.contextmanager
    def observing(self, text: LayerObserver | None = None, vision: LayerObserver | None = None) -> Iterator[None]:
        """Within the block, the model's prompted encoder calls pass ``text`` / ``vision`` as the encoders'
        ``observer`` (called after every block; see :mod:`restore.prompting.encoders`). Teacher and
        fixed-prompt passes made directly on the encoders are not observed."""
        previous = self._observers
        self._observers = {name: obs for name, obs in (("text", text), ("vision", vision)) if obs is not None}
        try:
            yield
        finally:
            self._observers = previous

    def observer(self, tower: str) -> LayerObserver | None:
        """The observer installed by :meth:`observing` for ``tower`` ("text" or "vision"), if any."""
        return self._observers.get(tower)

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

    def upgrade_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the keys of checkpoints written by older versions of the model (identity here)."""
        return state

    def complete_official_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the entries an official checkpoint has no counterpart for (e.g. PromptSRC's GPA sums)."""
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a learnable-only state dict, or an official-code checkpoint of the same method (renamed,
        frozen weights and class buffers dropped); missing, unexpected or mis-shaped keys are clear errors."""
        expected = self.checkpoint_state()
        state = self.upgrade_state(state)
        official = bool(self.official_keys) and is_official_state(state)  # our own keys never match it
        if official:
            state = self.complete_official_state(rename_official_state(state, self.official_keys))
            logger.info(f"{source}: a checkpoint of the official {type(self).__name__} code; read its {len(state)} "
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


class DeepPromptModel(PromptModel):
    """Base for models whose prompts are layer-0 text context + deep tokens in either tower.

    Subclasses set ``self.prompt_learner`` (a module with ``text_context``, ``text_deep()`` and
    ``vision_deep()``, e.g. IndependentPrompts or CoupledPrompts). Hooks, identity / pass-through
    here, for methods built on top:

    * :meth:`text_deep` / :meth:`vision_deep`: the :class:`DeepTokens` groups given to each tower.
    * :meth:`adapt_text_features` / :meth:`adapt_image_features`: applied to the projected,
      un-normalised features (``(C, D)`` / ``(B, D)``) in training and evaluation, e.g. adapters.
      They are applied after the text cache, so they may hold learnable parameters.
    * :meth:`encode_text_output` / :meth:`encode_image_output`: the full encoder outputs (hidden
      states with ``return_hidden=True``); they pass the observer installed by :meth:`observing`.

    When the text side has nothing to learn (vision-only prompting) the text features are computed
    once without gradient and reused, per device and dtype.
    """

    prompt_learner: nn.Module

    def __init__(self, clip_model: CLIP, classnames: Sequence[str]) -> None:
        super().__init__(clip_model, classnames)
        self._fixed_text: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # --- hooks ---
    def text_deep(self) -> list[DeepTokens]:
        """The deep-token groups of the text tower."""
        return self.prompt_learner.text_deep()

    def vision_deep(self) -> list[DeepTokens]:
        """The deep-token groups of the image tower."""
        return self.prompt_learner.vision_deep()

    def adapt_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Applied to the projected class text features (identity here)."""
        return features

    def adapt_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """Applied to the projected image features (identity here)."""
        return features

    # --- encoders ---
    @property
    def text_is_learned(self) -> bool:
        """Whether the class text depends on learnable prompt tokens."""
        return self.prompt_learner.text_context.ctx is not None or len(self.text_deep()) > 0

    def encode_text_output(self, **kwargs: Any) -> EncoderOutput:
        """The prompted text tower's output for every class."""
        context = self.prompt_learner.text_context
        kwargs.setdefault("observer", self.observer("text"))
        return self.text_encoder(context(), context.eot_index, self.text_deep(), **kwargs)

    def encode_image_output(self, image: torch.Tensor, **kwargs: Any) -> EncoderOutput:
        """The prompted image tower's output."""
        kwargs.setdefault("observer", self.observer("vision"))
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
