"""Reading checkpoints written by the methods' official code (CoOp, CoCoOp, KgCoOp, MaPLe, IVLP, VPT,
PromptSRC, MMRL) into this library's models, so released weights evaluate here unchanged.

Those files hold a Dassl ``state_dict`` under the same registered folder names as ours
(``prompt_learner``, ``MultiModalPromptLearner``, ``VLPromptLearner``,
``MultiModalRepresentationLearner``), but with the official key names, often the whole frozen CLIP,
and class-dependent buffers (``token_prefix``/``token_suffix``, MMRL's ``prompt_embeddings``). A
model class states how the official code names its learned tensors as :data:`OfficialKeys`; this
module renames those, drops everything else and lets the model fill derived entries.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, Union

import torch

#: ``(pattern, replacement)``: a key matching ``pattern`` (``re.fullmatch``) is renamed to the
#: replacement (a ``re`` template such as ``r"prompt_learner.text_prompts.\1"``, or a function of
#: the match); the first matching pair wins. Keys that no pair matches are dropped.
OfficialKeys = Sequence[tuple[str, Union[str, Callable[["re.Match[str]"], str]]]]

# Present in every official checkpoint and in none of ours: the frozen towers of whole-model
# checkpoints, or the class-dependent buffers that the official loaders delete before loading.
_OFFICIAL_MARKER = re.compile(r"^(image_encoder|text_encoder)\.|(^|\.)(token_prefix|token_suffix|prompt_embeddings)$")


def is_official_state(state: dict[str, torch.Tensor]) -> bool:
    """True for a state dict written by the official code (frozen towers or class buffers inside)."""
    return any(_OFFICIAL_MARKER.search(key) for key in state)


def rename_official_state(state: dict[str, torch.Tensor], rules: OfficialKeys) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that ``rules`` name, under this library's names (others dropped)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            match = re.fullmatch(pattern, key)
            if match is not None:
                new = replacement(match) if callable(replacement) else match.expand(replacement)
                if new in renamed:
                    raise ValueError(f"official keys {key!r} and another both map to {new!r}")
                renamed[new] = value
                break
    return renamed


def shifted(template: str, group: int = 1, offset: int = -1) -> Callable[["re.Match[str]"], str]:
    """A replacement that puts ``int(match.group(group)) + offset`` into ``template``'s ``{}``: the
    official IVLP stores layer k's deep prompt in block k, ours are numbered from the first deep layer."""
    return lambda match: template.format(int(match.group(group)) + offset)
