"""Every raw statistic, per site and per unit, against the brute-force reference.

The models are the zoo's (MLP, conv + BN + inplace ReLU, residual blocks reusing one inplace
ReLU two and three times, (N, L, F) sequences, MobileNetV2's ReLU6) and one small model per
ReLU-family member. Each is trained for several steps with windows closed part-way, and
each site's window, closed-window lifetime and their total are compared with the reference
sums over exactly the steps each should hold.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import relu_doctor
from relu_doctor.stats import (
    FIELDS,
    FORWARD_FIELDS,
    GRAD_FIELDS,
    ROW,
    AgreedSum,
    SiteStats,
    forward_rows,
    grad_rows,
    reduce_sum,
    resolve_unit_dim,
)
from tests import reference as ref
from tests import zoo

STEPS, LOG_EVERY = 5, 2  # windows close after steps 2 and 4; step 5 is the open window


def raw(matrix: torch.Tensor) -> dict[str, np.ndarray]:
    """A site's (len(FIELDS), units) matrix as {field: per-unit array}."""
    m = matrix.detach().cpu().numpy()
    return {name: m[ROW[name]] for name in FIELDS}


def site_views(site) -> dict[str, dict[str, np.ndarray]]:
    st = site.stats
    return {"lifetime": raw(st.lifetime), "window": raw(st.window), "total": raw(st.lifetime + st.window)}


@pytest.mark.parametrize("case", zoo.CASES.values(), ids=zoo.CASES.keys())
def test_every_statistic_matches_reference(run_watched, case):
    run = run_watched(case, steps=STEPS, log_every_n_steps=LOG_EVERY)
    names = ref.site_names(run.recorder)
    assert sorted(s.name for s in run.doc.probe.sites()) == sorted(names.values())

    closed = STEPS // LOG_EVERY * LOG_EVERY
    spans = {"lifetime": list(range(closed)), "window": list(range(closed, STEPS)), "total": None}
    varied = False
    for key, capture in run.recorder.calls.items():
        path, _ = key
        site = run.site_of(key)
        ndim = capture.outputs[0].dim()
        unit_dim = ref.expected_unit_dim(ndim)
        cap = ref.expected_cap(run.model.get_submodule(path))
        assert (site.unit_dim, site.units) == (unit_dim, capture.outputs[0].shape[unit_dim])
        assert len(capture.outputs) == len(capture.grads) == STEPS
        views = site_views(site)
        for span, steps in spans.items():
            expected = ref.expected_stats(capture, unit_dim, cap=cap, steps=steps)
            ref.assert_stats_match(views[span], expected, f"{case.name} {site.name} {span}")
            for name in ("nonfinite", "grad_nonfinite"):
                assert not views[span][name].any(), f"{site.name} {span}: {name}"
        total = ref.expected_stats(capture, unit_dim, cap=cap)
        varied |= bool(((total["active"] > 0) & (total["active"] < total["elements"])).any())
        if cap is not None and case.name.startswith("family_"):
            # The capped members must actually saturate here, or `saturated` went untested.
            assert 0 < total["saturated"].sum() < total["elements"].sum()
    assert varied, "no unit was partly active: the comparison would not test much"


def test_reused_module_sites_are_never_mixed(run_watched):
    """BasicBlock calls one inplace ReLU twice per forward: two sites, each with only its
    own calls' numbers (summing both calls would match neither reference)."""
    run = run_watched(zoo.ARCH_CASES["resnetish"], steps=2)
    block = [k for k in run.recorder.calls if k[0] == "layer1.0.relu"]
    assert sorted(block) == [("layer1.0.relu", 0), ("layer1.0.relu", 1)]
    first, second = (run.site_of(k) for k in sorted(block))
    assert (first.name, second.name) == ("layer1.0.relu#0", "layer1.0.relu#1")
    mixed = ref.expected_stats(run.recorder.calls[block[0]], 1)
    other = ref.expected_stats(run.recorder.calls[block[1]], 1)
    got = raw(first.stats.window + first.stats.lifetime)
    assert not np.allclose(got["sum"], mixed["sum"] + other["sum"])


def test_bottleneck_sites_keep_their_own_widths(run_watched):
    run = run_watched(zoo.ARCH_CASES["bottleneck"], steps=2)
    widths = {run.site_of(k).name: c.outputs[0].shape[1] for k, c in run.recorder.calls.items()}
    assert {s.name: s.units for s in run.doc.probe.sites()} == widths
    assert len(set(widths.values())) == 3


# ---------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("shape", "override", "expected"),
    [
        ((5,), None, 0),
        ((4, 5), None, 1),
        ((4, 7, 5), None, 2),
        ((4, 5, 3, 3), None, 1),
        ((4, 5, 2, 3, 3), None, 1),
        ((4, 5, 7), 1, 1),
        ((4, 5, 7), -2, 1),
        ((4, 5, 3, 3), -1, 3),
    ],
)
def test_resolve_unit_dim_follows_the_rule(shape, override, expected):
    dim, rule = resolve_unit_dim(shape, override)
    assert dim == expected
    assert ("override" in rule) == (override is not None)


@pytest.mark.parametrize(("shape", "override"), [((), None), ((4, 5), 2), ((4, 5), -3)])
def test_resolve_unit_dim_rejects_impossible_dims(shape, override):
    with pytest.raises(ValueError, match="dim"):
        resolve_unit_dim(shape, override)


def test_windows_add_up_to_the_lifetime():
    st = SiteStats(3, "cpu")
    steps = [torch.relu(torch.randn(6, 3)) for _ in range(6)]
    windows = [steps[:2], steps[2:4], steps[4:]]
    for i, window in enumerate(windows):
        for x in window:
            st.add_forward(forward_rows(x, 1, nonnegative=True, cap=None))
        if i < len(windows) - 1:
            st.close_window()
    closed = [x for w in windows[:-1] for x in w]
    ref.assert_stats_match(raw(st.lifetime), ref.forward_reference(closed, 1), "lifetime")
    ref.assert_stats_match(raw(st.window), ref.forward_reference(windows[-1], 1), "window")
    ref.assert_stats_match(raw(st.lifetime + st.window), ref.forward_reference(steps, 1), "total")
    assert not st.window[len(FORWARD_FIELDS) :].any(), "no gradient was added"


def test_site_stats_state_round_trip_and_unit_check():
    st = SiteStats(4, "cpu")
    st.add_forward(forward_rows(torch.randn(3, 4), 1, nonnegative=False, cap=None))
    st.close_window()
    st.add_forward(forward_rows(torch.randn(3, 4), 1, nonnegative=False, cap=None))
    state = st.state_dict()
    st.window.zero_()  # the state must be a copy, not a view
    fresh = SiteStats(4, "cpu")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.lifetime, state["lifetime"]) and torch.equal(fresh.window, state["window"])
    assert state["window"].any()
    with pytest.raises(ValueError, match="4 units"):
        SiteStats(5, "cpu").load_state_dict(state)


def test_reduce_sum_is_one_collective_and_keeps_shapes():
    calls = []

    def all_reduce(flat: torch.Tensor) -> torch.Tensor:
        calls.append(flat.shape)
        return flat * 3  # three identical processes

    tensors = [torch.randn(len(FIELDS), 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    out = reduce_sum(tensors, all_reduce)
    assert len(calls) == 1
    for t, r in zip(tensors, out, strict=True):
        assert r.shape == t.shape
        torch.testing.assert_close(r, 3 * t)
    assert reduce_sum([], all_reduce) == []


class TwoProcesses:
    """Two threads standing for two processes, with an ``all_reduce`` between them that
    sums their tensors, and fails as a real one would not: at once on tensors of other
    sizes (gloo aborts, NCCL hangs), after a timeout on a call the other never makes."""

    def __init__(self) -> None:
        self._barrier = threading.Barrier(2, timeout=10)
        self._slots: list[torch.Tensor | None] = [None, None]
        self.calls: list[list[int]] = [[], []]

    def all_reduce(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank].append(t.numel())
            self._slots[rank] = t.clone()
            self._barrier.wait()  # threading.BrokenBarrierError: the other made no call
            mine, theirs = self._slots[rank], self._slots[1 - rank]
            assert mine is not None and theirs is not None
            if mine.numel() != theirs.numel():
                raise AssertionError(f"a collective of {mine.numel()} against {theirs.numel()}")
            out = mine + theirs
            self._barrier.wait()
            return out
        return reduce

    def run(self, fn):
        """``[fn(0, all_reduce of 0), fn(1, all_reduce of 1)]``, side by side."""
        results: list = [None, None]
        errors: list[BaseException] = []

        def side(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.all_reduce(rank))
            except BaseException as e:
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=side, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _tensors(*shapes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=torch.float64, generator=g) for shape in shapes]


def test_agreed_sum_matches_tensors_by_name_whatever_order_each_process_holds_them_in():
    a = _tensors((2, 3), (4,), seed=0)
    b = _tensors((2, 3), (4,), seed=1)
    held = [{"x": a[0], "y": a[1]}, {"y": b[1], "x": b[0]}]  # made in another order
    group = TwoProcesses()
    sums = [AgreedSum(group.all_reduce(r)) for r in (0, 1)]

    results = group.run(lambda r, _: sums[r](held[r], None))
    for summed, world in results:
        assert world == 2 and summed is not None and set(summed) == {"x", "y"}
        torch.testing.assert_close(summed["x"], a[0] + b[0], rtol=0, atol=0)
        torch.testing.assert_close(summed["y"], a[1] + b[1], rtol=0, atol=0)
    # A new set: the check, then the sum of the set (9 numbers: the process count, the
    # signature and its squares).
    assert group.calls[0] == group.calls[1] == [9, 10]
    # The same set again: one call, the check and the tensors together.
    group.calls = [[], []]
    results = group.run(lambda r, _: sums[r](held[r], None))
    assert group.calls[0] == group.calls[1] == [9 + 10]
    torch.testing.assert_close(results[1][0]["y"], a[1] + b[1], rtol=0, atol=0)
    # Nothing anywhere: the check only.
    group.calls = [[], []]
    assert group.run(lambda r, _: AgreedSum(_)({}, None)) == [({}, 2), ({}, 2)]
    assert group.calls == [[9], [9]]


@pytest.mark.parametrize("theirs", [
    {"x": (2, 3)},  # a name missing there
    {"x": (2, 3), "y": (5,)},  # another size
    {"x": (3, 2), "y": (4,)},  # the same sizes, another shape
    {"x": (2, 3), "z": (4,)},  # another name
    {},  # nothing there (its model in eval mode: no site yet)
], ids=["missing", "size", "shape", "name", "none"])
@pytest.mark.parametrize("agreed_before", [False, True], ids=["first", "after-agreeing"])
def test_agreed_sum_of_processes_holding_other_tensors_is_none_on_both(theirs, agreed_before):
    """Neither a first call nor one after the processes agreed on a set (this process
    still holding it, the other not) makes a call the other does not make, or one of
    another size."""
    mine = {"x": (2, 3), "y": (4,)}
    held = [{k: t for k, t in zip(d, _tensors(*d.values(), seed=r), strict=True)}
            for r, d in enumerate((mine, theirs))]
    group = TwoProcesses()
    sums = [AgreedSum(group.all_reduce(r)) for r in (0, 1)]
    if agreed_before:
        before = [{"x": torch.ones(2, 3, dtype=torch.float64),
                   "y": torch.ones(4, dtype=torch.float64)}] * 2
        assert all(s is not None for s, _ in group.run(lambda r, _: sums[r](before[r], None)))
        group.calls = [[], []]
    results = group.run(lambda r, _: sums[r](held[r], None))
    assert results == [(None, 2), (None, 2)]
    assert group.calls[0] == group.calls[1] and len(group.calls[0]) == 1


def test_grad_rows_without_input_gradient_counts_no_input_elements():
    g = torch.randn(5, 3)
    rows = grad_rows(g, None, 1)
    got = dict(zip(GRAD_FIELDS, rows.numpy(), strict=True))
    np.testing.assert_array_equal(got["grad_elements"], [5, 5, 5])
    np.testing.assert_array_equal(got["grad_in_elements"], [0, 0, 0])
    np.testing.assert_array_equal(got["grad_zero"], [0, 0, 0])
    np.testing.assert_allclose(got["grad_sq"], (g.double() ** 2).sum(0).numpy(), rtol=1e-6)


@pytest.mark.parametrize("shape", [(2**24 + 3, 1), (1, 1, 4097, 4097)], ids=["rows", "positions"])
def test_counts_stay_exact_beyond_float32_integers(shape):
    """float32 holds integers exactly only up to 2**24; per-step counts must not round,
    whether the elements of a unit lie along rows (N, F) or positions (N, C, H, W)."""
    x = torch.ones(shape)
    per_unit = x.numel() // x.shape[1]
    assert per_unit > 2**24 and per_unit % 2 == 1  # odd: not representable in float32
    rows = forward_rows(x, 1, nonnegative=True, cap=None)
    got = dict(zip(FORWARD_FIELDS, rows[:, 0].tolist(), strict=True))
    assert got["elements"] == per_unit
    assert got["active"] == per_unit
    g = grad_rows(x, torch.zeros(shape), 1)
    assert dict(zip(GRAD_FIELDS, g[:, 0].tolist(), strict=True))["grad_zero"] == per_unit


# ---------------------------------------------------------------------- step patterns


def test_gradient_statistics_are_unscaled_under_a_grad_scaler():
    """With fp16-style loss scaling the taps see scale x dL/d(output); relu_doctor divides
    the scale out, so grad_sq is that of the true gradient (zero counts are unaffected)."""
    case = zoo.ARCH_CASES["small_cnn"]
    model = case.model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = ref.Recorder(model)
    with relu_doctor.watch(model, grad_scaler=scaler) as doc:
        for _ in range(3):
            scaler.scale(model(case.batch(4)).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            doc.step()
    recorder.remove()
    scale = float(scaler.get_scale())
    assert scale == 2.0**12  # unchanged over these steps: one scale for every recorded grad
    for key, capture in recorder.calls.items():
        site = doc.probe.site(ref.site_names(recorder)[key])
        expected = ref.expected_stats(capture, 1)
        expected["grad_sq"] = expected["grad_sq"] / scale**2
        ref.assert_stats_match(raw(site.stats.window + site.stats.lifetime), expected, site.name)


def test_a_network_called_twice_in_one_forward_gives_separate_sites(run_watched):
    """A siamese model calls its whole trunk twice per forward: every activation is then
    called twice within one forward pass, so each call is its own site (``#0``, ``#1``)."""
    base = zoo.ARCH_CASES["resnetish"]

    class Siamese(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = base.model()

        def forward(self, x):
            a, b = x.chunk(2)
            return self.net(a) - self.net(b)

    case = zoo.Case("siamese", Siamese, lambda n: torch.cat([base.batch(n), base.batch(n)]))
    run = run_watched(case, steps=2, batch_size=3)
    names = ref.site_names(run.recorder)
    assert {s.name for s in run.doc.probe.sites()} == set(names.values())
    assert "net.stem.2#1" in names.values() and "net.layer1.0.relu#3" in names.values()
    for key, capture in run.recorder.calls.items():
        site = run.site_of(key)
        ref.assert_stats_match(raw(site.stats.window + site.stats.lifetime),
                               ref.expected_stats(capture, 1), site.name)


def test_forwards_accumulated_in_one_step_add_to_the_same_sites():
    """Gradient accumulation: several forward passes, one optimizer step. Each pass restarts
    the call indices, so all of them add to the same sites."""
    case = zoo.ARCH_CASES["resnetish"]
    model = case.model()
    recorder = ref.Recorder(model)
    with relu_doctor.watch(model) as doc:
        for _ in range(2):
            for _ in range(3):
                model(case.batch(2)).square().mean().backward()
            doc.step()
    recorder.remove()
    names = ref.site_names(recorder)
    assert {s.name for s in doc.probe.sites()} == set(names.values())
    assert all(len(c.outputs) == len(c.grads) == 6 for c in recorder.calls.values())
    for key, capture in recorder.calls.items():
        site = doc.probe.site(names[key])
        ref.assert_stats_match(raw(site.stats.window + site.stats.lifetime),
                               ref.expected_stats(capture, 1), site.name)


def test_an_activation_on_an_input_without_gradient_has_forward_statistics_only(run_watched):
    case = zoo.Case("relu_first", lambda: torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(6, 2)),
                    lambda n: torch.randn(n, 6))
    run = run_watched(case, steps=2, log_every_n_steps=2)
    (site,) = run.doc.probe.sites()
    total = raw(site.stats.lifetime)
    ref.assert_stats_match(total, ref.expected_stats(run.recorder.calls[("0", 0)], 1), "forward")
    assert not any(total[name].any() for name in GRAD_FIELDS)
    row = run.doc.records[-1].site_row("0")
    assert np.isnan(row["grad_rms"]) and np.isnan(row["grad_zero_fraction"])
