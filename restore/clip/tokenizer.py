"""CLIP's byte-pair tokenizer with OpenAI's ``clip.tokenize`` semantics.

The BPE itself is open_clip's ``SimpleTokenizer`` (same vocabulary file and cleaning as OpenAI's),
created on first use so that ``import restore.clip`` stays cheap.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from open_clip.tokenizer import SimpleTokenizer

SOT_TOKEN = 49406  # <start_of_text>
EOT_TOKEN = 49407  # <end_of_text>

_tokenizer: SimpleTokenizer | None = None
_lock = threading.Lock()


def get_tokenizer() -> SimpleTokenizer:
    """The process-wide open_clip ``SimpleTokenizer`` (built once, on first call)."""
    global _tokenizer
    if _tokenizer is None:
        with _lock:
            if _tokenizer is None:
                from open_clip.tokenizer import SimpleTokenizer

                tok = SimpleTokenizer()
                if (tok.sot_token_id, tok.eot_token_id) != (SOT_TOKEN, EOT_TOKEN):
                    raise RuntimeError(
                        f"open_clip's SimpleTokenizer has SOT/EOT ids {tok.sot_token_id}/{tok.eot_token_id}, "
                        f"expected CLIP's {SOT_TOKEN}/{EOT_TOKEN}; the installed open_clip is incompatible.")
                _tokenizer = tok
    return _tokenizer


def encode(text: str) -> list[int]:
    """BPE ids of ``text`` without SOT/EOT (``len(encode(name))`` is CoOp's ``name_lens``)."""
    return list(get_tokenizer().encode(text))


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """Tokenize like OpenAI's ``clip.tokenize``.

    Each row is ``[SOT, bpe..., EOT, 0, 0, ...]`` of length ``context_length``.

    Args:
        texts: one string or a list of strings.
        context_length: number of positions per row (77 for every CLIP).
        truncate: cut over-long texts to ``context_length`` (last position set to EOT) instead of
            raising.

    Returns:
        A ``(len(texts), context_length)`` int64 tensor.

    Raises:
        RuntimeError: a text is too long and ``truncate`` is False.
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [SOT_TOKEN] + encode(text) + [EOT_TOKEN]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(
                    f"Input {text!r} is too long for context length {context_length} "
                    f"({len(tokens)} tokens with SOT/EOT); shorten it or pass truncate=True.")
            tokens = tokens[:context_length]
            tokens[-1] = EOT_TOKEN
        result[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return result  # type: ignore[return-value]
