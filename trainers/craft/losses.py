"""Craft's losses on anchor-aligned ("relative") representations.

A relative representation of an embedding is its vector of scaled cosine similarities to a set of
anchors; every alignment term is a softmax cross-entropy over such a vector (craft.md §6), and the
OOD term is an MMD between the relative representations of source and target images with respect to
the static text anchors (craft.md §7).

Every function here computes in float32 with autocast switched off on the inputs' device
(:func:`fp32_math`): the regularizer runs inside the trainer's autocast, where the cosine
similarities and the ``||x||^2 + ||y||^2 - 2 x.y`` expansion of the MMD distances would otherwise be
computed in bf16 / fp16 (the MMD was off by ~1% under bf16). The host's own forward keeps its
precision; only the loss math is float32.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["fp32_math", "relative_logits", "static_alignment_loss", "stochastic_alignment_loss",
           "contrast_targets", "minmax_scale", "squared_distances", "gaussian_kernel", "mmd"]


def fp32_math(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` (a no-op where that device type has no autocast)."""
    try:
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def _f32(scale: torch.Tensor | float) -> torch.Tensor | float:
    return scale.float() if isinstance(scale, torch.Tensor) else float(scale)


def relative_logits(query: torch.Tensor, anchors: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``scale * cos(query_i, anchor_j)``: (B, N) float32 from (B, D) and (N, D); inputs need not be normalised."""
    with fp32_math(query.device):
        return _f32(scale) * F.normalize(query.float(), dim=-1) @ F.normalize(anchors.float(), dim=-1).t()


def static_alignment_loss(text: torch.Tensor, image_anchors: torch.Tensor, label: torch.Tensor,
                          scale: torch.Tensor | float, clusters_per_class: int = 1) -> torch.Tensor:
    """L_Aligned(Static): classify each stochastic text anchor against the static image anchors.

    ``image_anchors`` is (C * K, D), class-major (class c owns rows c*K .. c*K+K-1). With K > 1 the
    class score is the log-sum-exp of its K anchor scores, i.e. the loss is -log of the softmax mass
    that falls on the true class's anchors (K = 1: plain cross-entropy, as the code).
    """
    with fp32_math(text.device):
        logits = relative_logits(text, image_anchors, scale)
        if clusters_per_class > 1:
            logits = logits.view(logits.shape[0], -1, clusters_per_class).logsumexp(dim=-1)
        return F.cross_entropy(logits, label)


def contrast_targets(label: torch.Tensor, mode: str = "index") -> torch.Tensor:
    """Targets of the stochastic term: ``arange(B)`` ("index", the code) or soft same-class targets ("class")."""
    if mode == "index":
        return torch.arange(label.shape[0], device=label.device)
    if mode == "class":
        same = (label[:, None] == label[None, :]).float()
        return same / same.sum(dim=1, keepdim=True)
    raise ValueError(f"contrast target mode must be 'index' or 'class', got {mode!r}")


def stochastic_alignment_loss(query: torch.Tensor, keys: torch.Tensor, label: torch.Tensor,
                              scale: torch.Tensor | float, targets: str = "index") -> torch.Tensor:
    """L_Aligned(Stochastic): row i of ``query`` (B, D) classified against the batch ``keys`` (B, D)."""
    with fp32_math(query.device):
        return F.cross_entropy(relative_logits(query, keys, scale), contrast_targets(label, targets))


def minmax_scale(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-column min-max scaling over the batch (gradients flow through min and max, as the code)."""
    with fp32_math(x.device):
        x = x.float()
        lo = x.min(dim=0, keepdim=True).values
        hi = x.max(dim=0, keepdim=True).values
        return (x - lo) / (hi - lo + eps)


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x_i - y_j||^2`` (N, M) in float32, clamped at 0 (a differentiable expansion, no sqrt)."""
    with fp32_math(x.device):
        x, y = x.float(), y.float()
        d2 = (x * x).sum(dim=1, keepdim=True) + (y * y).sum(dim=1)[None, :] - 2.0 * x @ y.t()
        return d2.clamp_min(0.0)


def gaussian_kernel(d2: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Multi-bandwidth Gaussian kernel ``sum_s exp(-d2 / (2 s))`` with ``s`` = sigma^2."""
    with fp32_math(d2.device):
        d2 = d2.float()
        return sum(torch.exp(-0.5 * d2 / float(s)) for s in bandwidths)  # type: ignore[return-value]


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (10.0, 15.0, 20.0, 50.0),
        minmax: bool = True) -> torch.Tensor:
    """Biased (V-statistic) squared MMD between samples ``x`` (N, D) and ``y`` (M, D).

    ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)`` with diagonals included; with ``minmax`` each
    sample is first min-max scaled per column on its own (craft.md §7). N and M may differ. Float32
    with autocast off, whatever the caller's autocast.
    """
    with fp32_math(x.device):
        x, y = x.float(), y.float()
        if minmax:
            x, y = minmax_scale(x), minmax_scale(y)
        kxx = gaussian_kernel(squared_distances(x, x), bandwidths).mean()
        kyy = gaussian_kernel(squared_distances(y, y), bandwidths).mean()
        kxy = gaussian_kernel(squared_distances(x, y), bandwidths).mean()
        return kxx + kyy - 2.0 * kxy
