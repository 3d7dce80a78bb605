"""Exceptions every layer may raise, kept in a module that imports nothing else of vidistill.

The data layer, the models and the distillation methods raise `ConfigError` for what a user can fix;
importing it from here (not from `vidistill.config`) keeps those layers independent of the stage
configurations.

Everything a user can cause and fix derives from `UserError`: the `vidistill` command prints its
message as one line (no traceback; `--debug` or `VIDISTILL_DEBUG=1` shows it) and exits with 2. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the value or file and what to do."""


class ConfigError(UserError, ValueError):
    """A parameter a user gave is invalid; the message names it and what to do."""


class OutputError(UserError, OSError):
    """An output location cannot be written: read-only, full, or in use by another process."""


class OutputInUseError(OutputError):
    """Another process is writing the same output folder (its lock is held)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model file cannot be read (empty, truncated, corrupt) or does not fit the run."""


class ResumeMismatchError(CheckpointError):
    """`--resume` found a checkpoint made with other data, classes, model or settings."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised by the `vidistill` command's handler): the run ends as KILLED."""
