"""Property-based tests of the per-step reductions against numpy.

For any shape from 1-D to 5-D (batch size 1 included), any unit dim (the default rule or an
override), and float32, float64 or bfloat16, :func:`forward_rows` and :func:`grad_rows`
must give the numbers numpy computes by the definitions on the same values in float64:
counts exactly, sums to the accumulation dtype's precision.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relu_doctor.stats import FORWARD_FIELDS, GRAD_FIELDS, forward_rows, grad_rows, resolve_unit_dim
from tests import reference as ref

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# relu_doctor sums float32 and bfloat16 in float32, float64 in float64.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5}

# name -> (activation, nonnegative, cap)
ACTIVATIONS = {
    "relu": (torch.relu, True, None),
    "relu6": (lambda x: torch.clamp(x, 0.0, 6.0), True, 6.0),
    "leaky_relu": (lambda x: torch.nn.functional.leaky_relu(x, 0.1), False, None),
    "elu": (torch.nn.functional.elu, False, None),
    "hardtanh": (lambda x: torch.clamp(x, -1.0, 0.75), False, 0.75),
}

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def activations(draw):
    """(tensor, unit_dim, override) with a drawn shape, dtype and unit dim."""
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    if ndim > 1 and draw(st.booleans()):
        shape = (1, *shape[1:])  # batch size 1
    override = draw(st.none() | st.integers(-ndim, ndim - 1))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.5, 4.0, 20.0]))
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = with_exact_zeros(x, gen).to(dtype)
    unit_dim, _ = resolve_unit_dim(shape, override)
    if override is None:
        assert unit_dim == ref.expected_unit_dim(ndim)
    return x, unit_dim, gen


def with_exact_zeros(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """About a fifth of the entries exactly 0: every member maps 0 to 0, which is not
    active (output > 0), and a count that used >= would be caught."""
    return torch.where(torch.rand(x.shape, generator=gen) < 0.2, 0.0, x)


def check(got_rows, fields, expected, dtype, where, rtol=RTOL):
    got = dict(zip(fields, got_rows.detach().to(torch.float64).numpy(), strict=True))
    ref.assert_stats_match(got, expected, where, rtol=rtol[dtype])


@PROPERTY
@given(data=activations(), name=st.sampled_from(sorted(ACTIVATIONS)))
def test_forward_rows_match_numpy(data, name):
    x, unit_dim, _ = data
    act, nonnegative, cap = ACTIVATIONS[name]
    out = act(x)
    expected = ref.forward_reference([out], unit_dim, cap)
    rows = forward_rows(out, unit_dim, nonnegative=nonnegative, cap=cap)
    assert rows.shape == (len(FORWARD_FIELDS), out.shape[unit_dim])
    check(rows[:-1], FORWARD_FIELDS[:-1], expected, x.dtype, f"{name} {tuple(x.shape)} dim {unit_dim}")
    assert not rows[-1].any(), "finite input flagged as non-finite"


@PROPERTY
@given(data=activations(), zero_fraction=st.sampled_from([0.0, 0.5, 1.0]), with_input=st.booleans(),
       inv_scale=st.sampled_from([None, 1.0 / 1024, "tensor"]))
def test_grad_rows_match_numpy(data, zero_fraction, with_input, inv_scale):
    g, unit_dim, gen = data
    keep = torch.rand(g.shape, generator=gen) >= zero_fraction
    grad_in = (g * keep).to(g.dtype) if with_input else None
    scale = torch.tensor(1.0 / 512) if inv_scale == "tensor" else inv_scale
    rows = grad_rows(g, grad_in, unit_dim, scale)
    s = 1.0 if scale is None else float(scale)
    if with_input:
        expected = ref.grad_reference([g * s], [grad_in], unit_dim)
        expected["grad_in_elements"] = expected["grad_elements"].copy()
    else:
        expected = ref.grad_reference([g * s], [g], unit_dim)
        expected["grad_in_elements"] = np.zeros_like(expected["grad_elements"])
        expected["grad_zero"] = np.zeros_like(expected["grad_elements"])
    check(rows[:-1], GRAD_FIELDS[:-1], expected, g.dtype, f"{tuple(g.shape)} dim {unit_dim}")
    assert not rows[-1].any()


@PROPERTY
@given(data=activations(), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       name=st.sampled_from(["relu", "leaky_relu"]))
def test_nonfinite_values_flag_their_unit_only(data, bad, name):
    """A NaN/Inf leaves its unit's step out of every sum (nonfinite = 1); other units are
    counted as usual."""
    x, unit_dim, gen = data
    act, nonnegative, cap = ACTIVATIONS[name]
    out = act(x).clone()
    flat_index = int(torch.randint(out.numel(), (1,), generator=gen))
    index = np.unravel_index(flat_index, out.shape)
    out[index] = bad
    if nonnegative and bad < 0:
        out[index] = float("nan")  # ReLU never outputs -inf
    hit = int(index[unit_dim])
    rows = forward_rows(out, unit_dim, nonnegative=nonnegative, cap=cap)
    got = dict(zip(FORWARD_FIELDS, rows.to(torch.float64).numpy(), strict=True))
    assert got["nonfinite"][hit] == 1
    assert all(got[f][hit] == 0 for f in FORWARD_FIELDS[:-1])
    others = np.arange(out.shape[unit_dim]) != hit
    expected = ref.forward_reference([out], unit_dim, cap)
    ref.assert_stats_match(
        {k: v[others] for k, v in got.items()},
        {k: v[others] for k, v in expected.items()},
        "other units",
        rtol=RTOL[x.dtype],
    )
    assert not got["nonfinite"][others].any()

    g_rows = grad_rows(out, None, unit_dim)
    g_got = dict(zip(GRAD_FIELDS, g_rows.to(torch.float64).numpy(), strict=True))
    assert g_got["grad_nonfinite"][hit] == 1 and g_got["grad_sq"][hit] == 0
    assert not g_got["grad_nonfinite"][others].any()


LARGE = 1 << 17  # large enough for the bandwidth-bound code paths (packed counting)
# Per-step float sums are float32. Over 2**17+ elements read with strides (channels-last),
# torch's float32 reductions of bfloat16 squares drift by up to ~3e-5 (measured); counts
# must still be exact.
RTOL_LARGE = {torch.float32: 1e-4, torch.float64: 1e-12, torch.bfloat16: 1e-4}


@st.composite
def large_activations(draw):
    """Activations of 2**17+ elements in the layouts real models produce: NCHW, channels-last,
    (N, L, F), (N, F), and a non-contiguous slice; unit counts and position counts both with
    and without a factor of 8."""
    layout = draw(st.sampled_from(["nchw", "channels_last", "sliced", "nlf", "nf"]))
    units = draw(st.sampled_from([3, 8, 12, 64]))
    n = draw(st.sampled_from([1, 3, 8]))
    extra = draw(st.integers(0, 3))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout in ("nchw", "channels_last", "sliced"):
        side = int(np.ceil(np.sqrt(LARGE / (n * units)))) + extra
        shape = (n, units, side, 2 * side if layout == "sliced" else side)
    elif layout == "nlf":
        shape = (n, -(-LARGE // (n * units)) + extra, units)
    else:
        shape = (-(-LARGE // units) + extra, units)
    # Wide enough to reach ReLU6's cap, with exact zeros.
    x = with_exact_zeros(4.0 * torch.randn(shape, generator=gen), gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        x = x[..., ::2]
    return x, ref.expected_unit_dim(x.dim()), layout


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=large_activations(), name=st.sampled_from(sorted(ACTIVATIONS)))
def test_large_activations_in_every_layout_match_numpy(data, name):
    x, unit_dim, layout = data
    act, nonnegative, cap = ACTIVATIONS[name]
    out = act(x)
    if layout == "channels_last":
        out = out.contiguous(memory_format=torch.channels_last)
    assert out.numel() >= LARGE
    rows = forward_rows(out, unit_dim, nonnegative=nonnegative, cap=cap)
    expected = ref.forward_reference([out], unit_dim, cap)
    check(rows[:-1], FORWARD_FIELDS[:-1], expected, x.dtype, f"{name} {layout} {tuple(x.shape)}",
          RTOL_LARGE)
    g = torch.where(out > 0, x, torch.zeros_like(x))  # a gradient with many exact zeros
    g_rows = grad_rows(x, g, unit_dim)
    g_expected = ref.grad_reference([x], [g], unit_dim)
    g_expected["grad_in_elements"] = g_expected["grad_elements"].copy()
    check(g_rows[:-1], GRAD_FIELDS[:-1], g_expected, x.dtype, f"grad {layout} {tuple(x.shape)}",
          RTOL_LARGE)


# ---------------------------------------------------------------- the fused CPU kernel
def _fused_window(out, unit_dim, cap, grad=None, grad_in=None, scale=None):
    """A site window filled by the fused kernel only (never the eager fallback)."""
    from relu_doctor import _kernels
    from relu_doctor.stats import SiteStats

    st_ = SiteStats(out.shape[unit_dim], "cpu")
    assert _kernels.forward_into(st_.window, out, unit_dim, cap=cap)
    if grad is not None:
        assert _kernels.grad_into(st_.window, grad, grad_in, unit_dim, scale, len(FORWARD_FIELDS))
    return st_.window


@PROPERTY
@given(data=activations(), name=st.sampled_from(sorted(ACTIVATIONS)), channels_last=st.booleans())
def test_fused_kernel_matches_numpy(data, name, channels_last):
    """The fused kernel against the same numpy definitions: counts exactly, sums to float32
    precision, in a contiguous or a channels-last layout."""
    from relu_doctor import _kernels

    if not _kernels.available():
        return
    x, unit_dim, gen = data
    act, _nonnegative, cap = ACTIVATIONS[name]
    out = act(x)
    if channels_last and out.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    gi = torch.where(out > 0, g, torch.zeros_like(g))
    w = _fused_window(out, unit_dim, cap, g, gi, 0.5)
    where = f"fused {name} {tuple(x.shape)} dim {unit_dim}"
    check(w[: len(FORWARD_FIELDS) - 1], FORWARD_FIELDS[:-1],
          ref.forward_reference([out], unit_dim, cap), x.dtype, where)
    expected = ref.grad_reference([g * 0.5], [gi], unit_dim)
    expected["grad_in_elements"] = expected["grad_elements"].copy()
    grad = w[len(FORWARD_FIELDS) : -1]
    check(grad, GRAD_FIELDS[:-1], expected, x.dtype, where)
    assert not w[len(FORWARD_FIELDS) - 1].any() and not w[-1].any()


# ---------------------------------------------------------------- metrics over stacked sites
@PROPERTY
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1),
       tau=st.sampled_from([0.0, 0.1, 0.5]))
def test_stacked_metrics_equal_the_per_site_functions(sizes, seed, tau):
    """metrics.stacked_metrics (every site at once) gives what unit_metrics and site_metrics
    give site by site: unseen units, dead units, sites with no units included."""
    import math

    from relu_doctor.metrics import site_metrics, stacked_metrics, unit_metrics
    from relu_doctor.stats import FIELDS, ROW

    gen = torch.Generator().manual_seed(seed)
    windows, lifetimes = [], []
    for u in sizes:
        w = torch.rand(len(FIELDS), u, generator=gen, dtype=torch.float64) * 50
        w[ROW["elements"]] = torch.randint(0, 3, (u,), generator=gen).double() * 8
        dead = torch.rand(u, generator=gen) < 0.4
        w[ROW["active"]] = torch.where(dead, 0.0, w[ROW["elements"]] / 2)
        w[ROW["saturated"]] = torch.where(dead, w[ROW["elements"]], 0.0)
        w[ROW["nonfinite"]] = torch.randint(0, 2, (u,), generator=gen).double()
        windows.append(w)
        lifetimes.append(w + torch.rand(len(FIELDS), u, generator=gen, dtype=torch.float64))
    units, rows = stacked_metrics(windows, lifetimes, tau)
    for w, life, u2, r2 in zip(windows, lifetimes, units, rows, strict=True):
        u1 = unit_metrics(w, life, tau)
        assert sorted(u1) == sorted(u2)
        for k, v in u1.items():
            assert v.dtype == u2[k].dtype and v.shape == u2[k].shape, k
            torch.testing.assert_close(v, u2[k], rtol=1e-12, atol=0, equal_nan=True, msg=k)
        for k in ("dead", "dormant", "fully_saturated", "nonfinite"):  # diagnosis's unit lists
            for limit in (1, 2, 64):
                want = torch.nonzero(u1[k]).flatten()[:limit].tolist()
                assert u2.nonzero(k, limit) == want, (k, limit)
            assert u2.count(k) == int(torch.count_nonzero(u1[k])), k
            assert u2.count(k, unless="below_tau") == int(  # (diagnosis's units above tau)
                (u1[k].bool() & ~u1["below_tau"].bool()).sum()), k
        assert "dead" in u2 and "no such metric" not in u2
        r1 = site_metrics(w, u1)
        assert sorted(r1) == sorted(r2)
        for k, v in r1.items():
            assert type(v) is type(r2[k]) or isinstance(v, float), k
            assert v == r2[k] or (math.isnan(v) and math.isnan(r2[k])) or math.isclose(
                v, r2[k], rel_tol=1e-12), (k, v, r2[k])
