"""The run record: a run directory written as training goes, read back by ``load_run`` with
the same numbers ``doc.history()`` holds; ``doc.save()``; and the run-directory errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import relu_doctor
from relu_doctor.errors import ReluDoctorError, RunDirError
from relu_doctor.history import FORMAT_VERSION, load_run
from tests import zoo


def parts(run_dir, table):
    return sorted(p.name for p in (run_dir / table).glob("part-*.parquet"))


def assert_same_table(loaded: pd.DataFrame, in_memory: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        loaded.reset_index(drop=True), in_memory.reset_index(drop=True),
        check_dtype=False, check_exact=True,
    )


def test_run_directory_is_written_incrementally_and_reads_back(tmp_path):
    run_dir = tmp_path / "run"
    case = zoo.ARCH_CASES["resnetish"]
    model = case.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with torch.no_grad():
        model.stem[1].bias[0] = -1e3  # a dead unit, so there are findings to write
    with relu_doctor.watch(model, log_every_n_steps=2, run_dir=run_dir, optimizer=opt) as doc:
        meta = json.loads((run_dir / "meta.json").read_text())
        assert meta["format_version"] == FORMAT_VERSION
        events_seen = 0
        for step in range(1, 7):
            zoo.train(model, [case.batch(4)], doc=doc, optimizer=opt)
            logs = step // 2
            for table in ("history", "units", "layers"):
                assert len(parts(run_dir, table)) == logs, (step, table)
            lines = (run_dir / "events.jsonl").read_text().splitlines() if logs else []
            assert len(lines) >= events_seen
            events_seen = len(lines)
            if logs:
                # What is on disk now is what the doctor has logged so far.
                assert_same_table(load_run(run_dir).history, doc.history())
    assert events_seen > 0

    run = load_run(run_dir)
    assert_same_table(run.history, doc.history())
    assert_same_table(run.units, pd.concat([r.unit_table for r in doc.records]))
    assert_same_table(run.layers, pd.concat([r.layer_table for r in doc.records]))
    assert sorted(run.history["step"].unique()) == [2, 4, 6]
    assert [s["name"] for s in run.site_info] == [s.name for s in doc.probe.sites()]
    assert run.site_info == [json.loads(json.dumps(s.describe())) for s in doc.probe.sites()]
    assert run.meta["config"]["log_every_n_steps"] == 2
    assert run.last_step == 6
    # Findings are written when they begin, change severity or end, never re-written.
    events = [(e.status, e.step, e.finding.kind, e.finding.site, e.finding.severity)
              for e in run.finding_events()]
    assert events == transitions(doc.records)
    assert len(events) < sum(len(r.findings) for r in doc.records)
    assert [f.to_dict() for f in run.findings()] == [
        json.loads(json.dumps(f.to_dict())) for f in doc.records[-1].findings
    ]
    assert ("dead", "stem.2") in {(f.kind, f.site) for f in run.findings()}
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"


def transitions(records):
    """Reference: ``(status, step, kind, site, severity)`` of every finding that began,
    changed severity or ended, from the findings of each logged record."""
    out, before = [], {}
    for rec in records:
        now = {(f.kind, f.site): f for f in rec.findings}
        for key, f in now.items():
            if key not in before:
                out.append(("began", rec.step, *key, f.severity))
            elif before[key].severity != f.severity:
                out.append(("changed", rec.step, *key, f.severity))
        out += [("ended", rec.step, *key, f.severity) for key, f in before.items() if key not in now]
        before = now
    return sorted(out, key=lambda t: (t[1], t[0] != "ended"))


def test_save_writes_a_loadable_run(tmp_path):
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=2) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(4)], doc=doc)
    run = load_run(doc.save(tmp_path / "saved"))
    assert_same_table(run.history, doc.history())
    assert_same_table(run.units, pd.concat([r.unit_table for r in doc.records]))
    assert len(run.events) == len(transitions(doc.records))
    # Saving again over it replaces the events rather than doubling them.
    run2 = load_run(doc.save(tmp_path / "saved"))
    assert len(run2.events) == len(run.events)


def test_save_before_any_log_keeps_the_current_window(tmp_path):
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=100) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
    run = load_run(doc.save(tmp_path / "early"))
    assert_same_table(run.history, doc.to_pandas())
    assert set(run.history["site"]) == {"1", "3"}


def test_a_run_cut_short_still_loads(tmp_path):
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=tmp_path / "run") as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
    run_dir = tmp_path / "run"
    last = sorted((run_dir / "history").glob("part-*.parquet"))[-1]
    last.write_bytes(last.read_bytes()[:20])  # killed while writing (no atomic rename)
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"type": "finding", "step": 9')  # half a line
    run = load_run(run_dir)
    assert sorted(run.history["step"].unique()) == [1, 2]
    assert all(e["step"] <= 3 for e in run.events)


# ---------------------------------------------------------------------- errors


def test_load_run_errors(tmp_path):
    cases = {
        "missing": (tmp_path / "nope", r"does not exist"),
        "a file": (tmp_path / "file.txt", r"is not a directory"),
        "empty": (tmp_path / "empty", r"is empty: it is not a relu_doctor run directory"),
        "foreign": (tmp_path / "foreign", r"has no meta.json: it is not a relu_doctor run"),
        "bad json": (tmp_path / "badjson", r"cannot be read as JSON"),
        "future version": (tmp_path / "future", r"format 99; this relu_doctor reads formats \[1, 2\]"),
        "no version": (tmp_path / "noversion", r"format None"),
    }
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.csv").write_text("a,b\n")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "meta.json").write_text("{not json")
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "meta.json").write_text(json.dumps({"format_version": 99}))
    (tmp_path / "noversion").mkdir()
    (tmp_path / "noversion" / "meta.json").write_text(json.dumps({"sites": []}))
    for what, (path, message) in cases.items():
        with pytest.raises(RunDirError, match=message):
            load_run(path)
        assert issubclass(RunDirError, ReluDoctorError), what


def test_run_dir_refuses_a_foreign_directory(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    model = zoo.mlp()
    with pytest.raises(RunDirError, match=r"run_dir: .* is not empty and is not a relu_doctor"):
        relu_doctor.watch(model, run_dir=foreign)
    assert not any(m._forward_hooks for m in model.modules())
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]


def test_a_resumed_run_appends_to_its_directory(tmp_path):
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        state = doc.state_dict()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc2:
        doc2.load_state_dict(state)
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc2)
    run = load_run(run_dir)
    assert sorted(run.history["step"].unique()) == [1, 2, 3, 4]
