"""Argument checks shared by every entry point (a leaf: imports only errors).

Each check returns the value it accepted (converted where that is the point) and raises
:class:`~relu_doctor.errors.ReluDoctorError` naming the argument, what was expected and what
came. Also the one definition of "a finite number" every module uses.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from relu_doctor.errors import ReluDoctorError

__all__ = [
    "callable_or_none",
    "finite_or_none",
    "flag",
    "glob_patterns",
    "is_finite_number",
    "is_number",
    "matches",
    "nonnegative",
    "number_in",
    "one_optimizer",
    "optimizers",
    "path",
    "path_or_none",
    "positive_finite",
    "positive_int",
    "unit_dims",
    "watch_options",
]


def is_finite_number(value: object) -> bool:
    """True for an int or float (not a bool) that is neither NaN nor infinite."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def is_number(value: object) -> bool:
    """A real number, numpy's scalars (``np.float32``, ``np.int64``) and one-element numpy
    arrays included, not a bool, finite or not: a value the user's loop passes in (training
    metrics), wider than :func:`is_finite_number`'s arguments."""
    if isinstance(value, np.ndarray):
        return value.size == 1 and value.dtype.kind in "fiu"
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when that is a finite number (tensors and numpy scalars included),
    else None."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def flag(name: str, value: object) -> bool:
    """A True/False argument (no truthy stand-ins)."""
    if not isinstance(value, bool):
        raise ReluDoctorError(f"{name}: expected True or False, got {value!r}.")
    return value


def path(name: str, value: object, *, none: bool = False) -> Any:
    """A path argument (``str`` or ``os.PathLike``); with ``none``, None as well."""
    import os

    if not (isinstance(value, (str, os.PathLike)) or (none and value is None)):
        raise ReluDoctorError(
            f"{name}: expected a path (str or os.PathLike){' or None' if none else ''}, "
            f"got {value!r}."
        )
    if value is not None and os.fspath(value) == "":
        raise ReluDoctorError(
            f"{name}: got an empty path ''; name a directory (for the current one, '.')."
        )
    if value is not None and ("\0" if isinstance(os.fspath(value), str) else b"\0") in (
            os.fspath(value)):
        raise ReluDoctorError(f"{name}: got a path with a NUL character, {value!r}; no file "
                              "system allows one in a name.")
    return value


def path_or_none(name: str, value: object) -> Any:
    """A path argument (``str`` or ``os.PathLike``) or None."""
    return path(name, value, none=True)


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer (>= 1)" if minimum == 1 else f"an integer >= {minimum}"
        raise ReluDoctorError(f"{name}: expected {what}, got {value!r}.")
    return value


def number_in(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = True,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A number in the interval from ``low`` to ``high``; ``low_open``/``high_open`` say
    whether each end is excluded. ``hint`` is added to the message."""
    ok = is_finite_number(value)
    if ok:
        f = float(value)  # type: ignore[arg-type]
        ok = (f > low if low_open else f >= low) and (f < high if high_open else f <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ReluDoctorError(
            f"{name}: expected a number in {lo}{low:g}, {high:g}{hi}{hint}, got {value!r}."
        )
    return float(value)  # type: ignore[arg-type]


def nonnegative(name: str, value: object) -> float:
    """A finite number ``>= 0``."""
    if not is_finite_number(value) or float(value) < 0:  # type: ignore[arg-type]
        raise ReluDoctorError(f"{name}: expected a finite number >= 0, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def positive_finite(name: str, value: object) -> float:
    """A finite number ``> 0``."""
    if not is_finite_number(value) or float(value) <= 0:  # type: ignore[arg-type]
        raise ReluDoctorError(f"{name}: expected a positive finite number, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def glob_patterns(name: str, value: Iterable[str] | str | None) -> list[str]:
    """fnmatch patterns of module paths or site names: a string or a sequence of non-empty
    strings (None: no patterns)."""
    if value is None:
        return []
    if not isinstance(value, (str, Iterable)):
        raise ReluDoctorError(
            f"{name}: expected a glob pattern or a list of them (such as 'layer1.*'), got "
            f"{type(value).__name__} {value!r}."
        )
    out: list[Any] = [value] if isinstance(value, str) else list(value)
    for p in out:
        if not isinstance(p, str) or not p:
            raise ReluDoctorError(
                f"{name}: expected glob patterns (non-empty strings such as 'layer1.*'), "
                f"got {p!r}."
            )
    return out


def unit_dims(name: str, value: object) -> dict[str, int]:
    """A ``{pattern: dim}`` mapping (fnmatch pattern of a module path -> the dim that holds
    the units, negative counting from the end) as a dict; None: no override."""
    if value is None:
        return {}
    form = f"{name}: expected {{pattern: int dim}}, e.g. {{'encoder.*': 1}}"
    if not isinstance(value, Mapping):
        raise ReluDoctorError(f"{form}; got {type(value).__name__} {value!r}.")
    for pat, dim in value.items():
        if not isinstance(pat, str) or isinstance(dim, bool) or not isinstance(dim, int):
            raise ReluDoctorError(f"{form}; got {pat!r}: {dim!r}.")
    return dict(value)


#: The keyword arguments of ``watch`` that a one-pass reader (``scan``, ``check_init``) takes.
SITE_OPTIONS = ("exclude", "functional", "include", "unit_dims")


def watch_options(fn: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` of ``fn`` (a one-pass reader), which may only be :data:`SITE_OPTIONS`."""
    unknown = set(kwargs) - set(SITE_OPTIONS)
    if unknown:
        raise ReluDoctorError(
            f"{fn}() got unexpected arguments {sorted(unknown)}; allowed: {list(SITE_OPTIONS)}."
        )
    return dict(kwargs)


def matches(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Whether ``name`` is selected: it matches an ``include`` pattern (or there are none)
    and no ``exclude`` pattern."""
    inc = list(include)
    if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def callable_or_none(name: str, value: object) -> Any:
    """A function argument, or None."""
    if value is not None and not callable(value):
        raise ReluDoctorError(f"{name}: expected a function or None, got {value!r}.")
    return value


def name_or_function(name: str, value: object) -> Any:
    """A keyword argument's name (a non-empty str), a function, or None."""
    if value is not None and not callable(value) and not (isinstance(value, str) and value):
        raise ReluDoctorError(
            f"{name}: expected the name of a keyword argument of the model's forward (such as "
            f"'attention_mask'), a function of (args, kwargs), or None, got {value!r}.")
    return value


def optimizers(name: str, value: Any) -> list[Any]:
    """None, one ``torch.optim.Optimizer`` or a list/tuple of them, as a list; a wrapper
    holding one (accelerate's ``AcceleratedOptimizer``) gives the optimizer it holds
    (:func:`unwrapped_optimizer`)."""
    import torch  # local: this module is a leaf that the CLI may import without torch

    if value is None:
        return []
    opts = [unwrapped_optimizer(o) for o in (list(value) if isinstance(value, (list, tuple))
                                             else [value])]
    for i, o in enumerate(opts):
        if not isinstance(o, torch.optim.Optimizer):
            raise ReluDoctorError(
                f"{name}: expected torch.optim.Optimizer instances, got {type(o).__name__} "
                f"at position {i}."
            )
    return opts


def unwrapped_optimizer(o: Any) -> Any:
    """The torch optimizer that a wrapper of one holds (accelerate's ``AcceleratedOptimizer``
    at ``.optimizer``, Opacus's ``DPOptimizer`` at ``.original_optimizer``; one at
    ``._optimizer`` too), or ``o`` itself: an optimizer with step
    hooks of its own. accelerate's wrapper is an ``Optimizer`` that never ran its
    ``__init__``, so it has no hooks to register (``register_step_pre_hook`` raised), and its
    ``step`` calls the one it holds, whose hooks then run, at the steps that update (none at
    a step that only accumulates gradients, nor at one a loss scaler skips). Lightning
    Fabric's ``_FabricOptimizer`` is an ``Optimizer`` sharing the dict of the one it holds: a
    hook registered on it lands in that one's hooks and runs with that one, so that one is
    the optimizer (keyed by the wrapper, each layer's gradient norm was never divided by its
    steps, read the root of the window's steps too large, and the learning rate logged was
    the scheduler's next: a trial)."""
    import torch

    for _ in range(4):  # (a wrapper of a wrapper)
        inner = next((x for a in ("optimizer", "_optimizer", "original_optimizer")
                      if isinstance(x := getattr(o, a, None), torch.optim.Optimizer)), None)
        hooks = getattr(o, "_optimizer_step_pre_hooks", None)
        if isinstance(o, torch.optim.Optimizer) and hooks is not None and (
                inner is None or getattr(inner, "_optimizer_step_pre_hooks", None) is not hooks):
            return o
        if inner is None or inner is o:
            return o
        o = inner
    return o


def one_optimizer(name: str, value: object) -> Any:
    """Exactly one ``torch.optim.Optimizer`` (the one a wrapper holds: see
    :func:`optimizers`)."""
    if value is None or isinstance(value, (list, tuple)):
        raise ReluDoctorError(
            f"{name}: expected a torch.optim.Optimizer, got {type(value).__name__}."
        )
    return optimizers(name, value)[0]
