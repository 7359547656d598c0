"""The one error of Hugging Face interop."""

from __future__ import annotations

from matrixmagic.configs import ConfigError


class HFError(ConfigError):
    """A Hugging Face directory, file or config cannot be imported or exported as it is.
    The message names the file, tensor or field, and the fix. A ConfigError, so `magic`
    prints it as one line and exits 2."""
