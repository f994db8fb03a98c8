"""Prompted CLIP encoders shared by every trainer."""

from .encoders import DeepTokens, EncoderOutput, PromptedTextEncoder, PromptedVisionEncoder

__all__ = ["DeepTokens", "EncoderOutput", "PromptedTextEncoder", "PromptedVisionEncoder"]
