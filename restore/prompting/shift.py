"""Feature shift as the RESTORE paper defines it, measured block by block during a prompted forward.

The paper (§3.3, Eq. 6) defines the feature shift of block ``i`` as the difference between the
block's output **with** and **without** the learnable prompts, for the **same input**::

    dF_i = Block_i(X_{i-1}, P_i) - Block_i(X_{i-1})

It leaves open which tokens are compared, how a batch is reduced and how the two towers, whose
activations differ in size and scale, are made comparable. The choices made here (one
implementation, used by the RESTORE trainer's ``SHIFT "feature"`` mode and by the analysis CLI):

* **Same input.** ``X_{i-1}`` is the block input of the prompted forward (it already carries the
  influence of earlier prompts). The prompt-free pass runs the same frozen block on that input with
  the prompt *positions removed* (not replaced by anything). For the text tower the causal mask
  is rebuilt for the shorter sequence. The prompt-free pass runs under ``no_grad``: gradients
  flow through the prompted output only, and it costs no activation memory.
* **Tokens compared.** Vision: every non-prompt token (CLS + patches). Text: the non-prompt
  positions up to and including EOT (SOS, the fixed words, the class name, ".", EOT); padding after
  EOT is excluded per class. The layer-0 learned text context (CoOp, MaPLe, IVLP...) counts as
  prompt positions: the prompt-free text at layer 0 is "[SOS] of a <class>. [EOT]" for
  "a photo of a" with 2 learned tokens (the alternative, putting the hand-written word embeddings
  back into those slots, is not used).
* **Scale-free relative shift.** Per sample (image, or class prompt) ``b``::

      s_i(b) = ||dF_i(b)||_F / (||Block_i(X_{i-1}(b))||_F + eps)

  and the layer's shift is the mean over samples. It does not grow with batch size, class count,
  token count or width, so the text and vision values are comparable.

Blocks whose input holds no prompt token have shift 0 by definition (the block sees exactly what
frozen CLIP sees) and are not re-run.

Use from code::

    with observe_shift(model) as rec:          # any PromptModel
        text = model.encode_text(); image = model.encode_image(images)
    rec.text.layer_means()                     # {layer: differentiable scalar}
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from restore.clip.model import causal_mask

from .context import TextContext
from .model import PromptModel

__all__ = ["ShiftRecorder", "ShiftRecording", "relative_block_shift", "observe_shift", "text_context_positions"]

logger = logging.getLogger(__name__)

BlockFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def relative_block_shift(block: BlockFn, x_in: torch.Tensor, x_out: torch.Tensor, prompt_mask: torch.Tensor,
                         causal: bool, eot_index: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample relative shift ``||dF(b)||_F / (||F_without(b)||_F + eps)`` of one block, shape (B,).

    Args:
        block: the frozen block, called as ``block(x, attn_mask)``.
        x_in: the block's input in the prompted forward, (B, L, D).
        x_out: the block's output in the prompted forward, (B, L, D) (may carry gradients).
        prompt_mask: (L,) bool, True at prompt positions (removed for the prompt-free pass).
        causal: rebuild a causal mask for the shortened sequence (text tower).
        eot_index: (B,) position of EOT in the *prompted* sequence; later positions are ignored.
        eps: added to the denominator.
    """
    keep = ~prompt_mask.to(x_in.device)
    x_without = x_in[:, keep]
    with torch.no_grad():
        length = x_without.shape[1]
        mask = causal_mask(length, x_in.device, x_in.dtype) if causal else None
        f_without = block(x_without.detach(), mask).float()
    f_with = x_out[:, keep].float()
    diff = f_with - f_without
    if eot_index is not None:
        # EOT's index among the kept tokens; padding after it is dropped.
        kept_before = torch.cumsum(keep.long(), dim=0) - 1
        eot_kept = kept_before[eot_index.to(x_in.device)]
        valid = torch.arange(length, device=x_in.device)[None, :] <= eot_kept[:, None]
        diff = diff * valid[..., None]
        f_without = f_without * valid[..., None]
    num = torch.linalg.vector_norm(diff, dim=(1, 2))
    den = torch.linalg.vector_norm(f_without, dim=(1, 2))
    return num / (den + eps)


class ShiftRecorder:
    """An encoder ``observer`` that records per-sample relative shifts of selected blocks.

    Args:
        tower: "text" (causal mask, EOT handling) or "vision".
        layers: block indices to measure (``None``: every block whose input holds prompt tokens).
        extra_positions: prompt positions not reported by the encoder's deep-token slots, in the
            coordinates of the text embeddings (the layer-0 learned context, positions ``1..n``).
            Used while no token has been inserted into the sequence.
        eps: denominator epsilon.
    """

    def __init__(self, tower: str, layers: Iterable[int] | None = None, extra_positions: Sequence[int] = (),
                 eps: float = 1e-6) -> None:
        if tower not in ("text", "vision"):
            raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
        self.tower = tower
        self.layers = None if layers is None else set(int(k) for k in layers)
        self.extra_positions = list(extra_positions)
        self.eps = eps
        self.shifts: dict[int, torch.Tensor] = {}
        self.done = False
        self._begun = False
        self._eot: torch.Tensor | None = None
        self._length0 = 0

    def begin(self, length0: int, eot_index: torch.Tensor | None = None) -> None:
        """Called by the encoder before its first block; only the first encoder call is recorded."""
        if self._begun:
            self.done = True
            return
        self._begun = True
        self._length0 = length0
        self._eot = eot_index

    def __call__(self, layer: int, block: nn.Module, x_in: torch.Tensor, x_out: torch.Tensor,
                 prompt_mask: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
        if self.done or (self.layers is not None and layer not in self.layers):
            return
        length = x_in.shape[1]
        mask = prompt_mask.clone()
        if self.extra_positions and length == self._length0:
            idx = torch.tensor([p for p in self.extra_positions if p < length], dtype=torch.long, device=mask.device)
            mask[idx] = True
        if not bool(mask.any()):
            return  # nothing prompted enters this block: shift 0 by definition
        eot = None
        if self.tower == "text" and self._eot is not None:
            eot = (self._eot.to(x_in.device) + (length - self._length0)).clamp(max=length - 1)
        self.shifts[layer] = relative_block_shift(
            block, x_in, x_out, mask,
            causal=self.tower == "text", eot_index=eot, eps=self.eps)

    def layer_means(self) -> dict[int, torch.Tensor]:
        """Mean over samples per measured layer (0-dim tensors, differentiable)."""
        return {k: v.mean() for k, v in sorted(self.shifts.items())}

    def vector(self, layers: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """Layer means in the order of ``layers`` (0 for a layer without prompt tokens), fp32."""
        means = self.layer_means()
        zero = torch.zeros((), device=device)
        values = [means[k].float() if k in means else zero for k in layers]
        return torch.stack(values) if values else torch.zeros(0, device=device)


@dataclass
class ShiftRecording:
    text: ShiftRecorder
    vision: ShiftRecorder


def text_context_positions(model: nn.Module) -> list[int]:
    """Positions ``1..n`` of a model's learned layer-0 text context (end class-token position only)."""
    candidates = []
    learner = getattr(model, "prompt_learner", None)
    if isinstance(learner, TextContext):
        candidates.append(learner)
    if learner is not None and isinstance(getattr(learner, "text_context", None), TextContext):
        candidates.append(learner.text_context)
    candidates += [m for m in model.modules() if isinstance(m, TextContext)]
    for context in candidates:
        if context.ctx is None or context.n_ctx == 0:
            continue
        if context.class_token_position != "end":
            logger.warning("Note: feature shift ignores the layer-0 text context with class token position "
                           "%r (only 'end' is supported)", context.class_token_position)
            return []
        return list(range(1, 1 + context.n_ctx))
    return []


@contextlib.contextmanager
def observe_shift(model: PromptModel, text_layers: Iterable[int] | None = None,
                  vision_layers: Iterable[int] | None = None, text_positions: Sequence[int] | None = None,
                  eps: float = 1e-6) -> Iterator[ShiftRecording]:
    """Record block shifts of the next prompted text and image encoder calls made by ``model``.

    ``model`` is any :class:`~restore.prompting.model.PromptModel`: the recorders are installed as
    its observers (:meth:`~restore.prompting.model.PromptModel.observing`). ``text_positions``
    defaults to the learned layer-0 context found in the model (:func:`text_context_positions`).
    """
    positions = text_context_positions(model) if text_positions is None else list(text_positions)
    recording = ShiftRecording(ShiftRecorder("text", text_layers, positions, eps),
                               ShiftRecorder("vision", vision_layers, (), eps))
    with model.observing(text=recording.text, vision=recording.vision):
        yield recording
