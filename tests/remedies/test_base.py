"""The remedy protocol (relu_doctor.remedies.base): pending interventions owned by the base
and completed one interval later, snapshots against hand-computed numbers, site resolution
without parsing names, and the package's shape (public names, import direction, sizes)."""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn as nn

import relu_doctor
import relu_doctor.remedies as remedies
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Intervention, InterventionResult
from relu_doctor.history import merge_interventions
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


def test_bound_remedies_record_every_event_once():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias[:6] = -100.0
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


def _books(remedy: Any) -> Any:
    """What a remedy counts from each record, whether or not it acts (its books)."""
    from relu_doctor.remedies import ActivationSwapper, DormantRecycler

    if isinstance(remedy, ActivationSwapper):
        return dict(remedy.streaks)
    if isinstance(remedy, DormantRecycler):
        return remedy.intervals
    return {k: v.clone() for k, v in remedy.age.items()}  # ContinualBackprop


@pytest.mark.parametrize("kind", ["swap", "redo", "cbp"])
def test_a_window_closing_on_the_last_step_is_counted_but_changes_nothing(kind: str) -> None:
    """A window that closes exactly on training's last step was an ordinary log: a remedy
    acted there, after the last optimizer step (a swap left the user a model with an
    activation no step trained with). ``doc.step(last=True)`` (what the Lightning, Keras and
    Hugging Face callbacks pass) makes that record ``final``: the remedy keeps its books
    (streaks, intervals, ages: a resumed run must find them as an uninterrupted run left
    them) but changes nothing. An identical run without ``last`` acts at that step, and the
    action it left out happens at the next log where training goes on."""
    from relu_doctor.remedies import ActivationSwapper, ContinualBackprop, DormantRecycler

    def run(last_at: int | None, steps: int) -> tuple[Any, list[dict[str, Any]], list, Any]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1))
        with torch.no_grad():
            net[0].bias[:32] = -50.0  # dead from the start
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        doc = relu_doctor.watch(net, every_n_steps=1, overhead_budget=None, optimizer=opt,
                                log_every_n_steps=5)
        remedy: Any = {
            "swap": lambda: ActivationSwapper(net, threshold=0.3, patience=2, optimizer=opt),
            "redo": lambda: DormantRecycler(net, optimizers=opt),
            "cbp": lambda: ContinualBackprop(net, optimizers=opt, replacement_rate=0.02,
                                             maturity=0),
        }[kind]().bind(doc)
        seen, records, before = events_of(doc), [], None
        doc.add_listener(records.append)
        for i in range(1, steps + 1):
            opt.zero_grad()
            net(torch.randn(32, 4)).pow(2).mean().backward()
            opt.step()
            if i == last_at:
                before = (copy.deepcopy(net), _books(remedy))
            doc.step(last=i == last_at)
            if i == last_at:
                after = net.state_dict()
                assert all(torch.equal(before[0].state_dict()[k], v) for k, v in after.items())
                assert [type(m) for m in net.modules()] == [type(m) for m in before[0].modules()]
        doc.detach()
        return remedy, [e for e in seen if e["type"] == "intervention"], records, before

    plain, acted, _, _ = run(None, 10)
    assert 10 in [e["step"] for e in acted]  # an ordinary log at step 10 acts
    held, acted, records, _ = run(10, 10)
    assert [(r.step, r.final) for r in records] == [(5, False), (10, True)]
    assert 10 not in [e["step"] for e in acted]
    if kind == "swap":  # the books went on: the streak that made `plain` swap is kept
        assert held.streaks == {"1": 2} and plain.streaks == {}
    elif kind == "redo":
        assert held.intervals == plain.intervals == 2
    else:
        # CBP: the units `plain` replaced at step 10 (age 0 there) aged on here, and their
        # replacement is still owed
        diff = held.age["1"] != plain.age["1"]
        assert (plain.age["1"][diff] == 0).all() and (held.age["1"][diff] == 10).all()
        n = int(diff.sum())
        assert n > 0 and plain.replaced["1"] - held.replaced["1"] == n
        assert held._owed["1"] - plain._owed["1"] == pytest.approx(n)
    _, acted, _, _ = run(10, 15)  # training goes on: the action comes at the next log
    assert 15 in [e["step"] for e in acted]


def test_step_last_must_be_a_bool() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with relu_doctor.watch(net) as doc:
        net(torch.randn(2, 4))
        with pytest.raises(ReluDoctorError, match="last: expected True or False, got 1"):
            doc.step(last=1)  # type: ignore[arg-type]
        doc.step(last=True)
