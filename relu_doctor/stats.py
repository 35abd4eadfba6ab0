"""On-device accumulators: per-unit counts and sums, windows, cross-process reduction.

Pure tensor maths; imports nothing else of relu_doctor but the fused kernels
(:mod:`relu_doctor._kernels`). Accumulation only: what the sums
mean is :mod:`relu_doctor.metrics`' business. The rule (torchmetrics-style) is to store sums
and counts only and to derive rates and means at read time, so that windows add
up, checkpoints resume exactly, and sums across processes equal one process seeing all data.

A site's state is one float64 matrix of shape ``(len(FIELDS), units)``: one row per field.
float64 counts are exact up to 2**53. Per step, a hook reduces the activation to a small
float32 matrix of per-unit rows (:func:`forward_rows`, :func:`grad_rows`: the eager reference
path) and adds it to the window in one in-place op; on the CPU (C) and on CUDA (Triton) one
fused kernel does both in a single read of the activation (:meth:`SiteStats.record_forward`,
:meth:`SiteStats.record_grad`), with the eager path as the fallback. Nothing is read back to the host until logging time.

Fields:

=================  ====================================================================
``elements``       elements seen per unit (positions x samples), finite steps only
``active``         elements with output > 0
``sum``            sum of h
``sum_abs``        sum of |h|
``sum_sq``         sum of h**2
``saturated``      elements at the family's upper cap (0 for members without a cap)
``nonfinite``      steps in which this unit's output held a NaN or Inf (those steps are
                   left out of every other forward field)
``grad_elements``  elements of dL/d(output) seen per unit, finite steps only
``grad_sq``        sum of (dL/d(output))**2, unscaled when an AMP scale is given
``grad_in_elements`` elements of dL/d(input) seen (0 where the input needs no gradient)
``grad_zero``      exactly-zero entries of dL/d(input)
``grad_nonfinite`` steps in which this unit's gradient held a NaN or Inf
=================  ====================================================================
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from relu_doctor import _kernels, sampling

__all__ = [
    "FIELDS",
    "FORWARD_FIELDS",
    "GRAD_FIELDS",
    "AgreedSum",
    "SiteStats",
    "cap_in",
    "forward_rows",
    "grad_rows",
    "group_size",
    "mask_for",
    "masked_forward_rows",
    "masked_grad_rows",
    "read_back",
    "reduce_sum",
    "resolve_unit_dim",
    "unit_view",
]

FORWARD_FIELDS: tuple[str, ...] = (
    "elements",
    "active",
    "sum",
    "sum_abs",
    "sum_sq",
    "saturated",
    "nonfinite",
)
GRAD_FIELDS: tuple[str, ...] = (
    "grad_elements",
    "grad_sq",
    "grad_in_elements",
    "grad_zero",
    "grad_nonfinite",
)
FIELDS: tuple[str, ...] = FORWARD_FIELDS + GRAD_FIELDS
ROW: dict[str, int] = {name: i for i, name in enumerate(FIELDS)}
_N_FWD = len(FORWARD_FIELDS)
_FIRST_ROWS = [ROW["elements"], ROW["active"]]  # a site's first reading (SiteStats.first)

_EXACT_F32 = 2**24  # float32 holds every integer up to this exactly


def resolve_unit_dim(shape: Sequence[int], override: int | None = None) -> tuple[int, str]:
    """Which dim of an activation of ``shape`` holds the units by its shape alone (the
    fallback where no producing layer is known; see :mod:`relu_doctor.provenance`), and the
    rule that chose it.

    The shape rule (README, Definitions): dim 1 of a conv-style ``(N, C, ...)`` output (4-D and up),
    the last dim of a 3-D ``(N, L, F)`` sequence output, the only feature dim of ``(N, F)``,
    dim 0 of an unbatched ``(F,)`` vector. It cannot tell a Conv1d's ``(N, C, L)`` from a
    Linear's ``(N, L, F)``, nor a channels-last ``(N, H, W, C)`` from ``(N, C, H, W)``: the
    producing layer decides those.

    Args:
        shape: the activation's shape.
        override: a dim chosen by the user (negative counts from the end).

    Returns:
        ``(dim, rule)`` with ``dim`` non-negative and ``rule`` a short description.
    """
    nd = len(shape)
    if nd == 0:
        raise ValueError("a 0-dim activation has no unit dimension")
    if override is not None:
        if not -nd <= override < nd:
            raise ValueError(
                f"unit dim {override} is out of range for an activation of shape {tuple(shape)}"
            )
        return override % nd, f"unit_dims override -> dim {override % nd}"
    if nd == 1:
        return 0, "shape rule (F,) -> dim 0"
    if nd == 2:
        return 1, "shape rule (N, F) -> dim 1"
    if nd == 3:
        return 2, "shape rule (N, L, F) -> last dim"
    return 1, "shape rule (N, C, ...) -> dim 1"


def unit_view(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """View ``x`` as ``(A, U)`` (units last) or ``(A, U, B)`` so per-unit sums are cheap.

    Reductions then run over contiguous memory: dim -1 first (positions), then dim 0.
    """
    shape = x.shape
    units = shape[unit_dim]
    if unit_dim == x.dim() - 1:
        return x.reshape(-1, units)
    before = math.prod(shape[:unit_dim])
    after = math.prod(shape[unit_dim + 1 :])
    return x.reshape(before, units, after)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- hot path
# Measured (benchmarks/overhead.py, CPU): a statistic costs the passes it makes over the
# activation plus ~5-25 us per op dispatched. So each statistic is one pass, counts use the
# packed count below, and the rows are assembled in a handful of ops.

# Below this many elements a tensor sits in cache and op count dominates: count with
# sign().sum() (2 ops) rather than the packed count (~7 ops).
_PACKED_MIN = 1 << 17
_LANE_MAX = 255  # a byte lane of an int64 sum holds a count up to 255 without carry


def _lane_chunk(words: int) -> int:
    """The largest divisor of ``words`` that is at most ``_LANE_MAX`` (0: too little packing)."""
    if words <= _LANE_MAX:
        return words
    for c in range(_LANE_MAX, 15, -1):
        if words % c == 0:
            return c
    return 0


def _packed_count(b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Exact per-unit count of True in a bool unit view ``(A, U)`` or ``(A, U, B)``, as
    ``dtype``, or None where the packing does not apply (then count another way).

    The bool bytes are read as int64 words, 8 elements per word, and words are summed; each
    byte lane of the sum counts its own element position exactly while it stays <= 255, so
    at most 255 words go into one sum. Then the byte lanes are summed per unit. One pass over
    1 byte per element, where ``(x > 0).sum()`` runs a slow bool-to-int64 reduction and
    ``x.sign().sum()`` writes and reads a float per element (about 2x slower on CPU).
    """
    if not b.is_contiguous() or b.numel() == 0:
        return None
    A, U = b.shape[0], b.shape[1]
    row = b.numel() // A
    if b.dim() == 2 or (A >= 32 and row % 8 == 0):
        # Sum words down the rows (a vectorised outer-dim reduction), 255 rows at a time.
        if row % 8:
            return None
        w = b.view(A, row).view(torch.int64)
        chunk = _lane_chunk(A)
        if chunk:  # A = k * chunk rows: one op
            s = w.view(A // chunk, chunk, -1).sum(1)
        else:
            q = A // _LANE_MAX
            s = torch.cat(
                [
                    w[: q * _LANE_MAX].view(q, _LANE_MAX, -1).sum(1),
                    w[q * _LANE_MAX :].sum(0, keepdim=True),
                ]
            )
    else:
        # Few rows: sum words along each unit's positions, up to 255 words at a time.
        B = b.shape[2]
        chunk = _lane_chunk(B // 8) if B % 8 == 0 else 0
        if not chunk:
            return None
        s = b.view(torch.int64).view(A, U, -1, chunk).sum(-1)
    lanes = s.view(torch.uint8).view(-1, U, s.numel() * 8 // (s.shape[0] * U))
    return lanes.sum((0, 2), dtype=dtype)


def _count(
    v: torch.Tensor, mask: Callable[[], torch.Tensor], fallback: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Exact per-unit count of ``mask()`` over unit view ``v``: the packed count on a large
    view, else ``fallback()`` (the same as 0/1 floats) summed per unit."""
    if v.numel() >= _PACKED_MIN:
        dtype = torch.float32 if v.numel() // max(v.shape[1], 1) < _EXACT_F32 else torch.float64
        c = _packed_count(mask(), dtype)
        if c is not None:
            return c
    return _unit_sum(v, fallback())


# Positions per unit from which reducing along them (dim -1, contiguous) beats reducing down
# the rows; below it (4x4, 8x8 maps) the inner reduction runs over rows too short to vectorise.
_INNER_MIN = 64


def _unit_sum(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-unit sum of ``x`` (a float tensor shaped like unit view ``v``), float64 where the
    float32 sum could round a count."""
    if v.dim() == 3 and v.shape[2] >= _INNER_MIN:
        inner = x.dtype if v.shape[2] < _EXACT_F32 else torch.float64
        return x.sum(-1, dtype=inner).sum(0, dtype=torch.float64)
    # Down the rows first: a vectorised outer-dim reduction over A, then the B positions.
    A = v.shape[0]
    x = x.reshape(A, x.numel() // A if A else math.prod(x.shape[1:]))
    if v.dim() == 3:
        return x.sum(0).view(v.shape[1], v.shape[2]).sum(-1, dtype=torch.float64)
    # (A, U): the unit's elements are its A rows; float32 holds exact counts below 2**24.
    return x.sum(0, dtype=x.dtype if A < _EXACT_F32 else torch.float64)


def _sum_sq(v: torch.Tensor) -> torch.Tensor:
    """Per-unit sum of squares of float unit view ``v`` (dtype as :func:`_unit_sum`)."""
    if v.dim() == 3 and v.shape[2] >= _INNER_MIN:
        # vector_norm along contiguous positions is one fused pass (no squared temporary).
        n: torch.Tensor = torch.linalg.vector_norm(v, 2, dim=-1)
        return (n * n).sum(0, dtype=torch.float64)
    # vector_norm down the rows takes a strided slow path (25x a sum): square, then sum.
    return _unit_sum(v, v * v)


def _rows_view(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A unit view as ``(A, U * B)`` in ``dtype``: rows first, for an outer-dim reduction."""
    if v.dtype != dtype:
        v = v.to(dtype)
    return v.reshape(v.shape[0], math.prod(v.shape[1:]))


def _stacked_sum(cols: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """Per-unit sums of same-shape ``(A, U * B)`` columns of unit view ``v``, as ``(k, U)``.

    Rows first (a vectorised outer-dim reduction; counts stay exact: A < 2**24 rows of 0/1),
    then the B positions of each unit in float64. A short last dim (4x4 maps) reduced
    first is several times slower on CPU.
    """
    x = torch.stack(cols)
    A = x.shape[1]
    x = x.sum(1, dtype=x.dtype if A < _EXACT_F32 else torch.float64)
    if v.dim() == 3:
        return x.view(len(cols), v.shape[1], v.shape[2]).sum(-1, dtype=torch.float64)
    return x.to(torch.float64)


_BAD_COLUMNS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _bad_column(n: int, like: torch.Tensor) -> torch.Tensor:
    """``(n, 1)``: zeros, then 1 in the last row (the rows of a unit whose step was not finite)."""
    if torch.compiler.is_compiling():  # no module-level cache inside a traced graph
        return (torch.arange(n, device=like.device) == n - 1).to(like.dtype).unsqueeze(1)
    key = (n, like.dtype, like.device)
    col = _BAD_COLUMNS.get(key)
    if col is None:
        col = torch.zeros(n, 1, dtype=like.dtype, device=like.device)
        col[-1] = 1.0
        _BAD_COLUMNS[key] = col
    return col


def _finish(rows: list[torch.Tensor], finite: torch.Tensor) -> torch.Tensor:
    """Stack ``rows`` (each ``(k, U)``) and a last ``nonfinite`` row, keeping only finite units.

    A unit whose ``finite`` is False gets every row 0 and ``nonfinite`` 1; a finite unit keeps
    its rows (an Inf from an overflowing sum of squares included) and ``nonfinite`` 0. One
    ``cat`` and one ``where``: this runs once per hook call, where op count is the cost.
    """
    body = torch.cat([*rows, finite.new_zeros(1, finite.shape[0], dtype=rows[1].dtype)])
    return torch.where(finite, body, _bad_column(body.shape[0], body))


def forward_rows(
    out: torch.Tensor,
    unit_dim: int,
    *,
    nonnegative: bool,
    cap: float | None,
) -> torch.Tensor:
    """Per-unit forward statistics of one activation output, as rows of ``FORWARD_FIELDS``.

    Args:
        out: the activation's output (detached); any float dtype.
        unit_dim: the non-negative dim that holds the units.
        nonnegative: the family never outputs negatives (enables ``|h| = h`` and counting
            actives as ``sign(h)``).
        cap: upper saturation value, or None.

    Returns:
        A ``(len(FORWARD_FIELDS), units)`` float tensor on ``out``'s device. Units whose
        output held NaN/Inf this step have every row zero except ``nonfinite`` (= 1).
    """
    dtype = _acc_dtype(out)
    cap = cap_in(cap, out.dtype)
    v = unit_view(out, unit_dim)
    units = v.shape[1]
    per_unit = out.numel() // units if units else 0
    if torch.compiler.is_compiling():
        # Inductor fuses the stacked columns into one reduction kernel.
        w = _rows_view(v, dtype)
        if nonnegative:
            cols = [w.sign(), w, w, w * w]
        else:
            cols = [w.clamp(min=0).sign(), w, w.abs(), w * w]
        if cap is not None:
            cols.append(w.ge(cap).to(w.dtype))
        body = _stacked_sum(cols, v)
    else:
        # Eager: one pass per statistic and few ops (each op costs its memory traffic plus
        # a fixed dispatch cost of several microseconds).
        w = v if v.dtype == dtype else v.to(dtype)
        if nonnegative:  # h > 0 <=> h != 0 when h >= 0
            active = _count(v, v.bool, w.sign)
        else:
            active = _count(v, lambda: v.gt(0), lambda: w.gt(0).to(dtype))
        s = _unit_sum(w, w)
        rows = [active, s, s if nonnegative else _unit_sum(w, w.abs()), _sum_sq(w)]
        if cap is not None:  # the output never exceeds the cap: saturated <=> h >= cap
            rows.append(_count(v, lambda: v.ge(cap), lambda: w.ge(cap).to(dtype)))
        body = torch.stack(rows)
    # body rows: active, sum, sum_abs, sum_sq[, saturated]; finite where sum |h| is.
    rows = [body.new_full((1, units), float(per_unit)), body]
    if cap is None:
        rows.append(body.new_zeros(1, units))
    return _finish(rows, body[2].isfinite())


def grad_rows(
    grad_out: torch.Tensor,
    grad_in: torch.Tensor | None,
    unit_dim: int,
    inv_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-unit gradient statistics, as rows of ``GRAD_FIELDS``.

    Args:
        grad_out: dL/d(output) of the activation.
        grad_in: dL/d(input), or None when the input needs no gradient.
        unit_dim: the non-negative dim that holds the units.
        inv_scale: 1 / AMP loss scale (a device tensor is fine: no host sync), so that the
            recorded squares are those of the unscaled gradient.

    Returns:
        A ``(len(GRAD_FIELDS), units)`` float tensor on the gradient's device.
    """
    grad_out, inv_scale = _kernels.tamed(grad_out, inv_scale)  # (its squares in float32)
    dtype = _acc_dtype(grad_out)
    g = unit_view(grad_out, unit_dim)
    units = g.shape[1]
    per_unit = grad_out.numel() // units if units else 0
    gi = None
    if grad_in is not None and grad_in.shape == grad_out.shape:
        gi = unit_view(grad_in, unit_dim)
    if torch.compiler.is_compiling():
        w = _rows_view(g, dtype)
        cols = [w * w] if gi is None else [w * w, _rows_view(gi, dtype).sign().abs_()]
        body = _stacked_sum(cols, g)
    else:
        sq = _sum_sq(g if g.dtype == dtype else g.to(dtype))
        if gi is None:
            body = sq.unsqueeze(0)
        else:
            nonzero = _count(gi, gi.bool, lambda: gi.ne(0).to(dtype))
            body = torch.stack([sq, nonzero])
    # body rows: grad_sq[, entries of dL/d(input) that are not zero]
    sq = body[:1]
    finite = body[0].isfinite()
    if inv_scale is not None:
        sq = sq * (inv_scale * inv_scale)
    elements = sq.new_full((1, units), float(per_unit))
    if gi is None:
        return _finish([elements, sq, sq.new_zeros(2, units)], finite)
    return _finish([elements, sq, elements, torch.rsub(body[1:], float(per_unit))], finite)


# ---------------------------------------------------------------------- padding masks
# A padded batch's padding positions are left out by zeroing them (zero is no activity, adds
# nothing to a sum, is under every cap, and wipes a NaN there), then counting only the real
# positions: ``elements`` (and ``grad_in_elements``) become the real positions, and the
# zeros the padding added to ``grad_zero`` come off. Exact, with no host sync: no gather.


def mask_for(shape: Sequence[int], unit_dim: int, mask: torch.Tensor) -> torch.Tensor | None:
    """``mask`` (True at the real positions, e.g. an attention mask ``(batch, seq)``) shaped
    to broadcast over an activation of ``shape`` whose units are dim ``unit_dim``, or None
    where it does not apply: the activation's shape, its unit dim left out, must begin with
    the mask's (``(batch, seq, features)`` does, and a convolution's ``(batch, channels,
    seq)``, its units among the mask's dims: a point cloud's padded points, a trial).

    Example:
        >>> m = torch.ones(2, 5, dtype=torch.bool)
        >>> [tuple(k.shape) if k is not None else None
        ...  for k in (mask_for((2, 5, 8), 2, m), mask_for((2, 8, 5), 1, m),
        ...            mask_for((2, 8, 4), 1, m), mask_for((2, 8), 1, m))]
        [(2, 5, 1), (2, 1, 5), None, None]
    """
    k = mask.dim()
    if k == 0:
        return None
    if unit_dim >= k and tuple(shape[:k]) == tuple(mask.shape):
        return mask.reshape(*mask.shape, *([1] * (len(shape) - k)))
    rest = (*shape[:unit_dim], *shape[unit_dim + 1:])
    if unit_dim < k and tuple(rest[:k]) == tuple(mask.shape):
        return mask.reshape(*mask.shape[:unit_dim], 1, *mask.shape[unit_dim:],
                            *([1] * (len(shape) - k - 1)))
    return None


def _positions(out: torch.Tensor, unit_dim: int, keep: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Every position per unit (a number) and the real ones (a 0-d float tensor: positions
    beyond the mask's dims count once per real position)."""
    units = out.shape[unit_dim]
    per_unit = out.numel() // units if units else 0
    return per_unit, keep.sum(dtype=torch.float64) * (per_unit / max(keep.numel(), 1))


def masked_forward_rows(
    out: torch.Tensor, unit_dim: int, keep: torch.Tensor, *, nonnegative: bool,
    cap: float | None,
) -> torch.Tensor:
    """:func:`forward_rows` of the real positions of ``out`` only (``keep`` from
    :func:`mask_for`)."""
    rows = forward_rows(torch.where(keep, out, 0), unit_dim, nonnegative=nonnegative, cap=cap)
    real = _positions(out, unit_dim, keep)[1].to(rows.dtype)
    rows[0] = torch.where(rows[0] > 0, real, 0.0)  # (a unit whose step was not finite: 0)
    return rows


def masked_grad_rows(
    grad_out: torch.Tensor, grad_in: torch.Tensor | None, unit_dim: int, keep: torch.Tensor,
    inv_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """:func:`grad_rows` of the real positions only (``keep`` from :func:`mask_for`, made
    for the forward pass these gradients flow back through)."""
    rows = grad_rows(torch.where(keep, grad_out, 0),
                     None if grad_in is None else torch.where(keep, grad_in, 0),
                     unit_dim, inv_scale)
    every, real = _positions(grad_out, unit_dim, keep)
    real = real.to(rows.dtype)
    pad = every - real
    rows[0] = torch.where(rows[0] > 0, real, 0.0)
    inputs = rows[2] > 0  # dL/d(input) read (finite, and the input needs a gradient)
    rows[3] = torch.where(inputs, rows[3] - pad, 0.0)  # the padding's zeros left out
    rows[2] = torch.where(inputs, real, 0.0)
    return rows


_ROUNDED: dict[tuple[float, torch.dtype], float] = {}


def _rounded(cap: float, dtype: torch.dtype) -> float:
    r = _ROUNDED.get((cap, dtype))
    if r is None:
        if len(_ROUNDED) >= 64:
            _ROUNDED.clear()
        r = _ROUNDED[(cap, dtype)] = float(torch.tensor(cap, dtype=dtype))
    return r


# torch._dynamo.assume_constant_result, without importing torch._dynamo here: under
# torch.compile the rounding runs in plain Python at trace time and its value is baked into
# the graph (no tensor made while tracing).
_rounded._dynamo_marked_constant = True  # type: ignore[attr-defined]


def cap_in(cap: float | None, dtype: torch.dtype) -> float | None:
    """The value saturation is counted from (``h >= cap_in(...)``) for an activation of
    ``dtype``: the lower of ``cap`` and ``cap`` as the dtype holds it. A Hardtanh(max_val=1.1)
    in float16 outputs 1.0996 (the nearest float16) where it saturates; in bfloat16 it
    outputs 1.1016, but inside a torch.compile graph the statistics may read the clamp's
    float32 value (1.1) before it is rounded. No other value of the dtype lies between the
    two. Every path compares against this value."""
    if cap is None or dtype in (torch.float32, torch.float64):
        return cap
    return min(float(cap), _rounded(float(cap), dtype))


class SiteStats:
    """The accumulators of one site: a current window and the closed-window lifetime total.

    Each is a float64 ``(len(FIELDS), units)`` tensor on the model's device. ``window`` holds
    the steps since the last :meth:`close_window`; ``lifetime`` all closed windows, so the
    lifetime total at any moment is ``lifetime + window``.

    Example:
        >>> st = SiteStats(4, torch.device("cpu"))
        >>> st.add_forward(forward_rows(torch.relu(torch.randn(8, 4)), 1, nonnegative=True, cap=None))
        >>> st.window[ROW["elements"]].tolist()
        [8.0, 8.0, 8.0, 8.0]
    """

    __slots__ = ("first", "first_due", "lifetime", "units", "window")

    def __init__(self, units: int, device: torch.device | str) -> None:
        self.units = units
        self.window = torch.zeros(len(FIELDS), units, dtype=torch.float64, device=device)
        self.lifetime = torch.zeros_like(self.window)
        # The site's first call's ``elements`` and ``active`` rows (see take_first), from
        # that call until a log reads them. Not due for a site restored from a checkpoint
        # (its first call came before).
        self.first: torch.Tensor | None = None
        self.first_due = True

    def take_first(self) -> None:
        """Keep the window's ``elements`` and ``active`` rows as the site's first reading,
        if this is its first call (see :meth:`first_dead_fraction`); a copy of two rows,
        once per site."""
        if self.first_due:
            self.first_due = False
            self.first = self.window[_FIRST_ROWS].clone()

    @staticmethod
    def first_dead_fraction(first: torch.Tensor) -> torch.Tensor:
        """The share of the units seen on a site's first call that were never active on it
        (its dead fraction at first sight: at initialisation for a site of the first step),
        from its first reading (summed across processes or not), as a 0-d tensor on its
        device: NaN where no unit was seen."""
        seen = first[0] > 0
        return (seen & (first[1] == 0)).sum().double() / seen.sum().double()

    def add_forward(self, rows: torch.Tensor) -> None:
        """Add :func:`forward_rows` output to the window (in place, on device)."""
        self.window[:_N_FWD].add_(rows)

    def add_grad(self, rows: torch.Tensor) -> None:
        """Add :func:`grad_rows` output to the window (in place, on device)."""
        self.window[_N_FWD:].add_(rows)

    def record_forward(
        self, out: torch.Tensor, unit_dim: int, *, nonnegative: bool, cap: float | None,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Add the forward statistics of activation output ``out`` (detached or not: it is
        only read) to the window: the fused kernel where it applies (one pass, no dispatched
        op), else :func:`forward_rows`; of the real positions only with ``keep`` (a padding
        mask from :func:`mask_for`: the eager path)."""
        if torch.compiler.is_compiling():  # part of a compiled graph: nothing to time
            out = out.detach()
            self.add_forward(forward_rows(out, unit_dim, nonnegative=nonnegative, cap=cap))
            return
        cap = cap_in(cap, out.dtype)
        ev = sampling.begin_call(out)
        if keep is not None:
            self.add_forward(masked_forward_rows(out.detach(), unit_dim, keep,
                                                 nonnegative=nonnegative, cap=cap))
        elif not _kernels.forward_into(
            self.window, out, unit_dim, cap=cap, nonnegative=nonnegative
        ):
            out = out.detach()
            self.add_forward(forward_rows(out, unit_dim, nonnegative=nonnegative, cap=cap))
        sampling.end_call(ev)

    def prepare_forward(
        self, out: torch.Tensor, unit_dim: int, *, nonnegative: bool, cap: float | None
    ) -> _kernels.Prepared | None:
        """:meth:`record_forward` for the later outputs laid out as ``out``, prepared (see
        :class:`~relu_doctor._kernels.Prepared`: it returns False, doing nothing, for one
        that is not); None where the fused CPU kernel would not read ``out`` in place."""
        return _kernels.prepare_forward(
            self.window, out, unit_dim, cap=cap_in(cap, out.dtype), nonnegative=nonnegative
        )

    def prepare_grad(
        self, grad_out: torch.Tensor, grad_in: torch.Tensor | None, unit_dim: int
    ) -> _kernels.Prepared | None:
        """:meth:`record_grad`, prepared likewise for the later gradients laid out as these
        (called with ``(grad_out, grad_in, inv_scale)``, ``inv_scale`` a number or None)."""
        return _kernels.prepare_grad(self.window, grad_out, grad_in, unit_dim, _N_FWD)

    def record_grad(
        self,
        grad_out: torch.Tensor,
        grad_in: torch.Tensor | None,
        unit_dim: int,
        inv_scale: torch.Tensor | float | None = None,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Add the gradient statistics to the window (arguments as :func:`grad_rows`; the
        gradients are only read, detached or not): the fused kernel where it applies, else
        :func:`grad_rows`; of the real positions only with ``keep`` (see
        :meth:`record_forward`)."""
        if grad_in is not None and grad_in.shape != grad_out.shape:
            grad_in = None
        ev = sampling.begin_call(grad_out)
        if keep is not None:
            self.add_grad(masked_grad_rows(grad_out.detach(), grad_in, unit_dim, keep,
                                           inv_scale))
        elif torch.compiler.is_compiling() or not _kernels.grad_into(
            self.window, grad_out, grad_in, unit_dim, inv_scale, _N_FWD
        ):
            self.add_grad(grad_rows(grad_out.detach(), grad_in, unit_dim, inv_scale))
        sampling.end_call(ev)

    def to(self, device: torch.device) -> None:
        """Move the accumulators to ``device`` (a site restored from a checkpoint loaded
        onto another device than the one its layer runs on)."""
        self.window = self.window.to(device)
        self.lifetime = self.lifetime.to(device)

    def close_window(self, total: torch.Tensor | None = None) -> None:
        """Fold the window into the lifetime total and start a new, empty window.

        Args:
            total: the window summed across processes (:func:`reduce_sum`), folded in
                instead of this process's own window so that every process keeps the same
                lifetime total.
        """
        self.lifetime.add_(self.window if total is None else total)
        self.window.zero_()

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (tensors are cloned)."""
        return {
            "units": self.units,
            "window": self.window.detach().clone(),
            "lifetime": self.lifetime.detach().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the unit count must match."""
        if int(state["units"]) != self.units:
            raise ValueError(
                f"checkpoint has {state['units']} units for this site, the model has {self.units}"
            )
        self.window.copy_(state["window"])
        self.lifetime.copy_(state["lifetime"])
        self.first_due = False  # (its first call came before the checkpoint)


def _through_flat(
    tensors: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """Concatenate ``tensors`` flat, apply ``fn`` once, and split the result back into
    tensors of the same shapes, in order."""
    if not tensors:
        return []
    return _split(fn(torch.cat([t.reshape(-1) for t in tensors])), tensors)


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` cut into views of the shapes of ``like``, in order."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[i : i + n].reshape(t.shape))
        i += n
    return out


def read_back(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` on the host as float64, with their shapes: from a device, copied in one
    device-to-host transfer (the one host synchronisation of a logging step); tensors
    already on the host in float64 are returned as they are, not copied."""
    if all(t.device.type == "cpu" and t.dtype == torch.float64 for t in tensors):
        return [t.detach() for t in tensors]
    return _through_flat([t.to(torch.float64) for t in tensors], lambda flat: flat.cpu())


def group_size() -> int:
    """How many processes the running ``torch.distributed`` process group holds (1 when none
    runs)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def group_rank() -> int:
    """This process's rank in the running ``torch.distributed`` process group (0 when none
    runs)."""
    dist = torch.distributed
    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


def reduce_sum(
    tensors: Sequence[torch.Tensor], all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """Sum ``tensors`` across processes with one collective call.

    Args:
        tensors: tensors on one device.
        all_reduce: sums a flat tensor across processes and returns the result (for example
            ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``).

    Returns:
        The reduced tensors, same shapes, in order.
    """
    return _through_flat(tensors, all_reduce)


def _signature(named: Mapping[str, torch.Tensor], keys: Sequence[str]) -> list[int]:
    """``named``'s names and shapes as small integers (11 bits each: their squares summed
    over up to 2**15 processes stay exact in float64): the count of names and a CRC-32 of
    the names and shapes, in three parts."""
    crc = zlib.crc32("\n".join(f"{k}:{tuple(named[k].shape)}" for k in keys).encode())
    return [len(keys) & 0x7FF, crc >> 22, (crc >> 11) & 0x7FF, crc & 0x7FF]


class AgreedSum:
    """Sums tensors across processes, matched by name, where every process holds the same
    names with the same shapes.

    Processes may not hold the same tensors: a site is made when its activation first runs
    on a process, and a branch or an expert that one process has not run yet has no site
    there (and the order of first runs may differ). A collective call over tensors of other
    sizes aborts or hangs the run, and one over the same sizes in another order sums
    unrelated units. So each call carries a signature of the names and shapes with its
    squares (the processes hold the same one exactly when ``world * sum(x**2) ==
    sum(x)**2``), read on the host, and the tensors in the order of their names.

    Every process sends a buffer of one size: the signature and the tensors when it holds
    what the processes last agreed on (the sizes are then the same everywhere), else zeros
    of that size. So a log makes one collective call while the sites stay the same, two when
    they changed on every process alike (the second sums the new set), and one where they
    differ (nothing summed: ``None``).

    Args:
        all_reduce: sums a flat tensor across processes and returns the result.
    """

    def __init__(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.all_reduce = all_reduce
        self._agreed: tuple[list[int], int] = ([], 0)  # (signature, elements) last summed

    def __call__(
        self, named: Mapping[str, torch.Tensor], device: torch.device | None
    ) -> tuple[dict[str, torch.Tensor] | None, int]:
        """``(named summed by name, or None where the processes differ, number of
        processes)``. ``named``: float64 tensors on ``device`` (the collective's), by names
        that mean the same on every process. Every process must call it."""
        keys = sorted(named)
        tensors = [named[k] for k in keys]
        sig = _signature(named, keys)
        agreed, size = self._agreed
        same = sig == agreed
        head = torch.tensor([1, *sig, *(x * x for x in sig)], dtype=torch.float64, device=device)
        body = tensors if same else [torch.zeros(size, dtype=torch.float64, device=device)]
        flat = self.all_reduce(torch.cat([head, *(t.reshape(-1) for t in body)]))
        total = flat[: head.numel()].cpu().tolist()
        world, n = round(total[0]), len(sig)
        if any(world * total[1 + n + i] != total[1 + i] ** 2 for i in range(n)):
            self._agreed = ([], 0)  # (decided alike everywhere: the sums are the same)
            return None, world
        if same:  # every process holds what was agreed (its own and the sums' signature)
            return dict(zip(keys, _split(flat[head.numel() :], tensors), strict=True)), world
        self._agreed = (sig, sum(t.numel() for t in tensors))
        return dict(zip(keys, _through_flat(tensors, self.all_reduce), strict=True)), world
