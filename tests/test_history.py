"""The run record: a run directory written as training goes, read back by ``load_run`` with
the same numbers ``doc.history()`` holds; ``doc.save()``; and the run-directory errors."""

from __future__ import annotations

import itertools
import json
import os
import re
import warnings

import pandas as pd
import pyarrow as pa
import pytest
import torch

import relu_doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, RunDirError
from relu_doctor.history import FORMAT_VERSION, Run, load_run
from relu_doctor.rundir import RunWriter, read_table
from tests import zoo


def parts(run_dir, table):
    return sorted(p.name for p in (run_dir / table).glob("seg-*"))


def logged_steps(run_dir, table):
    frame = read_table(run_dir, table)
    return [] if frame.empty else sorted(frame["step"].unique())


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
                # One open segment per table, appended to at every log, readable meanwhile.
                assert len(parts(run_dir, table)) == min(logs, 1), (step, table)
                assert logged_steps(run_dir, table) == [2 * k for k in range(1, logs + 1)]
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


def test_save_refuses_another_runs_directory_unless_told_to_overwrite_it(tmp_path):
    """Another run's directory is not written over by mistake; with overwrite=True it is
    replaced whole: its TensorBoard files and report go too, not shown under this run."""
    other = zoo.mlp()
    with relu_doctor.watch(other, log_every_n_steps=1, run_dir=tmp_path / "other") as d0:
        zoo.train(other, [torch.randn(8, 10) for _ in range(3)], doc=d0)
    assert list((tmp_path / "other").glob("events.out.tfevents.*"))
    (tmp_path / "other" / "report.html").write_text("<html>the other run</html>")
    before = load_run(tmp_path / "other")
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=2) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(4)], doc=doc)
    with pytest.raises(RunDirError, match=r"^path: .* already holds run '"
                       + before.meta["run_id"] + r"', which this Doctor did not save; pass a "
                       r"new directory, or overwrite=True"):
        doc.save(tmp_path / "other")
    assert_same_table(load_run(tmp_path / "other").history, before.history)  # untouched
    with pytest.raises(ReluDoctorError, match=r"^overwrite: expected True or False, got 'no'"):
        doc.save(tmp_path / "other", overwrite="no")  # a truthy string replaces nothing
    assert_same_table(load_run(tmp_path / "other").history, before.history)
    run = load_run(doc.save(tmp_path / "other", overwrite=True))
    assert_same_table(run.history, doc.history())
    assert not list((tmp_path / "other").glob("events.out.tfevents.*"))
    assert not (tmp_path / "other" / "report.html").exists()
    # its own run directory: said to be this run already
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=tmp_path / "own") as d1:
        zoo.train(model, [torch.randn(8, 10)], doc=d1)
        with pytest.raises(RunDirError, match=r"^path: .* is this Doctor's own run directory"):
            d1.save(tmp_path / "own")


def test_save_before_any_log_keeps_the_current_window(tmp_path):
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=100) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
    run = load_run(doc.save(tmp_path / "early"))
    assert_same_table(run.history, doc.to_pandas())
    assert set(run.history["site"]) == {"1", "3"}


def test_save_names_a_bad_path_and_an_unwritable_one(tmp_path):
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1) as doc:
        zoo.train(model, [torch.randn(8, 10)], doc=doc)
    with pytest.raises(ReluDoctorError, match=r"^path: expected a path \(str or os.PathLike\), got None"):
        doc.save(None)  # type: ignore[arg-type]
    # /proc refuses a new directory to everyone, root included (ENOENT)
    with pytest.raises(RunDirError, match=r"^path: cannot write the run directory "
                       r"'/proc/relu_doctor_test' \(No such file or directory\)") as info:
        doc.save("/proc/relu_doctor_test")
    assert isinstance(info.value.__cause__, FileNotFoundError)  # the OS error, chained
    # a folder of other things, and a file: named as the argument given, left as they were
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"^path: '.*notes' is not empty and is not a "
                       r"relu_doctor run directory \(it holds \['todo.txt'\]\)"):
        doc.save(tmp_path / "notes")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(RunDirError, match=r"^path: '.*file' exists and is not a directory"):
        doc.save(tmp_path / "file")
    assert sorted(x.name for x in (tmp_path / "notes").iterdir()) == ["todo.txt"]
    assert (tmp_path / "file").read_text() == "mine"
    assert load_run(doc.save(tmp_path / "ok")).history["step"].tolist()  # and it still saves


@pytest.mark.parametrize("value", [123, None, ["runs/exp1"]])
def test_load_run_of_what_is_not_a_path_names_the_argument(value):
    with pytest.raises(ReluDoctorError, match=r"^path: expected a path \(str or os.PathLike\)") as info:
        load_run(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


def test_a_run_cut_short_still_loads(tmp_path):
    """A writer killed mid-batch: the open stream is read up to its last complete batch
    (with a warning naming it), a half line of events.jsonl is skipped and named."""
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    doc = relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir)
    zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
    (stream,) = (run_dir / "history").glob("seg-*.arrows")  # still open: not compacted
    stream.write_bytes(stream.read_bytes()[:-40])  # the last batch torn
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"type": "finding", "step": 9')  # half a line
    with pytest.warns(ReluDoctorWarning) as caught:
        run = load_run(run_dir)
    assert sorted(run.history["step"].unique()) == [1, 2]
    assert all(e["step"] <= 3 for e in run.events)
    text = " ".join(str(w.message) for w in caught)
    assert stream.name in text and "cut short" in text and "events.jsonl" in text
    assert len(run.problems) == 2
    doc.detach()


@pytest.mark.parametrize("where", ["tail", "middle"])
def test_a_damaged_stream_says_where_it_stopped_being_read(tmp_path, where):
    """A report trial's stream with bytes flipped a third in, its length whole, was said to
    be "cut short". The warning says the byte it was read to, of the file's size: a
    batch's length from the end for a torn tail, well before it for damage inside."""
    import re

    run_dir = tmp_path / "run"
    model = zoo.mlp()
    doc = relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir)
    zoo.train(model, [torch.randn(8, 10) for _ in range(6)], doc=doc)
    (stream,) = (run_dir / "history").glob("seg-*.arrows")  # still open: not compacted
    data = bytearray(stream.read_bytes())
    if where == "tail":
        data = data[:-40]
    else:
        data[len(data) // 3:len(data) // 3 + 64] = b"\xff" * 64
    stream.write_bytes(bytes(data))
    with pytest.warns(ReluDoctorWarning, match="was cut short, or is damaged, at byte") as said:
        load_run(run_dir)
    (text,) = [str(w.message) for w in said if stream.name in str(w.message)]
    at, size = map(int, re.search(r"at byte (\d+) of its (\d+);", text).groups())
    assert size == len(data)
    batch = len(data) // 6  # (about one log's batch: six logs)
    assert (size - batch < at < size) if where == "tail" else (at <= len(data) // 3)
    doc.detach()
    doc.close()


# ---------------------------------------------------------------------- errors


def test_load_run_errors(tmp_path):
    cases = {
        "missing": (tmp_path / "nope", r"does not exist"),
        "a file": (tmp_path / "file.txt", r"is not a directory"),
        "empty": (tmp_path / "empty", r"is empty: it is not a relu_doctor run directory"),
        "foreign": (tmp_path / "foreign", r"has no meta.json: it is not a relu_doctor run"),
        "bad json": (tmp_path / "badjson", r"cannot be read as JSON"),
        "future version": (tmp_path / "future", r"format 99; this relu_doctor reads formats \[1, 2, 3, 4\]"),
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


def test_a_second_run_in_a_run_directory_is_refused_and_resume_continues_it(tmp_path):
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        state = doc.state_dict()
    run_id = load_run(run_dir).meta["run_id"]
    with pytest.raises(RunDirError, match=r"already holds run .*pass resume=True"):
        relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir)
    assert not any(m._forward_hooks for m in model.modules())
    # resume=True with the checkpoint: continues after it.
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc2:
        doc2.load_state_dict(state)
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc2)
    # resume=True without one: continues after the last logged step.
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc3:
        zoo.train(model, [torch.randn(8, 10) for _ in range(1)], doc=doc3)
    run = load_run(run_dir)
    assert sorted(run.history["step"].unique()) == [1, 2, 3, 4, 5]
    assert run.history.groupby("step").size().eq(2).all()  # no step written twice
    assert run.meta["run_id"] == run_id
    assert not run.problems


def test_a_continued_run_keeps_the_sites_it_has_not_run_again_and_another_model_is_said(
        tmp_path):
    """resume=True rewrote meta.json with the new process's sites only: a site whose rows
    fill the history vanished from the report. And continuing another model's run was
    silent: its record and the new one read as one run."""
    run_dir = tmp_path / "run"
    model = zoo.mlp()  # sites "1" and "3"
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
    # the same model, its second ReLU not run in the continued part: no warning, kept
    model.forward = lambda x: model[1](model[0](x))  # type: ignore[method-assign]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        warnings.filterwarnings("ignore", ".*no Doctor state loaded", ReluDoctorWarning)
        with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc:
            for _ in range(2):
                model(torch.randn(8, 10)).sum().backward()
                doc.step()
    run = load_run(run_dir)
    assert [d["name"] for d in run.meta["sites"]] == ["1", "3"]
    assert set(run.history["site"]) == {"1", "3"}
    # another model continued in it: said once, naming the site that differs
    other = torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.ReLU())
    with (pytest.warns(ReluDoctorWarning, match=r"holds the run of another model \(its site "
                       r"'1' of another width\)") as rec,
          relu_doctor.watch(other, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc):
        for _ in range(2):
            other(torch.randn(8, 10)).sum().backward()
            doc.step()
    assert sum("another model" in str(w.message) for w in rec) == 1
    assert [d["name"] for d in load_run(run_dir).meta["sites"]] == ["1", "3"]


def test_a_swap_in_a_continued_run_is_no_other_model(tmp_path):
    """A remedy's ReLU-to-LeakyReLU swap changes a site's family: in a run continued with
    resume=True it was said to be another model's."""
    from relu_doctor.remedies.swap import swap_activation

    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        warnings.filterwarnings("ignore", ".*no Doctor state loaded", ReluDoctorWarning)
        with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc:
            zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
            swap_activation(model, path="1")
            doc.probe.refresh()
            zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
    assert {d["name"]: d["family"] for d in load_run(run_dir).meta["sites"]}["1"] == "leaky_relu"


def test_resume_from_an_older_checkpoint_drops_what_was_logged_after_it(tmp_path):
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        state = doc.state_dict()  # checkpoint at step 2
        zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)  # 3-5: lost
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc2:
        doc2.load_state_dict(state)
        zoo.train(model, [torch.randn(8, 10) for _ in range(1)], doc=doc2)
    run = load_run(run_dir)
    assert sorted(run.history["step"].unique()) == [1, 2, 3]
    assert run.history.groupby("step").size().eq(2).all()
    assert all(e["step"] <= 3 for e in run.events)


def test_a_damaged_part_does_not_stop_a_resume_that_drops_later_rows(tmp_path):
    """Resuming from an older checkpoint reads every part to drop the rows after it: a
    damaged part raised (ArrowInvalid) into the user's training. It is left as it is, with
    a warning, and the run goes on (readers skip that part, with their own warning)."""
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        state = doc.state_dict()
        zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
    part = sorted((run_dir / "units").glob("seg-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:40] + b"\x00" * 64 + part.read_bytes()[104:])
    with pytest.warns(ReluDoctorWarning, match=re.escape(part.name) + ".*left as it is"), \
            relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc2:
        doc2.load_state_dict(state)
        zoo.train(model, [torch.randn(8, 10) for _ in range(1)], doc=doc2)
    run = load_run(run_dir)
    assert sorted(run.history["step"].unique()) == [1, 2, 3]
    with pytest.warns(ReluDoctorWarning, match=re.escape(part.name)):
        assert 1 not in set(run.units["step"])  # that part: skipped when read


def test_segments_rotate_and_every_row_reads_back_in_order(tmp_path):
    """A small rotation limit: closed segments are Parquet, the open one a stream; the
    generic ``metrics`` table reads back through ``Run.metrics``."""
    w = RunWriter(tmp_path / "r", rotate_rows=5)
    w.write_meta({"sites": []})
    rows = []
    for step in range(1, 8):
        frame = pd.DataFrame({"step": [step, step], "name": ["loss", "acc"],
                              "value": [1.0 / step, step / 10]})
        w.append_table("metrics", step, frame)
        rows.append(frame)
    names = sorted(p.name for p in (tmp_path / "r" / "metrics").iterdir())
    assert names == ["seg-000001.parquet", "seg-000002.parquet", "seg-000003.arrows"]
    run = load_run(tmp_path / "r")  # while being written
    assert_same_table(run.metrics, pd.concat(rows))
    w.close()
    assert sorted(p.suffix for p in (tmp_path / "r" / "metrics").iterdir()) == [".parquet"] * 3
    assert_same_table(load_run(tmp_path / "r").metrics, pd.concat(rows))
    assert load_run(tmp_path / "r").units.empty
    assert list(Run({}, pd.DataFrame(), pd.DataFrame(), pd.DataFrame()).metrics.columns) == [
        "step", "name", "value"]
    with pytest.raises(ValueError, match="table"):
        RunWriter(tmp_path / "s").append_table("../x", 1, frame)


def test_appends_into_an_open_segment_read_back_as_pandas_own_conversion(tmp_path, monkeypatch):
    """Frames appended to an open segment are converted by its schema, column by column;
    what reads back equals what the general conversion (``Table.from_pandas``) writes,
    NaN and None, bools, ints and strings, a frame that does not fit (a float where the
    segment has ints, another column set) included."""
    import numpy as np
    import pyarrow.parquet as pq

    from relu_doctor import rundir

    frames = [
        pd.DataFrame({"step": [1, 1], "site": ["a", "b"], "x": [0.5, np.nan], "ok": [True, False],
                      "n": [3, 4], "s": [None, "u"]}),
        pd.DataFrame({"step": [2, 2], "site": ["a", None], "x": [np.nan, 2.0], "ok": [False, True],
                      "n": [5, 6], "s": ["v", None]}),
        pd.DataFrame({"step": [3], "site": ["a"], "x": [1.0], "ok": [True], "n": [7.5], "s": ["w"]}),
        pd.DataFrame({"step": [4], "site": ["c"], "x": [2.0], "ok": [True], "n": [8], "s": ["z"]}),
        pd.DataFrame({"step": [5], "site": ["c"], "other": [1.0]}),
    ]

    def written(path, general):
        if general:
            monkeypatch.setattr(rundir, "_by_schema", lambda frame, seg: None)
        w = RunWriter(path)
        for f in frames:
            w.append_table("history", int(f["step"].iloc[0]), f)
        w.close()
        monkeypatch.undo()
        return read_table(path, "history"), [pq.read_table(f) for f in
                                             sorted((path / "history").glob("seg-*"))]

    (fast, fast_parts), (general, general_parts) = (
        written(tmp_path / "fast", False), written(tmp_path / "general", True))
    pd.testing.assert_frame_equal(fast, general)
    assert len(fast) == 7
    # the same Arrow values and types on disk (a NaN written as NaN, not null, would read
    # back alike in pandas)
    assert len(fast_parts) == len(general_parts) == 3  # the misfits start segments alike
    for a, b in zip(fast_parts, general_parts, strict=True):
        assert a.equals(b)


def test_bounded_in_memory_buffer_without_a_run_directory():
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, keep_records=3) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(7)], doc=doc)
    assert [r.step for r in doc.records] == [5, 6, 7]
    assert sorted(doc.history()["step"].unique()) == [5, 6, 7]
    run = doc.to_run()
    assert sorted(run.units["step"].unique()) == [5, 6, 7]
    assert run.meta["records_dropped"] == 4
    with pytest.raises(ReluDoctorError, match="keep_records"):
        relu_doctor.watch(model, keep_records=0)


def test_the_last_partial_window_is_logged_on_exit_and_on_an_exception(tmp_path):
    for fail in (False, True):
        model, run_dir = zoo.mlp(), tmp_path / f"run{fail}"
        try:
            with relu_doctor.watch(model, log_every_n_steps=50, run_dir=run_dir) as doc:
                zoo.train(model, [torch.randn(8, 10) for _ in range(120)], doc=doc)
                if fail:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        run = load_run(run_dir)
        assert sorted(run.history["step"].unique()) == [50, 100, 120]
        last = run.history[run.history["step"] == 120]["window_steps"]
        assert last.between(1, 20).all() and last.iloc[0] == doc.records[-1].site_rows[0][
            "window_steps"]
        assert_same_table(doc.history(), run.history)
        assert not (run_dir / ".lock").exists()
    saved = load_run(doc.save(tmp_path / "saved"))
    assert sorted(saved.history["step"].unique()) == [50, 100, 120]


# ---------------------------------------------------------------------- reading at scale


def _unit_frames(steps, sites=("a", "b"), units=4):
    """One unit frame per step, values that tell every row apart."""
    return [pd.DataFrame({"step": s, "site": [n for n in sites for _ in range(units)],
                          "unit": list(range(units)) * len(sites),
                          "activation_rate": [s + i / 100 for i in range(units * len(sites))]})
            for s in steps]


def test_read_units_reads_only_the_steps_and_sites_asked_and_units_is_read_when_asked(
        tmp_path, monkeypatch):
    """Closed Parquet segments and the open stream of a run being written: load_run reads no
    unit row; read_units gives exactly the rows asked (reference: the frames written,
    filtered with pandas), and the same from a run built in memory."""
    from relu_doctor import runread

    w = RunWriter(tmp_path / "r", rotate_rows=20)
    w.write_meta({"sites": [{"name": "a"}, {"name": "b"}]})
    frames = _unit_frames(range(1, 11))
    for f in frames:
        w.append_table("history", int(f["step"].iloc[0]), f[["step", "site"]].drop_duplicates())
        w.append_table("units", int(f["step"].iloc[0]), f)
    kinds = sorted(p.suffix for p in (tmp_path / "r" / "units").iterdir())
    assert ".arrows" in kinds and kinds.count(".parquet") >= 2
    written = pd.concat(frames, ignore_index=True)

    reads = []
    real = runread._read_part
    monkeypatch.setattr(runread, "_read_part", lambda part, cols, where, *rest: (
        reads.append((part.parent.name, where)), real(part, cols, where, *rest))[1])
    run = load_run(tmp_path / "r")
    assert not [r for r in reads if r[0] == "units"], "load_run read unit rows"
    in_memory = Run({}, pd.DataFrame(), units=written)
    for steps, sites, columns in [([3, 7, 10], ["b"], None), ([2], None, ["unit", "step"]),
                                  (None, ["a"], ["activation_rate"]), ([99], None, None)]:
        want = written
        if steps is not None:
            want = want[want["step"].isin(steps)]
        if sites is not None:
            want = want[want["site"].isin(sites)]
        if columns is not None:
            want = want[columns]
        got = run.read_units(steps=steps, sites=sites, columns=columns)
        if want.empty:
            assert got.empty
            continue
        assert_same_table(got, want)
        assert_same_table(in_memory.read_units(steps=steps, sites=sites, columns=columns), want)
    assert all(where is not None for table, where in reads if table == "units")
    assert run.unit_sites() == in_memory.unit_sites() == ["a", "b"]
    assert_same_table(run.units, written)  # the whole table, read on first use
    with pytest.raises(TypeError, match=r"steps: expected int values, got 1.5"):
        run.read_units(steps=[1.5])
    with pytest.raises(TypeError, match="sites: expected a list of str"):
        run.read_units(sites="a")
    w.close()


def test_the_report_reads_the_unit_rows_of_the_steps_it_shows(tmp_path, monkeypatch):
    """80 logs: the heatmaps show 60 of them (plots.MAX_COLS), evenly spread from the first
    to the last, and the report reads the unit rows of those steps only; a smaller row budget
    (wide layers) shows fewer."""
    from relu_doctor.reports import context
    from relu_doctor.reports.html import render_report
    from relu_doctor.reports.plots import MAX_COLS
    from relu_doctor.runread import TableParts

    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(80)], doc=doc)
    asked = []
    real = TableParts.read
    monkeypatch.setattr(TableParts, "read", lambda self, **kw: (
        asked.append(kw) if self.folder.name == "units" else None, real(self, **kw))[1])
    run = load_run(run_dir)
    logged = sorted(int(s) for s in run.history["step"].unique())
    ctx = context.build_context(run)
    html = render_report(run)
    shown = ctx.series.heatmap_steps
    assert len(shown) == MAX_COLS and shown[0] == logged[0] and shown[-1] == logged[-1]
    gaps = [logged.index(b) - logged.index(a) for a, b in itertools.pairwise(shown)]
    assert set(gaps) <= {1, 2}  # evenly spread over the 80
    assert sorted(ctx.series.units["step"].unique()) == shown
    assert asked and all(kw.get("steps") is not None for kw in asked), asked
    assert set().union(*(set(kw["steps"]) for kw in asked)) == set(shown)
    assert f"{MAX_COLS} of the 80 logging steps" in html
    # A wide layer: the row budget holds 5 steps of the 64 units.
    monkeypatch.setattr(context, "HEATMAP_ROWS", 64 * 5)
    shown = context.build_context(run).series.heatmap_steps
    assert shown == [logged[i] for i in (0, 20, 40, 59, 79)]  # np.round of linspace(0, 79, 5)


def test_a_long_stream_is_compacted_whole_and_a_torn_one_up_to_its_last_batch(tmp_path):
    """600 logs (more than one fold of batches): every row in order, in one row group; a
    stream whose writer died mid-batch is compacted by the next writer up to that batch."""
    import pyarrow.parquet as pq

    from relu_doctor.runread import FOLD_BATCHES

    frames = [pd.DataFrame({"step": [s] * 3, "name": ["a", "b", "c"], "value": [s, -s, s / 7]})
              for s in range(1, 601)]
    assert len(frames) > 2 * FOLD_BATCHES
    for torn in (False, True):
        w = RunWriter(tmp_path / f"r{torn}")
        w.write_meta({"sites": []})
        for f in frames:
            w.append_table("metrics", int(f["step"].iloc[0]), f)
        if torn:
            stream = next((tmp_path / "rTrue" / "metrics").glob("seg-*.arrows"))
            w.abandon()
            stream.write_bytes(stream.read_bytes()[:-40])
            w._finalizer()  # the lock of the dead writer
            RunWriter(tmp_path / "rTrue", resume=True).close()  # compacts what it finds
        else:
            w.close()
        (part,) = (tmp_path / f"r{torn}" / "metrics").glob("seg-*.parquet")
        assert pq.ParquetFile(part).num_row_groups == 1
        kept = sorted(p.name for p in (tmp_path / f"r{torn}" / "metrics").iterdir())
        assert kept == [*(["seg-000001.arrows.damaged"] if torn else []), part.name]
        want = pd.concat(frames[:-1] if torn else frames)
        assert_same_table(read_table(tmp_path / f"r{torn}", "metrics"), want)


def test_a_format_3_run_reads_in_todays_vocabulary(tmp_path):
    """Until format 3 a unit's ``dormant`` was ReDo's score <= tau, dead units included. A run
    written today, turned into that form on disk, reads back as written: per unit exactly;
    per site exactly for ReLU (a dead unit scores 0), unknown (NaN) for a leaky site."""
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        torch.nn.LeakyReLU(0.1), torch.nn.Linear(16, 1))
    with torch.no_grad():  # dead and dormant units at both sites
        model[0].bias[:5] = -20.0
        model[0].weight[5:8] *= 0.001
        model[0].bias[5:8] = 0.0
        model[2].bias[:4] = -40.0
    with relu_doctor.watch(model, log_every_n_steps=2, run_dir=tmp_path / "run") as doc:
        for _ in range(6):
            model(torch.randn(32, 4)).sum().backward()
            doc.step()
    today = load_run(tmp_path / "run")
    units, history = today.units, today.history
    relu = history[~history["leaky"].astype(bool)]
    assert (relu["dead"] > 0).all() and (relu["dormant"] > 0).all()  # the test can tell
    # the old form: dormant = below_tau, no below_tau columns, format 3
    for table in ("units", "history"):
        for part in (tmp_path / "run" / table).iterdir():
            t = pq.read_table(part).to_pandas()
            t["dormant"] = t.pop("below_tau")
            if table == "history":
                t["dormant_fraction"] = t.pop("below_tau_fraction")
            pq.write_table(pa.Table.from_pandas(t, preserve_index=False), part)
    meta_path = tmp_path / "run" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 3
    meta_path.write_text(json.dumps(meta))

    old = load_run(tmp_path / "run")
    cols = ["step", "site", "unit", "dead", "dormant", "below_tau"]
    pd.testing.assert_frame_equal(old.units[cols].reset_index(drop=True),
                                  units[cols].reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(old.read_units(steps=[2], columns=["dormant"]),
                                  today.read_units(steps=[2], columns=["dormant"]),
                                  check_dtype=False)
    leaky = old.history["leaky"].astype(bool)
    for col in ("dormant", "dormant_fraction", "below_tau", "below_tau_fraction"):
        assert old.history.loc[~leaky, col].tolist() == pytest.approx(
            history.loc[~leaky, col].tolist())
    assert old.history.loc[leaky, "dormant"].isna().all()
    assert old.history["below_tau"].tolist() == history["below_tau"].tolist()


def test_legacy_dormant_of_sites_whose_leakiness_is_unknown():
    """A format-3 site row without ``leaky`` (or with it missing) gets an unknown dormant
    count, not an error; the rows that say ReLU are translated exactly."""
    from relu_doctor.runread import legacy_dormant

    old = pd.DataFrame({"dormant": [3, 2], "dead": [1, 0], "dormant_fraction": [0.3, 0.2]})
    out = legacy_dormant(old, units=False)
    assert out["below_tau"].tolist() == [3, 2] and out["dormant"].isna().all()
    old["leaky"] = [False, None]
    old["units_seen"] = [10, 10]
    out = legacy_dormant(old, units=False)
    assert out["dormant"].iloc[0] == 2 and pd.isna(out["dormant"].iloc[1])
    assert out["dormant_fraction"].iloc[0] == pytest.approx(0.2)


def test_a_table_appended_as_columns_continues_the_segment_a_dataframe_began(tmp_path):
    """The logs write their small tables (metrics, windows) as columns, without pandas: the
    rows read back as written, in the segment that DataFrames of the same table began (an
    older writer's), with no new segment for a changed schema."""
    w = RunWriter(tmp_path / "r")
    w.write_meta({"model": "Net", "sites": []})
    w.append_table("metrics", 5, pd.DataFrame({"step": [5, 5], "name": ["loss", "lr"],
                                               "value": [0.5, 0.1]}))
    w.append_table("metrics", 10, {"step": [10], "name": ["loss"], "value": [0.25]})
    w.append_table("metrics", 15, {"step": [], "name": [], "value": []})  # nothing to write
    w.append_table("windows", 10, {"step": [10], "steps_run": [5], "steps_collected": [2],
                                   "judged": [False]})
    assert len(list((tmp_path / "r" / "metrics").iterdir())) == 1
    w.close()
    got = read_table(tmp_path / "r", "metrics")
    assert got.values.tolist() == [[5, "loss", 0.5], [5, "lr", 0.1], [10, "loss", 0.25]]
    assert load_run(tmp_path / "r").tables["windows"].values.tolist() == [[10, 5, 2, False]]


def test_history_rows_read_back_as_the_records_held_them(tmp_path, monkeypatch):
    """The history table written from each record's site rows (Arrow reads the dicts where
    they fit the open segment) reads back as those rows, logs after the first included:
    a capped site and uncapped ones (cap None), NaN where a window saw no gradient (an
    evaluation-free forward-only step), ints, bools and strings; a row with another key
    goes the general way and starts a new segment."""
    import relu_doctor.rundir as rundir

    fast = []
    real = rundir._rows_by_schema
    monkeypatch.setattr(rundir, "_rows_by_schema",
                        lambda rows, seg: fast.append(real(rows, seg) is not None) or real(rows, seg))
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU6(), torch.nn.Linear(6, 5),
                              torch.nn.ReLU(), torch.nn.Linear(5, 3), torch.nn.LeakyReLU())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.manual_seed(0)
    with relu_doctor.watch(net, log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "r") as doc:
        for step in range(8):
            out = net(torch.randn(16, 4))
            if step not in (2, 3):  # a window with no backward: its gradient metrics NaN
                opt.zero_grad()
                out.square().mean().backward()
                opt.step()
            doc.step()
        records = list(doc.records)
    want = pd.DataFrame([r for rec in records for r in rec.site_rows])
    assert want["grad_rms"].isna().any() and want["cap"].isna().any() and want["cap"].notna().any()
    got = load_run(tmp_path / "r").history
    pd.testing.assert_frame_equal(got[list(want.columns)].reset_index(drop=True), want,
                                  check_dtype=False)
    assert fast == [False, True, True, True]  # the first log opens the segment

    w = RunWriter(tmp_path / "s")
    w.write_meta({"sites": []})
    w.append_table("history", 1, [{"step": 1, "site": "a", "x": 1.0}])
    w.append_table("history", 2, [{"step": 2, "site": "a", "x": float("nan")}])
    w.append_table("history", 3, [{"step": 3, "site": "a", "x": 2.0, "y": 1}])  # a new key
    w.append_table("history", 4, [{"step": 4, "site": "a", "x": None, "y": 2}])
    w.close()
    got = read_table(tmp_path / "s", "history")
    assert got["step"].tolist() == [1, 2, 3, 4] and got["x"].tolist()[:1] == [1.0]
    assert got["x"].isna().tolist() == [False, True, False, True]
    assert got["y"].tolist()[2:] == [1, 2]
    assert fast[-3:] == [True, False, True]
    assert len(list((tmp_path / "s" / "history").iterdir())) == 2


def test_findings_json_is_rewritten_only_when_its_bytes_change(tmp_path, monkeypatch):
    """findings.json is replaced atomically (a new file each time: a new inode) when its
    contents change, left as it is when they do not (no findings, log after log), and made
    again when it went missing meanwhile. (No time between writes here: see the next test.)"""
    from relu_doctor import rundir
    from relu_doctor.diagnosis import Finding

    monkeypatch.setattr(rundir, "FINDINGS_EVERY_S", 0.0)
    w = RunWriter(tmp_path / "r")
    path = tmp_path / "r" / "findings.json"

    def write(findings):
        w.write_findings(findings)
        return path.stat().st_ino, json.loads(path.read_text())

    first = write([])
    assert first[1] == [] and write([]) == first
    f = Finding("dead", "a", "warning", "1 of 2 units dead.", {"dead": 1}, "Swap.", 4, 2)
    changed = write([f])
    assert changed[0] != first[0] and changed[1] == [f.to_dict()]
    assert write([f]) == changed
    path.unlink()
    assert write([f])[1] == [f.to_dict()]
    w.close()


def test_findings_json_holding_findings_is_rewritten_at_most_every_few_seconds(tmp_path, monkeypatch):
    """A log of hundreds of findings wrote half a megabyte of JSON at every log. While the
    file and the new findings both hold some, the new ones wait until FINDINGS_EVERY_S has
    passed since the last write; they are written at once when either is empty or the file
    went missing, at the next write after the interval, and at close."""
    from relu_doctor import rundir
    from relu_doctor.diagnosis import Finding

    clock = [100.0]
    monkeypatch.setattr(rundir.time, "monotonic", lambda: clock[0])
    w = RunWriter(tmp_path / "r")
    path = tmp_path / "r" / "findings.json"

    def f(step, site="a"):
        return Finding("dead", site, "warning", f"at {step}", {"dead": 1}, "Swap.", step, 1)

    def held():
        return [d["step"] for d in json.loads(path.read_text())]

    w.write_findings([f(1)])
    assert held() == [1]  # the first write: at once
    clock[0] += rundir.FINDINGS_EVERY_S / 2
    w.write_findings([f(2), f(2, "b")])
    assert held() == [1]  # kept back
    w.write_findings([])
    assert held() == []  # none: at once (a reader never sees findings that ended)
    w.write_findings([f(4)])
    assert held() == [4]  # the first after none: at once
    w.write_findings([f(5)])
    assert held() == [4]
    path.unlink()
    w.write_findings([f(6)])
    assert held() == [6]  # went missing: made again at once
    w.write_findings([f(7)])
    clock[0] += rundir.FINDINGS_EVERY_S
    assert held() == [6]
    w.write_findings([f(8)])
    assert held() == [8]  # the interval passed
    w.write_findings([f(9)])
    assert held() == [8]
    w.write_findings([f(9, "c")])  # a second log at a step held back: kept back as well
    assert held() == [8]
    clock[0] += rundir.FINDINGS_EVERY_S
    w.write_findings([f(10)])
    w.write_findings([f(10, "d")])  # a second log at the step the file holds: at once (a
    assert held() == [10] and json.loads(path.read_text())[0]["site"] == "d"  # reader
    w.write_findings([f(11)])  # applies only the events after that step)
    w.write_findings_next()  # (a log failed to write, and its events with it)
    w.write_findings([f(12)])
    assert held() == [12]
    w.write_findings([f(13)])
    assert held() == [12]
    real = os.getpid()
    monkeypatch.setattr(rundir.os, "getpid", lambda: real + 1)  # as in a forked child
    w.flush_findings()
    assert held() == [12]  # its parent's to write
    monkeypatch.setattr(rundir.os, "getpid", lambda: real)
    w.close()
    assert held() == [13]  # close writes what was kept back


_KILLED_SCRIPT = """
import os, sys, torch, relu_doctor
from relu_doctor import rundir
from tests import zoo
rundir.FINDINGS_EVERY_S = 3600.0  # nothing is rewritten after the first write but at exit
torch.manual_seed(0)
model = zoo.mlp()
with torch.no_grad():
    model[2].bias.fill_(-100.0)  # site "3" dead from the start: findings at the first log
doc = relu_doctor.watch(model, log_every_n_steps=1, run_dir=sys.argv[1], overhead_budget=None)
zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
with torch.no_grad():
    model[0].bias.fill_(-100.0)  # site "1" dead from step 4: findings that begin
    model[2].bias.fill_(1.0)  # and site "3" fires on its bias alone: findings that end
zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
sys.stdout.flush()
if sys.argv[2] == "kill":
    os._exit(0)  # no close, no atexit: as a process killed
"""


def test_a_killed_runs_findings_are_brought_up_to_its_last_log_from_the_events(tmp_path):
    """A run killed while findings.json held an earlier log's findings (it is rewritten every
    few seconds): the reader applies the finding events logged after it, so the findings
    are the last log's (as those of the same run left to exit: its atexit hook writes them),
    and the report says which numbers are of which step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from relu_doctor.reports.context import build_context
    from relu_doctor.reports.text import summary

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo, "PYTHONWARNINGS": "ignore"}
    runs = {}
    for mode in ("kill", "exit"):
        r = subprocess.run([sys.executable, "-c", _KILLED_SCRIPT, str(tmp_path / mode), mode],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs[mode] = load_run(tmp_path / mode)
    held = json.loads((tmp_path / "kill" / "findings.json").read_text())
    assert {d["step"] for d in held} == {1} and ("dead", "3") in {(d["kind"], d["site"]) for d in held}
    assert "1" not in {d["site"] for d in held}
    killed, exited = runs["kill"], runs["exit"]
    assert killed.findings_step == 1 and exited.findings_step is None

    def opened(run):
        return sorted((f.kind, f.site, f.severity) for f in run.findings())

    assert "1" in {f.site for f in exited.findings()}
    assert ("dead", "3") not in {(f.kind, f.site) for f in exited.findings()}  # (ended)
    assert {f.step for f in exited.findings()} == {6}
    assert opened(killed) == opened(exited)
    began = {f.step for f in killed.findings() if f.site == "1"}
    assert began == {4}  # the events' evidence: of the log each began at
    text = summary(build_context(killed))
    assert "Findings: findings.json was last written at step 1" in text
    assert "(evidence from step 4)" in text  # (the last log was step 6)
    assert "Findings:" not in summary(build_context(exited))


def test_a_log_that_failed_to_write_has_the_next_findings_written_at_once(tmp_path, monkeypatch):
    """A log whose write failed took its finding events with it: a findings.json older than
    it could not be brought up past them, so the next log that writes writes its findings
    at once (a review's full disk for a moment, then a kill)."""
    from relu_doctor import rundir

    monkeypatch.setattr(rundir, "FINDINGS_EVERY_S", 3600.0)
    real = RunWriter.append_table
    failing = {3}

    def append(self, table, step, rows):
        if step in failing and table == "units":
            raise OSError(28, "No space left on device")
        return real(self, table, step, rows)

    monkeypatch.setattr(RunWriter, "append_table", append)
    model = zoo.mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    path = tmp_path / "r" / "findings.json"
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, log_every_n_steps=1, run_dir=tmp_path / "r",
                               overhead_budget=None) as doc:
            for _ in range(5):
                zoo.train(model, [torch.randn(8, 10)], doc=doc)
                steps.append({d["step"] for d in json.loads(path.read_text())})
    assert steps == [{1}, {1}, {1}, {4}, {4}]  # step 3 failed: step 4's written at once


def test_a_copy_saved_or_read_during_training_has_the_last_logs_findings(tmp_path, monkeypatch):
    """doc.save() and doc.to_run() while findings.json is kept back: the copy had the
    numbers of the steps the findings began at, and said nothing (a review)."""
    from relu_doctor import rundir

    monkeypatch.setattr(rundir, "FINDINGS_EVERY_S", 3600.0)
    model = zoo.mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=tmp_path / "r",
                           overhead_budget=None) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(4)], doc=doc)
        want = sorted((f.kind, f.site, f.severity, f.step) for f in doc.records[-1].findings)
        doc.save(tmp_path / "copy")
        run = doc.to_run()
    assert {w[3] for w in want} == {4}
    for got in (load_run(tmp_path / "copy"), run):
        assert got.findings_step is None
        assert sorted((f.kind, f.site, f.severity, f.step) for f in got.findings()) == want


def test_a_run_continued_after_an_event_line_cut_short_keeps_its_own_first_event(tmp_path):
    """events.jsonl whose last line was cut short (a kill mid-write, a full disk): the
    continued run's first event was glued onto that fragment, and readers skipped both. The
    fragment is ended first: one line skipped, every new event read."""
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
    path = run_dir / "events.jsonl"
    whole = path.read_text().splitlines()
    assert len(whole) >= 2
    path.write_text("\n".join(whole) + "\n" + whole[-1][: len(whole[-1]) // 2])  # cut short
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc:
        with torch.no_grad():  # every unit of site "1" dead from now: a new finding event
            model[0].bias.fill_(-100.0)
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
    lines = path.read_text().splitlines()
    assert lines[len(whole)] == whole[-1][: len(whole[-1]) // 2]  # the fragment, on its own
    written = [json.loads(line) for line in lines[len(whole) + 1:]]
    assert written and all(e["step"] > 2 for e in written)
    with pytest.warns(ReluDoctorWarning, match=r"events.jsonl"):
        run = load_run(run_dir)
        events = run.events
    assert [e for e in events if e["step"] > 2] == written


def test_a_log_cut_short_in_a_stream_stays_said_after_the_run_is_continued(tmp_path):
    """A writer killed mid-write leaves a stream whose last batch is cut short; the reader
    said so, but continuing the run (resume=True) compacted the stream quietly and the report
    then read as whole, the lost log's history rows gone without a word (crash trial). The
    continued run says it once, at the user's line, and lists that step as written in part."""
    from relu_doctor.reports.gaps import read_gaps

    run_dir = tmp_path / "run"
    model = zoo.mlp()
    doc = relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir)
    doc.__enter__()
    zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
    (stream,) = (run_dir / "history").glob("seg-*.arrows")  # open: as a killed writer left it
    data = stream.read_bytes()
    doc.__exit__(None, None, None)
    stream.write_bytes(data[:-40])  # its last log's batch cut short
    for part in (run_dir / "history").glob("seg-*.parquet"):
        part.unlink()
    kept = sorted(set(load_run(run_dir).history["step"]))
    assert kept == [1, 2]
    with pytest.warns(ReluDoctorWarning, match=r"was cut short .* rows of step 3 are lost") as said, \
            relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
    ours = [w for w in said if "cut short" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__
    run = load_run(run_dir)
    assert sorted(set(run.history["step"])) == [1, 2, 4, 5]
    gaps = read_gaps(run)
    assert gaps.unwritten == [(3, 3)] and gaps.partly == [3]


def test_a_stream_damaged_mid_file_is_kept_and_its_lost_logs_said_when_continued(tmp_path):
    """A stream of a run never closed, damaged in its middle (a bad copy, a failing disk):
    continuing the run compacted it to the logs before the damage, deleted it, and said
    only its last log lost (15 of 30 were: an operations trial). Every log the other tables
    hold past the last kept is said lost and listed as written in part, and the stream is
    kept as it was beside its Parquet file."""
    from relu_doctor.reports.gaps import read_gaps
    from relu_doctor.rundir import damaged_copy

    run_dir = tmp_path / "run"
    model = zoo.mlp()
    doc = relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir)
    doc.__enter__()
    zoo.train(model, [torch.randn(8, 10) for _ in range(6)], doc=doc)
    (stream,) = (run_dir / "history").glob("seg-*.arrows")  # open: as a killed writer left it
    data = bytearray(stream.read_bytes())
    doc.__exit__(None, None, None)
    for part in (run_dir / "history").glob("seg-*.parquet"):
        part.unlink()
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # garbled mid-file
    stream.write_bytes(bytes(data))
    kept = sorted(set(load_run(run_dir).history["step"]))
    assert kept and kept[-1] < 5
    lost = list(range(kept[-1] + 1, 7))
    with pytest.warns(ReluDoctorWarning, match=rf"complete logs up to step {kept[-1]} are kept; "
                      rf"its rows of {len(lost)} logs, steps {lost[0]} to 6, are lost") as said, \
            relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
    assert len([w for w in said if "cut short" in str(w.message)]) == 1
    assert damaged_copy(stream).read_bytes() == bytes(data)  # kept as it was
    run = load_run(run_dir)
    assert sorted(set(run.history["step"])) == [*kept, 7, 8]
    gaps = read_gaps(run)
    assert gaps.unwritten == [(lost[0], 6)] and gaps.partly == lost


def test_a_run_continued_without_the_doctors_state_says_its_lifetime_counts_began_again(tmp_path):
    """resume=True with no checkpoint loaded continues after the last log, its lifetime
    counts starting again: the report read as one run ("never active 10" where the whole
    run had 0, a crash trial). The run says from which step; a checkpoint of that process,
    loaded later, carries it; one of the first process's clears it."""
    from relu_doctor.reports.context import build_context

    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        first = doc.state_dict()
    assert "lifetime_since" not in load_run(run_dir).meta
    # said once, at the first log (an operations trial's loop, back at an earlier
    # checkpoint, was logged 20 steps ahead with no word)
    with pytest.warns(ReluDoctorWarning, match=r"after its last log \(step 2\) with no Doctor "
                      r"state loaded: its steps go on from 3") as said, \
            relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        second = doc.state_dict()
    assert sum("no Doctor state loaded" in str(w.message) for w in said) == 1
    run = load_run(run_dir)
    assert run.meta["lifetime_since"] == 3
    never = dict(build_context(run).key_numbers)["never active"]
    assert never.endswith(" since step 3 (the run was continued there without the Doctor's "
                          "state: its counts began again)")
    for state, since in ((second, 3), (first, None)):
        with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc:
            doc.load_state_dict(state)
            zoo.train(model, [torch.randn(8, 10) for _ in range(1)], doc=doc)
        assert load_run(run_dir).meta.get("lifetime_since") == since


def test_a_table_written_at_some_logs_only_loses_its_latest_log_when_cut_short(tmp_path):
    """The metrics table gets rows only at logs that had metrics: cut short in its step-4
    batch, the continued run said steps 2-4 lost (review). A writer dies writing its latest
    log: that one alone is lost."""
    from relu_doctor.reports.gaps import read_gaps

    run_dir = tmp_path / "run"
    model = zoo.mlp()
    doc = relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir)
    doc.__enter__()
    for step in range(1, 5):
        model(torch.randn(8, 10)).sum().backward()
        if step in (1, 4):
            doc.log_metrics({"acc": 0.5})
        doc.step()
    (stream,) = (run_dir / "metrics").glob("seg-*.arrows")
    data = stream.read_bytes()
    doc.__exit__(None, None, None)
    stream.write_bytes(data[:-40])
    for part in (run_dir / "metrics").glob("seg-*.parquet"):
        part.unlink()
    with pytest.warns(ReluDoctorWarning, match=r"rows of step 4 are lost"), \
            relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, resume=True) as doc:
        zoo.train(model, [torch.randn(8, 10)], doc=doc)
    run = load_run(run_dir)
    assert sorted(set(run.tables["metrics"]["step"])) == [1]
    assert read_gaps(run).unwritten == [(4, 4)] and read_gaps(run).partly == [4]


def test_a_ctrl_c_inside_a_logs_write_lists_that_log_as_written_in_part(tmp_path, monkeypatch):
    """A Ctrl-C that landed in the logging step's own write (1 of 28 in a crash trial) lost
    that log without a word: the report said only "Ended early". It is now listed as never
    written, in part (its history rows reached the disk), and Ctrl-C goes on up unchanged."""
    from relu_doctor.reports.gaps import read_gaps
    from relu_doctor.rundir import RunWriter

    real = RunWriter.append_table

    def interrupted(self, table, step, frame):
        if table == "units" and step == 3:
            raise KeyboardInterrupt
        return real(self, table, step, frame)

    monkeypatch.setattr(RunWriter, "append_table", interrupted)
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with pytest.raises(KeyboardInterrupt), \
            relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(5)], doc=doc)
    assert doc.global_step == 3
    monkeypatch.undo()
    run = load_run(run_dir)
    gaps = read_gaps(run)
    assert gaps.unwritten == [(3, 3)] and gaps.partly == [3]
    assert sorted(set(run.history["step"])) == [1, 2, 3]
    assert gaps.ended_by.startswith("KeyboardInterrupt")
