"""The fused CPU kernel against the eager reference path (relu_doctor._kernels).

Counts (elements, active, saturated, nonfinite and their gradient twins) must be equal
exactly; sums agree to float rounding (the two paths sum in different orders). Covered:
shapes from an unbatched vector to 5-D, float32/float64/float16/bfloat16, contiguous,
channels-last, transposed, sliced and expanded layouts, units holding NaN/Inf, capped and
leaky families, gradients with and without dL/d(input) and with an AMP scale, thread counts,
and the fallback when no compiler is found.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from relu_doctor import _kernels
from relu_doctor._kernels import cpu
from relu_doctor.stats import FIELDS, ROW, SiteStats

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="no C compiler: eager path only")

COUNTS = ["elements", "active", "saturated", "nonfinite", "grad_elements", "grad_in_elements",
          "grad_zero", "grad_nonfinite"]
SUMS = ["sum", "sum_abs", "sum_sq", "grad_sq"]
SHAPES = [(7,), (9, 5), (300, 70), (4, 6, 7), (2, 3, 5, 5), (4, 40, 3, 3), (16, 24, 20, 20),
          (3, 4, 5, 2, 2), (2, 5, 3, 3000), (2, 3, 70, 70),
          # the loop choice for few rows (per_unit in fused_stats.c): per unit, by groups
          (1, 8, 14, 14), (16, 6, 6, 6), (17, 6, 6, 6), (4, 5, 4, 4), (5, 5, 4, 4), (4, 5, 3, 5),
          # slabs of rows: narrow rows by groups ((N, F), and maps of 4 x 4), per unit
          (2000, 40), (300, 16, 4, 4), (40, 8, 16, 16)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _unit_dim(shape: tuple[int, ...]) -> int:
    return {1: 0, 2: 1, 3: 2}.get(len(shape), 1)


def _both(x, g, gi, unit_dim, *, nonnegative, cap, inv=None):
    """(fused window, eager window) after one forward and one gradient record."""
    units = x.shape[unit_dim]
    fused, eager = SiteStats(units, "cpu"), SiteStats(units, "cpu")
    assert _kernels.forward_into(fused.window, x, unit_dim, cap=cap, nonnegative=nonnegative)
    assert _kernels.grad_into(fused.window, g, gi, unit_dim, inv, len(FIELDS) - 5)
    with _kernels.disabled():
        eager.record_forward(x, unit_dim, nonnegative=nonnegative, cap=cap)
        eager.record_grad(g, gi, unit_dim, inv)
    return fused.window, eager.window


def _check(fused, eager, dtype):
    for name in COUNTS:
        assert torch.equal(fused[ROW[name]], eager[ROW[name]]), name
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for name in SUMS:
        torch.testing.assert_close(fused[ROW[name]], eager[ROW[name]], rtol=rtol, atol=1e-6)


def _data(shape, dtype, *, leaky=False, cap=None):
    x = torch.randn(shape) * 3
    x = torch.where(x > 0, x, 0.1 * x) if leaky else torch.relu(x)
    if cap is not None:
        x = x.clamp(max=cap)
    if len(shape) > 1:  # a dead unit
        x.select(_unit_dim(shape), 0).zero_()
    g = torch.randn(shape)
    gi = torch.where(x > 0, g, torch.zeros_like(g))
    return x.to(dtype), g.to(dtype), gi.to(dtype)


@pytest.mark.parametrize("nonnegative", [True, False], ids=["nonnegative", "general"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_counts_equal_eager_over_shapes_and_dtypes(shape, dtype, nonnegative):
    # ReLU outputs through both kernels: the one that sums |h| apart and the one that reuses
    # sum h (nonnegative families)
    x, g, gi = _data(shape, dtype)
    _check(*_both(x, g, gi, _unit_dim(shape), nonnegative=nonnegative, cap=None), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_leaky_and_capped_families(dtype):
    x, g, gi = _data((8, 12, 6, 6), dtype, leaky=True)
    _check(*_both(x, g, gi, 1, nonnegative=False, cap=None), dtype)
    x, g, gi = _data((8, 12, 6, 6), dtype, cap=6.0)
    fused, eager = _both(x, g, gi, 1, nonnegative=True, cap=6.0)
    assert fused[ROW["saturated"]].sum() > 0  # the cap is hit, so the count is tested
    _check(fused, eager, dtype)


LAYOUTS = {
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(0, 2).contiguous().transpose(0, 2),
    "sliced": lambda t: torch.cat([t, t], 3)[..., ::2],
    "expanded": lambda t: t[:1].expand_as(t),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.keys())
def test_layouts(layout, dtype):
    x, g, gi = (LAYOUTS[layout](t) for t in _data((6, 10, 9, 9), dtype))
    _check(*_both(x, g, gi, 1, nonnegative=True, cap=None), dtype)
    # gradient and input gradient in different layouts
    gi2 = gi.contiguous()
    _check(*_both(x, g, gi2, 1, nonnegative=True, cap=None), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_units(dtype):
    x, g, gi = _data((4, 8, 5, 5), dtype)
    x[1, 2, 3, 3] = float("nan")
    x[0, 5, 0, 0] = float("inf")
    g[2, 3, 1, 1] = float("-inf")
    g[3, 6, 0, 4] = float("nan")
    fused, eager = _both(x, g, gi, 1, nonnegative=True, cap=None)
    assert fused[ROW["nonfinite"]].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]
    assert fused[ROW["grad_nonfinite"]].tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    _check(fused, eager, dtype)


def test_gradient_without_input_gradient_and_with_a_scale():
    x, g, _ = _data((5, 16, 4, 4), torch.float32)
    for inv in (None, 0.25, torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)):
        _check(*_both(x, g, None, 1, nonnegative=True, cap=None, inv=inv), torch.float32)


@pytest.mark.parametrize("scale", [2.0**70, 3.0 * 2**60], ids=["2**70", "3*2**60"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3000, 8), (40, 6, 10, 10)], ids=str)
def test_a_loss_scale_past_float32s_squares_reads_the_unscaled_gradient(shape, dtype, scale):
    """A GradScaler's scale grows without limit where no step overflows (bfloat16 or float32
    under a scaler): gradients of 1e-2 times 2**70 have squares whose float32 sum overflowed,
    on every path, read as non-finite and their RMS wrong. The fused and eager paths now
    equal a float64 sum of the unscaled gradients' squares, with the scale as a number or
    a tensor (float32 or float64), and a scale not a power of two (a scaler of one's own)
    read in float32 at least, a float16 or bfloat16 gradient not rounded again."""
    _, g, _ = _data(shape, torch.float32)
    # (float16: a scaled gradient that fits it, its unscaled one about 1e-19, whose squares
    # float32 cannot hold: the part of the scale kept lifts them)
    scaled = (g * 100 if dtype == torch.float16 else g * 1e-2 * scale).to(dtype)
    raw = scaled.double() / scale  # the unscaled gradient
    unit_dim = _unit_dim(shape)
    want = raw.pow(2).sum([d for d in range(raw.dim()) if d != unit_dim])
    assert torch.isfinite(scaled).all()
    if scale == 2.0**70 and dtype != torch.float16:
        assert not torch.isfinite(scaled.float().pow(2).sum()), "it must overflow float32"
    for inv in (1.0 / scale, torch.tensor(1.0 / scale), torch.tensor(1.0 / scale,
                                                                     dtype=torch.float64)):
        fused, eager = SiteStats(g.shape[unit_dim], "cpu"), SiteStats(g.shape[unit_dim], "cpu")
        assert _kernels.grad_into(fused.window, scaled, None, unit_dim, inv, len(FIELDS) - 5)
        with _kernels.disabled():
            eager.record_grad(scaled, None, unit_dim, inv)
        for w in (fused.window, eager.window):
            assert not w[ROW["grad_nonfinite"]].any()
            torch.testing.assert_close(w[ROW["grad_sq"]], want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("nonnegative", [True, False], ids=["nonnegative", "general"])
@pytest.mark.parametrize(
    "shape",
    [(64, 32, 16, 16), (64, 48, 3, 3), (700, 300), (16, 128, 7, 7), (700, 100), (1000, 70),
     (300, 130, 3, 3)],
    ids=str,
)
def test_same_result_with_any_thread_count(shape, nonnegative):
    # per-unit runs (16 x 16 maps; 7 x 7 maps of 16 rows), groups of units (3 x 3 maps, (N, F)
    # rows). The thread count sets the group size, so a column may be a vector's lane with
    # one count and in the lanes left over past a group's last full vector with another:
    # (700, 100), (1000, 70) and (300, 130, 3, 3) at 3, 5 or 7 threads.
    x, g, gi = _data(shape, torch.float32)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2, 3, 5, 7):
            torch.set_num_threads(threads)
            out.append(_both(x, g, gi, 1, nonnegative=nonnegative, cap=None)[0])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(out[0], o) for o in out[1:])


def test_accumulates_into_the_window():
    x, g, gi = _data((10, 6), torch.float32)
    st = SiteStats(6, "cpu")
    for _ in range(3):
        st.record_forward(x, 1, nonnegative=True, cap=None)
        st.record_grad(g, gi, 1)
    assert st.window[ROW["elements"]].tolist() == [30.0] * 6
    assert st.window[ROW["grad_in_elements"]].tolist() == [30.0] * 6
    expect = 3 * (x > 0).sum(0).double()
    assert torch.equal(st.window[ROW["active"]], expect)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The kernels unloaded, to be built again into an empty cache (``tmp_path``) at the next
    use; the loaded build comes back after the test."""
    monkeypatch.setattr(cpu, "_state", "unloaded")
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_front", None)
    monkeypatch.setenv("RELU_DOCTOR_CACHE", str(tmp_path))


def test_falls_back_to_eager_with_one_warning_when_no_compiler(monkeypatch, fresh_build):
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    x, g, gi = _data((10, 6), torch.float32)
    st = SiteStats(6, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            st.record_forward(x, 1, nonnegative=True, cap=None)
            st.record_grad(g, gi, 1)
    msgs = [str(w.message) for w in caught if "fused CPU statistics" in str(w.message)]
    assert len(msgs) == 1 and "no C compiler" in msgs[0]
    assert not _kernels.available()
    assert torch.equal(st.window[ROW["active"]], 3 * (x > 0).sum(0).double())


def _windows_through(front, cases):
    """The windows the fused path adds for ``cases`` with the per-call front ``front``."""
    saved = cpu._front
    cpu._front = front
    try:
        out = []
        for x, g, gi, unit_dim in cases:
            st = SiteStats(x.shape[unit_dim], "cpu")
            assert _kernels.forward_into(st.window, x, unit_dim, cap=6.0, nonnegative=False)
            assert _kernels.grad_into(st.window, g, gi, unit_dim, 0.5, len(FIELDS) - 5)
            out.append(st.window)
        return out
    finally:
        cpu._front = saved


def _front_cases():
    cases = []
    for shape, dtype in [((9, 5), torch.float32), ((2, 3, 5, 5), torch.bfloat16),
                         ((300, 16, 4, 4), torch.float16), ((4, 6, 7), torch.float64)]:
        x, g, gi = _data(shape, dtype, leaky=True, cap=6.0)
        cases += [(x, g, gi, _unit_dim(shape)), (x, g, None, _unit_dim(shape))]
    cl = torch.channels_last
    x, g, gi = (t.contiguous(memory_format=cl) for t in _data((4, 6, 5, 5), torch.float32))
    return [*cases, (x, g, gi, 1), (x, g, gi.contiguous(), 1)]


def test_the_cpython_front_adds_what_ctypes_adds():
    """Where the Python headers are found the per-call kernels are called through the
    CPython front of fastcall.c (about 0.2 us a call, against 3 us through ctypes): the same
    kernels, so bit-identical windows."""
    cpu._load()
    if isinstance(cpu._front, cpu._CtypesFront):
        pytest.skip("no Python headers: ctypes only")
    cases = _front_cases()
    fast = _windows_through(cpu._front, cases)
    slow = _windows_through(cpu._CtypesFront(cpu._lib), cases)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="10 arguments"):
        cpu._front.forward(0, 0)


def test_without_python_headers_the_kernels_go_through_ctypes(monkeypatch, fresh_build):
    monkeypatch.setattr(cpu, "_python_include", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the ctypes path is complete
        assert cpu._load() is not None
    assert isinstance(cpu._front, cpu._CtypesFront)
    cases = _front_cases()
    got = _windows_through(cpu._front, cases)
    for w, (x, g, gi, unit_dim) in zip(got, cases, strict=True):
        eager = SiteStats(x.shape[unit_dim], "cpu")
        with _kernels.disabled():
            eager.record_forward(x, unit_dim, nonnegative=False, cap=6.0)
            eager.record_grad(g, gi, unit_dim, 0.5)
        _check(w, eager.window, x.dtype)


def test_a_front_that_does_not_load_leaves_the_plain_kernel(monkeypatch, fresh_build):
    """A front built but not loadable (a host that embeds Python without exporting its
    symbols) gives way to the plain build, not to the eager path."""
    real = cpu.ctypes.CDLL

    def cdll(path, *a, **k):
        if b"PyInit__rd_fastcall" in Path(path).read_bytes():  # the front's object
            raise OSError("undefined symbol: PyLong_AsVoidPtr")
        return real(path, *a, **k)

    monkeypatch.setattr(cpu.ctypes, "CDLL", cdll)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu._load() is not None
    assert isinstance(cpu._front, cpu._CtypesFront)
    x, g, gi = _data((9, 5), torch.float32)
    _check(*_both(x, g, gi, 1, nonnegative=True, cap=None), torch.float32)


def test_the_portable_build_counts_as_the_native_one(monkeypatch, fresh_build):
    """Without -march=native (the compiler refused it) the kernels are built for the
    baseline of the architecture, with 16-byte accumulator vectors (SSE2, NEON) where the
    native build uses the target's width (32 bytes on AVX2, 64 on AVX-512): other loop
    bounds, the same counts."""
    monkeypatch.setattr(cpu, "_FLAG_SETS", [f for f in cpu._FLAG_SETS if "-march=native" not in f])
    assert cpu._load() is not None
    for shape in [(9, 5), (300, 70), (4, 40, 3, 3), (2, 5, 3, 3000), (17, 6, 6, 6), (2000, 40)]:
        for dtype in DTYPES:
            x, g, gi = _data(shape, dtype, cap=2.0)
            d = _unit_dim(shape)
            _check(*_both(x, g, gi, d, nonnegative=True, cap=2.0), dtype)
            _check(*_both(x, g, gi, d, nonnegative=False, cap=None), dtype)
            out = torch.zeros(1, dtype=torch.float64)
            assert cpu.sum_squares_into(out, [g], [0])
            torch.testing.assert_close(out, g.double().square().sum().view(1), rtol=1e-5, atol=0)


def test_layouts_of_one_shape_are_told_apart():
    """The per-call paths remember how a (shape, strides) reads; a tensor of the same shape
    in another layout (channels-last after contiguous, an expanded gradient) is read its
    own way, not the remembered one."""
    for _ in range(2):  # the second round reads every layout from the cache
        for layout in LAYOUTS.values():
            x, g, gi = (layout(t) for t in _data((6, 10, 9, 9), torch.float32))
            _check(*_both(x, g, gi, 1, nonnegative=True, cap=None), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_squares_into_equals_a_float64_reference(dtype):
    # sizes around the kernel's chunk (65,536 elements), an empty tensor, two tensors of one
    # layer (index 1 twice); 25 and 41 elements end on an odd vector of 8 or 16 lanes (the
    # loop reads two vectors at a time) and on a partial one
    gen = torch.Generator().manual_seed(3)
    sizes = [(7,), (256, 256), (65_536 * 2 + 3,), (0,), (33, 5), (25,), (41,)]
    ts = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    index = [0, 1, 2, 1, 1, 0, 2]
    out = torch.full((3,), 0.5, dtype=torch.float64)
    assert cpu.sum_squares_into(out, ts, index)
    expect = torch.full((3,), 0.5, dtype=torch.float64)
    for t, i in zip(ts, index, strict=True):
        expect[i] += t.double().square().sum()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expect, rtol=rtol, atol=0)


def test_sum_squares_into_same_with_any_thread_count_and_declines_what_it_cannot_read():
    gen = torch.Generator().manual_seed(4)
    ts = [torch.randn(300_001, generator=gen), torch.randn(70_000, generator=gen)]
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = torch.zeros(2, dtype=torch.float64)
            assert cpu.sum_squares_into(out, ts, [0, 1])
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    out = torch.zeros(2, dtype=torch.float64)
    assert not cpu.sum_squares_into(out, [torch.randn(8, 6).t()], [0])  # not contiguous
    assert not cpu.sum_squares_into(out.float(), ts, [0, 1])  # not a float64 accumulator
    assert not cpu.sum_squares_into(out, [torch.arange(5)], [0])  # not a float dtype
    assert torch.equal(out, torch.zeros(2, dtype=torch.float64))


def test_sum_squares_into_follows_tensors_whose_sizes_change():
    # the call's prepared arrays are cached by the tensors' sizes and dtypes: a tensor that
    # changed size (a layer resized between steps) is read at its new size
    for n in (100, 70_000, 100):
        t = torch.ones(n)
        out = torch.zeros(1, dtype=torch.float64)
        assert cpu.sum_squares_into(out, [t], [0])
        assert out.item() == n


def test_zero_tensors_are_left_to_the_eager_path_not_read():
    # the gradient of sgn is a ZeroTensor: a plain contiguous CPU tensor with no memory (its
    # data pointer is 0); handing it to the kernel read address 0 and killed the process
    z = torch._efficientzerotensor(8, 4)
    st = SiteStats(4, "cpu")
    assert not _kernels.forward_into(st.window, z, 1, cap=None)
    assert not _kernels.grad_into(st.window, z, None, 1, None, len(FIELDS) - 5)
    assert not cpu.sum_squares_into(torch.zeros(1, dtype=torch.float64), [z], [0])
    # end to end: a parameter and an activation reached only through sgn
    import relu_doctor

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=2, overhead_budget=None) as doc:
        for _ in range(2):
            torch.sgn(model(torch.randn(5, 3))).sum().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    assert doc.records[-1].site_rows[0]["elements"] == 2 * 5 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nonnegative", [True, False])
def test_a_cap_that_rounds_in_the_activation_dtype_still_counts_saturation(dtype, nonnegative):
    # Hardtanh(max_val=1.1) in float16 outputs 1.0996 where it saturates: both paths compare
    # against the cap as the dtype holds it (before, both counted 0 saturated elements)
    x = torch.nn.functional.hardtanh(torch.randn(64, 6) * 3, 0.0, 1.1).to(dtype)
    at_cap = (x == torch.tensor(1.1, dtype=dtype)).sum(0).double()
    assert at_cap.sum() > 0
    fused, eager = SiteStats(6, "cpu"), SiteStats(6, "cpu")
    fused.record_forward(x, 1, nonnegative=nonnegative, cap=1.1)
    with _kernels.disabled():
        eager.record_forward(x, 1, nonnegative=nonnegative, cap=1.1)
    assert torch.equal(fused.window[ROW["saturated"]], at_cap)
    assert torch.equal(eager.window[ROW["saturated"]], at_cap)


def test_sum_squares_into_reads_channels_last_gradients():
    g = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    out = torch.zeros(1, dtype=torch.float64)
    assert cpu.sum_squares_into(out, [g], [0])
    torch.testing.assert_close(out[0], g.double().square().sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_squares_into_with_minus_adds_the_squared_differences_in_the_same_pass(dtype):
    # the tap's update norms: ||a - b||^2 into out_minus, ||a||^2 into out, per layer; the
    # difference of two 16-bit tensors is taken in float32 (an update far below the
    # weight's own rounding step still counts), so the reference subtracts in float64
    gen = torch.Generator().manual_seed(5)
    sizes = [(7,), (256, 256), (65_536 * 2 + 3,), (0,), (33, 5)]
    a = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    b = [(x.double() + 1e-3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(dtype)
         for x in a]
    index = [0, 1, 2, 1, 1]
    out, out_minus = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert cpu.sum_squares_into(out, a, index, minus=b, out_minus=out_minus)
    expect, expect_minus = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for x, y, i in zip(a, b, index, strict=True):
        expect[i] += x.double().square().sum()
        expect_minus[i] += (x.double() - y.double()).square().sum()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expect, rtol=rtol, atol=0)
    torch.testing.assert_close(out_minus, expect_minus, rtol=rtol, atol=0)
    # the same sums with any number of threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_minus = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        assert cpu.sum_squares_into(one, a, index, minus=b, out_minus=one_minus)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, out) and torch.equal(one_minus, out_minus)


def test_sum_squares_into_with_minus_declines_pairs_it_cannot_read_together():
    a = torch.randn(4, 3, 5, 5)
    out, out_minus = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    channels_last = a.contiguous(memory_format=torch.channels_last)
    assert not cpu.sum_squares_into(out, [a], [0], minus=[channels_last], out_minus=out_minus)
    assert not cpu.sum_squares_into(out, [a], [0], minus=[a.double()], out_minus=out_minus)
    assert not cpu.sum_squares_into(out, [a], [0], minus=[a.flatten()], out_minus=out_minus)
    assert not cpu.sum_squares_into(out, [a], [0], minus=[a])  # nowhere to add the differences
    assert not cpu.sum_squares_into(out, [a], [0], minus=[a], out_minus=out_minus.float())
    assert torch.equal(out, torch.zeros(1, dtype=torch.float64))
    # both channels-last: read together, in memory order
    b = channels_last + 1
    assert cpu.sum_squares_into(out, [channels_last], [0], minus=[b], out_minus=out_minus)
    torch.testing.assert_close(out_minus[0], torch.tensor(float(a.numel()), dtype=torch.float64))
