"""The one place that runs CLIP's towers with extra tokens.

Every method expresses its prompts as :class:`DeepTokens` groups:

* CoOp/CoCoOp: no group; the learned context is part of the text embeddings given to the encoder.
* VPT / IVLP / MaPLe: a vision group appended at layer 0 then replaced at deeper layers, and a
  text group that replaces positions ``1..n`` from layer 1 (layer-0 text context comes from the
  prompt learner, as in MaPLe).
* MMRL: groups inserted at layer J after CLS (vision) or after BOT (text), replaced afterwards.

"Layer k" is the input of residual block k. Vision tokens inserted at layer 0 enter before
``ln_pre`` and get no positional embedding (as VPT and MaPLe do); text tokens inserted at any
layer get no positional embedding. The text causal mask is rebuilt for the grown sequence and
the EOT index moves with insertions before it. The text tower runs only up to the longest EOT
(exact: with a causal mask nothing after EOT reaches it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, cast

import torch
from torch import nn

from restore.clip.model import CLIP, ResidualAttentionBlock, VisionTransformer, causal_mask


@dataclass
class DeepTokens:
    """Learnable tokens placed into one tower, layer by layer.

    Args:
        tokens: ``tokens[k]`` acts at layer ``first_layer + k``; each is ``(n, D)`` (shared over the
            batch) or ``(B, n, D)``. After the last one the tokens just propagate.
        first_layer: the layer where the group first acts.
        position: sequence index of the group's first token when it first acts (``None``: append
            at the end). Later insertions before it shift it automatically.
        insert: at ``first_layer``, insert the tokens (sequence grows) or overwrite existing ones.
        name: key under which the group's final positions are reported.
    """

    tokens: Sequence[torch.Tensor]
    first_layer: int = 0
    position: int | None = None
    insert: bool = True
    name: str = ""

    @property
    def num_tokens(self) -> int:
        return self.tokens[0].shape[-2]

    @property
    def last_layer(self) -> int:
        return self.first_layer + len(self.tokens) - 1


@dataclass
class EncoderOutput:
    """What an encoder returns.

    Attributes:
        features: projected features (B, embed_dim), not normalised.
        tokens: the last block's output after the final LayerNorm, (B, L, D).
        slots: final ``slice`` of each named DeepTokens group in ``tokens``.
        pooled_index: per-sample index of the pooled token (CLS = 0, text: EOT).
        hidden_states: per-block outputs (B, L_k, D), only when asked for.
        prompt_masks: per-block boolean (L_k,) masks of prompt positions, only when asked for.
        plain_features: the frozen tower's features of the same input without any deep tokens (no
            gradient), only when asked for.
    """

    features: torch.Tensor
    tokens: torch.Tensor
    slots: dict[str, slice]
    pooled_index: torch.Tensor
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    prompt_masks: list[torch.Tensor] = field(default_factory=list)
    plain_features: torch.Tensor | None = None


# observer(layer, block, x_in, x_out, prompt_mask, attn_mask) -> None, called after each block. An
# observer that also has a ``begin(length, eot_index)`` method gets it called once before the first
# block, with the sequence length before any insertion and the EOT index (None for images).
LayerObserver = Callable[[int, ResidualAttentionBlock, torch.Tensor, torch.Tensor, torch.Tensor,
                          "torch.Tensor | None"], None]


def _begin(observer: LayerObserver | None, length: int, eot_index: torch.Tensor | None) -> None:
    begin = getattr(observer, "begin", None)
    if callable(begin):
        begin(length, eot_index)


class _Slots:
    """Tracks where each active group sits in the sequence while tokens are inserted."""

    def __init__(self) -> None:
        self.starts: dict[int, int] = {}
        self.sizes: dict[int, int] = {}

    def apply(self, x: torch.Tensor, layer: int,
              groups: Sequence[DeepTokens]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Insert or overwrite every group acting at ``layer``; returns x and the insertions made, in
        order, as (position in the sequence at that moment, count)."""
        insertions: list[tuple[int, int]] = []
        for gid, group in enumerate(groups):
            k = layer - group.first_layer
            if k < 0 or k >= len(group.tokens):
                continue
            tok = group.tokens[k].to(x.dtype)
            tok = tok.expand(x.shape[0], -1, -1) if tok.dim() == 2 else tok
            n = tok.shape[1]
            if k == 0:
                start = x.shape[1] if group.position is None else group.position
                if group.insert:
                    for other, s in self.starts.items():
                        if s >= start:
                            self.starts[other] = s + n
                    x = torch.cat([x[:, :start], tok, x[:, start:]], dim=1)
                    insertions.append((start, n))
                else:
                    x = torch.cat([x[:, :start], tok, x[:, start + n:]], dim=1)
                self.starts[gid], self.sizes[gid] = start, n
            else:
                start = self.starts[gid]
                x = torch.cat([x[:, :start], tok, x[:, start + n:]], dim=1)
        return x, insertions

    def mask(self, length: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(length, dtype=torch.bool, device=device)
        for gid, start in self.starts.items():
            mask[start:start + self.sizes[gid]] = True
        return mask

    def named(self, groups: Sequence[DeepTokens]) -> dict[str, slice]:
        return {groups[g].name or str(g): slice(s, s + self.sizes[g]) for g, s in self.starts.items()}


def _validate(groups: Sequence[DeepTokens], depth: int, tower: str) -> None:
    for group in groups:
        if group.first_layer < 0 or group.last_layer >= depth:
            raise ValueError(
                f"{tower} prompts span layers {group.first_layer}..{group.last_layer}, but the backbone "
                f"has {depth} layers; lower the prompt depth in the trainer's config.")


def vision_transformer(visual: nn.Module) -> VisionTransformer:
    """``visual`` (a CLIP image tower) as a ViT; a clear error for a ResNet tower, which has no
    layers to put visual prompts (or MMRL's representation tokens, RESTORE's shifts) into."""
    if isinstance(visual, VisionTransformer):
        return visual
    raise ValueError(
        f"This backbone's image tower is a ResNet ({type(visual).__name__}): it has no transformer layers for "
        "visual prompts. A method that puts tokens into the image tower needs a ViT backbone "
        "(e.g. MODEL.BACKBONE.NAME ViT-B/16); methods that prompt only the text side run on ResNet backbones.")


class PromptedVisionEncoder(nn.Module):
    """CLIP's image tower run block by block with optional deep tokens (a ResNet tower runs whole,
    without prompts)."""

    def __init__(self, clip_model: CLIP) -> None:
        super().__init__()
        self.visual = clip_model.visual

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def width(self) -> int:
        return vision_transformer(self.visual).transformer.width

    @property
    def num_layers(self) -> int:
        return vision_transformer(self.visual).transformer.layers

    def forward(self, image: torch.Tensor, deep: Sequence[DeepTokens] = (), return_hidden: bool = False,
                observer: LayerObserver | None = None, plain: bool = False) -> EncoderOutput:
        """``plain``: also compute the frozen tower's features of ``image`` without the deep tokens (a
        distillation teacher), sharing the blocks that run before the first group acts."""
        if not isinstance(self.visual, VisionTransformer) and not deep and not return_hidden and observer is None:
            tokens = self.visual.forward_tokens(image)
            pooled = torch.zeros(image.shape[0], dtype=torch.long, device=tokens.device)
            features = tokens[:, 0]
            return EncoderOutput(features, tokens, {}, pooled, plain_features=features.detach() if plain else None)
        visual = vision_transformer(self.visual)
        _validate(deep, self.num_layers, "Vision")
        branch = min((g.first_layer for g in deep), default=None) if plain else None
        plain_features = None
        x = visual.embed(image.to(self.dtype))
        _begin(observer, x.shape[1], None)
        if branch == 0:
            plain_features = self._plain_from(visual, visual.ln_pre(x), 0)
        slots = _Slots()
        x, _ = slots.apply(x, 0, deep)
        x = visual.ln_pre(x)
        hidden, masks = [], []
        for layer, block in enumerate(visual.transformer.resblocks):
            if layer > 0:
                if layer == branch:
                    plain_features = self._plain_from(visual, x, layer)
                x, _ = slots.apply(x, layer, deep)
            x_in = x
            x = block(x)
            if return_hidden or observer is not None:
                mask = slots.mask(x.shape[1], x.device)
                if return_hidden:
                    hidden.append(x)
                    masks.append(mask)
                if observer is not None:
                    observer(layer, block, x_in, x, mask, None)
        tokens = visual.ln_post(x)
        features = tokens[:, 0, :] @ visual.proj
        pooled = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if plain and branch is None:  # no deep tokens: the features are the plain ones
            plain_features = features.detach()
        return EncoderOutput(features, tokens, slots.named(deep), pooled, hidden, masks, plain_features)

    @staticmethod
    @torch.no_grad()
    def _plain_from(visual: VisionTransformer, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Features of the hidden state ``x`` entering block ``layer`` run through the rest of the tower."""
        for block in visual.transformer.resblocks[layer:]:
            x = block(x)
        return visual.ln_post(x)[:, 0, :] @ visual.proj


class PromptedTextEncoder(nn.Module):
    """CLIP's text tower over token embeddings, with deep tokens, causal mask and EOT tracking."""

    def __init__(self, clip_model: CLIP) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection

    @property
    def dtype(self) -> torch.dtype:
        return cast(torch.dtype, self.transformer.resblocks[0].mlp.c_fc.weight.dtype)

    @property
    def width(self) -> int:
        return self.transformer.width

    @property
    def num_layers(self) -> int:
        return self.transformer.layers

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (no positional embedding) in the model's dtype: (N, L, D)."""
        return self.token_embedding(token_ids).to(self.dtype)

    def forward(self, embeddings: torch.Tensor, eot_index: torch.Tensor, deep: Sequence[DeepTokens] = (),
                return_hidden: bool = False, observer: LayerObserver | None = None,
                truncate: bool = True) -> EncoderOutput:
        """Encode prompts given as token embeddings (N, L, D); ``eot_index`` is (N,) (argmax of ids).

        With ``truncate`` the sequence is cut after the longest EOT: exact under the causal mask.
        """
        _validate(deep, self.num_layers, "Text")
        eot = eot_index.to(embeddings.device).clone()
        length = int(eot.max()) + 1 if truncate else embeddings.shape[1]
        x = embeddings[:, :length].to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        _begin(observer, length, eot)
        slots = _Slots()
        hidden, masks = [], []
        mask_cache: dict[int, torch.Tensor] = {}
        for layer, block in enumerate(self.transformer.resblocks):
            x, insertions = slots.apply(x, layer, deep)
            for at, n in insertions:
                eot = torch.where(eot >= at, eot + n, eot)
            L = x.shape[1]
            if L not in mask_cache:
                mask_cache[L] = causal_mask(L, x.device, x.dtype)
            x_in = x
            x = block(x, mask_cache[L])
            if return_hidden or observer is not None:
                pmask = slots.mask(L, x.device)
                if return_hidden:
                    hidden.append(x)
                    masks.append(pmask)
                if observer is not None:
                    observer(layer, block, x_in, x, pmask, mask_cache[L])
        tokens = self.ln_final(x)
        features = tokens[torch.arange(tokens.shape[0], device=tokens.device), eot] @ self.text_projection
        return EncoderOutput(features, tokens, slots.named(deep), eot, hidden, masks)

    def encode_token_ids(self, token_ids: torch.Tensor, deep: Sequence[DeepTokens] = (),
                         **kwargs: object) -> EncoderOutput:
        """Encode tokenised prompts (N, 77): embedding lookup, EOT = argmax of the ids."""
        return self.forward(self.embed(token_ids), token_ids.argmax(dim=-1), deep, **kwargs)
