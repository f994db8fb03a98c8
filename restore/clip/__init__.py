"""CLIP backbones: the model, loading by name (OpenAI files, paths, open_clip, ``tiny``), the tokenizer.

Importing this package is cheap: open_clip is imported only when the tokenizer or an open_clip
backbone is first used.
"""

from restore.clip.loader import (
    OPENAI_MEAN,
    OPENAI_MODELS,
    OPENAI_STD,
    ChecksumError,
    LoadedCLIP,
    available_models,
    clear_cache,
    convert_open_clip,
    load_clip,
    save_openai_state_dict,
)
from restore.clip.model import CLIP, TINY_CONFIG, CLIPConfig, build_model, config_from_state_dict
from restore.clip.tokenizer import encode, tokenize

__all__ = [
    "CLIP", "CLIPConfig", "TINY_CONFIG", "build_model", "config_from_state_dict", "load_clip", "LoadedCLIP",
    "ChecksumError", "available_models", "clear_cache", "convert_open_clip", "save_openai_state_dict",
    "OPENAI_MODELS", "OPENAI_MEAN", "OPENAI_STD", "tokenize", "encode",
]
