"""The library's one exception type (a leaf module: imports nothing of ours)."""

from __future__ import annotations

__all__ = ["ReluDoctorError"]


class ReluDoctorError(Exception):
    """Raised for bad input and unusable state. Messages name the argument, what was
    expected and what came, and where possible suggest the fix."""


class RunDirError(ReluDoctorError):
    """A run directory is missing, empty, foreign, or from an unsupported format version."""
