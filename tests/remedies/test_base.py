"""The remedy protocol (relu_doctor.remedies.base): pending interventions owned by the base
and completed one interval later, snapshots against hand-computed numbers, site resolution
without parsing names, and the package's shape (public names, import direction, sizes)."""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import relu_doctor
import relu_doctor.remedies as remedies
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Intervention, InterventionResult
from relu_doctor.history import IntervalRecord, merge_interventions
from relu_doctor.remedies import Remedy, model_snapshot, site_snapshot
from relu_doctor.remedies.base import RecordLike
from relu_doctor.sites import SiteKey
from tests.remedies.helpers import EXPLODING, events_of, rec, site_row
from tests.zoo import BasicBlock

PACKAGE = Path(remedies.__file__).parent

PUBLIC = [  # the names relu_doctor.remedies exported before the split (less merge_interventions)
    "AGC",
    "ActivationSwapper",
    "AutoClip",
    "Consumer",
    "DormantRecycler",
    "LRRescuer",
    "Remedy",
    "SwapRecord",
    "UnitLinks",
    "find_unit_links",
    "model_snapshot",
    "recycle_units",
    "restore_activation",
    "scale_lr",
    "site_snapshot",
    "swap_activation",
]


class Marker(Remedy):
    """Intervenes at every site whose dead fraction is above 0.5, and on the model when the
    record has an exploding-gradient finding."""

    name = "marker"

    def decide(self, record: RecordLike) -> list[Intervention]:
        out = [
            self._intervention(site=r["site"], step=record.step, what="marked",
                               before=site_snapshot(r), note=1)
            for r in record.site_rows
            if r["dead_fraction"] > 0.5
        ]
        if any(f.kind == "exploding_gradient" for f in record.findings):
            out.append(self._intervention(site="model", step=record.step, what="model",
                                          before=model_snapshot(record)))
        return out

    def mark(self, site: str, step: int) -> Intervention:
        return self._record(self._intervention(site=site, step=step, what="by hand", before=None))


# ======================================================================= package shape


#: added since: the treatment plan and Continual Backprop (issue 15)
ADDED = ["ContinualBackprop", "DEFAULT_STEPS", "PlanStep", "TreatmentPlan"]


def test_public_names_are_those_of_before_the_split():
    assert sorted(remedies.__all__) == sorted(PUBLIC + ADDED)
    for name in PUBLIC + ADDED:
        assert getattr(remedies, name) is not None
    assert not hasattr(remedies, "merge_interventions")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_each_module_is_one_small_idea_importing_the_right_way(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= 600, f"{path.name}: {len(lines)} lines"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 8, f"{path.name}: no docstring saying its idea"
    bad = {
        m for m in _imports(path)
        if m == "relu_doctor"
        or m.startswith(("relu_doctor.history", "relu_doctor.reports", "relu_doctor.callbacks",
                         "relu_doctor.doctor", "lightning"))
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


# ======================================================================= snapshots


def test_site_snapshot_keeps_the_metrics_and_drops_non_finite():
    row = {**site_row("a", 0.3), "lifetime_dead_fraction": float("nan"), "extra": 1}
    snap = site_snapshot(row)
    assert list(snap) == [
        "dead_fraction", "lifetime_dead_fraction", "dormant_fraction", "below_tau_fraction",
        "sparsity", "activation_rate", "mean_abs", "grad_rms",
    ]
    assert snap["dead_fraction"] == 0.3 and snap["lifetime_dead_fraction"] is None
    assert snap["dormant_fraction"] is None and snap["grad_rms"] == 0.1


def test_model_snapshot_weights_by_units_and_sums_layer_norms():
    rows = [
        {**site_row("a", 0.5, units=10), "dormant": 6},
        {**site_row("b", 0.25, units=30), "dormant": 3},
    ]
    record = rec(5, rows, findings=[EXPLODING])
    record.layer_table = pd.DataFrame({"layer": ["x", "y"], "grad_norm": [3.0, 4.0]})
    snap = model_snapshot(record)
    assert snap == {
        "dead_fraction": (5 + 8) / 40,  # round(0.25 * 30) = 8
        "dormant_fraction": 9 / 40,
        "grad_norm": 5.0,
        "exploding_gradient": True,
    }
    empty = model_snapshot(rec(5, []))
    assert empty == {"dead_fraction": None, "dormant_fraction": None, "grad_norm": None,
                     "exploding_gradient": False}
    record.layer_table = pd.DataFrame({"layer": ["x"], "grad_norm": [math.inf]})
    assert model_snapshot(record)["grad_norm"] is None


@pytest.mark.parametrize("resumed", [False, True])
def test_a_model_wide_change_is_judged_over_the_sites_its_before_was_of(resumed: bool) -> None:
    """The model-wide numbers are of the sites that train (a frozen teacher's left out): a
    backbone unfrozen between a change and its next window joined them, moving every number
    though no unit changed (a review). The window after is read over the sites the before
    was, through a checkpoint too."""
    frozen_backbone = {**site_row("backbone", 0.75, units=32), "frozen": "backbone.0"}
    head = site_row("head", 0.5, units=8)
    marker = Marker()
    made = marker(rec(4, [frozen_backbone, head], findings=[EXPLODING]))
    model_change = next(e for e in made if isinstance(e, Intervention) and e.site == "model")
    assert model_change.before is not None and model_change.before["dead_fraction"] == 0.5
    if resumed:
        again = Marker()
        again.load_state_dict(copy.deepcopy(marker.state_dict()))
        marker = again
    unfrozen = {**frozen_backbone, "frozen": None}  # 24 of 32 still dead
    after = rec(8, [unfrozen, site_row("head", 0.25, units=8)])
    results = [e for e in marker(after) if isinstance(e, InterventionResult)]
    judged = next(r for r in results if r.ref == model_change.id)
    assert judged.after is not None and judged.after["dead_fraction"] == 0.25  # the head's
    assert model_snapshot(after)["dead_fraction"] == (24 + 2) / 40  # (both train now)


# ======================================================================= the protocol


def test_the_base_owns_pending_interventions_until_their_results():
    m = Marker()
    first = m(rec(10, [site_row("a", 0.9), site_row("b", 0.1)], findings=[EXPLODING]))
    assert [(type(e).__name__, e.site) for e in first] == [
        ("Intervention", "a"), ("Intervention", "model"),
    ]
    a = first[0]
    assert a.remedy == "marker" and a.id == "marker:10:a:1" and a.details == {"note": 1}
    assert a.before["dead_fraction"] == 0.9 and a.after is None
    assert [(p.id, p.site) for p in m.pending] == [("marker:10:a:1", "a"),
                                                    ("marker:10:model:2", "model")]
    second = m(rec(20, [site_row("a", 0.2)]))
    assert all(isinstance(e, InterventionResult) for e in second)
    assert [(e.ref, e.site, e.step, e.remedy) for e in second] == [
        ("marker:10:a:1", "a", 20, "marker"), ("marker:10:model:2", "model", 20, "marker"),
    ]
    assert second[0].after == site_snapshot(site_row("a", 0.2))
    assert second[1].after == model_snapshot(rec(20, [site_row("a", 0.2)]))
    assert not m.pending
    # A site missing from the next record: measured as None, not lost.
    m(rec(30, [site_row("c", 0.9)]))
    (res,) = m(rec(40, []))
    assert res.site == "c" and res.after is None


def test_pending_interventions_survive_a_checkpoint():
    m = Marker()
    m(rec(10, [site_row("a", 0.9)]))
    state = m.state_dict()
    assert state == {"pending": [{"id": "marker:10:a:1", "site": "a"}], "n_events": 1}
    fresh = Marker()
    fresh.load_state_dict(state)
    (res, new) = fresh(rec(20, [site_row("a", 0.8)]))
    assert res.ref == "marker:10:a:1" and res.after["dead_fraction"] == 0.8
    assert new.id == "marker:20:a:2"  # ids continue, never reused


def _marked_net() -> nn.Module:
    """A net whose first layer has 6 of 8 units dead (Marker acts at its site "1")."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias[:6] = -100.0
    return net


def test_bound_remedies_record_every_event_once():
    net = _marked_net()
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        seen = events_of(doc)
        m = Marker()
        assert m.bind(doc) is m and m.bind(doc) is m  # idempotent: one listener
        net(torch.randn(8, 4)).sum().backward()
        doc.step()
        by_hand = m.mark("1", step=1)
        net(torch.randn(8, 4)).sum().backward()
        doc.step()
    kinds = [(e["type"], e["site"], e["step"]) for e in seen]
    assert kinds == [
        ("intervention", "1", 1),  # from decide: recorded by __call__
        ("intervention", "1", 1),  # by hand: recorded by _record
        ("intervention_result", "1", 2),
        ("intervention_result", "1", 2),
        ("intervention", "1", 2),
    ]
    assert seen[1]["id"] == by_hand.id and seen[1]["what"] == "by hand"
    assert seen[0]["details"] == {"note": 1}


def _marked_run(remedy: Remedy, steps: int) -> tuple[relu_doctor.Doctor, list[dict[str, Any]]]:
    """``steps`` steps of :func:`_marked_net`, logged at every step, with ``remedy`` bound:
    the Doctor and the events it recorded."""
    net = _marked_net()
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        seen = events_of(doc)
        remedy.bind(doc)
        for _ in range(steps):
            net(torch.randn(8, 4)).sum().backward()
            doc.step()
    return doc, seen


def test_a_remedy_that_fails_warns_once_and_steps_aside_while_monitoring_goes_on():
    # A bug in a remedy's decision (here on its second decision) must not reach the user's
    # doc.step() nor stop the monitoring: one warning, no more decisions, every log written.
    class Failing(Marker):
        calls = 0

        def decide(self, record: RecordLike) -> list[Intervention]:
            Failing.calls += 1
            if Failing.calls == 2:
                raise IndexError("a bug")
            return super().decide(record)

    with pytest.warns(UserWarning, match="the marker remedy failed at step 2") as caught:
        doc, seen = _marked_run(Failing(), 4)
    assert sum("remedy failed" in str(w.message) for w in caught) == 1
    assert Failing.calls == 2  # no decision after the failure
    assert [r.step for r in doc.records] == [1, 2, 3, 4]
    assert [(e["type"], e["step"]) for e in seen] == [
        ("intervention", 1), ("intervention_result", 2)]  # the step-1 change still judged


def test_a_remedy_that_fails_half_way_records_what_it_changed_before():
    # A decision that made a change and then failed: the change is recorded (announced,
    # judged at the next log) as if the decision had returned it.
    class HalfWay(Marker):
        def decide(self, record: RecordLike) -> list[Intervention]:
            made = super().decide(record)  # one intervention, made here
            if made:
                raise RuntimeError("failed after a change")
            return made

    with pytest.warns(UserWarning, match="marker remedy failed at step 1"):
        _, seen = _marked_run(HalfWay(), 2)
    assert [(e["type"], e["step"]) for e in seen] == [("intervention", 1), ("intervention_result", 2)]


def test_a_clippers_failing_report_does_not_stop_its_clipping():
    # The clipper's own "clip no more" (its hook failed) and a remedy's "decide no more" (its
    # report failed) are two things: a failing report leaves the clipping in the optimizer on.
    from relu_doctor.remedies import AutoClip

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    clip = AutoClip(percentile=10, warmup_steps=0).attach(opt)

    def broken(record: RecordLike) -> list[Intervention]:
        raise IndexError("a bug in the report")

    clip.decide = broken  # type: ignore[method-assign]
    clipped = []
    with (pytest.warns(UserWarning, match="adaptive_grad_clip remedy failed at step 1"),
          relu_doctor.watch(net, log_every_n_steps=1, optimizer=opt) as doc):
        clip.bind(doc)
        for i in range(6):  # growing gradients: each step's norm over the 10th percentile
            net(torch.randn(8, 4) * (1 + i)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            clipped.append(int(clip._clipped or 0))  # never read: the report failed
            doc.step()
    assert clipped[-1] >= clipped[1] + 4  # every step after the failure clipped


def test_sites_resolve_to_keys_without_parsing_names():
    block = BasicBlock(4)
    m = Marker()
    # Unbound: a str is a module path, exactly as written.
    assert m.resolve_site("relu#1") == (SiteKey("relu#1"), "relu#1")
    assert m.resolve_site("") == (SiteKey(""), "(root)")
    assert m.resolve_site(SiteKey("relu", 1)) == (SiteKey("relu", 1), "relu#1")
    assert m.resolve_site(SiteKey("blk", 0, "gelu")) == (SiteKey("blk", 0, "gelu"), "blk:gelu#0")
    with pytest.raises(ReluDoctorError, match="site: expected a site name"):
        m.resolve_site(3)  # type: ignore[arg-type]
    with relu_doctor.watch(block, log_every_n_steps=1) as doc:
        block(torch.randn(2, 4, 5, 5))
        m.bind(doc)
        # Bound: a site name is looked up, a module path that is no site name stays one.
        assert m.resolve_site("relu#1") == (SiteKey("relu", 1), "relu#1")
        assert m.resolve_site("relu") == (SiteKey("relu"), "relu")
        assert m.resolve_site(SiteKey("relu", 0)) == (SiteKey("relu", 0), "relu#0")


def test_merge_interventions_fills_after():
    """(History's merge, which remedies no longer re-export; kept from the old test file.)"""
    events: list[dict[str, Any]] = [
        {"type": "finding", "kind": "dead"},
        {"type": "intervention", "id": "x", "after": None, "step": 5},
        {"type": "intervention_result", "ref": "x", "after": {"dead_fraction": 0.0}, "step": 10},
    ]
    merged = merge_interventions(events)
    assert merged == [
        {
            "type": "intervention",
            "id": "x",
            "after": {"dead_fraction": 0.0},
            "step": 5,
            "after_step": 10,
        }
    ]


def test_no_remedy_acts_on_the_last_log_after_training_ended():
    """The last, partial window is logged when the ``with`` block ends, after the last
    optimizer step: ReDo recycled units there, and the model the user went on to save held
    freshly initialised units that no step trained. That log's record is ``final`` now:
    the recycler judges its earlier intervention on it and starts none, so the model leaves
    the block as its last step left it. (The same remedy on a log inside training acts.)"""
    from relu_doctor.remedies import DormantRecycler

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        net[0].bias[:32] = -50.0  # dead from the start
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    records = []
    with relu_doctor.watch(
        net, every_n_steps=1, overhead_budget=None, optimizer=opt, log_every_n_steps=10
    ) as doc:
        seen = events_of(doc)
        DormantRecycler(net, optimizers=opt, every=1).bind(doc)
        doc.add_listener(records.append)
        for _ in range(15):
            opt.zero_grad()
            net(torch.randn(32, 4)).pow(2).mean().backward()
            opt.step()
            doc.step()
        last = {k: v.clone() for k, v in net.state_dict().items()}
        acted = [e for e in seen if e["type"] == "intervention"]
        assert [e["step"] for e in acted] == [10]  # a log inside training: it acted
    assert [(r.step, r.final) for r in records] == [(10, False), (15, True)]
    assert all(torch.equal(last[k], v) for k, v in net.state_dict().items())
    assert [(e["type"], e["step"]) for e in seen] == [
        ("intervention", 10), ("intervention_result", 15)  # judged on the final record
    ]


class HeldRun(NamedTuple):
    remedy: Any
    acted: list[tuple[Any, ...]]  # (step, site, what, units) of each intervention
    records: list[Any]
    after: Any  # the model's state and module types after last_at's step call
    before: Any  # ... and before it
    net: nn.Module
    judged: list[tuple[str, int, str | None]]  # (id, step, verdict) of each result


def _held_run(kind: str, last_at: int | None, steps: int, ended_at: int | None = None
              ) -> HeldRun:
    """A 4-64-1 regression with half its hidden units dead from the start, watched (log
    every 5 steps) with one remedy; ``doc.step(last=True)`` at step ``last_at``; the open
    window logged as final after step ``ended_at`` (``doc.log_final()``: a ``with`` block
    left there), training going on after both."""
    from relu_doctor.remedies import (
        ActivationSwapper,
        ContinualBackprop,
        DormantRecycler,
        TreatmentPlan,
    )
    from relu_doctor.remedies.plan import PlanStep

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        net[0].bias[:32] = -50.0  # dead from the start
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    doc = relu_doctor.watch(net, every_n_steps=1, overhead_budget=None, optimizer=opt,
                            log_every_n_steps=5)
    remedy: Any = {
        "swap": lambda: ActivationSwapper(net, threshold=0.3, patience=2, optimizer=opt),
        "redo": lambda: DormantRecycler(net, optimizers=opt, every=2),
        "cbp": lambda: ContinualBackprop(net, optimizers=opt, replacement_rate=0.02,
                                         maturity=0),
        "plan": lambda: TreatmentPlan(net, optimizer=opt, cooldown=1, patience=2,
                                      steps=(PlanStep("swap", options={"threshold": 0.3}),)),
    }[kind]().bind(doc)
    seen, records = events_of(doc), []
    doc.add_listener(records.append)
    before = after = None
    for i in range(1, steps + 1):
        opt.zero_grad()
        net(torch.randn(32, 4)).pow(2).mean().backward()
        opt.step()
        if i == last_at:
            before = copy.deepcopy(net.state_dict()), [type(m) for m in net.modules()]
        doc.step(last=i == last_at)
        if i == last_at:
            after = copy.deepcopy(net.state_dict()), [type(m) for m in net.modules()]
        if i == ended_at:
            doc.log_final()
    doc.detach()
    acted = [(e["step"], e["site"], e["what"], e["details"].get("units"))
             for e in seen if e["type"] == "intervention"]
    judged = [(e["ref"], e["step"], e.get("verdict")) for e in seen
              if e["type"] == "intervention_result"]
    return HeldRun(remedy, acted, records, after, before, net, judged)


@pytest.mark.parametrize("kind", ["swap", "redo", "cbp", "plan"])
def test_a_window_closing_on_the_last_step_is_held_and_decided_if_training_goes_on(
    kind: str,
) -> None:
    """A window that closes exactly on training's last step was an ordinary log: a remedy
    acted there, after the last optimizer step (a swap left the user a model with an
    activation no step trained with). ``doc.step(last=True)`` (what the Lightning, Keras and
    Hugging Face callbacks pass) makes that record ``final``: the remedy judges on it and
    holds it, and the model is left as the last step left it. When training goes on, the
    remedy decides on the held record at the end of the next step: the decision the
    uninterrupted run made at step 10 (the same units, the same change), one step later."""
    plain = _held_run(kind, None, 20).acted
    assert 10 in [a[0] for a in plain]  # an ordinary log at step 10 acts
    held, acted, records, after, before, *_ = _held_run(kind, 10, 10)
    assert [(r.step, r.final) for r in records] == [(5, False), (10, True)]
    assert 10 not in [a[0] for a in acted] and held.held is records[-1]
    assert after[1] == before[1]  # no module swapped
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items())
    held, acted, *_ = _held_run(kind, 10, 20)
    assert [a for a in acted if a[0] <= 10] == [a for a in plain if a[0] <= 10]
    assert held.held is None


@pytest.mark.parametrize("kind", ["swap", "redo", "cbp", "plan"])
def test_the_changes_before_the_last_step_are_judged_on_the_final_record(kind: str) -> None:
    """A final record is held from decisions only: the changes made at the log before it
    are judged on it, as an uninterrupted run judges them there (a plan judges its steps'
    changes, which it collects from its remedies, on it too)."""
    plain = _held_run(kind, None, 20)
    ended = _held_run(kind, 15, 15)
    assert ended.records[-1].final and ended.records[-1].step == 15
    at_15 = [j for j in plain.judged if j[1] == 15]
    assert at_15, plain.judged  # the change made at 10 is judged at 15
    assert [j for j in ended.judged if j[1] == 15] == at_15


@pytest.mark.parametrize("kind", ["swap", "redo", "cbp", "plan"])
def test_a_release_on_a_logging_step_is_judged_on_the_window_after_it(kind: str) -> None:
    """Training ended after step 9 (a partial window, logged final and held) and went on:
    step 10, its first step since, closes a window too. That window ran before the held
    decision made at its end, so it is only observed (nothing decided on it, nothing
    judged): the changes decided on the held record are judged on the window of steps
    11-15, which ran after them (they were judged on step 10 alone, before)."""
    run = _held_run(kind, None, 20, ended_at=9)
    assert [(r.step, r.final) for r in run.records][:3] == [(5, False), (9, True), (10, False)]
    assert 9 in [a[0] for a in run.acted], run.acted  # decided on the held record
    assert 10 not in [a[0] for a in run.acted]
    assert [j for j in run.judged if j[1] == 10] == []
    assert [j for j in run.judged if j[1] == 15], run.judged


def test_a_held_record_survives_a_checkpoint_loaded_with_weights_only(tmp_path: Path) -> None:
    """The held record is part of the remedy's state (a run resumed from a checkpoint saved
    after the last step decides on it), in plain data that ``torch.load(weights_only=True)``
    reads: the same steps, rows, unit table (NaN kept), findings and keys come back."""
    from relu_doctor.remedies import DormantRecycler

    held, _, records, _, _, net, _ = _held_run("redo", 10, 10)
    records[-1].unit_table.loc[3, "mean_abs"] = float("nan")  # a NaN cell to keep
    path = tmp_path / "state.pt"
    torch.save(held.state_dict(), path)
    again = DormantRecycler(net)
    again.load_state_dict(torch.load(path, weights_only=True))
    got, want = again.held, records[-1]
    assert got is not None and got.step == want.step == 10 and got.final
    pd.testing.assert_frame_equal(pd.DataFrame(got.site_rows), pd.DataFrame(want.site_rows))
    pd.testing.assert_frame_equal(got.unit_table, want.unit_table.reset_index(drop=True),
                                  check_dtype=False, check_categorical=False)
    pd.testing.assert_frame_equal(got.layer_table, want.layer_table.reset_index(drop=True),
                                  check_dtype=False, check_categorical=False)
    assert got.findings == want.findings and got.keys == want.keys
    assert isinstance(got, IntervalRecord)  # every field a user's remedy may read
    assert got.new_findings == want.new_findings and got.metrics == want.metrics
    assert math.isnan(got.unit_table.loc[3, "mean_abs"])
    state = again.state_dict()
    assert state["held"]["step"] == 10
    again.release_held()
    assert again.held is None and "held" not in again.state_dict()


def test_step_last_must_be_a_bool() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with relu_doctor.watch(net) as doc:
        net(torch.randn(2, 4))
        with pytest.raises(ReluDoctorError, match="last: expected True or False, got 1"):
            doc.step(last=1)  # type: ignore[arg-type]
        doc.step(last=np.int64(3) == 3)  # numpy's bool is a bool
        doc.step(last=True)


@pytest.mark.parametrize("make", [
    lambda net: remedies.ActivationSwapper(net),
    lambda net: remedies.DormantRecycler(net),
    lambda net: remedies.LRRescuer(None),
    lambda net: remedies.AutoClip(),
    lambda net: remedies.ContinualBackprop(net),
    lambda net: remedies.TreatmentPlan(net),
], ids=["swap", "recycle", "lr", "autoclip", "cbp", "plan"])
@pytest.mark.parametrize("value", ["doc", None, nn.Identity()])
def test_bind_refuses_what_is_not_a_doctor(make, value) -> None:
    """One check in :meth:`Remedy.bind`, for every remedy: not an AttributeError from inside."""
    remedy = make(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    with pytest.raises(ReluDoctorError, match=r"^doctor: expected a relu_doctor\.Doctor \(") as info:
        remedy.bind(value)
    assert type(value).__name__ in str(info.value) and "watch(model" in str(info.value)
    assert remedy.doctor is None  # nothing half-bound


@pytest.mark.parametrize("kind", ["TreatmentPlan", "DormantRecycler", "ActivationSwapper", "ContinualBackprop"])
def test_a_remedy_given_another_model_than_the_doctors_is_refused_at_bind(kind: str) -> None:
    """A plan given another model than the Doctor watches bound silently and found none of
    its sites at its first change (a Fabric trial); given a copy (an EMA model), it would
    change the copy in the model's stead. bind() refuses it, naming both; the Doctor's own
    model binds."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    make = getattr(remedies, kind)
    with relu_doctor.watch(net, optimizer=opt) as doc:
        with pytest.raises(ReluDoctorError, match=r"^model: .* not the model the Doctor watches"):
            make(copy.deepcopy(net)).bind(doc)
        assert make(net).bind(doc).doctor is doc
        doc.step()
