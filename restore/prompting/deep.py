"""Deep prompt modules shared by trainers: independent (VPT, IVLP, PromptSRC) and coupled (MaPLe).

Both expose ``text_deep()`` and ``vision_deep()`` returning :class:`DeepTokens` groups for the
prompted encoders, and keep the layer-0 text context in a :class:`TextContext`. Conventions
(dassl_compat.md §11.3, restore.md §3.1): vision prompts are appended after the patch tokens at
layer 0 and overwritten at deeper layers; deep text prompts overwrite positions ``1..n`` from
layer 1 on; deeper layers without prompts let the tokens propagate.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from restore.clip.model import CLIP

from .context import TextContext
from .encoders import DeepTokens, vision_transformer


def _normal_tokens(count: int, n_tokens: int, width: int, std: float = 0.02,
                   initial: Sequence[torch.Tensor] = ()) -> nn.ParameterList:
    """``count`` learnable (n_tokens, width) tensors, N(0, std^2) (drawn all first, then filled, as the
    official code), or copies of ``initial`` when it holds ``count`` tensors of that shape."""
    if len(initial) == count and all(t.shape == (n_tokens, width) for t in initial):
        return nn.ParameterList([nn.Parameter(t.detach().clone().float()) for t in initial])
    params = nn.ParameterList([nn.Parameter(torch.empty(n_tokens, width)) for _ in range(count)])
    for p in params:
        nn.init.normal_(p, std=std)
    return params


def text_width(clip_model: CLIP) -> int:
    return clip_model.ln_final.weight.shape[0]


def vision_width(clip_model: CLIP) -> int:
    """Token width of the ViT image tower (a clear error for a ResNet tower)."""
    return vision_transformer(clip_model.visual).transformer.width


class IndependentPrompts(nn.Module):
    """Separate learnable tokens per layer in each tower (IVLP; VPT = vision only; language only).

    Args:
        n_ctx_text / n_ctx_vision: tokens per layer in each tower (0 disables that tower).
        depth_text / depth_vision: number of prompted layers (0 disables; 1 = layer 0 only).
        ctx_init: init string of the layer-0 text context ("a photo of a"), MaPLe-style.
    """

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx_text: int, n_ctx_vision: int,
                 depth_text: int, depth_vision: int, ctx_init: str = "a photo of a",
                 initial: dict[str, list[torch.Tensor]] | None = None) -> None:
        super().__init__()
        # ``initial``: the deep prompts the official code draws inside its CLIP build, in build order
        # (restore.clip.replay: "text_blocks", "vision_input" + "vision_blocks"); drawn here otherwise
        initial = initial or {}
        use_text = n_ctx_text > 0 and depth_text > 0
        self.text_context = TextContext(clip_model, classnames, n_ctx_text if use_text else 0, ctx_init, "first_words")
        use_vision = n_ctx_vision > 0 and depth_vision > 0
        vision_initial = [*initial.get("vision_input", []), *initial.get("vision_blocks", [])]
        self.text_prompts = _normal_tokens(depth_text - 1 if use_text else 0, n_ctx_text, text_width(clip_model),
                                           initial=initial.get("text_blocks", []))
        self.vision_prompts = _normal_tokens(depth_vision if use_vision else 0, n_ctx_vision,
                                             vision_width(clip_model) if use_vision else 0, initial=vision_initial)

    def text_deep(self) -> list[DeepTokens]:
        if len(self.text_prompts) == 0:
            return []
        return [DeepTokens(list(self.text_prompts), first_layer=1, position=1, insert=False, name="text_prompts")]

    def vision_deep(self) -> list[DeepTokens]:
        if len(self.vision_prompts) == 0:
            return []
        return [DeepTokens(list(self.vision_prompts), first_layer=0, position=None, insert=True, name="vision_prompts")]


class CoupledPrompts(nn.Module):
    """MaPLe: text prompts per layer, vision prompts obtained from them by linear maps.

    Layer 0: ``ctx`` (text) and ``proj(ctx)`` (vision). Layers 1..depth-1: ``compound_prompts_text[k]``
    and ``compound_prompt_projections[k](compound_prompts_text[k])``. The projections start as
    copies of one freshly initialised Linear, as in the official code.
    """

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx: int, depth: int,
                 ctx_init: str = "a photo of a") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("Coupled (text-to-vision) prompts need PROMPT_DEPTH >= 1")
        if n_ctx < 1:
            raise ValueError("Coupled (text-to-vision) prompts need N_CTX >= 1")
        wt, wv = text_width(clip_model), vision_width(clip_model)
        self.text_context = TextContext(clip_model, classnames, n_ctx, ctx_init, "first_words")
        self.proj = nn.Linear(wt, wv)
        self.compound_prompts_text = _normal_tokens(depth - 1, n_ctx, wt)
        single = nn.Linear(wt, wv)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])

    @property
    def ctx(self) -> torch.Tensor:
        return self.text_context.ctx

    def deep_text_tokens(self) -> list[torch.Tensor]:
        """The text prompts of layers 1..depth-1 (what RESTORE's official shift proxy measures)."""
        return list(self.compound_prompts_text)

    def deep_vision_tokens(self) -> list[torch.Tensor]:
        """The projected vision prompts of layers 1..depth-1."""
        return [layer(p) for layer, p in zip(self.compound_prompt_projections, self.compound_prompts_text)]

    def text_deep(self) -> list[DeepTokens]:
        if len(self.compound_prompts_text) == 0:
            return []
        return [DeepTokens(self.deep_text_tokens(), first_layer=1, position=1, insert=False, name="text_prompts")]

    def vision_deep(self, deep_vision: list[torch.Tensor] | None = None) -> list[DeepTokens]:
        tokens = [self.proj(self.ctx)] + (deep_vision if deep_vision is not None else self.deep_vision_tokens())
        return [DeepTokens(tokens, first_layer=0, position=None, insert=True, name="vision_prompts")]
