"""Fused statistics kernels: one pass per hook call that adds every field to a site's window.

:mod:`relu_doctor.stats` owns what the fields mean and the eager reference path; this package
holds compiled paths that compute the same fields in one read of the activation, and picks
one by the tensor's device. On the CPU that is a small C kernel (``fused_stats.c``) compiled
at first use and called through its CPython front, or ctypes where the Python headers are
missing (:mod:`relu_doctor._kernels.cpu`). On CUDA it is a
Triton kernel (:mod:`relu_doctor._kernels.triton_stats`), imported at the first CUDA tensor
only, so CPU users never import triton. Where a path is unavailable (no C compiler, triton
not installed, a build or launch fails) the eager path runs instead and one warning says
why. ``RELU_DOCTOR_FUSED=0`` turns both off.

``RELU_DOCTOR_TRITON_INTERPRET=1`` (read at import) sends CPU tensors to the Triton path as
well; with ``TRITON_INTERPRET=1`` set before triton is imported, Triton's interpreter runs
it. That is for testing the CUDA kernel without a GPU, never for training (it is slow).
"""

from __future__ import annotations

import os
import threading
import warnings
from types import ModuleType
from typing import Any

import torch

from relu_doctor._kernels import cpu
from relu_doctor._kernels.cpu import Prepared, available, disabled, sum_squares_into

__all__ = ["LARGEST_SCALE", "Prepared", "available", "disabled", "forward_into", "grad_into",
           "prepare_forward", "prepare_grad", "sum_squares_into", "tamed"]

#: The largest part of a loss scale left in a gradient whose squares are summed in float32.
#: A GradScaler's scale only grows where no step overflows (bfloat16 or float32 under a
#: scaler: twice every 2000 steps), and a gradient of 1e-3 times 2**70 has squares whose
#: sum overflowed float32: read as non-finite, its RMS wrong. Every path divides the rest
#: of the scale out of the values before squaring them (exact: loss scales are powers of
#: two). Kept up to 2**32, a scale still lifts fp16's smallest gradients far from float32's
#: smallest squares, and only an exploding gradient (past about 1e9) overflows.
LARGEST_SCALE = 2.0**32


def tamed(
    grad: torch.Tensor, inv_scale: torch.Tensor | float | None
) -> tuple[torch.Tensor, torch.Tensor | float | None]:
    """``grad`` and ``inv_scale`` (1 / the loss scale) with the part of the scale past
    :data:`LARGEST_SCALE` divided out of ``grad``: the squares of the returned gradient
    times the returned ``inv_scale`` squared are those of the unscaled gradient. The
    division is done in float32 at least (a float16 or bfloat16 gradient is not rounded
    again). A scale read on the host decides there, dividing only past the limit; one in a
    device tensor is divided on the device at every call (no sync: the Triton kernel does
    it inside instead, and this is the eager path's)."""
    if inv_scale is None:
        return grad, None
    wide = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    host = cpu.host_scalar(inv_scale)
    if host is not None:
        if host * LARGEST_SCALE >= 1.0:
            return grad, inv_scale
        return wide * (host * LARGEST_SCALE), 1.0 / LARGEST_SCALE
    assert isinstance(inv_scale, torch.Tensor)
    part = (inv_scale.to(wide.dtype) * LARGEST_SCALE).clamp(
        min=torch.finfo(torch.float32).tiny, max=1.0)  # (an inverse scale of 0 reads 0)
    return wide * part, inv_scale / part

_TRITON_ON_CPU = os.environ.get("RELU_DOCTOR_TRITON_INTERPRET") == "1"

_triton: ModuleType | None = None
_triton_state = "unloaded"  # unloaded | ready | failed
_lock = threading.Lock()


def _triton_failed(cause: str) -> None:
    """Turn the Triton path off for this process, with one warning naming ``cause``."""
    global _triton, _triton_state
    _triton, _triton_state = None, "failed"
    warnings.warn(
        f"relu_doctor: the fused CUDA statistics kernel is unavailable ({cause}); statistics "
        "are computed by the eager path (slower, same numbers).",
        stacklevel=4,
    )


def _load_triton() -> ModuleType | None:
    global _triton, _triton_state
    with _lock:
        if _triton_state == "unloaded":
            if os.environ.get("RELU_DOCTOR_FUSED", "1") == "0":
                _triton_state = "failed"
                return None
            try:
                from relu_doctor._kernels import triton_stats
            except Exception as e:  # triton missing or broken: use the eager path
                _triton_failed(f"triton could not be imported: {e}")
                return None
            _triton, _triton_state = triton_stats, "ready"
    return _triton


def _via_triton(x: torch.Tensor, name: str, *args: Any, **kwargs: Any) -> bool:
    """Call ``triton_stats.<name>`` for tensor ``x`` (CUDA, or CPU under the switch); False
    where the Triton path is off or unavailable, or fails (then it is off for good)."""
    if cpu._off or x.device.type not in ("cuda", "cpu"):  # disabled(), or MPS, XLA, meta...
        return False
    ts = _triton if _triton_state == "ready" else _load_triton()
    if ts is None:
        return False
    try:
        return bool(getattr(ts, name)(*args, **kwargs))
    except Exception as e:  # a compile or launch failure: step aside, never break training
        _triton_failed(f"{type(e).__name__}: {e}")
        return False


def forward_into(
    window: torch.Tensor,
    out: torch.Tensor,
    unit_dim: int,
    *,
    cap: float | None,
    nonnegative: bool = False,
) -> bool:
    """:func:`relu_doctor._kernels.cpu.forward_into` for a CPU tensor, the Triton kernel for
    a CUDA one (same arguments; the Triton kernel sums ``|h|`` whatever ``nonnegative``
    says); False (nothing done) where neither applies, and then the caller runs the eager
    path."""
    if out.is_cpu and not _TRITON_ON_CPU:
        return cpu.forward_into(window, out, unit_dim, cap=cap, nonnegative=nonnegative)
    return _via_triton(out, "forward_into", window, out.detach(), unit_dim, cap=cap)


def grad_into(
    window: torch.Tensor,
    grad_out: torch.Tensor,
    grad_in: torch.Tensor | None,
    unit_dim: int,
    inv_scale: torch.Tensor | float | None,
    row0: int,
) -> bool:
    """:func:`relu_doctor._kernels.cpu.grad_into` for a CPU gradient, the Triton kernel for
    a CUDA one (same arguments); False (nothing done) where neither applies."""
    if grad_out.is_cpu and not _TRITON_ON_CPU:
        host = cpu.host_scalar(inv_scale)  # (read once: a number from here on)
        if host is None and inv_scale is not None:
            return False  # (a scale on another device: the eager path)
        grad_out, inv = tamed(grad_out, host)
        return cpu.grad_into(window, grad_out, grad_in, unit_dim, inv, row0)
    return _via_triton(grad_out, "grad_into", window, grad_out, grad_in, unit_dim, inv_scale, row0)


def prepare_forward(
    window: torch.Tensor, out: torch.Tensor, unit_dim: int, *, cap: float | None,
    nonnegative: bool = False,
) -> Prepared | None:
    """:func:`relu_doctor._kernels.cpu.prepare_forward` for a CPU tensor; None for the
    others (their calls take :func:`forward_into`)."""
    if out.is_cpu and not _TRITON_ON_CPU:
        return cpu.prepare_forward(window, out, unit_dim, cap=cap, nonnegative=nonnegative)
    return None


def prepare_grad(
    window: torch.Tensor, grad_out: torch.Tensor, grad_in: torch.Tensor | None, unit_dim: int,
    row0: int,
) -> Prepared | None:
    """:func:`relu_doctor._kernels.cpu.prepare_grad` for a CPU gradient; None for the
    others (their calls take :func:`grad_into`)."""
    if grad_out.is_cpu and not _TRITON_ON_CPU:
        return cpu.prepare_grad(window, grad_out, grad_in, unit_dim, row0)
    return None
