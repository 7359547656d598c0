"""matrixmagic.configs: frozen, validated dataclasses and named presets.

  model_config.py   ModelConfig (every shape and switch of the three families), the
                    lists of choices, ConfigError and its helpers
  presets.py        the papers' architectures and training recipes, up to GPT-3 175B
  train_config.py   TrainConfig (data, optimizer, mesh, run) and the recipe's batch
  overrides.py      `--set field=value` parsed once into typed values; a config built from them

The bottom layer: imports no other matrixmagic package (and no jax), so reading a
config or a preset is instant.
"""

from .model_config import ConfigError, ModelConfig
from .presets import PRESETS, PaperRecipe, Preset, get_preset

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "PaperRecipe", "Preset", "get_preset"]
