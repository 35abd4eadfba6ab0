"""The CUDA fused-statistics kernel, in Triton: one launch per hook call adds every field.

The same fields with the same meaning as the eager reference path (:func:`relu_doctor.stats.
forward_rows`, :func:`relu_doctor.stats.grad_rows`) and the CPU C kernel: per unit the
element count, active (h > 0) and saturated (h >= cap) counts, sum, sum |h| and sum of
squares of the forward output; the sum of squares of dL/d(output) (times 1 / scale**2) and
the exactly-zero entries of dL/d(input). A unit whose sum |h| (gradient: sum of squares) is
not finite adds only its ``nonfinite`` (``grad_nonfinite``) = 1.

The tensor is read as ``(A, U, B)`` with the units in the middle (contiguous, or units-last
such as channels-last; other layouts are copied first, as on the CPU). One program owns
``BLOCK_U`` units and a run of rows ``a``; it sums a ``(BLOCK_A, BLOCK_U, BLOCK_B)`` tile per
step into float32 lanes (int32 lanes for counts, so counts are exact), then reduces the lanes
in float64 (int64). Where the units alone give too few programs to fill the GPU, the rows
are split: each split writes its partial sums to a small float64 buffer and a second launch
adds them in split order (deterministic) into the window. float32, float16 and bfloat16 are
read (as float32); float64 and anything else are left to the eager path.

Nothing here reads a value back to the host (the AMP scale is read on the device), so a hook
call never synchronises. This module imports triton: :mod:`relu_doctor._kernels` imports it
only for a CUDA tensor, or for a CPU tensor under ``RELU_DOCTOR_TRITON_INTERPRET=1``. Where
``TRITON_INTERPRET=1`` was set before triton was imported, the Triton interpreter runs the
kernel, on CPU tensors too: that is how the tests check it without a GPU (it is far too slow
for training).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import triton
import triton.language as tl

from relu_doctor._kernels import LARGEST_SCALE
from relu_doctor._kernels.cpu import _layout, host_scalar

__all__ = ["forward_into", "grad_into"]

_INF = tl.constexpr(float("inf"))
_LARGEST = tl.constexpr(LARGEST_SCALE)
_NP = 5  # partial sums per unit and split: two counts, three float sums
_TILE = 1024  # elements of one tile (BLOCK_A * BLOCK_U * BLOCK_B)
_ROW = 128  # contiguous elements a tile reads along units x positions
_MIN_WORK = 1 << 15  # elements one program should read at least before rows are split
_WAVES = 4  # programs per streaming multiprocessor to aim for
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _as_float32(v):  # type: ignore[no-untyped-def]
    """``v`` as float32, exactly: bfloat16 by moving its bits, as the C kernel does (one
    shift on the GPU; the interpreter's own conversion gets bfloat16 subnormals wrong)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


def _stats_kernel(  # type: ignore[no-untyped-def]
    x_ptr, gi_ptr, win_ptr, part_ptr, scale_ptr,
    A, U, B, a_per_split, split, per_unit, row0, cap, inv_scale,
    GRAD: tl.constexpr, HAS_CAP: tl.constexpr, HAS_GI: tl.constexpr,
    SCALE_PTR: tl.constexpr, READ_PARTS: tl.constexpr, WRITE_PARTS: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Program (i, s): units ``i * BLOCK_U ..`` over rows ``s * a_per_split ..`` of the
    ``(A, U, B)`` tensor at ``x_ptr``.

    Sums per unit: forward ``c1`` active, ``c2`` saturated, ``f1`` sum, ``f2`` sum |h|,
    ``f3`` sum of squares; gradient ``f3`` sum of squares of dL/d(output), ``c2`` zero
    entries of dL/d(input). ``WRITE_PARTS``: store them as split ``s`` of ``part_ptr``
    (``(split, 5, U)`` float64); ``READ_PARTS``: read them from there instead of the
    tensor; neither or ``READ_PARTS``: add the fields to rows ``row0..`` of the window.
    """
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    mu = u < U
    if GRAD:
        if SCALE_PTR:  # noqa: SIM108 - a compile-time branch (Triton)
            inv = tl.load(scale_ptr).to(tl.float64)
        else:
            inv = inv_scale
        # the part of the scale past LARGEST_SCALE, divided out of each value before it
        # is squared (see relu_doctor._kernels.LARGEST_SCALE); the rest at the end
        part = tl.minimum(inv * _LARGEST, 1.0)
        rest = inv / part
        part32 = part.to(tl.float32)
    if READ_PARTS:
        c1 = tl.zeros([BLOCK_U], tl.float64)
        c2 = tl.zeros([BLOCK_U], tl.float64)
        f1 = tl.zeros([BLOCK_U], tl.float64)
        f2 = tl.zeros([BLOCK_U], tl.float64)
        f3 = tl.zeros([BLOCK_U], tl.float64)
        for k in range(0, split):  # in split order: the same result on every run
            p = part_ptr + k * 5 * U + u
            c1 += tl.load(p, mask=mu, other=0.0)
            c2 += tl.load(p + U, mask=mu, other=0.0)
            f1 += tl.load(p + 2 * U, mask=mu, other=0.0)
            f2 += tl.load(p + 3 * U, mask=mu, other=0.0)
            f3 += tl.load(p + 4 * U, mask=mu, other=0.0)
    else:
        u3 = u[None, :, None]
        ia = tl.arange(0, BLOCK_A)[:, None, None]
        ib = tl.arange(0, BLOCK_B)[None, None, :]
        a_first = tl.program_id(1) * a_per_split
        n1 = tl.zeros([BLOCK_A, BLOCK_U, BLOCK_B], tl.int32)
        n2 = tl.zeros([BLOCK_A, BLOCK_U, BLOCK_B], tl.int32)
        s1 = tl.zeros([BLOCK_A, BLOCK_U, BLOCK_B], tl.float32)
        s2 = tl.zeros([BLOCK_A, BLOCK_U, BLOCK_B], tl.float32)
        s3 = tl.zeros([BLOCK_A, BLOCK_U, BLOCK_B], tl.float32)
        for a0 in range(0, a_per_split, BLOCK_A):
            a = a_first + a0 + ia
            rows = (a.to(tl.int64) * U + u3) * B
            ma = (a < A) & (u3 < U)
            for b0 in range(0, B, BLOCK_B):
                b = b0 + ib
                m = ma & (b < B)
                v = _as_float32(tl.load(x_ptr + rows + b, mask=m, other=0.0))
                if GRAD:
                    v = v * part32
                s3 += v * v
                if GRAD:
                    if HAS_GI:
                        w = _as_float32(tl.load(gi_ptr + rows + b, mask=m, other=1.0))
                        n2 += (w == 0).to(tl.int32)
                else:
                    n1 += (v > 0).to(tl.int32)
                    if HAS_CAP:
                        n2 += ((v >= cap) & m).to(tl.int32)
                    s1 += v
                    s2 += tl.abs(v)
        c1 = tl.sum(tl.sum(n1.to(tl.int64), axis=2), axis=0).to(tl.float64)
        c2 = tl.sum(tl.sum(n2.to(tl.int64), axis=2), axis=0).to(tl.float64)
        f1 = tl.sum(tl.sum(s1.to(tl.float64), axis=2), axis=0)
        f2 = tl.sum(tl.sum(s2.to(tl.float64), axis=2), axis=0)
        f3 = tl.sum(tl.sum(s3.to(tl.float64), axis=2), axis=0)
    if WRITE_PARTS:
        p = part_ptr + tl.program_id(1) * 5 * U + u
        tl.store(p, c1, mask=mu)
        tl.store(p + U, c2, mask=mu)
        tl.store(p + 2 * U, f1, mask=mu)
        tl.store(p + 3 * U, f2, mask=mu)
        tl.store(p + 4 * U, f3, mask=mu)
    else:
        w = win_ptr + row0 * U + u
        n = tl.zeros([BLOCK_U], tl.float64) + per_unit
        if GRAD:
            finite = tl.abs(f3) < _INF  # False for NaN and Inf
            ok = finite & mu
            tl.store(w, tl.load(w, mask=ok) + n, mask=ok)
            tl.store(w + U, tl.load(w + U, mask=ok) + f3 * (rest * rest), mask=ok)
            if HAS_GI:
                tl.store(w + 2 * U, tl.load(w + 2 * U, mask=ok) + n, mask=ok)
                tl.store(w + 3 * U, tl.load(w + 3 * U, mask=ok) + c2, mask=ok)
            bad = (~finite) & mu
            tl.store(w + 4 * U, tl.load(w + 4 * U, mask=bad) + 1.0, mask=bad)
        else:
            finite = tl.abs(f2) < _INF  # as the eager path: finite where sum |h| is
            ok = finite & mu
            tl.store(w, tl.load(w, mask=ok) + n, mask=ok)
            tl.store(w + U, tl.load(w + U, mask=ok) + c1, mask=ok)
            tl.store(w + 2 * U, tl.load(w + 2 * U, mask=ok) + f1, mask=ok)
            tl.store(w + 3 * U, tl.load(w + 3 * U, mask=ok) + f2, mask=ok)
            tl.store(w + 4 * U, tl.load(w + 4 * U, mask=ok) + f3, mask=ok)
            if HAS_CAP:
                tl.store(w + 5 * U, tl.load(w + 5 * U, mask=ok) + c2, mask=ok)
            bad = (~finite) & mu
            tl.store(w + 6 * U, tl.load(w + 6 * U, mask=bad) + 1.0, mask=bad)


# Arguments whose value changes with the batch: not specialised on, so that a new batch size
# does not compile a new kernel.
_NO_SPECIALIZE = ["A", "a_per_split", "split", "per_unit"]


_KERNEL: Any = triton.jit(_stats_kernel, do_not_specialize=_NO_SPECIALIZE)
# Under TRITON_INTERPRET=1 (set before triton is imported) triton.jit gives the interpreter,
# which runs on CPU tensors too; compiled kernels take CUDA tensors only.
_INTERPRETED = not isinstance(_KERNEL, triton.runtime.jit.JITFunction)


@functools.cache
def _programs(device: torch.device) -> int:
    """How many programs fill ``device``: a few per streaming multiprocessor."""
    if device.type != "cuda":
        return 4  # the interpreter runs programs one by one: split only a little
    return _WAVES * torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _usable(x: torch.Tensor, window: torch.Tensor) -> bool:
    return (
        type(x) is torch.Tensor
        and (x.device.type == "cuda" or _INTERPRETED)
        and x.dtype in _DTYPES
        and x.device == window.device
        and x.numel() > 0
        and not torch.compiler.is_compiling()
    )


def _launch(
    window: torch.Tensor,
    x: torch.Tensor,
    gi: torch.Tensor | None,
    dims: tuple[int, int, int],
    row0: int,
    *,
    grad: bool,
    cap: float | None = None,
    scale: torch.Tensor | float = 1.0,
    split: int | None = None,
) -> None:
    """Add the fields of the ``(A, U, B)`` tensor ``x`` (and ``gi``) to ``window``.

    ``split`` forces the number of row splits (tests); by default it follows the device.
    """
    A, U, B = dims
    block_b = min(_pow2(B), _TILE)
    block_u = min(_pow2(U), max(1, _ROW // block_b))
    block_a = max(1, _TILE // (block_b * block_u))
    units = triton.cdiv(U, block_u)
    a_blocks = triton.cdiv(A, block_a)
    if split is None:
        work = A * block_u * B  # elements one unit program reads
        split = min(triton.cdiv(_programs(x.device), units), a_blocks, max(1, work // _MIN_WORK))
    a_per_split = triton.cdiv(a_blocks, max(1, min(split, a_blocks))) * block_a
    split = triton.cdiv(A, a_per_split)
    scale_ptr = scale if isinstance(scale, torch.Tensor) else window
    inv = 1.0 if isinstance(scale, torch.Tensor) else float(scale)
    args = (x, x if gi is None else gi, window, window, scale_ptr, A, U, B, a_per_split, split,
            A * B, row0, 0.0 if cap is None else float(cap), inv)
    flags = {"GRAD": grad, "HAS_CAP": cap is not None, "HAS_GI": gi is not None,
             "SCALE_PTR": isinstance(scale, torch.Tensor),
             "BLOCK_A": block_a, "BLOCK_U": block_u, "BLOCK_B": block_b}
    if split == 1:
        _KERNEL[(units, 1)](*args, READ_PARTS=False, WRITE_PARTS=False, **flags)
        return
    part = torch.empty(split, _NP, U, dtype=torch.float64, device=x.device)
    args = (*args[:3], part, *args[4:])
    _KERNEL[(units, split)](*args, READ_PARTS=False, WRITE_PARTS=True, **flags)
    _KERNEL[(units, 1)](*args, READ_PARTS=True, WRITE_PARTS=False, **flags)


def _on_device(x: torch.Tensor) -> Any:
    """Launch on ``x``'s GPU even where another one is current (a no-op elsewhere)."""
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def forward_into(
    window: torch.Tensor,
    out: torch.Tensor,
    unit_dim: int,
    *,
    cap: float | None,
    split: int | None = None,
) -> bool:
    """Add the forward fields of ``out`` to rows 0-6 of ``window`` (same device), in place.

    Returns False (nothing done) where this path does not apply; then the caller runs the
    eager path. ``split`` forces the number of row splits (tests).
    """
    if not _usable(out, window):
        return False
    t, a, u, b = _layout(out, unit_dim)
    with _on_device(t):
        _launch(window, t, None, (a, u, b), 0, grad=False, cap=cap, split=split)
    return True


def _scale_on(device: torch.device, inv_scale: torch.Tensor | float | None) -> Any:
    """``inv_scale`` as the kernel takes it: a float, or a one-element float tensor on
    ``device`` (read by the kernel: no sync); None where it is neither (use the eager path)."""
    if inv_scale is None:
        return 1.0
    if not isinstance(inv_scale, torch.Tensor):
        return float(inv_scale)
    if inv_scale.numel() != 1 or not inv_scale.is_floating_point():
        return None
    if inv_scale.device == device:
        return inv_scale
    return host_scalar(inv_scale)  # a CPU scalar, read without an op; None otherwise


def grad_into(
    window: torch.Tensor,
    grad_out: torch.Tensor,
    grad_in: torch.Tensor | None,
    unit_dim: int,
    inv_scale: torch.Tensor | float | None,
    row0: int,
    *,
    split: int | None = None,
) -> bool:
    """Add the gradient fields to rows ``row0``.. ``row0 + 4`` of ``window``, in place.

    ``grad_in`` is dL/d(input) or None; ``inv_scale`` is 1 / the AMP loss scale: a float, a
    one-element tensor on the gradient's device (read there: no sync) or on the CPU. Returns
    False where this path does not apply.
    """
    scale = _scale_on(grad_out.device, inv_scale)
    if scale is None or not _usable(grad_out, window):
        return False
    g, a, u, b = _layout(grad_out, unit_dim)
    gi = None
    if grad_in is not None:
        if not _usable(grad_in, window):
            return False
        gi, *dims = _layout(grad_in, unit_dim)
        if dims != [a, u, b]:  # laid out differently: read both as contiguous
            g, a, u, b = _layout(grad_out.contiguous(), unit_dim)
            gi = grad_in.contiguous()
    with _on_device(g):
        _launch(window, g, gi, (a, u, b), row0, grad=True, scale=scale, split=split)
    return True
