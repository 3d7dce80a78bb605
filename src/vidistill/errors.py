"""Exceptions every layer may raise, kept in a module that imports nothing else of vidistill.

The data layer, the models and the distillation methods raise `ConfigError` for what a user can fix;
importing it from here (not from `vidistill.config`) keeps those layers independent of the stage
configurations.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A parameter a user gave is invalid; the message names it and what to do."""
