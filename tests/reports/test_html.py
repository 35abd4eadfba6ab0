"""The HTML report without a browser: content, numbers, escaping, robustness."""

from __future__ import annotations

import html as htmllib
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import relu_doctor
from relu_doctor.errors import ReluDoctorError, RunDirError
from relu_doctor.history import Run, RunWriter, load_run
from relu_doctor.reports import plots
from relu_doctor.reports.context import build_context, fmt_num, fmt_pct
from relu_doctor.reports.html import render_report, write_report
from relu_doctor.reports.report import Report
from relu_doctor.reports.text import summary
from tests.reports.conftest import KILLED, XSS_DIR, XSS_SITE, TrainedRun


def data_island(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="relu-doctor-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def section(page: str, anchor: str) -> str:
    start = page.index(f'<section id="{anchor}">')
    return page[start : page.index("</section>", start)]


def test_report_is_one_self_contained_file(dead_run: TrainedRun) -> None:
    page = dead_run.report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # no external URL: every src/href is a data URI or a fragment
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith(("data:", "#")), attr
    assert "http://" not in page and "https://" not in page
    assert "Content-Security-Policy" in page
    assert page.count("<img ") >= 4  # dead over time, two heatmaps, gradient flow
    assert len(re.findall(r'src="data:image/png;base64,', page)) == page.count("<img ")


def test_verdict_comes_first_then_findings_naming_dead_units(dead_run: TrainedRun) -> None:
    page = dead_run.report.read_text(encoding="utf-8")
    order = [page.index(f'id="{a}"') for a in (
        "rd-verdict", "rd-findings", "rd-sites", "rd-dead", "rd-heatmaps", "rd-gradients",
        "rd-interventions", "rd-environment")]
    assert order == sorted(order)
    verdict = page[page.index('id="rd-verdict"') : page.index('id="rd-findings"')]
    assert "problem" in verdict and "act1" in verdict
    findings = section(page, "rd-findings")
    for site, units in KILLED.items():
        m = re.search(
            rf'dead units</span>\s*<span class="rd-at">at</span> <code class="rd-site">{site}</code>'
            r'.*?<span class="rd-unit-list">([^<]*)</span>',
            findings, re.S,
        )
        assert m is not None, site
        named = [int(u) for u in m.group(1).split(",")]
        assert set(units) <= set(named)
    assert "Recommended:" in findings and "LeakyReLU" in findings


def test_numbers_match_what_was_logged_during_training(dead_run: TrainedRun) -> None:
    """The report made from the run directory afterwards shows what training logged."""
    logged = dead_run.history
    last = logged[logged["step"] == logged["step"].max()].set_index("site")
    page = dead_run.report.read_text(encoding="utf-8")
    data = data_island(page)
    assert data["steps"] == sorted(int(s) for s in logged["step"].unique())
    assert data["last_step"] == int(logged["step"].max())
    cols = ("units", "dead", "dead_fraction", "lifetime_dead", "dormant", "dormant_fraction",
            "sparsity", "grad_rms", "grad_zero_fraction")
    assert [s["site"] for s in data["sites"]] == list(last.index)
    # "dormant" in the report: flagged dormant by the per-unit verdicts logged in training,
    # and not dead (the record's site-level count includes dead units)
    units = dead_run.in_memory.units
    u = units[units["step"] == logged["step"].max()]
    quiet = (u["dormant"].astype(bool) & ~u["dead"].astype(bool)).groupby(u["site"]).sum()
    last = last.assign(dormant=[int(quiet[s]) for s in last.index])
    for s in data["sites"]:
        for c in cols:
            want = float(last.loc[s["site"], c])
            assert s[c] == pytest.approx(want, rel=1e-12, abs=0.0), (s["site"], c)
    # the table cells are those numbers, formatted
    table = section(page, "rd-sites")
    for site, row in last.iterrows():
        m = re.search(rf"<code>{site}</code>.*?</tr>", table, re.S)
        assert m is not None
        cells = re.findall(r'<td class="rd-n">([^<]*)</td>', m.group(0))
        assert cells == [
            str(int(row["units"])), str(int(row["dead"])), fmt_pct(row["dead_fraction"]),
            str(int(row["lifetime_dead"])), str(int(row["dormant"])), fmt_pct(row["sparsity"]),
            fmt_num(row["grad_rms"]), fmt_pct(row["grad_zero_fraction"]),
        ]
    # and the same report context comes from the directory and from memory
    from_disk = build_context(load_run(dead_run.run_dir)).data
    in_memory = build_context(dead_run.in_memory).data
    assert from_disk == in_memory


def test_heatmap_data_from_directory_matches_memory(dead_run: TrainedRun) -> None:
    disk = load_run(dead_run.run_dir)
    for site in KILLED:
        a = plots.activity_matrix(disk.units, site)
        b = plots.activity_matrix(dead_run.in_memory.units, site)
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.matrix, b.matrix)
        # killed units sort first and are dead at every logged step
        assert a.row_labels[: len(KILLED[site])] == [str(u) for u in sorted(KILLED[site])]
        assert (a.matrix[: len(KILLED[site])] == 0).all()
        assert a.dead_last >= len(KILLED[site])


def test_user_strings_are_escaped(xss_run: TrainedRun) -> None:
    page = xss_run.report.read_text(encoding="utf-8")
    assert XSS_SITE not in page
    assert "<img src=x" not in page
    assert htmllib.escape(XSS_SITE, quote=False) in page
    assert htmllib.escape(XSS_DIR, quote=False) in page
    # the only script element is the JSON data block, whose text escapes '<'
    assert page.count("<script") == 1
    data = data_island(page)
    assert XSS_SITE in [s["site"] for s in data["sites"]]
    assert '"\\u003cscript\\u003e' in page
    # $ in a name does not start matplotlib mathtext (the figures rendered)
    assert "a$b$_{x}&amp;" in page


def test_thousands_of_units_are_aggregated_legibly() -> None:
    rng = np.random.default_rng(0)
    n_units, steps = 5000, np.arange(10, 1010, 10)
    rate = rng.uniform(0.2, 0.8, size=n_units)
    rate[:1200] = 0.0  # dead
    units = pd.DataFrame({
        "step": np.repeat(steps, n_units),
        "site": "wide",
        "unit": np.tile(np.arange(n_units), len(steps)),
        "activation_rate": np.tile(rate, len(steps)),
    })
    data = plots.activity_matrix(units, "wide")
    assert data is not None
    assert data.matrix.shape[0] <= plots.MAX_ROWS and data.matrix.shape[1] <= plots.MAX_COLS
    assert data.units_per_row == math.ceil(n_units / plots.MAX_ROWS)
    assert data.dead_last == 1200
    full_dead_rows = 1200 // data.units_per_row
    assert (data.matrix[:full_dead_rows] == 0).all()  # the dead block stays one block
    assert data.matrix[full_dead_rows + 1 :].min() > 0
    fig = plots.activity_heatmap_figure(data, "wide", "relu")
    w, h = fig.get_size_inches()
    assert w <= 7 and h <= 6  # a bounded image, not one pixel row per unit


@pytest.mark.parametrize("last_lr", [0.0, 1e-4])
def test_the_learning_rate_panel_keeps_a_rate_of_zero(last_lr: float) -> None:
    """A schedule that ends at 0 keeps its last point, on a linear axis, with no warning
    from matplotlib about log-scaling; rates above 0 are drawn on a log axis."""
    import warnings

    metrics = pd.DataFrame({"step": [1, 2, 3, 1, 2, 3], "name": ["loss"] * 3 + ["lr"] * 3,
                            "value": [2.0, 1.5, 1.2, 1e-3, 5e-4, last_lr]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.training_curve_figure(metrics)
        assert fig is not None
        fig.canvas.draw()
    ax = next(a for a in fig.axes if a.get_title() == "learning rate")
    assert list(ax.lines[0].get_ydata()) == [1e-3, 5e-4, last_lr]
    assert ax.get_yscale() == ("linear" if last_lr == 0 else "log")


@pytest.mark.parametrize(("values", "scale"), [([4e6, 5e4, 8e3], "log"), ([2.0, 1.5, 0.05], "linear"),
                                               ([4e6, 0.0, 8e3], "linear")])
def test_a_loss_over_decades_is_drawn_on_a_log_scale(values: list[float], scale: str) -> None:
    """A regression's loss from 4e6 to 8e3 drew flat at 0 after the first window (a trial):
    a metric above 0 whose largest is 100 times its smallest is drawn on a log axis; one
    with a 0, or a narrower range, on a linear one."""
    metrics = pd.DataFrame({"step": [1, 2, 3], "name": "loss", "value": values})
    fig = plots.training_curve_figure(metrics)
    assert fig is not None
    assert fig.axes[0].get_yscale() == scale


def test_small_layers_keep_one_row_per_unit() -> None:
    units = pd.DataFrame({"step": [1, 1, 1, 2, 2, 2], "site": "s", "unit": [0, 1, 2] * 2,
                          "activation_rate": [0.5, 0.0, 0.9, 0.4, 0.0, 1.0]})
    data = plots.activity_matrix(units, "s")
    assert data is not None and data.units_per_row == 1
    assert data.row_labels == ["1", "0", "2"]  # least active first


def _writer_run(tmp_path: Path, events: list[dict]) -> Path:
    run_dir = tmp_path / "run"
    w = RunWriter(run_dir)
    w.write_meta({"model": "Net", "sites": [{"name": "s", "family": "relu", "units": 2, "order": 0}]})
    for step in (10, 20):
        w.append_table("history", step, pd.DataFrame([{
            "step": step, "site": "s", "family": "relu", "order": 0, "units": 2, "units_seen": 2,
            "dead": 1, "dead_fraction": 0.5, "lifetime_dead": 1, "dormant": 1,
            "dormant_fraction": 0.5, "sparsity": 0.7, "grad_rms": 0.01,
            "grad_zero_fraction": 0.7}]))
        w.append_table("units", step, pd.DataFrame({
            "step": step, "site": "s", "unit": [0, 1], "activation_rate": [0.0, 0.6]}))
    w.append_events(events)
    return run_dir


def test_interventions_timeline_joins_results(tmp_path: Path) -> None:
    events = [
        {"type": "intervention", "id": "swap:10:s:1", "remedy": "leaky_relu_swap", "site": "s",
         "step": 10, "what": "replaced ReLU at s with LeakyReLU(negative_slope=0.01)",
         "before": {"dead_fraction": 0.5}, "after": None},
        {"type": "intervention_result", "ref": "swap:10:s:1", "site": "s", "step": 20,
         "after": {"dead_fraction": 0.0}},
        {"type": "intervention", "id": "clip:10", "remedy": "adaptive_grad_clip", "site": "model",
         "step": 10, "what": "clipped on 3 of 10 steps",
         "before": {"grad_norm": 2.0, "unclipped_grad_norm": 40.0, "dead_fraction": 0.1},
         "details": {"clip": {"clip_fraction": 0.3}, "judged": False}},
        {"type": "intervention", "id": "clip:20", "remedy": "adaptive_grad_clip", "site": "model",
         "step": 20, "what": "clipped on 1 of 10 steps",
         "before": {"grad_norm": 1.0, "unclipped_grad_norm": 9.0, "dead_fraction": 0.1},
         "details": {"clip": {"clip_fraction": 0.1}, "judged": False}},
    ]
    run_dir = _writer_run(tmp_path, events)
    page = render_report(load_run(run_dir))
    timeline = section(page, "rd-interventions")
    assert "3 interventions" in timeline
    assert "replaced ReLU at s with LeakyReLU" in timeline
    assert "<strong>dead</strong> 50.0% &rarr; 0.0%" in timeline  # its target, first
    assert "acted at 2 logging intervals, steps 10–20" in timeline  # clipping summarised
    assert "<strong>steps clipped</strong> 30.0% &rarr; 10.0%" in timeline  # first -> last
    # then the norm before clipping (the one after is the clipper's doing), not the dead share
    assert "gradient norm before clipping 40 &rarr; 9" in timeline
    assert "<div>dead 10.0%" in timeline


def test_a_change_no_log_judges_reads_not_judged_where_others_await_their_numbers() -> None:
    """A clipper's report of one window (or a plan's stop) is never judged: its numbers after
    read "not judged", not "not yet measured", and no metric is bold as its target."""
    from relu_doctor.reports.interventions import intervention_view

    clip = intervention_view({
        "type": "intervention", "id": "clip:10", "remedy": "adaptive_grad_clip",
        "site": "model", "step": 10, "what": "clipped on 3 of 10 steps",
        "before": {"unclipped_grad_norm": 40.0, "dead_fraction": 0.1},
        "details": {"clip": {"clip_fraction": 0.3}, "judged": False}})
    assert clip.changes == [("steps clipped", "30.0%", "not judged"),
                            ("gradient norm before clipping", "40", "not judged"),
                            ("dead", "10.0%", "not judged")]
    assert clip.target == "" and clip.verdict == ""
    # a clipper's row of an older run, judged on the norm the tap read: that target first
    old = intervention_view({
        "type": "intervention", "id": "clip:10", "remedy": "adaptive_grad_clip",
        "site": "model", "step": 10, "what": "AGC clipped", "target": "grad_norm",
        "verdict": "did not help", "before": {"grad_norm": 0.189, "dead_fraction": 0.1},
        "after": {"grad_norm": 0.255, "dead_fraction": 0.1},
        "details": {"clip": {"clip_fraction": 0.029}}})
    assert old.changes[0] == ("parameter-gradient norm", "0.189", "0.255")
    assert old.target == "grad_norm" and old.verdict == "did not help"
    pending = intervention_view({
        "type": "intervention", "id": "swap:10:s:1", "remedy": "leaky_relu_swap", "site": "s",
        "step": 10, "what": "replaced ReLU", "before": {"dead_fraction": 0.5}})
    assert pending.changes == [("dead", "50.0%", "not yet measured")]
    assert pending.target == "dead_fraction"


def test_run_killed_before_first_log_reports_nothing_logged(tmp_path: Path) -> None:
    w = RunWriter(tmp_path / "r")
    w.write_meta({"model": "Net", "sites": []})
    page = render_report(load_run(tmp_path / "r"))
    assert "Nothing logged yet" in page
    # its writer (this process) has not closed it: said too
    assert summary(load_run(tmp_path / "r")).splitlines() == [
        "Net: Nothing logged yet", "  Not closed: this process is still writing it"]
    w.close()  # closed: nothing will come
    assert summary(load_run(tmp_path / "r")) == "Net: Nothing logged"
    assert "Nothing logged yet" not in render_report(load_run(tmp_path / "r"))


@pytest.mark.parametrize("kind", ["missing", "empty", "foreign", "old-format"])
def test_unusable_directories_raise_a_clear_error(tmp_path: Path, kind: str) -> None:
    d = tmp_path / "d"
    if kind != "missing":
        d.mkdir()
    if kind == "foreign":
        (d / "notes.txt").write_text("hello")
    if kind == "old-format":
        (d / "meta.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(RunDirError) as e:
        write_report(d, tmp_path / "out.html")
    assert "\n" not in str(e.value)
    assert str(d) in str(e.value)
    assert not (tmp_path / "out.html").exists()


def test_notebook_repr_is_a_scoped_fragment(dead_run: TrainedRun) -> None:
    report = Report(dead_run.run_dir)
    frag = report._repr_html_()
    assert "<html" not in frag and "<body" not in frag
    assert 'class="rd"' in frag
    # every style rule is scoped under .rd, so the notebook's own styles are untouched
    css = frag[frag.index("<style>") + 7 : frag.index("</style>")]
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    for selector_group in re.findall(r"([^{}]+)\{", css):
        for selector in selector_group.split(","):
            assert selector.strip().startswith(".rd"), selector
    out = report.save(dead_run.run_dir.parent / "saved.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_in_memory_run_needs_an_output_path(dead_run: TrainedRun) -> None:
    run = load_run(dead_run.run_dir)
    run.path = None  # as built in memory
    with pytest.raises(ValueError, match="out_path"):
        write_report(run)


@pytest.mark.parametrize("value", [5, ["out.html"]])
def test_an_out_path_that_is_not_a_path_names_the_argument(dead_run: TrainedRun, value: object) -> None:
    with pytest.raises(ReluDoctorError, match=r"^out_path: expected a path \(str or os.PathLike\) "
                       r"or None") as info:
        write_report(dead_run.run_dir, value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)
    with pytest.raises(ReluDoctorError, match=r"^path: expected a path \(str or os.PathLike\) or None"):
        Report(dead_run.run_dir).save(value)  # type: ignore[arg-type]


def test_text_summary(dead_run: TrainedRun) -> None:
    text = summary(load_run(dead_run.run_dir))
    first = text.splitlines()[0]
    assert "problem" in first
    assert "act1" in text and "act2" in text
    assert "dead units: 2, 5, 11" in text


def test_healthy_run(tmp_path: Path) -> None:
    import torch
    import torch.nn as nn

    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with relu_doctor.watch(net, log_every_n_steps=2, run_dir=tmp_path / "h") as doc:
        for _ in range(2):
            net(torch.randn(256, 4)).sum().backward()
            doc.step()
    assert not [f for f in doc.findings() if f.severity != "info"]
    run = load_run(tmp_path / "h")
    page = render_report(run)
    assert "rd-verdict-healthy" in page
    # no optimizer watched: no update ratio, and no figure of it
    assert plots.update_ratio_figure(run.layers) is None
    assert "Update ratio of each layer" not in page


def test_site_without_rows_is_listed(tmp_path: Path) -> None:
    run = Run(meta={"model": "Net", "sites": [{"name": "late", "family": "relu", "units": 4}]},
              history=pd.DataFrame(), units=pd.DataFrame(), layers=pd.DataFrame())
    ctx = build_context(run)
    assert [s.site for s in ctx.sites] == ["late"]
    assert ctx.verdict.status == "empty"


@pytest.mark.parametrize(("stream", "says"), [
    ("train", "no training pass"), ("eval", "no evaluation pass"), ("all", "no forward pass")])
def test_windows_logged_with_no_site_name_the_stream_that_recorded_nothing(stream, says):
    """A run whose windows were logged before any site was seen says so, naming what its
    stream would have recorded (not "train longer")."""
    windows = pd.DataFrame({"step": [5, 10], "steps_run": [5, 5], "steps_collected": [0, 0],
                            "judged": [False, False]})
    run = Run(meta={"model": "Net", "stream": stream}, history=pd.DataFrame(),
              units=pd.DataFrame(), layers=pd.DataFrame(), tables={"windows": windows})
    ctx = build_context(run)
    assert (ctx.verdict.status, ctx.verdict.headline) == ("empty", "No activation seen")
    assert says in ctx.verdict.detail and "up to step 10" in ctx.verdict.detail
    assert ("eval mode" in ctx.verdict.detail) == (stream == "train")


def test_a_run_directory_started_before_the_windows_table_states_every_logs_sampling():
    """A run logged at steps 5 and 10 before the windows table existed and resumed since
    has the table for its later logs only: the earlier ones still count, from the history
    (the report said "steps logged 15–20 (2 logs)" and "20 of 20 run")."""
    hist = pd.DataFrame({"step": [5, 10, 15, 20], "site": ["s"] * 4,
                         "steps_collected": [5, 2, 5, 5], "steps_run": [5, 5, 5, 5],
                         "elements": [40.0, 16.0, 40.0, 40.0]})
    windows = pd.DataFrame({"step": [15, 20], "steps_run": [5, 5], "steps_collected": [5, 5],
                            "judged": [True, True]})
    run = Run(meta={"model": "Net"}, history=hist, units=pd.DataFrame(),
              layers=pd.DataFrame(), tables={"windows": windows})
    numbers = dict(build_context(run).key_numbers)
    assert numbers["steps logged"] == "5–20 (4 logs)"
    assert numbers["steps collected"].startswith("17 of 20 run")


@pytest.mark.parametrize("logged", [[2, 4], [2, 4, 6], [2, 4, 6, 8, 10, 12]])
def test_the_gradient_flow_draws_the_first_and_last_logs_and_zeros_on_its_axis(logged):
    """Up to four logs, the first and the last among them (two logs drew the first alone); a
    gradient of exactly 0 is drawn at 0 (a log axis cannot), every value where it is."""
    hist = pd.DataFrame([{"step": s, "site": site, "order": i,
                          "grad_rms": 0.0 if (s, site) == (logged[-1], "a") else 10.0 ** -(3 - i)}
                         for s in logged for i, site in enumerate("abc")])
    fig = plots.gradient_flow_figure(hist)
    assert fig is not None
    (ax,) = fig.axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    want = [logged[round(i * (len(logged) - 1) / (min(4, len(logged)) - 1))]
            for i in range(min(4, len(logged)))]
    assert list(drawn) == [f"step {s}" for s in want]
    for s in want:
        expect = hist[hist["step"] == s].sort_values("order")["grad_rms"].tolist()
        assert drawn[f"step {s}"] == expect
    assert ax.get_yscale() == "symlog" and ax.get_ylim()[0] == 0


def test_the_summary_tells_long_site_names_apart(tmp_path: Path) -> None:
    """Site names were cut at 36 characters, so two sites of a deep model whose names
    differ near their end (``...stages.0.layers.0.activation``, ``...stages.1...``) printed
    alike; a long name now keeps its start and its end."""
    from tests.reports.conftest import long_named_run

    names = [s.name for s in long_named_run(tmp_path / "r", blocks=2).sites]
    lines = summary(load_run(tmp_path / "r")).splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("site "))
    labels = [lines[header + 1 + i].split()[0] for i in range(2)]
    assert len(set(labels)) == 2  # told apart
    for label, name in zip(labels, names, strict=True):
        head, _, tail = label.partition("…")
        assert name.startswith(head) and name.endswith(tail) and len(label) <= 48


def test_the_most_severe_findings_are_the_largest_shares_not_the_first_names(tmp_path: Path) -> None:
    """The verdict's "most severe" and the summary listed one severity's findings by site
    name as text: site '3' (15 of 16 units dead) after '11' (11 of 16) and '13' (10)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    kill = {1: 15, 5: 11, 6: 10}  # the Linear before ReLU sites '3', '11', '13'
    for i in range(8):
        lin = nn.Linear(16, 16)
        with torch.no_grad():
            lin.bias += 1.0
            lin.bias[:kill.get(i, 0)] = -100.0
        layers += [lin, nn.ReLU()]
    net = nn.Sequential(*layers)
    with relu_doctor.watch(net, log_every_n_steps=4, run_dir=tmp_path / "r") as doc:
        for _ in range(4):
            net(torch.randn(32, 16)).mean().backward()
            doc.step()
    dead = {str(r["site"]): int(r["dead"]) for r in doc.records[-1].site_rows}
    assert dead["3"] > dead["11"] > dead["13"] > 8  # (the plants hold; the others live)
    text = summary(load_run(tmp_path / "r"))
    listed = [line.split("]")[1].split(":")[0].strip() for line in text.splitlines()
              if line.strip().startswith("[critical]")]
    assert listed[:3] == ["3", "11", "13"], text


def test_the_dead_units_figure_draws_the_share_redo_calls_dormant_over_time():
    """A plasticity study's central curve (ReDo's dormant neurons: score <= tau, dead ones
    included) was in the history only: the figure draws it beside dead and sparsity, each
    site's values at each step."""
    hist = pd.DataFrame([{"step": s, "site": site, "dead_fraction": 0.1 * i,
                          "sparsity": 0.5, "below_tau_fraction": 0.1 * i + 0.01 * s}
                         for s in (2, 4, 6) for i, site in enumerate("ab")])
    fig = plots.dead_fraction_figure(hist)
    assert fig is not None
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["dead (no activation in the window)", "sparsity (outputs not active)",
                      "ReDo-dormant (score ≤ tau)"]
    ax = fig.axes[2]
    drawn = [list(line.get_ydata()) for line in ax.get_lines() if len(line.get_ydata())]
    for site in "ab":
        want = hist[hist["site"] == site]["below_tau_fraction"].tolist()
        assert any(v == pytest.approx(want) for v in drawn), (site, drawn)
    assert len(plots.dead_fraction_figure(hist.drop(columns="below_tau_fraction")).axes) == 2


def test_the_heatmaps_draw_each_intervention_after_the_window_it_was_made_at():
    """A researcher reading a site's heatmap looked for where its units were recycled: the
    heatmaps drew no intervention. Each one made within the steps shown is now a numbered line
    at the edge after the last logging step up to it (its numbers those of the table); those
    before the first or after the last step shown are not drawn."""
    steps = [2, 4, 6, 8]
    units = pd.DataFrame([{"step": s, "site": "a", "unit": u, "activation_rate": 0.1 * u}
                          for s in steps for u in range(3)])
    data = plots.activity_matrix(units, "a")
    assert data is not None and data.steps == steps
    marks = [1, 3, 4, 5, 9]  # before the first, after step 2, at step 4 and after it, past the end
    fig = plots.activity_heatmap_figure(data, "a", marks=marks)
    ax = fig.axes[0]
    lines = sorted(line.get_xdata()[0] for line in ax.get_lines())
    labels = sorted(t.get_text() for t in ax.texts)
    # independently: the edge after column k is x = k + 1, column k holding steps[k]
    want = {}
    for number, m in enumerate(marks, start=1):
        before = [k for k, s in enumerate(steps) if s <= m]
        if before and before[-1] + 1 < len(steps):
            want.setdefault(before[-1] + 1, []).append(str(number))
    assert lines == sorted(want) == [1, 2]
    assert labels == sorted(",".join(v) for v in want.values()) == ["2", "3,4"]
    assert not plots.activity_heatmap_figure(data, "a").axes[0].get_lines()


def test_a_metric_measured_neither_before_nor_after_is_no_row_of_the_change() -> None:
    """Under Keras no parameter-gradient norm is measured: a change's rows showed
    "parameter-gradient norm — → —". Its target stays, measured or not."""
    from relu_doctor.reports.interventions import intervention_view

    snapshot = {"dead_fraction": 0.5, "dormant_fraction": 0.1, "grad_norm": None}
    view = intervention_view({
        "type": "intervention", "id": "lr:30", "remedy": "lr_rescue", "site": "model",
        "step": 30, "what": "scaled the learning rate by 0.5", "target": "dead_fraction",
        "before": snapshot, "after": {**snapshot, "dead_fraction": 0.4}})
    assert view.changes == [("dead", "50.0%", "40.0%"), ("dormant", "10.0%", "10.0%")]
    view = intervention_view({
        "type": "intervention", "id": "lr:30", "remedy": "lr_rescue", "site": "model",
        "step": 30, "what": "scaled the learning rate by 0.5", "target": "grad_norm",
        "before": snapshot, "after": snapshot})
    assert view.changes[0] == ("parameter-gradient norm", "—", "—")


def test_long_paths_that_share_a_prefix_keep_their_labels_apart_and_inside_the_figure() -> None:
    """Hugging Face paths share a long prefix: the dead-fraction legend ran off both edges,
    the gradient-flow axis read 'resnet.encod....activation (2)', '(3)'... (a trial), and a
    heatmap's one-line title was wider than its figure. Each label now differs in what tells
    the sites apart (their indices), and every text lies inside its figure."""
    sites = [f"resnet.encoder.stages.{s}.layers.{i}.layer.{j}.activation"
             for s in range(2) for i in range(2) for j in range(2)]
    hist = pd.DataFrame([{"step": st, "site": site, "dead_fraction": 0.1 * k, "sparsity": 0.5,
                          "below_tau_fraction": 0.2, "grad_rms": 0.01 * (k + 1)}
                         for st in (10, 20) for k, site in enumerate(sites)])

    def inside(fig) -> list[str]:
        """The legends and titles of ``fig`` that reach past its edges, drawn."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        r, box = canvas.get_renderer(), fig.bbox
        parts = [*fig.legends, *(ax.title for ax in fig.axes if ax.get_title())]
        return [str(p) for p in parts
                if (e := p.get_window_extent(r)).x0 < box.x0 - 1 or e.x1 > box.x1 + 1]

    dead = plots.dead_fraction_figure(hist)
    legend = [t.get_text() for t in dead.legends[0].get_texts()]
    assert len(set(legend)) == len(sites) and not any("(2)" in t for t in legend)
    for site, label in zip(sites, legend, strict=True):  # each label names its own indices
        s, i, j = (int(x) for x in re.findall(r"\.(\d+)\.", site + "."))
        assert re.search(rf"{s}\.\w+\.{i}\.\w+\.{j}\.", label + "."), (site, label)
    assert inside(dead) == []
    flow = plots.gradient_flow_figure(hist)
    ticks = [t.get_text() for t in flow.axes[0].get_xticklabels()]
    assert len(set(ticks)) == len(sites) and not any("(2)" in t for t in ticks)
    data = plots.HeatmapData(matrix=np.ones((4, 2)), steps=[10, 20], row_labels=list("0123"),
                             units_per_row=1, steps_per_col=1, units=4, dead_last=0)
    assert inside(plots.activity_heatmap_figure(data, sites[-1], "relu")) == []


@pytest.mark.parametrize("recorded", ["quiet", "below tau (older runs)"])
def test_a_recyclings_verdict_says_it_is_on_the_units_it_changed(recorded: str) -> None:
    """A recycling is judged on the units it changed: "dead 0.0% -> 78.1% ... helped" read
    as a contradiction where the rest of the site died meanwhile (a report trial). Its
    verdict says what it is on; a swap's, judged on the site, does not. Its numbers are the
    changed units' share dead or below tau (all of them when chosen); runs recorded before
    that was judged show the share below tau."""
    quiet = recorded == "quiet"
    events = [
        {"type": "intervention", "id": "r", "remedy": "dormant_reset", "site": "s", "step": 10,
         "what": "recycled 2 of 4 units", "before": {"dead_fraction": 0.0}, "after": None,
         "target": "below_tau_fraction"},
        {"type": "intervention_result", "ref": "r", "remedy": "dormant_reset", "site": "s",
         "step": 20, "after": {"dead_fraction": 0.75}, "verdict": "helped",
         "target": "changed_units_quiet" if quiet else "changed_units_below_tau",
         "efficacy": {"still_below_tau": 0.0, **({"still_quiet": 0.5} if quiet else {})}},
        {"type": "intervention", "id": "w", "remedy": "leaky_relu_swap", "site": "s", "step": 30,
         "what": "swapped", "before": {"dead_fraction": 0.75}, "after": None,
         "target": "dead_fraction"},
        {"type": "intervention_result", "ref": "w", "remedy": "leaky_relu_swap", "site": "s",
         "step": 40, "after": {"dead_fraction": 0.25}, "verdict": "helped",
         "target": "dead_fraction"},
    ]
    hist = pd.DataFrame([{"step": 10 * i, "site": "s", "units": 4, "dead": 1,
                          "dead_fraction": 0.25} for i in (1, 2, 3, 4)])
    run = Run(meta={"sites": [{"name": "s", "units": 4}]}, history=hist, units=pd.DataFrame(),
              layers=pd.DataFrame(), events=events)
    text = htmllib.unescape(re.sub(r"<[^>]+>", " ", render_report(run)))
    assert text.count("helped (on the units it changed, not the whole site)") == 1, text
    assert text.count("helped") >= 2
    said = " ".join(text.split())
    assert ("changed units dead or with ReDo score ≤ tau 100.0% → 50.0%" in said) == quiet, said
    assert ("changed units with ReDo score ≤ tau 100.0% → 0.0%" in said) == (not quiet)


@pytest.mark.parametrize("name, other", [("loss", "val_loss"), ("train_loss", "val_loss"),
                                         ("train_loss", "kl_loss"), ("train/loss", "eval_loss")])
def test_a_verdict_beside_a_training_loss_that_rose_says_so(name: str, other: str) -> None:
    """A plan's swap was judged "helped" on its dead fraction while the training loss rose
    from 0.84 to 3.24 (a Keras trial): the report showed "helped" alone. A judged change
    whose next window's loss is 1.5x its own or more says so, with the two losses; one whose
    loss fell does not. A LightningModule's "train_loss" is read where no "loss" is (never a
    validation loss, nor another loss that sorts first: a VAE's "kl_loss", an "eval_loss",
    which a review saw taken)."""
    events = []
    for rid, site, step, judged in (("w", "s", 72, 80), ("v", "t", 64, 72)):
        events += [
            {"type": "intervention", "id": rid, "remedy": "leaky_relu_swap", "site": site,
             "step": step, "what": "swapped", "before": {"dead_fraction": 0.75}, "after": None,
             "target": "dead_fraction"},
            {"type": "intervention_result", "ref": rid, "remedy": "leaky_relu_swap", "site": site,
             "step": judged, "after": {"dead_fraction": 0.25}, "verdict": "helped",
             "target": "dead_fraction"},
        ]
    hist = pd.DataFrame([{"step": st, "site": site, "units": 4, "dead": 1, "dead_fraction": 0.25}
                         for st in (64, 72, 80) for site in ("s", "t")])
    metrics = pd.DataFrame({"step": [64, 72, 80] * 2, "name": [name] * 3 + [other] * 3,
                            "value": [1.07, 0.84, 3.24, 1.0, 9.0, 1.0]})
    run = Run(meta={"sites": [{"name": "s", "units": 4}, {"name": "t", "units": 4}]}, history=hist,
              units=pd.DataFrame(), layers=pd.DataFrame(), events=events, tables={"metrics": metrics})
    rose = {e.site: e.loss_rose for e in build_context(run).interventions}
    assert math.isclose(rose["s"], 3.24 / 0.84) and rose["t"] == 0.0  # (1.07 -> 0.84 fell)
    text = " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", render_report(run))).split())
    assert text.count("helped, but the training loss rose 3.9x after it") == 1, text
    assert "training loss 0.84 → 3.24" in text and "training loss 1.07" not in text


def test_the_evaluation_streams_findings_are_in_the_main_report(tmp_path: Path) -> None:
    """The evaluation stream had a critical finding (56% dead on the evaluation data) that
    the main report and its terminal summary never said: they showed its small table only (a
    report trial). Its warnings and critical findings are listed in its section, and the
    summary names the first, with the command for its own report."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    run_dir = tmp_path / "my run"  # (the command quotes it: a review)
    with relu_doctor.watch(net, log_every_n_steps=2, overhead_budget=None, eval_stream=True,
                           run_dir=run_dir) as doc:
        for _ in range(4):
            net.train()
            net(torch.randn(16, 4)).square().mean().backward()
            doc.step()
            net.eval()
            with torch.no_grad():  # evaluation data far on the negative side: most units dead
                net(-10 * torch.ones(8, 4) - 5 * torch.rand(8, 4))
    ev = relu_doctor.load_run(run_dir / "eval")
    serious = [f for f in ev.findings() if f.severity in ("warning", "critical")]
    assert serious, ev.findings()
    text = " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", render_report(relu_doctor.load_run(run_dir)))).split())
    assert f"relu-doctor report '{run_dir / 'eval'}'" in text
    for f in serious:
        assert " ".join(f.message.split()) in text
    said = summary(relu_doctor.load_run(run_dir))
    first = serious[0]
    assert f"On the evaluation data (eval): [{first.severity}] {first.site}:" in said
    line = next(x for x in said.splitlines() if "On the evaluation data" in x)
    assert line.endswith(f"relu-doctor report '{run_dir / 'eval'}'")


@pytest.mark.parametrize("died", ["throughout", "in the last window"])
def test_every_dead_unit_a_finding_names_has_its_label_on_the_heatmap(died: str) -> None:
    """A 64-unit site's heatmap labelled every other row: 9 of the 21 dead units its finding
    named had no label (a report trial). The named units are labelled one each, wherever
    the order (least active over the run first) puts them: units that died in the last
    window sort among the living (a review); the other rows as space allows."""
    dead = list(range(2, 64, 3))  # 21 units
    rows = [{"site": "s", "unit": u, "step": st,
             "activation_rate": (0.0 if died == "throughout" or st == 30 else 0.6) if u in dead
             else 0.05 + u / 2000}
            for u in range(64) for st in (10, 20, 30)]
    data = plots.activity_matrix(pd.DataFrame(rows), "s", named=dead)
    assert data is not None and data.units_per_row == 1 and len(data.named_rows) == 21
    assert sorted(int(data.row_labels[i]) for i in data.named_rows) == dead
    fig = plots.activity_heatmap_figure(data, "s", "relu")
    labels = {t.get_text() for t in fig.axes[0].get_yticklabels()}
    assert {str(u) for u in dead} <= labels, sorted({str(u) for u in dead} - labels)


def test_the_parameter_gradient_panel_leaves_out_layers_with_no_gradient() -> None:
    """Frozen layers have no gradient norm at any log (NaN): a LoRA trial's 21 frozen base
    layers of 49 left blank slots on the axis and crowded its labels. They are left out,
    and the axis says how many."""
    hist = pd.DataFrame([{"step": s, "site": "a", "order": 0, "grad_rms": 0.1} for s in (2, 4)])
    layers = pd.DataFrame([{"step": s, "layer": name,
                            "grad_norm": float("nan") if name.endswith("base") else 0.5 + s}
                           for s in (2, 4) for name in ("q.base", "q.lora_A", "v.base", "v.lora_B")])
    fig = plots.gradient_flow_figure(hist, layers)
    assert fig is not None
    ax = fig.axes[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q.lora_A", "v.lora_B"]
    assert ax.get_xlabel().endswith("(2 with no gradient, frozen, left out)")
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert drawn == {"step 2": [2.5, 2.5], "step 4": [4.5, 4.5]}


def test_the_update_ratio_figure_draws_each_layers_recorded_ratios(dead_run: TrainedRun) -> None:
    """The report had no update ratio (an accelerate trial looked for one): it now draws the
    run's per-layer ratios against step, the values the run directory holds, and a run with
    no optimizer watched has no such figure."""
    run = load_run(dead_run.run_dir)
    fig = plots.update_ratio_figure(run.layers)
    assert fig is not None
    ax = fig.axes[0]
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.get_lines() if not line.get_label().startswith("_")}
    expected = {str(name): (list(part["step"]), list(part["update_ratio"]))
                for name, part in run.layers.sort_values("step").groupby("layer", sort=False)}
    assert drawn == expected and len(expected) == 3
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()
    page = dead_run.report.read_text(encoding="utf-8")
    assert 'alt="Update ratio of each layer' in section(page, "rd-gradients")


def test_many_layers_are_coloured_by_depth_and_frozen_or_still_ones_are_said() -> None:
    """Twenty layers: a legend of twenty names would hide the plot, so only the first and
    the last are named and the legend says how the colours run; a layer with no ratio at
    any log (frozen) is left out and counted, a ratio of exactly 0 (nothing moved) stays
    on the axis."""
    names = [f"block{i}.fc" for i in range(20)] + ["frozen"]
    layers = pd.DataFrame([{"step": s, "layer": n,
                            "update_ratio": float("nan") if n == "frozen"
                            else 0.0 if (n == "block3.fc" and s == 20) else 1e-3 * (1 + i)}
                           for s in (10, 20) for i, n in enumerate(names)])
    fig = plots.update_ratio_figure(layers, [15])
    assert fig is not None
    ax = fig.axes[0]
    named = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert named == ["block0.fc", "block19.fc"]
    data = [line for line in ax.get_lines() if list(line.get_xdata()) == [10, 20]]
    assert len(data) == 20 and [0.004, 0.0] in [list(line.get_ydata()) for line in data]
    title = ax.get_legend().get_title().get_text()
    assert title.startswith("20 layers\n(1 never updated, left out)") and "light: input side" in title
    assert ax.get_yscale() == "symlog" and ax.get_ylabel().endswith("(log scale; 0: no update)")
    assert plots.update_ratio_figure(layers[layers["layer"] == "frozen"]) is None


def test_a_verdict_of_the_loss_guard_is_said_with_the_ratio_it_judged() -> None:
    """A surgery the plan's loss guard judged "did not help" (its window's loss 2x its own
    or more, or no longer finite: the result's ``loss_rose``) was said as the report's own
    reading of the logged curve, at its own 1.5x bar: silent where the curve (Lightning's
    one-step ``train_loss``, Keras' running mean) rose less than the loss the guard read,
    and "infx" could not be written. The report says the guard's ratio and reason, the
    curve's values beside it; an ``inf`` crosses the events' JSON as ``"inf"``."""
    from relu_doctor.events import InterventionResult, event_from_dict

    events = []
    for rid, site, rose in (("w", "s", 7.0), ("v", "t", math.inf)):
        result = InterventionResult(rid, "dormant_reset", site, 80, {"below_tau_fraction": 0.1},
                                    target="below_tau_fraction", verdict="did not help",
                                    before={"below_tau_fraction": 0.5}, loss_rose=rose)
        as_json = json.loads(json.dumps(result.to_dict(), allow_nan=False))
        assert event_from_dict(as_json).loss_rose == rose  # type: ignore[union-attr]
        events += [
            {"type": "intervention", "id": rid, "remedy": "dormant_reset", "site": site,
             "step": 72, "what": "recycled", "before": {"below_tau_fraction": 0.5},
             "after": None, "target": "below_tau_fraction"},
            as_json,
        ]
    hist = pd.DataFrame([{"step": st, "site": site, "units": 4, "dead": 1, "dead_fraction": 0.25}
                         for st in (72, 80) for site in ("s", "t")])
    metrics = pd.DataFrame({"step": [72, 80], "name": ["loss"] * 2, "value": [1.0, 1.2]})
    run = Run(meta={"sites": [{"name": "s", "units": 4}, {"name": "t", "units": 4}]}, history=hist,
              units=pd.DataFrame(), layers=pd.DataFrame(), events=events, tables={"metrics": metrics})
    views = {e.site: e for e in build_context(run).interventions}
    assert views["s"].loss_rose == 7.0 and views["t"].loss_rose == math.inf
    assert views["s"].loss_guarded and views["t"].loss_guarded
    text = " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", render_report(run))).split())
    assert "the training loss rose 7.0x after it" in text, text
    assert "the training loss was no longer finite after it" in text
    assert "logged loss 1 → 1.2" in text and "infx" not in text
