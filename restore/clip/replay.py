"""Advance the global torch RNG exactly as OpenAI's ``build_model`` does when it builds a CLIP.

The methods' official code builds its CLIP through OpenAI's ``build_model``: every module's default
initialiser and ``initialize_parameters`` draw from the global RNG before the weights file
overwrites them, and only then does the prompt learner draw its own random tensors. This library
loads CLIP without touching the global RNG; :func:`replay_openai_build` then makes the same draws
(on throwaway tensors, in the same order and with the same torch initialisers), so the learnable
tensors created afterwards get the official initial values for the same seed.

Some official variants (IVLP, VPT) create deep prompt tensors *inside* the CLIP build; pass their
shapes as :class:`BuildPrompts` and the values drawn at those points are returned, in the official
order, for the caller to use as its initial prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model import CLIPConfig, ModifiedResNet

__all__ = ["BuildPrompts", "replay_openai_build"]


@dataclass(frozen=True)
class BuildPrompts:
    """Prompt tensors an official CLIP variant draws during its build (IVLP/VPT ``design_details``).

    ``vision_ctx`` tokens as ``visual.VPT`` plus one per vision block ``1..vision_depth-1``
    (``vision_depth`` 0: none); ``language_ctx`` tokens per text block ``1..language_depth-1``.
    """

    vision_ctx: int = 0
    vision_depth: int = 0
    language_ctx: int = 0
    language_depth: int = 0
    #: a second vision projection drawn like ``visual.proj`` right after it (MMRL's ``proj_rep``)
    vision_proj_extra: bool = False


def _normal(shape: tuple[int, ...], std: float = 0.02) -> torch.Tensor:
    values = torch.empty(shape)
    nn.init.normal_(values, std=std)
    return values


def _blocks(width: int, layers: int, n_ctx: int, depth: int) -> list[torch.Tensor]:
    """One transformer tower's module draws; the block prompts drawn for layers ``1..depth-1``."""
    prompts = []
    for i in range(layers):
        nn.MultiheadAttention(width, max(1, width // 64))
        nn.Linear(width, width * 4)
        nn.Linear(width * 4, width)
        if i != 0 and depth > i and n_ctx > 0:
            prompts.append(_normal((n_ctx, width)))
    return prompts


@torch.no_grad()
def replay_openai_build(config: CLIPConfig, prompts: BuildPrompts | None = None) -> dict[str, list[torch.Tensor]]:
    """Draw from the global RNG what OpenAI's ``build_model`` draws for ``config``'s architecture.

    Returns the prompt tensors drawn inside the build for ``prompts`` (keys ``vision_input``: the
    input-level ``visual.VPT`` as a one-element list, ``vision_blocks`` and ``text_blocks``: per-block
    prompts in layer order, ``vision_proj_extra``: the extra projection); empty lists when none.
    """
    prompts = prompts or BuildPrompts()
    drawn: dict[str, list[torch.Tensor]] = {"vision_input": [], "vision_blocks": [], "text_blocks": [],
                                            "vision_proj_extra": []}
    width = config.vision_width
    if config.is_resnet:
        ModifiedResNet(layers=config.vision_layers, output_dim=config.embed_dim,  # type: ignore[arg-type]
                       heads=width * 32 // 64, input_resolution=config.image_resolution, width=width)
    else:
        patch = int(config.vision_patch_size or 0)
        nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        if prompts.vision_depth > 0:
            drawn["vision_input"].append(_normal((prompts.vision_ctx, width)))
        torch.randn(width)
        grid = config.image_resolution // patch
        torch.randn(grid * grid + 1, width)
        drawn["vision_blocks"] = _blocks(width, int(config.vision_layers), prompts.vision_ctx,  # type: ignore[arg-type]
                                         prompts.vision_depth)
        scale = width ** -0.5
        torch.randn(width, config.embed_dim)
        if prompts.vision_proj_extra:
            drawn["vision_proj_extra"].append(scale * torch.randn(width, config.embed_dim))
    text = config.transformer_width
    drawn["text_blocks"] = _blocks(text, config.transformer_layers, prompts.language_ctx, prompts.language_depth)
    nn.Embedding(config.vocab_size, text)
    # initialize_parameters (the ResNet-only attention-pool draws come first, as in OpenAI's code)
    _normal((config.vocab_size, text), 0.02)
    _normal((config.context_length, text), 0.01)
    if config.is_resnet:  # q, k, v and c_proj of the attention pool (the std draws nothing)
        pool = width * 32
        for shape in ((pool, pool), (pool, pool), (pool, pool), (config.embed_dim, pool)):
            _normal(shape)
    proj_std = (text ** -0.5) * ((2 * config.transformer_layers) ** -0.5)
    for _ in range(config.transformer_layers):
        _normal((3 * text, text), text ** -0.5)
        _normal((text, text), proj_std)
        _normal((4 * text, text), (2 * text) ** -0.5)
        _normal((text, 4 * text), proj_std)
    _normal((text, config.embed_dim), text ** -0.5)
    return drawn
