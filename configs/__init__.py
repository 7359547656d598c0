"""Configs: frozen, validated dataclasses and named presets."""

from .model_config import ConfigError, ModelConfig
from .presets import PRESETS, PaperRecipe, Preset, get_preset

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "PaperRecipe", "Preset", "get_preset"]
