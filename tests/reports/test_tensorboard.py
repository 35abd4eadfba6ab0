"""TensorBoard output, read back with tensorboard's own ``EventAccumulator`` and checked
against the run's numbers: scalar tags and values, per-unit histograms, the custom-scalars
layout, findings (the last step's, and the timeline of began/changed/ended) and
interventions as text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from relu_doctor.history import Run, load_run
from relu_doctor.reports import tensorboard as tb
from relu_doctor.reports.findings import kind_label
from tests.reference import findings_table_rows, open_findings_by_step
from tests.reports.conftest import KILLED, TrainedRun

pytest.importorskip("tensorboard")


def accumulate(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def texts(ea: Any, tag: str) -> dict[int, str]:
    from tensorboard.util import tensor_util

    out = {}
    for ev in ea.Tensors(f"{tag}/text_summary"):
        value = tensor_util.make_ndarray(ev.tensor_proto)
        out[ev.step] = value.item().decode("utf-8") if value.ndim == 0 else value[0].decode()
    return out


@pytest.fixture(scope="module")
def written(dead_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Any]:
    run = load_run(dead_run.run_dir)
    log_dir = tb.write_run(run, tmp_path_factory.mktemp("tb") / "events")
    return run, accumulate(log_dir)


def test_site_scalars_are_the_history(written: tuple[Run, Any]) -> None:
    run, ea = written
    tags = set(ea.Tags()["scalars"])
    for site in KILLED:
        rows = run.history[run.history["site"] == site].sort_values("step")
        for metric in tb.DEFAULT_METRICS:
            t = tb.tag(metric, site)
            want = rows[metric].astype(float).to_numpy()
            if metric in ("saturated_fraction",):  # a ReLU has no cap: not logged
                assert t not in tags
                continue
            if np.isnan(want).all():
                assert t not in tags, t
                continue
            events = ea.Scalars(t)
            assert [e.step for e in events] == rows["step"].tolist()
            # TensorBoard stores float32
            np.testing.assert_allclose([e.value for e in events], want, rtol=1e-6, atol=0)
    assert tb.tag("dead_fraction", "act1") == "relu_doctor/dead_fraction/act1"


def test_layer_scalars_are_the_layer_table(written: tuple[Run, Any]) -> None:
    run, ea = written
    assert not run.layers.empty
    for layer, rows in run.layers.groupby("layer"):
        rows = rows.sort_values("step")
        for metric in tb.LAYER_METRICS:
            events = ea.Scalars(tb.tag(metric, str(layer)))
            assert [e.step for e in events] == rows["step"].tolist()
            np.testing.assert_allclose([e.value for e in events],
                                       rows[metric].astype(float), rtol=1e-6)


def test_histograms_hold_every_units_activation_rate(written: tuple[Run, Any]) -> None:
    run, ea = written
    for site in KILLED:
        events = ea.Histograms(f"relu_doctor/unit_activation_rate/{site}")
        units = run.units[run.units["site"] == site]
        assert [e.step for e in events] == sorted(units["step"].unique())
        for e in events:
            rates = units[units["step"] == e.step]["activation_rate"].to_numpy(float)
            h = e.histogram_value
            assert h.num == len(rates) == 16
            assert h.sum == pytest.approx(rates.sum(), rel=1e-9)
            assert h.min == rates.min() == 0.0  # the killed units
            assert h.max == pytest.approx(rates.max())
            assert sum(h.bucket) == len(rates)


def test_custom_scalars_layout_charts_every_site_of_a_metric(written: tuple[Run, Any]) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, ea = written
    (config,) = ea.Tensors("custom_scalars__config__")  # written once
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "relu_doctor"
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    # no site has a cap: no (empty) saturation chart
    assert list(charts) == [m for m in (*tb.DEFAULT_METRICS, *tb.LAYER_METRICS)
                            if m != "saturated_fraction"]
    assert charts["dead_fraction"] == ["^relu_doctor/dead_fraction/"]
    # the regex takes in every site's scalar of that metric, and nothing else
    import re

    scalars = ea.Tags()["scalars"]
    matched = [t for t in scalars if re.match(charts["dead_fraction"][0], t)]
    assert sorted(matched) == sorted(tb.tag("dead_fraction", s) for s in KILLED)


def test_findings_text_is_the_last_steps_findings(written: tuple[Run, Any]) -> None:
    run, ea = written
    found = texts(ea, "relu_doctor/findings")
    assert list(found) == [run.last_step]
    table = found[run.last_step]
    findings = run.findings()
    assert findings
    assert table.count("\n") == len(findings) + 1  # header, rule, one row each
    for f in findings:
        assert f"| {f.severity} | {kind_label(f.kind)} | {f.site} |" in table


def test_finding_events_text_is_the_timeline(written: tuple[Run, Any]) -> None:
    run, ea = written
    timeline = texts(ea, "relu_doctor/finding_events")
    events = run.finding_events()
    assert events
    assert sorted(timeline) == sorted({e.step for e in events})
    for e in events:
        assert (f"| {e.status} | {e.finding.severity} | {kind_label(e.finding.kind)} | "
                f"{e.finding.site} |") in timeline[e.step]
    assert kind_label("lifetime_dead") == "never active"  # the report's word


def test_interventions_as_text(tmp_path: Path) -> None:
    events = [
        {"type": "intervention", "id": "a", "remedy": "leaky_relu_swap", "site": "s", "step": 10,
         "what": "replaced ReLU at s", "before": {"dead_fraction": 0.5}, "after": None},
        {"type": "intervention_result", "ref": "a", "remedy": "leaky_relu_swap", "site": "s",
         "step": 20, "after": {"dead_fraction": 0.25}},
        {"type": "intervention", "id": "b", "remedy": "lr_rescue", "site": "model", "step": 20,
         "what": "scaled the learning rate by 0.5", "before": None, "after": None},
    ]
    hist = pd.DataFrame([{"step": s, "site": "s", "dead_fraction": 0.5} for s in (10, 20)])
    run = Run(meta={}, history=hist, units=pd.DataFrame(), layers=pd.DataFrame(), events=events)
    ea = accumulate(tb.write_run(run, tmp_path / "tb"))
    got = texts(ea, "relu_doctor/events")
    assert sorted(got) == [10, 20]
    assert got[10].splitlines()[:2] == [
        "| step | remedy | site | what | before → after |", "|---|---|---|---|---|"]
    # one row per intervention, its result merged in
    assert "| 10 | leaky_relu_swap | s | replaced ReLU at s | dead_fraction 0.5 → 0.25 |" in got[10]
    assert "| 20 | lr_rescue | model | scaled the learning rate by 0.5 |" in got[20]
    assert texts(ea, "relu_doctor/findings") == {20: "No findings."}


def test_a_change_no_log_judges_reads_not_judged_in_the_text() -> None:
    """A clipper's report of its window is never measured after: its row said "not yet
    measured" after every number it recorded, for good. It gives what it recorded first
    (the share clipped, the norm before clipping), not judged; a stop its snapshot."""
    clip = {"type": "intervention", "id": "c", "remedy": "adaptive_grad_clip", "site": "model",
            "step": 10, "what": "clipped", "details": {"clip": {"clip_fraction": 0.7},
                                                       "judged": False},
            "before": {"dead_fraction": 0.1, "exploding_gradient": False,
                       "unclipped_grad_norm": 67.4}}
    stop = {"type": "intervention", "id": "s", "remedy": "treatment_plan", "site": "model",
            "step": 20, "what": "stopped", "details": {"judged": False},
            "before": {"dead_fraction": 0.9}}
    text = tb.events_markdown([clip, stop])
    assert "| clip_fraction 0.7; unclipped_grad_norm 67.4 (not judged) |" in text
    assert "| dead_fraction 0.9 (not judged) |" in text and "not yet measured" not in text


def test_scalars_leave_out_nan_and_uncapped_saturation() -> None:
    rows = [
        {"site": "a", "cap": None, "dead_fraction": 0.25, "grad_rms": float("nan"),
         "saturated_fraction": 0.0},
        {"site": "b", "cap": 6.0, "dead_fraction": 0.0, "saturated_fraction": 0.5},
    ]
    layers = pd.DataFrame([{"layer": "fc", "grad_norm": 2.0, "update_ratio": float("nan")}])
    out = tb.scalars(rows, layers, metrics=("dead_fraction", "grad_rms", "saturated_fraction"))
    assert out == {
        "relu_doctor/dead_fraction/a": 0.25,
        "relu_doctor/dead_fraction/b": 0.0,
        "relu_doctor/saturated_fraction/b": 0.5,
        "relu_doctor/grad_norm/fc": 2.0,
    }
    val = tb.scalars(rows, metrics=("dead_fraction",), prefix=tb.VAL_PREFIX)
    assert list(val) == ["relu_doctor_val/dead_fraction/a", "relu_doctor_val/dead_fraction/b"]
    assert not any(math.isnan(v) for v in out.values())
    # numpy numbers, a bool, an int, an infinity, a string; a NaN cap (read from Parquet)
    # is no cap; a row without a cap key keeps its saturation
    odd = [{"site": "c", "cap": float("nan"), "dead_fraction": np.float32(0.5),
            "grad_rms": np.inf, "saturated_fraction": 0.1},
           {"site": "d", "dead_fraction": True, "grad_rms": np.int64(3),
            "saturated_fraction": np.float64(np.nan)},
           {"site": "e", "cap": 6, "dead_fraction": "n/a", "grad_rms": 2,
            "saturated_fraction": np.float64(0.75)}]
    assert tb.scalars(odd, metrics=("dead_fraction", "grad_rms", "saturated_fraction")) == {
        "relu_doctor/dead_fraction/c": 0.5, "relu_doctor/grad_rms/c": math.inf,
        "relu_doctor/dead_fraction/d": 1.0, "relu_doctor/grad_rms/d": 3.0,
        "relu_doctor/grad_rms/e": 2.0, "relu_doctor/saturated_fraction/e": 0.75,
    }


def test_write_run_of_an_in_memory_run_needs_a_log_dir() -> None:
    run = Run(meta={}, history=pd.DataFrame(), units=pd.DataFrame(), layers=pd.DataFrame())
    with pytest.raises(ValueError, match="log_dir"):
        tb.write_run(run)


def test_plain_watch_with_run_dir_writes_tensorboard(treated_run: TrainedRun) -> None:
    """watch(run_dir=...) writes event files into <run_dir> as it goes: the same scalars as the
    run record, the training metrics, the interventions table, no saturation chart."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    run = load_run(treated_run.run_dir)
    ea = accumulate(treated_run.run_dir)
    rows = run.history[run.history["site"] == "act1"].sort_values("step")
    events = ea.Scalars(tb.tag("dead_fraction", "act1"))
    assert [e.step for e in events] == rows["step"].tolist()
    np.testing.assert_allclose([e.value for e in events], rows["dead_fraction"], rtol=1e-6)
    metrics = run.metrics
    loss = metrics[metrics["name"] == "loss"].sort_values("step")
    got = ea.Scalars("train/loss")
    assert [e.step for e in got] == loss["step"].tolist()
    np.testing.assert_allclose([e.value for e in got], loss["value"], rtol=1e-6)
    assert [e.value for e in ea.Scalars("train/lr")][-1] == pytest.approx(0.005)
    table = "\n".join(texts(ea, "relu_doctor/events").values())
    assert "| 12 | lr_rescue | model | scaled the learning rate by 0.5 |" in table
    (config,) = ea.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    titles = {c.title for cat in layout.category for c in cat.chart}
    assert "dead_fraction" in titles and "saturated_fraction" not in titles
    assert "never active" in texts(ea, "relu_doctor/definitions")[0]


def test_watch_writes_the_findings_table_where_they_change_and_at_the_end(
    treated_run: TrainedRun,
) -> None:
    """A watch(run_dir=...) loop writes the findings' table at its first log, at each log
    where a finding began, changed severity or ended, and at its last log (24, a logging
    step: no final record), each table the findings open then; the finding events as their
    own table at the steps they happened, as write_run writes them."""
    run = load_run(treated_run.run_dir)
    ea = accumulate(treated_run.run_dir)
    steps = sorted(int(s) for s in run.history["step"].unique())
    events = run.finding_events()
    changed = {e.step for e in events}
    assert steps[-1] == 24 and changed and set(steps) - changed - {steps[0], steps[-1]}
    tables = texts(ea, "relu_doctor/findings")
    assert sorted(tables) == sorted(changed | {steps[0], steps[-1]})
    want = open_findings_by_step(run)
    for step, table in tables.items():
        assert findings_table_rows(table) == {(sev, kind_label(k), site) for sev, k, site in want[step]}
    assert {(f.severity, kind_label(f.kind), f.site) for f in run.findings()} == \
        findings_table_rows(tables[steps[-1]])
    timeline = texts(ea, "relu_doctor/finding_events")
    assert sorted(timeline) == sorted(changed)
    for e in events:
        assert (f"| {e.status} | {e.finding.severity} | {kind_label(e.finding.kind)} | "
                f"{e.finding.site} |") in timeline[e.step]


def test_findings_text_is_taken_at_the_first_a_change_and_a_final_record() -> None:
    """FindingsText per series: the first record, one whose most severe findings changed
    (one began, ended or changed severity among the table's rows), a final one; the last
    record's findings when not written, once, by flush_last. A finding beginning or ending
    below the table's rows (a dormant one flapping on a 256-site model) writes no table:
    it had, at nearly every log (46 MB of a 101 MB event file)."""
    from relu_doctor.diagnosis import Finding
    from relu_doctor.record import IntervalRecord

    f = Finding("dead", "a", "warning", "m")
    worse = Finding("dead", "a", "critical", "m")
    tail = [Finding("dormant", f"s{i}", "info", "d") for i in range(tb.FINDINGS_ROWS)]

    def record(step: int, findings: list[Finding], *, final: bool = False) -> IntervalRecord:
        return IntervalRecord(step, [], pd.DataFrame(), pd.DataFrame(), findings, final=final)

    text = tb.FindingsText()
    flap = Finding("dormant", "z", "info", "d")  # the 41st: below the table's rows
    swapped = [tail[1], tail[0], *tail[2:]]  # two sites trading places: no change
    got = {k: [s for s, r in rs if text.take(k, r) is not None]
           for k, rs in {"x": [(1, record(1, [f])), (2, record(2, [f])),
                               (3, record(3, [worse])), (4, record(4, [worse])),
                               (5, record(5, [worse], final=True))],
                         "y": [(2, record(2, [f, *tail])), (4, record(4, [f, *tail, flap])),
                               (6, record(6, [f, *swapped])), (8, record(8, [*tail]))]}.items()}
    assert got == {"x": [1, 3, 5], "y": [2, 8]}
    assert text.flush_last() == {}  # x's last (5) and y's (8) were written
    assert text.take("x", record(6, [worse])) is None
    assert text.flush_last() == {"x": (6, [worse])}
    table = tb.findings_markdown([*tail, flap, f])  # most severe first, whatever the order
    assert table.splitlines()[2].startswith("| warning | dead units | a |")
    assert table.count("\n| ") == tb.FINDINGS_ROWS + 1  # the rows, then the count of the rest
    assert table.endswith(f"| | | | and {len(tail) + 2 - tb.FINDINGS_ROWS} more findings "
                          "(see the report) | |")


@pytest.mark.parametrize("n", [0, 1, 4, 191, 192, 193, 511, 512, 513, 1025, 3000, 100_003])
def test_crc32c_is_tensorboards_on_every_length_class(n: int) -> None:
    """The vectorised CRC-32C equals tensorboard's own byte loop: short messages (the loop),
    messages of a block and a byte either side of the block size, and many blocks."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as ref

    from relu_doctor.reports._crc32c import crc32c, masked_crc32c

    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c(data) == ref.crc32c(data)
    assert masked_crc32c(data) == ref.masked_crc32c(data)
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C


def test_an_event_files_records_carry_tensorboards_checksums(tmp_path: Path) -> None:
    """Every record of a SafeSummaryWriter's file, framed by relu_doctor, verifies with
    tensorboard's checksum, and all of one add_scalars call is one event read back value by
    value, each its own series."""
    import struct

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from relu_doctor.reports.eventfile import SafeSummaryWriter

    values = {f"relu_doctor/dead_fraction/layer{i}": i / 7 for i in range(300)}
    w = SafeSummaryWriter(tmp_path)
    tb.add_scalars(w, values, 5)
    w.add_text("relu_doctor/findings", "x" * 5000, 5)
    w.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    raw, events, at = path.read_bytes(), [], 0
    while at < len(raw):
        header = raw[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[at + 8 : at + 12])[0] == masked_crc32c(header)
        data = raw[at + 12 : at + 12 + length]
        assert struct.unpack("<I", raw[at + 12 + length : at + 16 + length])[0] == masked_crc32c(data)
        events.append(Event.FromString(data))
        at += 16 + length
    scalar_events = [e for e in events if e.summary.value and e.summary.value[0].HasField("simple_value")]
    assert len(scalar_events) == 1 and len(scalar_events[0].summary.value) == len(values)
    ea = accumulate(tmp_path)
    for t, v in values.items():
        (got,) = ea.Scalars(t)
        assert (got.step, got.value) == (5, pytest.approx(v))


def test_histograms_in_one_event_equal_torchs_per_call_ones(tmp_path: Path) -> None:
    """A record's per-unit histograms, written as one event, read back as torch's
    add_histogram writes each site's finite rates: sites whose rows interleave, NaN rates
    left out, a site with none left out."""
    from torch.utils.tensorboard import SummaryWriter

    from relu_doctor.reports.eventfile import SafeSummaryWriter

    rng = np.random.default_rng(0)
    sites = np.array(["a", "b", "c", "nan_only"])[rng.integers(0, 3, 300)]
    rates = rng.random(300)
    rates[rng.random(300) < 0.1] = np.nan
    rates[:5] = [0.0, 1.0, 1.0, 0.0, 0.5]
    units = pd.DataFrame({"site": [*sites, "nan_only"], "activation_rate": [*rates, np.nan]})
    ours = SafeSummaryWriter(tmp_path / "ours")
    tb.write_record(ours, 3, sites=[], units=units, findings=None)
    ours.close()
    ref = SummaryWriter(tmp_path / "ref")
    for site, part in units.groupby("site", sort=False):
        r = part["activation_rate"].to_numpy(float)
        if np.isfinite(r).any():
            ref.add_histogram(tb.tag("unit_activation_rate", str(site)), r[np.isfinite(r)], 3,
                              bins=np.linspace(0.0, 1.0, 21))
    ref.close()
    got, want = accumulate(tmp_path / "ours"), accumulate(tmp_path / "ref")
    assert sorted(got.Tags()["histograms"]) == sorted(want.Tags()["histograms"]) == [
        tb.tag("unit_activation_rate", s) for s in "abc"]
    for t in want.Tags()["histograms"]:
        (g,), (w,) = got.Histograms(t), want.Histograms(t)
        assert_histograms_equal(g.histogram_value, w.histogram_value)


def assert_histograms_equal(got: Any, want: Any, where: str = "") -> None:
    """Every field of two histograms (``HistogramProto`` messages or tensorboard's
    ``HistogramValue``) equal; ``sum`` and ``sum_squares`` to float64 rounding (summed in
    another order)."""
    for f in ("min", "max", "num", "bucket_limit", "bucket"):  # (NaN equals NaN here)
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f"{f} {where}")
    for f in ("sum", "sum_squares"):
        np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-13, atol=0,
                                   err_msg=f"{f} {where}")


def test_histograms_equal_torchs_make_histogram_on_every_edge_case() -> None:
    """Every field of each part's histogram as torch's make_histogram makes it: lengths on
    both sides of numpy's pairwise-sum blocks, values on the bin edges (0, 1, an inner
    edge), one bin only, the first or the last bin only, and parts with a value outside the
    bins or NaN (torch's own call); an empty part raises as torch's does."""
    from torch.utils.tensorboard.summary import make_histogram

    rng = np.random.default_rng(1)
    bins = np.linspace(0.0, 1.0, 21)
    parts = [rng.random(n) for n in (1, 7, 8, 9, 127, 128, 129, 1000)]
    parts += [
        np.array([0.0]), np.array([1.0]), np.array([0.0, 1.0]), np.array([0.05, 0.05, 0.1]),
        np.full(5, 0.5), np.array([0.96, 0.97, 1.0]), np.array([0.0, 0.01]),
        np.array([0.3, 1.5]), np.array([-0.1, 0.2]), np.array([0.2, np.nan]),
        bins.copy(), rng.random(64).astype(np.float32),
    ]
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    got = tb._histograms(parts, bins)
    for i, (p, h) in enumerate(zip(parts, got, strict=True)):
        assert_histograms_equal(HistogramProto.FromString(h),
                                make_histogram(p.astype(float), bins), f"part {i}: {p[:8]}")
    with pytest.raises(ValueError, match="no element"):
        tb._histograms([np.array([0.5]), np.array([])], bins)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "interleaved"])
def test_rates_by_site_are_each_sites_finite_rates_in_first_appearance_order(grouped: bool) -> None:
    """The histograms' input, against pandas' group-by: each site's finite rates in row
    order, sites in the order they first appear, a site with no finite rate left out;
    rows grouped by site (a record's table) or interleaved (as a table read back may be)."""
    rng = np.random.default_rng(3)
    sizes = {"z.last": 5, "a.first": 7, "nan.only": 3, "m": 1}
    site = np.repeat(list(sizes), list(sizes.values()))
    rates = rng.random(len(site))
    rates[site == "nan.only"] = np.nan
    rates[[1, 6]] = [np.inf, np.nan]
    if not grouped:
        perm = rng.permutation(len(site))
        site, rates = site[perm], rates[perm]
    units = pd.DataFrame({"site": site, "activation_rate": rates})
    got = tb._rates_by_site(units)
    finite = units[np.isfinite(units["activation_rate"])]
    want = {str(k): g["activation_rate"].to_numpy()
            for k, g in finite.groupby("site", sort=False)}
    order = list(dict.fromkeys(site.tolist()))
    assert list(got) == [s for s in order if s in want] and "nan.only" not in got
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)
