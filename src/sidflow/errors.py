"""User-facing errors. Each message is one line: what is wrong, then what to do about it."""

from __future__ import annotations

__all__ = ["SidflowError", "TeacherLoadError", "ConfigError", "CheckpointError", "DataError", "NonFiniteError"]


class SidflowError(Exception):
    """Base class; the CLI prints these as one line without a traceback."""


class TeacherLoadError(SidflowError):
    """A teacher folder or hub id cannot be loaded (missing, malformed, unsupported)."""


class ConfigError(SidflowError, ValueError):
    """A configuration value or override is invalid."""


class CheckpointError(SidflowError):
    """A checkpoint is missing, corrupt or does not match the model."""


class DataError(SidflowError, ValueError):
    """Prompt files, images or datasets are empty or malformed."""


class NonFiniteError(SidflowError, FloatingPointError):
    """Too many non-finite losses or samples: training is aborted rather than silently filtered."""
