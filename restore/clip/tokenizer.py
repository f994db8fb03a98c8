"""CLIP's byte-pair tokenizer with OpenAI's ``clip.tokenize`` semantics.

The BPE itself is open_clip's ``SimpleTokenizer`` (same vocabulary file and cleaning as OpenAI's),
created on first use so that ``import restore.clip`` stays cheap. Its module is loaded on its own, not
through ``import open_clip`` (whose package imports timm and huggingface_hub: seconds per process).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from open_clip.tokenizer import SimpleTokenizer

SOT_TOKEN = 49406  # <start_of_text>
EOT_TOKEN = 49407  # <end_of_text>

_tokenizer: SimpleTokenizer | None = None
_lock = threading.Lock()


def _open_clip_tokenizer_module() -> ModuleType:
    """open_clip's ``tokenizer`` module, without running the ``open_clip`` package's ``__init__``.

    The module imports no other part of open_clip, so its file is executed under a private name; if
    ``open_clip`` is already imported (or its layout differs), the regular import is used.
    """
    if "open_clip" in sys.modules:
        import open_clip.tokenizer

        return open_clip.tokenizer
    name = "_restore_open_clip_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("open_clip")
    locations = package.submodule_search_locations if package is not None else None
    spec = (importlib.util.spec_from_file_location(name, f"{next(iter(locations))}/tokenizer.py")
            if locations else None)
    if spec is None or spec.loader is None:
        import open_clip.tokenizer

        return open_clip.tokenizer
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a dependency the module imports is missing: the package import says which
        del sys.modules[name]
        import open_clip.tokenizer

        return open_clip.tokenizer
    return module


def get_tokenizer() -> SimpleTokenizer:
    """The process-wide open_clip ``SimpleTokenizer`` (built once, on first call)."""
    global _tokenizer
    if _tokenizer is None:
        with _lock:
            if _tokenizer is None:
                tok = _open_clip_tokenizer_module().SimpleTokenizer()
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
