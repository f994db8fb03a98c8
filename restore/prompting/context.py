"""Layer-0 text context shared by the CoOp family: prompts ``[SOS][ctx][class tokens . EOT]``.

One implementation of the conventions every trainer relies on (dassl_compat.md §11.2): class
names with ``_`` -> space, prompt = prefix + " " + name + ".", the SOS embedding and the class
suffix held as class-dependent (non-persistent) buffers, and two ways to initialise from
``CTX_INIT``:

* ``"all_words"`` (the CoOp family's rule): ``n_ctx`` = number of words of the init string, and the
  context vectors start from their embeddings.
* ``"first_words"`` (the deep-prompt methods' rule): keep ``n_ctx``; when ``n_ctx <= 4`` the first
  ``n_ctx`` word embeddings initialise the context and the *whole* init string stays the prefix
  (so with "a photo of a" and n_ctx 2, "of a" remain fixed tokens after the learned ones).

Without an init string the context is N(0, 0.02^2) and the placeholder prefix is "X X ... X".
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from restore.clip.model import CLIP
from restore.clip.tokenizer import encode, tokenize

InitMode = Literal["all_words", "first_words"]
ClassTokenPosition = Literal["end", "middle", "front"]


def clean_classname(name: str) -> str:
    return name.replace("_", " ")


class TextContext(nn.Module):
    """Learnable context vectors spliced into tokenised class prompts.

    Args:
        clip_model: the frozen CLIP (its token embedding is read once, at construction).
        classnames: class names in label order.
        n_ctx: number of learnable context tokens (0: fixed prompts "<prefix> <class>.").
        ctx_init: optional init string ("a photo of a").
        init_mode: "all_words" or "first_words" (see module docstring).
        class_specific: one context per class (CoOp's CSC).
        class_token_position: "end", "middle" or "front" (CoOp).
    """

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx: int, ctx_init: str = "",
                 init_mode: InitMode = "first_words", class_specific: bool = False,
                 class_token_position: ClassTokenPosition = "end") -> None:
        super().__init__()
        ctx_init = ctx_init.replace("_", " ").strip()
        width = clip_model.ln_final.weight.shape[0]
        embedding = clip_model.token_embedding
        ctx_vectors: torch.Tensor | None = None
        if ctx_init and init_mode == "all_words":
            n_ctx = len(ctx_init.split(" "))
            prefix = ctx_init
        elif ctx_init and init_mode == "first_words" and n_ctx <= 4:
            prefix = ctx_init
        else:
            prefix = " ".join(["X"] * n_ctx)
            ctx_init = ""
        if ctx_init and n_ctx > 0:
            with torch.no_grad():
                init_embed = embedding(tokenize(ctx_init)).float()
            ctx_vectors = init_embed[0, 1:1 + n_ctx, :].clone()
            if class_specific:
                ctx_vectors = ctx_vectors.unsqueeze(0).repeat(len(classnames), 1, 1)
        elif n_ctx > 0:
            shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
            ctx_vectors = torch.empty(shape)
            nn.init.normal_(ctx_vectors, std=0.02)
        self.n_ctx = n_ctx
        self.n_cls = len(classnames)
        self.prompt_prefix = prefix
        self.class_token_position = class_token_position
        self.classnames = [clean_classname(c) for c in classnames]
        self.name_lens = [len(encode(name)) for name in self.classnames]
        prompts = [(prefix + " " + name + ".").strip() for name in self.classnames]
        self.prompts = prompts
        token_ids = tokenize(prompts)
        with torch.no_grad():
            embedded = embedding(token_ids).float()
        self.ctx = nn.Parameter(ctx_vectors) if ctx_vectors is not None else None
        # Class-dependent: never saved, so a checkpoint loads for other classes.
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1, :], persistent=False)
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:, :], persistent=False)

    @property
    def eot_index(self) -> torch.Tensor:
        """(C,) position of EOT in each prompt (argmax of token ids)."""
        return self.token_ids.argmax(dim=-1)

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings (C, 77, D); ``ctx`` overrides the learned context (CoCoOp's per-image ctx)."""
        ctx = self.ctx if ctx is None else ctx
        prefix, suffix = self.token_prefix, self.token_suffix
        if ctx is None or self.n_ctx == 0:
            return torch.cat([prefix, suffix], dim=1)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        ctx = ctx.to(prefix.dtype) if not torch.is_autocast_enabled() else ctx
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)
        prompts = []
        half = self.n_ctx // 2
        for i, name_len in enumerate(self.name_lens):
            p, c, s = prefix[i:i + 1], ctx[i:i + 1].to(prefix.dtype), suffix[i:i + 1]
            class_tokens, rest = s[:, :name_len], s[:, name_len:]
            if self.class_token_position == "middle":
                prompts.append(torch.cat([p, c[:, :half], class_tokens, c[:, half:], rest], dim=1))
            elif self.class_token_position == "front":
                prompts.append(torch.cat([p, class_tokens, c, rest], dim=1))
            else:
                raise ValueError(f"CLASS_TOKEN_POSITION must be end, middle or front, got {self.class_token_position!r}")
        return torch.cat(prompts, dim=0)


@torch.no_grad()
def encode_fixed_prompts(text_encoder: "PromptedTextEncoder", prompts: Sequence[str],  # noqa: F821
                         batch_size: int = 1000) -> torch.Tensor:
    """Projected text features (N, D) of fixed prompt strings, computed in chunks, no grad."""
    device = text_encoder.text_projection.device
    features = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenize(list(prompts[start:start + batch_size])).to(device)
        features.append(text_encoder.encode_token_ids(ids).features.float())
    return torch.cat(features, dim=0)


@torch.no_grad()
def zeroshot_classifier(text_encoder: "PromptedTextEncoder", classnames: Sequence[str],  # noqa: F821
                        templates: Sequence[str], normalize_per_template: bool = True) -> torch.Tensor:
    """L2-normalised class weights (C, D): per class, the normalised mean of the template features.

    ``normalize_per_template`` (CLIP's ensembling) normalises each template's features before the
    mean; False averages the raw features (PromptSRC's teacher), so longer features weigh more.
    """
    names = [clean_classname(c) for c in classnames]
    per_template = []
    for template in templates:
        feats = encode_fixed_prompts(text_encoder, [template.format(n) for n in names])
        per_template.append(feats / feats.norm(dim=-1, keepdim=True) if normalize_per_template else feats)
    mean = torch.stack(per_template, dim=0).mean(dim=0)
    return mean / mean.norm(dim=-1, keepdim=True)
