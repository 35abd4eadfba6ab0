"""The library's exception and warning types (a leaf module: imports nothing of ours)."""

from __future__ import annotations

import os
import sys

__all__ = [
    "ReluDoctorError", "ReluDoctorWarning", "RunDirError", "forget_write_failure",
    "note_write_failure", "user_stacklevel", "write_failure_noted",
]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ReluDoctorError(Exception):
    """Raised for bad input and unusable state. Messages name the argument, what was
    expected and what came, and where possible suggest the fix."""


class RunDirError(ReluDoctorError):
    """A run directory is missing, empty, foreign, or from an unsupported format version."""


class ReluDoctorWarning(UserWarning):
    """A finding reported during training, or a problem relu_doctor stepped aside from (a
    run directory it could not write, a damaged file it skipped, a hook that failed and stopped
    monitoring its site). Filter it with ``warnings.filterwarnings``."""


#: Modules whose frames a warning looks past: the training frameworks that call relu_doctor
#: from their callback dispatch, and ``contextlib`` (a warning raised in a ``with`` block).
_PASS_THROUGH = ("torch.", "lightning.", "pytorch_lightning.", "transformers.", "keras.", "contextlib")


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside relu_doctor and
    the frameworks that call it (the user's ``doc.step()``, ``trainer.fit(...)`` or
    ``model.fit(...)``), for a ``warnings.warn`` made by the caller of this function,
    whatever path inside the library led there."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE)
        or str(frame.f_globals.get("__name__", "")).startswith(_PASS_THROUGH)
    ):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


# Directories whose run-directory writer has warned that it cannot write there: the
# TensorBoard event file in the same directory then fails for the same reason and says
# nothing more (one warning per cause, not one per file).
_WRITE_FAILED: dict[str, int | None] = {}  # directory -> the errno its writer said


def _key(directory: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(directory))


def note_write_failure(directory: str | os.PathLike[str], error: BaseException) -> None:
    """The run directory ``directory`` could not be written (``error``), and its writer
    said so."""
    _WRITE_FAILED[_key(directory)] = getattr(error, "errno", None)


def forget_write_failure(directory: str | os.PathLike[str]) -> None:
    """Its writer closed: a later run there says its own failures."""
    _WRITE_FAILED.pop(_key(directory), None)


def write_failure_noted(directory: str | os.PathLike[str], error: BaseException) -> bool:
    """Whether a writer already said that ``directory`` cannot be written, for the cause
    of ``error`` (the same errno)."""
    key = _key(directory)
    return key in _WRITE_FAILED and _WRITE_FAILED[key] == getattr(error, "errno", None)
