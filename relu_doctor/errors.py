"""The library's exception and warning types (a leaf module: imports nothing of ours)."""

from __future__ import annotations

__all__ = ["ReluDoctorError", "ReluDoctorWarning", "RunDirError"]


class ReluDoctorError(Exception):
    """Raised for bad input and unusable state. Messages name the argument, what was
    expected and what came, and where possible suggest the fix."""


class RunDirError(ReluDoctorError):
    """A run directory is missing, empty, foreign, or from an unsupported format version."""


class ReluDoctorWarning(UserWarning):
    """A finding reported during training, or a problem relu_doctor stepped aside from (a
    run directory it could not write, a damaged file it skipped, a hook that failed and stopped
    monitoring its site). Filter it with ``warnings.filterwarnings``."""
