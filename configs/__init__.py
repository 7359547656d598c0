"""Configs: frozen, validated dataclasses and named presets."""

from configs.model_config import ConfigError, ModelConfig
from configs.presets import PRESETS, PaperRecipe, Preset, get_preset

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "PaperRecipe", "Preset", "get_preset"]
