"""The report context: built from a run record alone, findings from ``run.findings()`` (not
rebuilt from events), and the reports' imports running one way."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import relu_doctor
from relu_doctor.history import Run, load_run
from relu_doctor.reports.context import (
    CONTINUOUS_REMEDIES,
    FrozenChange,
    build_context,
    fmt_int,
    fmt_num,
    fmt_pct,
)
from relu_doctor.reports.text import summary
from tests.reports.conftest import KILLED, TrainedRun

REPORTS = Path(relu_doctor.__file__).parent / "reports"


def _relu_doctor_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "relu_doctor" or n.startswith("relu_doctor.")}
    return out


def test_reports_import_the_run_record_only() -> None:
    """reports/ reads history (and the value types and remedy texts it holds), never a
    model, hook or probe; html and text do not import each other."""
    allowed = {"relu_doctor.history", "relu_doctor.events", "relu_doctor.diagnosis",
               "relu_doctor.advice", "relu_doctor._validate", "relu_doctor.errors"}
    files = sorted(REPORTS.glob("*.py"))
    assert {p.stem for p in files} >= {"context", "html", "text", "plots", "tensorboard"}
    for p in files:
        imports = _relu_doctor_imports(p)
        foreign = {m for m in imports if m not in allowed and not m.startswith("relu_doctor.reports")}
        assert not foreign, (p.name, foreign)
    assert "relu_doctor.reports.text" not in _relu_doctor_imports(REPORTS / "html.py")
    assert "relu_doctor.reports.html" not in _relu_doctor_imports(REPORTS / "text.py")


def test_findings_are_the_last_steps_exactly(dead_run: TrainedRun) -> None:
    """Findings persist across logs (the killed units stay dead), so events.jsonl holds
    them only where they began: the report must still show every one of the last step."""
    run = load_run(dead_run.run_dir)
    ctx = build_context(run)
    want = sorted((f.kind, f.site, f.severity, f.message) for f in dead_run.findings)
    assert want, "the killed units make findings"
    shown = [(f.kind, f.site, f.severity, f.message) for f in ctx.findings]
    # a finding another at the same site explains is folded into that one, not dropped
    folded = [(kind, f.site, msg) for f in ctx.findings for kind, msg in f.merged]
    assert len(shown) + len(folded) == len(want)
    assert sorted(shown) == sorted(w for w in want if w[3] not in {m for _, _, m in folded})
    labels = {"too sparse": "too_sparse", "never active": "lifetime_dead"}
    for label, site, msg in folded:
        assert (labels[label], site) in {(w[0], w[1]) for w in want if w[3] == msg}
    assert ctx.findings_step == run.last_step and not ctx.findings_stale
    # the findings are not all re-written at the last step (which would hide the bug)
    last_events = [e for e in run.finding_events() if e.step == run.last_step]
    assert len(last_events) < len(want)
    # most severe first
    ranks = [("info", "warning", "critical").index(f.severity) for f in ctx.findings]
    assert ranks == sorted(ranks, reverse=True)


def test_site_rows_and_key_numbers_are_the_last_logged_numbers(dead_run: TrainedRun) -> None:
    run = load_run(dead_run.run_dir)
    ctx = build_context(run)
    last = run.history[run.history["step"] == run.last_step].set_index("site")
    assert [r.site for r in ctx.sites] == [s["name"] for s in run.site_info] == list(KILLED)
    for r in ctx.sites:
        h = last.loc[r.site]
        assert r.raw["dead"] == int(h["dead"]) and r.dead == str(int(h["dead"]))
        assert r.dead_pct == fmt_pct(h["dead_fraction"])
        assert r.severity == "critical" or r.severity == "warning"
        assert r.logged and r.family == "relu"
    keys = dict(ctx.key_numbers)
    assert keys["units"] == str(int(last["units"].sum()))
    assert keys["dead now"].startswith(f"{int(last['dead'].sum())} (")
    assert keys["steps logged"] == "3–12 (4 logs)"
    # the series the figures read are the run's own tables (its unit rows: those drawn,
    # here every logged step of every site)
    assert ctx.series.history is run.history
    assert ctx.series.heatmap_sites == list(KILLED)
    assert ctx.series.heatmap_steps == [3, 6, 9, 12]
    drawn = run.units[run.units["site"].isin(list(KILLED))].reset_index(drop=True)
    pd.testing.assert_frame_equal(ctx.series.units, drawn)


def test_interventions_and_timeline(tmp_path: Path) -> None:
    events = [
        {"type": "intervention", "id": "a", "remedy": "leaky_relu_swap", "site": "s", "step": 10,
         "what": "swapped", "before": {"dead_fraction": 0.5}, "after": None},
        {"type": "intervention_result", "ref": "a", "remedy": "leaky_relu_swap", "site": "s",
         "step": 20, "after": {"dead_fraction": 0.25}},
        *[{"type": "intervention", "id": f"c{i}", "remedy": "adaptive_grad_clip",
           "site": "model", "step": 10 * i, "what": f"clip {i}", "before": {"grad_norm": 1.0},
           "details": {"clip": {"clip_fraction": i / 10}}}
          for i in (1, 2, 3)],
    ]
    hist = pd.DataFrame([{"step": 10 * i, "site": "s", "units": 4, "dead": 1,
                          "dead_fraction": 0.25} for i in (1, 2, 3)])
    run = Run(meta={"sites": [{"name": "s", "units": 4}]}, history=hist, units=pd.DataFrame(),
              layers=pd.DataFrame(), events=events)
    ctx = build_context(run)
    assert [(e.remedy, e.step) for e in ctx.interventions] == [
        ("leaky_relu_swap", 10), ("adaptive_grad_clip", 10), ("adaptive_grad_clip", 20),
        ("adaptive_grad_clip", 30)]
    swap = ctx.interventions[0]
    assert swap.changes == [("dead", "50.0%", "25.0%")] and swap.after_step == 20
    assert ctx.remedy_counts == [("adaptive_grad_clip", 3), ("leaky_relu_swap", 1)]
    assert "adaptive_grad_clip" in CONTINUOUS_REMEDIES
    assert [(r.remedy, r.count, r.step, r.last_step) for r in ctx.timeline] == [
        ("leaky_relu_swap", 1, 10, 10), ("adaptive_grad_clip", 3, 10, 30)]
    assert ctx.series.marks == [10]  # clipping is not drawn over the time chart
    assert ctx.data["interventions"] == 2 == len(ctx.timeline)  # as the key number counts
    assert dict(ctx.key_numbers)["interventions"] == "2"
    assert ctx.data["intervention_events"] == 4


def test_text_summary_reads_the_same_context(dead_run: TrainedRun) -> None:
    run = load_run(dead_run.run_dir)
    ctx = build_context(run)
    assert summary(ctx) == summary(run)
    assert ctx.verdict.headline in summary(ctx).splitlines()[0]


def test_formatting() -> None:
    assert fmt_pct(0.125) == "12.5%" and fmt_pct(float("nan")) == "—" and fmt_pct(None) == "—"
    assert fmt_num(3) == "3" and fmt_num(2.0) == "2" and fmt_num(0.012345) == "0.0123"
    assert fmt_num(True) == "yes" and fmt_num(float("inf")) == "—"
    assert fmt_int(4.0) == "4" and fmt_int(None) == "—"


def test_training_metrics_are_the_window_means_of_what_was_passed(tmp_path: Path) -> None:
    """doc.step(loss=...) and doc.log_metrics: the record holds each window's mean (checked
    against the plain Python mean of the values), the learning rate at the logging step, and
    the report's series is that table."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    losses, accs = [], []
    with relu_doctor.watch(net, log_every_n_steps=3, optimizer=opt, run_dir=tmp_path / "r") as doc:
        for i in range(6):
            loss = F.mse_loss(net(torch.randn(16, 4)), torch.randn(16, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            accs.append(i / 10)
            doc.log_metrics({"acc": i / 10})
            doc.step(loss=loss)
            if i == 2:
                opt.param_groups[0]["lr"] = 0.05
    table = build_context(load_run(tmp_path / "r")).series.metrics
    got = {(int(r.step), r.name): r.value for r in table.itertuples()}
    for step, sl in ((3, slice(0, 3)), (6, slice(3, 6))):
        assert got[(step, "loss")] == pytest.approx(sum(losses[sl]) / 3, rel=1e-6)
        assert got[(step, "acc")] == pytest.approx(sum(accs[sl]) / 3, rel=1e-12)
    assert got[(3, "lr")] == 0.1 and got[(6, "lr")] == 0.05
    assert [r.metrics for r in doc.records][-1]["lr"] == 0.05


def _run_with(
    findings: list[relu_doctor.Finding], family: str, events: list[dict], loop: str | None = None
) -> Run:
    hist = pd.DataFrame([{"step": 10, "site": "s", "units": 4, "dead": 2, "dead_fraction": 0.5,
                          "family": family, "leaky": family != "relu"}])
    from relu_doctor.history import Run as _Run

    return _Run(meta={"sites": [{"name": "s", "units": 4, "family": family,
                                 "leaky": family != "relu"}],
                      **({"config": {"loop": loop}} if loop else {})},
                history=hist, units=pd.DataFrame(), layers=pd.DataFrame(), events=events,
                last_findings=findings)


def test_findings_merge_and_remedies_follow_what_was_done() -> None:
    from relu_doctor.diagnosis import Finding

    dead = Finding("dead", "s", "warning", "2 of 4 units dead", {"dead_units": [1, 3]},
                   "Swap ReLU for LeakyReLU (LeakyReluSwap)", step=10)
    sparse = Finding("too_sparse", "s", "warning", "sparsity 97%", {}, "Use LeakyReLU", step=10)
    # a plain ReLU site, nothing done yet: the diagnosis's own remedy, too_sparse folded in
    ctx = build_context(_run_with([dead, sparse], "relu", []))
    assert [(f.kind, f.site) for f in ctx.findings] == [("dead", "s")]
    (f,) = ctx.findings
    assert f.merged == [("too sparse", "sparsity 97%")]
    assert f.remedy == dead.remedy and f.done == []
    assert ctx.verdict.headline.startswith("1 problem")
    assert f.anchor == "rd-site-0"  # no heatmap drawn (no unit rows): its table row
    # already LeakyReLU, and the learning rate was lowered: the next steps instead
    events = [{"type": "intervention", "id": "a", "remedy": "lr_rescue", "site": "model",
               "step": 5, "what": "scaled the learning rate by 0.5",
               "before": {"dead_fraction": 0.6}, "after": None},
              {"type": "intervention_result", "ref": "a", "remedy": "lr_rescue", "site": "model",
               "step": 10, "after": {"dead_fraction": 0.5}, "target": "dead_fraction",
               "verdict": "helped"}]
    (g,) = build_context(_run_with([dead, sparse], "leaky_relu", events)).findings
    assert "swap relu for leakyrelu" not in g.remedy.lower() and "already leaky" in g.remedy
    assert "lower the learning rate further" in g.remedy
    assert g.done == ["lr_rescue at step 5: dead 60.0% → 50.0%, helped"]


@pytest.mark.parametrize("loop", [None, "watch", "lightning", "keras", "hf"])
def test_the_reports_next_steps_name_the_remedies_of_the_runs_loop(loop: str | None) -> None:
    from relu_doctor.diagnosis import REMEDY_NAMES, Finding

    dead = Finding("dead", "s", "warning", "2 of 4 units dead", {}, "(the diagnosis's)", step=10)
    swapped = [{"type": "intervention", "id": "a", "remedy": "leaky_relu_swap", "site": "s",
                "step": 5, "what": "swapped", "before": None, "after": None}]
    (f,) = build_context(_run_with([dead], "relu", swapped, loop)).findings
    names = REMEDY_NAMES[loop or "watch"]  # a run written before the loop was recorded: watch
    assert f"({names['lr']}" in f.remedy or f"; {names['lr']})" in f.remedy
    if names["recycle"]:
        assert f"recycle the units ({names['recycle']})" in f.remedy
    else:
        assert "recycle" not in f.remedy  # Keras offers none
    others = {n for k, v in REMEDY_NAMES.items() if k != (loop or "watch") for n in v.values()}
    assert not [n for n in others - set(names.values()) if n and f"{n})" in f.remedy]


def test_lightning_monitor_records_callback_metrics_and_learning_rate(tmp_path: Path) -> None:
    """The ReluDoctor callback reads what the LightningModule logs (trainer.callback_metrics)
    and the optimizer's learning rate at each logging step: the report's training curve."""
    import torch

    from relu_doctor.callbacks import ReluDoctor
    from tests.callbacks.test_monitor import TinyNet, loader, trainer

    class Logged(TinyNet):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            loss = self.loss(batch)
            self.log("train_loss", loss)
            self.seen.append((self.global_step + 1, float(loss.detach())))
            return loss

    torch.manual_seed(0)
    model = Logged(lr=0.05)
    model.seen = []
    cb = ReluDoctor(log_every_n_steps=3, run_dir=tmp_path / "run")
    trainer(tmp_path, [cb], max_steps=6).fit(model, loader())
    table = build_context(load_run(tmp_path / "run")).series.metrics
    got = {(int(r.step), r.name): r.value for r in table.itertuples()}
    assert sorted({n for _, n in got}) == ["lr", "train_loss"]  # no relu_doctor/ keys
    seen = dict(model.seen)
    for step in (3, 6):  # callback_metrics hold the last logged value at that step
        assert got[(step, "train_loss")] == pytest.approx(seen[step], rel=1e-6)
        assert got[(step, "lr")] == 0.05


def test_a_learning_rate_change_shows_the_recorded_learning_rate(treated_run: TrainedRun) -> None:
    run = load_run(treated_run.run_dir)
    (lr,) = build_context(run).interventions
    lrs = run.metrics[run.metrics["name"] == "lr"].set_index("step")["value"]
    assert ("learning rate", fmt_num(lrs[12]), fmt_num(lrs[15])) in lr.changes
    assert (lrs[12], lrs[15]) == (0.01, 0.005)
    assert lr.number == 1 and not lr.continuous


def test_one_log_is_said_as_one_step() -> None:
    from relu_doctor.reports.context import _logged_text

    assert _logged_text([3], None) == "step 3 (1 log)"
    assert _logged_text([], pd.DataFrame({"step": [3]})) == "step 3 (1 log, no site seen)"
    assert _logged_text([3, 6], None) == "3–6 (2 logs)"


def test_a_unit_list_says_it_is_cut_only_when_units_were_left_out():
    """All 64 of 64 units dead read "0, 1, ... 63 … (first 64 listed)", as if more were
    dead; the finding's own count says whether the list is whole."""
    import torch

    from relu_doctor.reports.findings import finding_view

    def dead_view(units: int, dead: int):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, units), torch.nn.ReLU())
        with torch.no_grad():
            net[0].bias[:dead] = -100.0
        with relu_doctor.watch(net, log_every_n_steps=1, overhead_budget=None) as doc:
            net(torch.randn(16, 4)).sum().backward()
            doc.step()
        (f,) = [f for f in doc.findings() if f.kind == "dead"]
        return finding_view(f)

    whole = dead_view(64, 64)
    assert len(whole.units_named) == 64 and "listed" not in whole.units_text
    cut = dead_view(80, 70)
    assert len(cut.units_named) == 64 and cut.units_text.endswith("… (first 64 of 70 listed)")
    # A NaN/Inf finding counts unit-steps, not units: its whole list is not "cut".
    from relu_doctor.diagnosis import Finding

    nan = finding_view(Finding("nonfinite", "s", "critical", "NaN.",
                               {"nonfinite": 12, "units": [0, 1, 2]}, "", 1))
    assert nan.units_text == "0, 1, 2"


def test_the_terminal_summary_says_what_to_do_first(dead_run: TrainedRun) -> None:
    """The summary listed findings without a word of what to do (only the HTML had it):
    it now gives the most severe finding's recommendation, as the report words it."""
    ctx = build_context(load_run(dead_run.run_dir))
    serious = [f for f in ctx.findings if f.severity != "info"] or ctx.findings
    assert serious, "the fixture's run has findings"
    text = summary(ctx)
    assert f"What to do first ({serious[0].site}): {serious[0].remedy}" in text
    # A run with findings of note only is healthy: its summary said "Healthy" and then "What
    # to do first". It offers the advice as advice.
    from dataclasses import replace

    from relu_doctor.diagnosis import Finding
    from relu_doctor.reports.findings import finding_view

    note = finding_view(Finding("dormant", "enc.act", "info", "3 of 64 units dormant.",
                                {"units": [1, 2, 3]}, "Recycle dormant units (ReDo).", 1))
    healthy = replace(ctx, findings=[note], verdict=replace(ctx.verdict, status="healthy",
                                                            headline="Healthy"))
    text = summary(healthy)
    assert "What to do first" not in text and text.startswith(f"{ctx.model}: Healthy")
    assert "Worth a try, nothing needs it (enc.act, info): Recycle dormant units (ReDo)." in text


@pytest.mark.real_overhead_budget
def test_the_report_states_relu_doctors_own_cost_by_its_estimate(tmp_path: Path) -> None:
    """Each log writes the budget's estimate of relu_doctor's own cost (the windows table's
    ``overhead``, equal to the sampler's at that log); the report's key numbers state the
    last, the budget, and at how many logs it was over it. A fixed rate states none."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    estimates: list[float | None] = []
    with warnings.catch_warnings(), relu_doctor.watch(
            model, log_every_n_steps=5, run_dir=tmp_path / "run", overhead_budget=0.03) as doc:
        warnings.simplefilter("ignore")  # (a model this small is over any budget: said)
        for _ in range(40):
            model(torch.randn(4, 8)).sum().backward()
            record = doc.step()
            if record is not None:
                estimates.append(record.overhead)
    run = load_run(tmp_path / "run")
    table = run.tables["windows"].sort_values("step")
    got = table["overhead"].tolist()
    assert [e is None for e in estimates] == [g != g for g in got]  # (NaN where None)
    assert [g for g in got if g == g] == pytest.approx([e for e in estimates if e is not None])
    known = [e for e in estimates if e is not None]
    assert known, "the budget timed no collecting step in 40 steps"
    over = sum(e > 0.03 for e in known)
    said = dict(build_context(run).key_numbers)["own cost"]
    assert said.startswith(f"{known[-1]:.1%} of a step (its estimate; budget 3.0%")
    assert (f"over it at {over} of {len(known)} logs" in said) == bool(over)
    with relu_doctor.watch(model, log_every_n_steps=5, run_dir=tmp_path / "fixed",
                           every_n_steps=2) as doc:
        for _ in range(10):
            model(torch.randn(4, 8)).sum().backward()
            doc.step()
    assert "own cost" not in dict(build_context(load_run(tmp_path / "fixed")).key_numbers)



def test_the_report_words_a_verdict_by_the_numbers_beside_it_and_says_a_new_finding() -> None:
    """A remedy judged on "no worse, within a tolerance" whose target rose a little is
    "helped" in its events; beside the risen number the report says "no worse (within
    tolerance)", and "helped" only where it fell. A finding that began at the step shown, a
    log after the first, says it is new; one that began earlier says since when."""
    from relu_doctor.diagnosis import Finding
    from relu_doctor.history import Run as _Run
    from relu_doctor.reports.html import render_context

    def events(before: float, after: float) -> list[dict]:
        return [{"type": "intervention", "id": "a", "remedy": "adaptive_grad_clip", "site": "s",
                 "step": 5, "what": "clipped", "before": {"dead_fraction": before},
                 "after": None},
                {"type": "intervention_result", "ref": "a", "remedy": "adaptive_grad_clip",
                 "site": "s", "step": 10, "after": {"dead_fraction": after},
                 "target": "dead_fraction", "verdict": "helped"}]

    hist = pd.DataFrame([{"step": s, "site": "s", "units": 4, "dead": 2, "dead_fraction": 0.5,
                          "family": "relu", "leaky": False} for s in (5, 10)])
    new = Finding("dead", "s", "warning", "2 of 4 units dead", {}, "", step=10, began=10)
    old = Finding("saturated", "s", "warning", "saturated", {}, "", step=10, began=5)
    for (before, after), said in (((0.234, 0.25), "no worse (within tolerance)"),
                                  ((0.25, 0.25), "no worse (within tolerance)"),  # (unchanged)
                                  ((0.56214, 0.56211), "no worse (within tolerance)"),  # (shown alike)
                                  ((0.3, 0.25), "helped")):
        run = _Run(meta={"sites": [{"name": "s", "units": 4, "family": "relu"}]}, history=hist,
                   units=pd.DataFrame(), layers=pd.DataFrame(), events=events(before, after),
                   last_findings=[new, old])
        ctx = build_context(run)
        (view,) = ctx.interventions
        assert view.verdict == said
        html = render_context(ctx)
        assert f">{said}</div>" in html and "rd-verdict-ok" in html
        assert "new at step 10" in html and "since step 5" in html


def test_dead_now_says_how_many_of_the_dead_are_stuck_negative_at_leaky_sites(
        tmp_path: Path) -> None:
    """A GAN trial's summary said "dead now 78", adding a LeakyReLU discriminator's units
    stuck negative (which still pass a gradient) to its ReLU generator's dead ones: the key
    number says how many of them are a leaky site's, counted from the history's rows."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU(0.1),
                          nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[:3] = -50.0
        model[2].bias[:5] = -50.0
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None,
                           run_dir=tmp_path) as doc:
        for _ in range(2):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            doc.step()
    run = load_run(tmp_path)
    last = run.history[run.history["step"] == run.last_step]
    leaky, dead = int(last.loc[last["leaky"], "dead"].sum()), int(last["dead"].sum())
    assert 5 <= leaky < dead  # (the biased units at least, and the ReLU site's)
    assert dict(build_context(run).key_numbers)["dead now"] == (
        f"{dead} ({fmt_pct(dead / 16)}), {leaky} of them stuck negative at leaky sites (they "
        "still pass a small gradient)")


def _frozen_backbone_model() -> Any:
    """A frozen backbone (8 of its 16 units dead) and a head that trains."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU()).requires_grad_(False)
    model.head = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model.backbone[0].bias[:8] = -50.0
    return model


def test_a_frozen_site_is_marked_in_the_sites_table_and_the_summary(tmp_path: Path) -> None:
    """A frozen backbone's sites were not told apart in the report's table (its gradients
    "-" with no reason, its dead units beside trainable ones): the row says which layer
    feeds it frozen, the terminal summary lists the frozen sites, and a site that trains is
    not marked; once unfrozen, the row shown is not marked either."""
    import torch

    from relu_doctor.reports.html import render_context

    model = _frozen_backbone_model()

    def fit(steps: int, run_dir: Path) -> None:
        with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None,
                               run_dir=run_dir) as doc:
            for _ in range(steps):
                model.head(model.backbone(torch.randn(8, 8))).pow(2).mean().backward()
                doc.step()

    fit(4, tmp_path / "frozen")
    ctx = build_context(load_run(tmp_path / "frozen"))
    assert {r.site: r.frozen for r in ctx.sites} == {"backbone.1": "backbone.0", "head.1": ""}
    html = render_context(ctx)
    assert html.count("frozen: fed by") == 1 and "frozen: fed by <code>backbone" in html
    assert ("Frozen (fed by layers that do not train, or reached by no gradient; no remedy "
            "acts there): backbone.1") in summary(ctx)
    model.backbone.requires_grad_(True)
    fit(4, tmp_path / "trains")
    ctx = build_context(load_run(tmp_path / "trains"))
    assert not any(r.frozen for r in ctx.sites) and "Frozen (" not in summary(ctx)


def test_a_part_unfrozen_ends_its_frozen_findings_and_begins_its_training_ones(
        tmp_path: Path) -> None:
    """A fine-tuning trial: the backbone's dead finding read "warning since step 2" after
    the unfreezing at step 4, though it had been frozen information until then. A frozen
    site's finding and a training one are apart: the first ends, the second begins, at the
    first log after the unfreezing, in the run directory and in what the report says."""
    import torch

    model = _frozen_backbone_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None, optimizer=opt,
                           run_dir=tmp_path / "ft") as doc:
        for step in range(1, 9):
            if step == 5:
                model.backbone.requires_grad_(True)
            loss = model.head(model.backbone(torch.randn(8, 8))).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            doc.step(loss=loss.detach())
    run = load_run(tmp_path / "ft")
    dead = [(e.status, e.step, e.finding.severity) for e in run.finding_events()
            if e.finding.kind == "dead" and e.finding.site == "backbone.1"]
    assert dead == [("began", 2, "info"), ("ended", 6, "info"), ("began", 6, "critical")]
    now = next(f for f in doc.findings() if f.kind == "dead" and f.site == "backbone.1")
    assert now.began == 6 and now.severity == "critical"
    ctx = build_context(run)
    shown = [f for f in ctx.findings if f.site == "backbone.1"]
    assert shown and all(f.began == 6 for f in shown if f.kind in ("dead", "lifetime_dead"))
    # The plots mark the unfreezing (nothing did): in the window after step 4's log, seen at 6
    assert ctx.series.phases == [FrozenChange(step=4, seen=6, unfrozen=1, frozen=0)]
    from relu_doctor.reports import plots
    from relu_doctor.reports.html import render_context

    fig = plots.dead_fraction_figure(ctx.series.history, phases=[(4, "unfrozen")])
    assert fig is not None
    for ax in fig.axes:
        dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert [tuple(ln.get_xdata()) for ln in dotted] == [(4.0, 4.0)]
        assert "unfrozen" in [t.get_text() for t in ax.texts]
    html = render_context(ctx)
    # (the training curve, the dead fraction and the update ratio: each drawn, each said)
    assert html.count("after step 4: 1 site began training") == 3
    data = json.loads(html.split('id="relu-doctor-data">')[1].split("</script>")[0])
    assert data["frozen_changes"] == [{"step": 4, "seen": 6, "unfrozen": 1, "frozen": 0}]


@pytest.mark.parametrize("teacher_only", [False, True])
def test_a_frozen_teachers_units_are_not_counted_in_the_model_wide_numbers(
        tmp_path: Path, teacher_only: bool) -> None:
    """A distillation trial: the frozen teacher, run under no_grad in the watched wrapper's
    forward, is recorded (marked frozen), and its dead units were counted in the report's
    "dead now"/"never active" and in the before/after a remedy's change is judged on. Those
    are of the student's sites alone, against the test's own hooks on them; a model all of
    whose sites are frozen keeps its own. Health, a time series, counts every site."""
    import torch
    import torch.nn as nn

    from relu_doctor.diagnosis import run_health
    from relu_doctor.integrations._common import summary_scalars
    from relu_doctor.remedies.evidence import model_snapshot

    torch.manual_seed(0)

    class KD(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
            self.student = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 2))
            self.teacher.requires_grad_(False).eval()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                t = self.teacher(x)
            return t, self.student(x) if not teacher_only else t

    kd = KD()
    with torch.no_grad():
        kd.teacher[0].bias[:20] = -50.0  # 20 of the teacher's 32 units dead
        kd.student[0].bias[:3] = -50.0  # 3 of the student's 12
    seen: list[torch.Tensor] = []
    kd.student[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    g = torch.Generator().manual_seed(1)
    with relu_doctor.watch(kd, log_every_n_steps=4, overhead_budget=None,
                           run_dir=tmp_path / "kd") as doc:
        for _ in range(4):
            x = torch.randn(16, 8, generator=g)
            t, s = kd(x)
            if not teacher_only:
                (s - t).pow(2).mean().backward()
            doc.step()
    rec = doc.records[-1]
    frozen = {r["site"]: r["frozen"] for r in rec.site_rows}
    if teacher_only:
        assert frozen == {"teacher.1": "teacher.0"}
        want_dead, want_units = 20, 32  # (all frozen: its own numbers)
    else:
        assert frozen == {"teacher.1": "teacher.0", "student.1": None}
        h = torch.cat(seen)
        want_dead, want_units = int((h <= 0).all(0).sum()), h.shape[1]
        assert want_dead == 3
    # health and the logged model-wide numbers count every site, the teacher's a constant
    # (so that they compare across an unfreezing: a fine-tuning trial's EarlyStopping)
    every_dead, every_units = (20, 32) if teacher_only else (want_dead + 20, want_units + 32)
    health = run_health(rec.site_rows, rec.findings)
    assert health["dead_fraction"] == every_dead / every_units
    assert health["health"] == 1 - every_dead / every_units
    assert health["lifetime_dead_fraction"] == every_dead / every_units
    assert summary_scalars(rec)["relu_doctor/dead_fraction"] == every_dead / every_units
    assert model_snapshot(rec)["dead_fraction"] == want_dead / want_units
    ctx = build_context(load_run(tmp_path / "kd"))
    numbers = dict(ctx.key_numbers)
    # ("Healthy" beside "dead now 62.5%" read oddly where nothing trains)
    assert (ctx.verdict.headline == "Frozen: nothing here trains") is teacher_only
    assert numbers["dead now"].startswith(f"{want_dead} (")
    assert numbers["never active"] == str(want_dead)
    assert numbers["units"] == (str(want_units) if teacher_only else
                                f"{want_units} that train (and 32 at 1 site fed by a frozen "
                                "part: not counted here)")


def test_a_site_not_run_in_the_window_shown_reads_not_seen(tmp_path: Path) -> None:
    """A branch taken only early: the table showed its last window as "dead 0, dormant 0"
    (a trial), where none of its units was seen; a site that ran reads its counts."""
    import torch
    import torch.nn as nn

    from relu_doctor.reports.html import render_context

    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(4, 6), nn.ReLU()),
                           "b": nn.Sequential(nn.Linear(4, 6), nn.ReLU())})
    with torch.no_grad():
        model["a"][0].bias[:2] = -50.0  # two dead where it runs
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None,
                           run_dir=tmp_path) as doc:
        for step in range(4):
            x = torch.randn(8, 4)
            out = model["a"](x) + (model["b"](x) if step < 2 else 0)
            out.sum().backward()
            doc.step()
    ctx = build_context(load_run(tmp_path))
    rows = {r.site: r for r in ctx.sites}
    assert (rows["a.1"].dead, rows["a.1"].dormant) == ("2", "0")
    assert (rows["b.1"].dead, rows["b.1"].dormant) == ("not seen", "not seen")
    assert "not seen" in render_context(ctx) and "not seen" in summary(ctx)
    # the key numbers: dead of the units seen, which the branch's are not
    keys = dict(ctx.key_numbers)
    assert keys["dead now"] == "2 (33.3%) of 6 seen" and keys["dormant"] == "0"


def test_a_window_that_saw_no_unit_reads_not_seen_in_the_key_numbers(tmp_path: Path) -> None:
    """Weights gone NaN: every site's table row read "not seen", while the key numbers
    above them said "dead now 0 (0.0%)" and "dormant 0"."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None,
                           run_dir=tmp_path) as doc:
        for step in range(4):
            if step == 2:
                with torch.no_grad():
                    model[0].weight.fill_(float("nan"))
            model(torch.randn(8, 4)).sum().backward()
            doc.step()
    ctx = build_context(load_run(tmp_path))
    assert [(r.dead, r.dormant) for r in ctx.sites] == [("not seen", "not seen")] * 2
    keys = dict(ctx.key_numbers)
    assert (keys["dead now"], keys["dormant"]) == ("not seen", "not seen")


def test_a_sites_heatmap_draws_its_own_interventions_and_the_model_wide_ones() -> None:
    """Every heatmap drew every intervention (14 lines on each of the demo's, most of them
    other sites' swaps and recycling): a site's heatmap draws its own and the model-wide
    ones, numbered as in the interventions table."""
    from relu_doctor.history import Run as _Run
    from relu_doctor.reports import plots

    sites = ["s", "t"]
    hist = pd.DataFrame([{"step": step, "site": site, "units": 2, "dead": 0,
                          "dead_fraction": 0.0, "family": "relu"}
                         for step in (2, 4, 6, 8, 10) for site in sites])
    units = pd.DataFrame([{"step": step, "site": site, "unit": u, "activation_rate": 0.5}
                          for step in (2, 4, 6, 8, 10) for site in sites for u in range(2)])
    events = [{"type": "intervention", "id": str(i), "remedy": remedy, "site": site,
               "step": step, "what": "x", "before": None, "after": None}
              for i, (remedy, site, step) in enumerate(
                  [("leaky_relu_swap", "s", 4), ("dormant_reset", "t", 6),
                   ("lr_rescue", "model", 8)])]
    run = _Run(meta={"sites": [{"name": s, "units": 2, "family": "relu"} for s in sites]},
               history=hist, units=units, layers=pd.DataFrame(), events=events,
               last_findings=[])
    series = build_context(run).series
    assert series.marks == [4, 6, 8]
    assert series.site_marks == {"s": [4, 8], "t": [6, 8]}
    data = plots.activity_matrix(series.units, "t")
    assert data is not None
    assert plots.heatmap_mark_columns(data.steps, series.marks, series.site_marks["t"]) == [
        (2, 3), (3, 4)]  # numbers 2 and 3 of the table, after the windows of steps 6 and 8
