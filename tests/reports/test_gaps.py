"""The report says what did not reach disk: steps whose records were never written (a write
failed, the writer paused and retried) and files the reader skipped, in the HTML report and
in the text summary; a run with neither shows no such section."""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import relu_doctor
from relu_doctor import rundir
from relu_doctor.cli import main
from relu_doctor.errors import ReluDoctorWarning, RunDirError
from relu_doctor.history import Run, load_run
from relu_doctor.reports.context import build_context
from relu_doctor.reports.html import render_report
from relu_doctor.reports.text import summary
from tests import zoo


def _train(run_dir: Path, steps: int, *, full: tuple[int, ...] = (),
           monkeypatch: pytest.MonkeyPatch | None = None, sites: int = 2) -> None:
    """Train ``steps`` steps logging each; the segment writes of the steps in ``full`` fail
    with ENOSPC (a full disk). ``sites``: 2 (the zoo's MLP), or that many Linear+ReLU."""
    real_write = rundir._Segment.write
    model = zoo.mlp() if sites == 2 else torch.nn.Sequential(
        *[m for i in range(sites) for m in (torch.nn.Linear(10, 10), torch.nn.ReLU())])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, optimizer=opt) as doc:
            for step in range(1, steps + 1):
                if monkeypatch is not None:
                    if step in full:
                        def no_space(self: object, table: object) -> None:
                            raise OSError(errno.ENOSPC, "No space left on device")
                        monkeypatch.setattr(rundir._Segment, "write", no_space)
                    else:
                        monkeypatch.setattr(rundir._Segment, "write", real_write)
                zoo.train(model, [torch.randn(8, 10)], doc=doc, optimizer=opt)


def _gap_section(html: str) -> str:
    m = re.search(r'<section id="rd-gaps".*?</section>', html, re.S)
    assert m is not None, "no 'what this report does not cover' section"
    return m.group(0)


def test_a_healthy_run_has_no_gap_section(tmp_path: Path) -> None:
    _train(tmp_path / "run", 3)
    run = load_run(tmp_path / "run")
    ctx = build_context(run)
    assert not ctx.gaps and ctx.data["unwritten"] == [] and ctx.data["skipped"] == 0
    html = render_report(run)
    assert 'id="rd-gaps"' not in html and "Never written" not in summary(ctx)


def test_a_run_still_being_written_says_so(tmp_path: Path) -> None:
    """Read while its writer holds it (this process, inside the block): "still writing",
    in the summary and the HTML; once the block closed it, nothing."""
    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=tmp_path / "run") as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        run = load_run(tmp_path / "run")
        assert run.writer_open == "this process is still writing it"
        assert "Not closed: this process is still writing it" in summary(run)
        section = _gap_section(render_report(run))
        assert "this process is still writing it" in section
        # (its streams are unchecked: a report trial's flipped bytes read as numbers)
        assert "Arrow streams the writer appends to, which carry no checksum" in section
        assert list((tmp_path / "run" / "history").glob("seg-*.arrows"))
    assert load_run(tmp_path / "run").writer_open == ""
    assert not list((tmp_path / "run" / "history").glob("seg-*.arrows"))  # (compacted)
    assert "no checksum" not in render_report(load_run(tmp_path / "run"))


def test_steps_never_written_are_named_in_the_html_and_the_summary(tmp_path, monkeypatch, capsys):
    """A full disk at steps 3-5, then writing resumes: the report names 3–5 and the cause."""
    run_dir = tmp_path / "run"
    _train(run_dir, 8, full=(3, 4, 5), monkeypatch=monkeypatch)
    monkeypatch.undo()
    run = load_run(run_dir)
    assert sorted(run.history["step"].unique()) == [1, 2, 6, 7, 8]  # what reached disk
    ctx = build_context(run)
    assert ctx.gaps.unwritten == [(3, 5)] and ctx.data["unwritten"] == [[3, 5]]
    assert "No space left on device" in ctx.gaps.write_error
    section = _gap_section(render_report(run))
    assert "steps 3–5" in section and "No space left on device" in section
    assert "Skipped while reading" not in section
    text = summary(ctx)
    assert re.search(r"Never written \(OSError: .*No space left on device\): the logs of steps "
                     r"3–5 are not in the run directory", text)
    # what the sampling line counts is what reached disk, and it says so
    assert re.search(r"steps collected 5 of 5 run \(100\.0%\) in the logs written", text), text
    # The command line prints the same summary.
    assert main(["report", str(run_dir)]) == 0
    assert "the logs of steps 3–5 are not in the run directory" in capsys.readouterr().out


def test_a_log_that_failed_half_way_is_said_written_in_part(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk after a log's tables reached the directory (at its findings): the
    report said 'Never written' of a step whose rows it showed."""
    run_dir = tmp_path / "run"
    real = rundir.RunWriter.write_findings
    calls = [0]

    def findings(self: rundir.RunWriter, fs: object) -> None:
        calls[0] += 1
        if calls[0] == 3:  # the third log's
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, fs)  # type: ignore[arg-type]

    monkeypatch.setattr(rundir.RunWriter, "write_findings", findings)
    _train(run_dir, 5)
    monkeypatch.undo()
    run = load_run(run_dir)
    assert 3 in set(run.history["step"]) and run.unwritten == [[3, 3]]
    ctx = build_context(run)
    assert ctx.gaps.partly == [3]
    assert "the log of step 3 is not in the run directory (written in part: step 3)" in summary(ctx)
    assert "(written in part: step 3)" in _gap_section(render_report(run))
    healthy = tmp_path / "healthy"
    _train(healthy, 2)
    assert build_context(load_run(healthy)).gaps.partly == []


def test_a_damaged_part_is_named_in_the_html_and_the_summary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(run_dir, 3)
    part = sorted((run_dir / "units").glob("seg-*.parquet"))[0]
    part.write_bytes(os.urandom(4096))
    with pytest.warns(relu_doctor.ReluDoctorWarning, match=part.name):
        run = load_run(run_dir)
    ctx = build_context(run)
    assert len(ctx.gaps.skipped) == 1 and part.name in ctx.gaps.skipped[0]
    assert not ctx.gaps.unwritten
    section = _gap_section(render_report(run))
    assert "1 damaged file or line" in section and part.name in section
    assert "Never written" not in section
    text = summary(ctx)
    assert "Skipped while reading: 1 damaged file or line:" in text and part.name in text
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert part.name in out.out and part.name in out.err  # summary, and the warning line


def test_a_stream_cut_short_found_when_the_units_are_read_is_in_the_section(tmp_path):
    """The unit rows are read after load_run (only the steps drawn): a torn stream found then
    is still listed, once, however often the units are read."""
    w = rundir.RunWriter(tmp_path / "r")
    w.write_meta({"sites": [{"name": "a", "order": 0}]})
    for step in (1, 2, 3):
        w.append_table("history", step, pd.DataFrame({"step": [step], "site": ["a"],
                                                      "dead_fraction": [0.0], "units": [4]}))
        w.append_table("units", step, pd.DataFrame({"step": step, "site": "a", "unit": range(4),
                                                    "activation_rate": 0.5}))
        w.write_findings([])  # as each log does
    stream = next((tmp_path / "r" / "units").glob("seg-*.arrows"))
    w.abandon()  # the writer died: its streams stay as they are
    stream.write_bytes(stream.read_bytes()[:-40])  # the last batch cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load_run(tmp_path / "r")
        assert not run.problems  # the unit rows are not read yet
        ctx = build_context(run)
        assert len(run.units) == 8 and sorted(run.units["step"].unique()) == [1, 2]
    assert len(ctx.gaps.skipped) == 1 and "was cut short" in ctx.gaps.skipped[0]
    assert len(run.problems) == 1 and sum("cut short" in str(c.message) for c in caught) == 1
    assert stream.name in _gap_section(render_report(run))


def _lose_history(run_dir: Path, how: str) -> str:
    """Damage the run's per-site history as a copy or a crash can: ``truncated`` cuts its
    one Parquet part in half, ``deleted`` removes the ``history`` folder. Returns the name
    the report must give (the part's file name, or the folder's path)."""
    folder = run_dir / "history"
    if how == "deleted":
        shutil.rmtree(folder)
        return str(folder)
    (part,) = folder.glob("seg-*.parquet")
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    return part.name


@pytest.mark.parametrize("sites", [2, 13])
@pytest.mark.parametrize(("how", "says"), [("truncated", "cannot be read"),
                                           ("deleted", "is missing")])
def test_a_damaged_or_missing_history_is_said_never_no_activation_seen(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, says: str,
        sites: int) -> None:
    """Activations were seen (the windows say so) but the per-site history is cut short or
    gone: the verdict, the summary, the HTML and the command line say the history is
    damaged or missing, naming the file or folder, never "No activation seen" (which blames
    eval mode); like any other damaged part, the report is written and the exit status is 0.
    Reading through the Python API says the same. With more sites than the report draws
    heatmaps of (12), choosing them read the lost history: the report failed (KeyError)."""
    run_dir = tmp_path / "run"
    _train(run_dir, 3, sites=sites)
    named = _lose_history(run_dir, how)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert "No activation seen" not in out.out and "eval mode" not in out.out, out.out
    assert "History unreadable" in out.out and says in out.out
    assert named in out.out and named in out.err and "Traceback" not in out.err
    assert (run_dir / "report.html").is_file()
    with pytest.warns(relu_doctor.ReluDoctorWarning, match=re.escape(named)):
        text = summary(str(run_dir))  # the Python API, from a path
    assert text == out.out.splitlines()[0] + "\n" + "\n".join(out.out.splitlines()[1:-1])
    with pytest.warns(relu_doctor.ReluDoctorWarning, match=re.escape(named)):
        run = load_run(run_dir)
    html = render_report(run)
    assert "No activation seen" not in html and "eval mode" not in html
    assert "History unreadable" in html and named in _gap_section(html)
    ctx = build_context(run)
    assert ctx.verdict.status == "damaged" and ctx.verdict.headline == "History unreadable"
    assert named in ctx.verdict.detail and says in ctx.verdict.detail
    assert len(ctx.gaps.skipped) == 1 and named in ctx.gaps.skipped[0]
    assert dict(ctx.key_numbers)["dead now"] == "—"  # not "0": it is not known
    assert "no site seen" not in dict(ctx.key_numbers)["steps logged"]
    assert run.history.empty and named in run.history_lost and says in run.history_lost

def test_a_run_that_never_saw_an_activation_has_no_history_and_nothing_lost(tmp_path):
    """The model left in eval mode: no site, so no history folder is written; that is no
    damage, and the report still says no activation was seen."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(net, log_every_n_steps=2, run_dir=tmp_path / "run") as doc:
            for _ in range(4):
                net(torch.randn(8, 4)).sum().backward()
                doc.step()
    assert not (tmp_path / "run" / "history").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = load_run(tmp_path / "run")
    assert run.history_lost == "" and not run.problems
    assert build_context(run).verdict.headline == "No activation seen"


def test_a_lock_with_this_processs_pid_that_it_does_not_hold_is_a_dead_writers(tmp_path: Path) -> None:
    """A killed writer's pid reused by the reader (a restarted container's pid 1): the lock
    is not the reader's, so the run was not closed, not 'still being written'."""
    import json as jsonlib
    import socket

    _train(tmp_path / "run", 2)
    (tmp_path / "run" / ".lock").write_text(jsonlib.dumps(
        {"run_id": "x", "pid": os.getpid(), "host": socket.gethostname()}))
    assert load_run(tmp_path / "run").writer_open.startswith(
        f"its writer, process {os.getpid()}, ended without closing it")


def test_a_dead_writers_lock_in_a_directory_made_read_only_blames_no_crash_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run directory made read-only mid-run: its writer trained on, failing to write its
    logs, its status.json and its closing (the lock stays). The report blamed a crash."""
    import json as jsonlib
    import socket

    run_dir = tmp_path / "run"
    _train(run_dir, 2)
    (run_dir / ".lock").write_text(jsonlib.dumps(
        {"run_id": "x", "pid": os.getpid(), "host": socket.gethostname()}))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == run_dir and
                        mode == os.W_OK else real_access(p, mode, **kw))
    said = load_run(run_dir).writer_open
    assert "the run directory is not writable now" in said and "lost write access" in said


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="start times from Linux /proc")
def test_a_writers_pid_now_held_by_another_live_process_is_a_dead_writers(tmp_path: Path) -> None:
    """The lock records its writer's start time: a live process that was given the dead
    writer's pid is told apart (the report says 'ended', a new writer takes the lock over),
    and the writer itself, still running, reads 'still writing'."""
    import json as jsonlib
    import socket
    import subprocess
    import sys

    from relu_doctor.runread import process_token

    _train(tmp_path / "run", 2)
    lock = tmp_path / "run" / ".lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        token = process_token(other.pid)
        assert token is not None and token != process_token(os.getpid())

        def held_by(started: str | None) -> None:
            lock.write_text(jsonlib.dumps({"run_id": "x", "pid": other.pid,
                                           "host": socket.gethostname(), "started": started}))

        held_by(token)  # that very process: still writing, and the directory is refused
        assert load_run(tmp_path / "run").writer_open == f"process {other.pid} is still writing it"
        with pytest.raises(relu_doctor.RunDirError, match="being written by another writer"):
            relu_doctor.watch(zoo.mlp(), run_dir=tmp_path / "run", resume=True)
        held_by(token.rsplit(":", 1)[0] + ":1")  # an earlier process that had its pid
        assert load_run(tmp_path / "run").writer_open.startswith(
            f"its writer, process {other.pid}, ended without closing it")
        with pytest.warns(relu_doctor.ReluDoctorWarning, match="taking over the lock"):
            relu_doctor.watch(zoo.mlp(), run_dir=tmp_path / "run", resume=True).detach()
    finally:
        other.kill()
        other.wait()


def test_findings_later_than_the_readable_history_say_which_step_each_part_is(tmp_path: Path) -> None:
    """A killed run whose history stream lost its last log: the findings (findings.json) are
    of that log, the sites table of the one before; the report says so, not one step."""
    from relu_doctor.diagnosis import Finding

    w = rundir.RunWriter(tmp_path / "r")
    w.write_meta({"sites": [{"name": "a", "order": 0}]})
    for step in (10, 20, 30):
        w.append_table("history", step, pd.DataFrame({"step": [step], "site": ["a"],
                                                      "dead_fraction": [0.1], "units": [4]}))
    w.write_findings([Finding("dead", "a", "warning", "1 of 4 units dead", {}, "Fix it", step=30)])
    stream = next((tmp_path / "r" / "history").glob("seg-*.arrows"))
    w.abandon()
    stream.write_bytes(stream.read_bytes()[:-40])  # the last log's batch cut short
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = build_context(load_run(tmp_path / "r"))
    assert sorted(ctx.series.history["step"].unique()) == [10, 20]
    assert ctx.findings_stale == ("Findings are from step 30, the last the run logged; the sites "
                                  "table and key numbers are from step 20, the last its history "
                                  "holds readable.")


@pytest.mark.parametrize("ranges, said", [
    ([[4, 4]], "the log of step 4 is not in the run directory"),
    ([[2, 4]], "the logs of steps 2–4 are not in the run directory"),
    ([[2, 2], [6, 6]], "the logs of steps 2, 6 are not in the run directory"),
])
def test_the_logs_never_written_are_named_in_good_english(ranges, said):
    run = Run(meta={"unwritten": ranges, "write_error": "OSError: disk full"},
              history=pd.DataFrame())
    assert f"Never written (OSError: disk full): {said}" in summary(build_context(run))


@pytest.mark.parametrize("emptied", [False, True], ids=["folder_gone", "parts_gone"])
@pytest.mark.parametrize("table", ["units", "metrics", "windows", "layers"])
def test_a_table_folder_the_run_wrote_and_that_is_gone_is_said_lost(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, emptied: bool) -> None:
    """``meta.json`` lists the tables the run wrote; one whose folder is gone, or holds
    none of its parts, was silent, and the report then blamed the loop ("No loss or learning
    rate was recorded: pass doc.step(loss=loss)") for a table that was written and lost."""
    run_dir = tmp_path / "run"
    _train(run_dir, 3)
    meta = rundir.read_meta(run_dir)
    assert {"history", "units", "metrics", "windows", "layers"} <= set(meta["tables"])
    shutil.rmtree(run_dir / table)
    if emptied:
        (run_dir / table).mkdir()
    assert main(["report", str(run_dir)]) == 0
    err = capsys.readouterr().err
    what = "holds none of its parts" if emptied else "is missing"
    said = f"{str(run_dir / table)!r} {what}, although the run wrote that table"
    assert said in err and "Traceback" not in err
    with pytest.warns(relu_doctor.ReluDoctorWarning, match=re.escape(said)):
        run = load_run(run_dir)
    ctx = build_context(run)
    assert ctx.gaps.lost_tables == [table] and any(said in s for s in ctx.gaps.skipped)
    html = render_report(run)
    assert said.replace("'", "&#39;") in _gap_section(html)  # (as Jinja escapes it)
    # The loop passed its loss and logged units: never said to be unlogged.
    assert "No loss or learning rate was recorded" not in html
    assert "No per-unit statistics were logged" not in html
    if table in ("metrics", "units"):
        assert f"(<code>{table}/</code>) is lost or damaged in the run directory" in html


@pytest.mark.parametrize("what", ["events.jsonl", "units", "history"])
def test_a_part_of_the_run_it_may_not_read_is_skipped_and_the_report_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        what: str) -> None:
    """Permission denied on ``events.jsonl`` or on a table folder (chmod 000, another
    user's copy) stopped the report ("PermissionError", exit 2): it is one skipped file,
    as a damaged one is, and the report is written."""
    run_dir = tmp_path / "run"
    _train(run_dir, 3)
    denied = run_dir / what
    real_open, real_iterdir = open, Path.iterdir

    def guarded_open(file, *args, **kwargs):
        if Path(file) == denied:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def guarded_iterdir(self):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr("relu_doctor.runread.open", guarded_open, raising=False)
    monkeypatch.setattr(Path, "iterdir", guarded_iterdir)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert "Permission denied" in out.err and str(denied) in out.err, out.err
    assert "Traceback" not in out.err and (run_dir / "report.html").is_file()
    headline = "History unreadable" if what == "history" else ""
    assert headline in out.out


@pytest.mark.parametrize(("name", "said"), [
    ("events.jsonl", "events.jsonl': it is not a file"),
    ("findings.json", "findings.json' is not a file, though the run logged"),
    ("meta.json", "holds a meta.json that is not a file"),
])
def test_a_file_of_the_run_that_is_a_folder_is_said_so_not_said_missing(
        tmp_path: Path, name: str, said: str) -> None:
    run_dir = tmp_path / "run"
    _train(run_dir, 3)
    (run_dir / name).unlink()
    (run_dir / name).mkdir()
    if name == "meta.json":
        with pytest.raises(RunDirError, match=said):
            load_run(run_dir)
        return
    with pytest.warns(ReluDoctorWarning, match=said):
        load_run(run_dir)


def _garble(part: Path, column: str) -> None:
    """Change bytes inside ``column``'s values in a Parquet part, leaving it readable."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(part).metadata
    chunk = meta.row_group(0).column(meta.schema.names.index(column))
    end = chunk.data_page_offset + chunk.total_compressed_size
    data = bytearray(part.read_bytes())
    data[end - 6:end - 2] = b"\x7f\x7f\x7f\x7f"
    part.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "table", "blame"), [
    ("garble", "units", "No per-unit statistics were logged"),
    ("garble", "metrics", "No loss or learning rate was recorded"),
    ("remove", "history", "No gradient statistics were recorded"),
])
def test_a_damaged_table_is_said_lost_where_its_section_would_be(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, table: str,
        blame: str) -> None:
    """A units part found damaged when the report read it stopped the report (KeyError,
    exit 2; more than 12 sites); a damaged metrics part, or a lost history, made the
    sections drawn from them blame the loop ("No loss ... was recorded: pass
    doc.step(loss=loss)", "gradients=False, or no backward pass ran") for data that was
    written. Each section says its table is lost or damaged instead; exit 0."""
    run_dir = tmp_path / "run"
    _train(run_dir, 3, sites=13)
    if damage == "remove":
        shutil.rmtree(run_dir / table)
    else:
        column = {"units": "activation_rate", "metrics": "value"}[table]
        _garble(sorted((run_dir / table).glob("seg-*.parquet"))[0], column)
    assert main(["report", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(run_dir / table) in err, err
    html = (run_dir / "report.html").read_text()
    assert blame not in html
    assert f"(<code>{table}/</code>) is lost or damaged in the run directory" in html


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_lost_events_and_a_missing_status_file_are_said(tmp_path: Path, how: str) -> None:
    """``events.jsonl`` deleted or emptied read as a run with no events, and a deleted
    ``status.json`` hid the logs that failed to write: each is said, naming the file."""
    run_dir = tmp_path / "run"
    _train(run_dir, 3, sites=13)  # (a deep net of 10 units: findings from the first log)
    assert load_run(run_dir).last_findings, "the run must have open findings"
    events = run_dir / "events.jsonl"
    if how == "deleted":
        events.unlink()
    else:
        events.write_bytes(b"")
    (run_dir / "status.json").unlink()
    with pytest.warns(ReluDoctorWarning) as rec:
        run = load_run(run_dir)
    said = [str(w.message) for w in rec]
    what = "is missing" if how == "deleted" else "holds no finding"
    assert any(f"{str(events)!r} {what}, although findings.json holds" in m for m in said)
    assert any("status.json' is missing" in m for m in said)
    assert len(run.problems) == 2


def test_a_healthy_run_read_while_each_log_is_written_never_looks_lost(tmp_path: Path) -> None:
    """A log appends its events before it replaces findings.json: a reader between the two
    never sees a finding without the event it began with."""
    run_dir = tmp_path / "run"
    order: list[str] = []
    real_events, real_findings = rundir.RunWriter.append_events, rundir.RunWriter.write_findings

    def events(self: rundir.RunWriter, evs: object) -> None:
        order.append("events")
        real_events(self, evs)  # type: ignore[arg-type]

    def findings(self: rundir.RunWriter, fs: object) -> None:
        order.append("findings")
        real_findings(self, fs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir.RunWriter, "append_events", events)
        mp.setattr(rundir.RunWriter, "write_findings", findings)
        _train(run_dir, 2, sites=13)
    first = order.index("findings")
    assert "events" in order[:first]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), ValueError("loss went\nnegative")],
                         ids=["ctrl_c", "exception"])
def test_a_run_stopped_by_an_exception_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], error: BaseException) -> None:
    """A watch block left by an exception closed the run directory as a finished run: the
    report read like a run meant to stop there. meta.json, the HTML report and the summary
    now say what stopped it; a run that ran its course says nothing of the kind."""
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with pytest.raises(type(error)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, log_every_n_steps=2, run_dir=run_dir) as doc:
            for step in range(5):
                zoo.train(model, [torch.randn(8, 10)], doc=doc)
                if step == 2:
                    raise error
    said = type(error).__name__ + (": loss went negative" if str(error) else "")
    run = load_run(run_dir)
    assert run.meta["ended_by"] == said and run.writer_open == ""
    assert sorted(run.history["step"].unique()) == [2, 3]  # the open window logged too
    html = render_report(run)
    assert f"training stopped on <code>{said}</code>" in _gap_section(html)
    assert main(["report", str(run_dir)]) == 0
    assert f"Ended early: training stopped on {said}" in capsys.readouterr().out
    healthy = tmp_path / "healthy"
    _train(healthy, 2)
    assert "ended_by" not in load_run(healthy).meta
    assert "Ended early" not in render_report(load_run(healthy))


def test_a_resumed_run_in_a_new_or_truncated_directory_is_not_said_to_have_lost_anything(
        tmp_path: Path) -> None:
    """Findings carried over from a checkpoint into a new run directory began before it (no
    event there), and a resume from a checkpoint older than the run's first log leaves its
    tables empty: neither is data lost, and a reader, while the run is written or after,
    says nothing of the kind (Lightning's resume into a new version directory)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:8] = -100.0  # dead from the start: open findings at every log

    def train(doc: relu_doctor.Doctor, n: int) -> None:
        for _ in range(n):
            model(torch.randn(8, 4)).sum().backward()
            doc.step(loss=1.0)

    first = tmp_path / "first"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, log_every_n_steps=2, run_dir=first,
                               overhead_budget=None) as doc:
            train(doc, 1)
            early = doc.state_dict()
            train(doc, 3)
            late = doc.state_dict()
        assert load_run(first).last_findings
        # into a new directory: its findings began in the first one
        with relu_doctor.watch(model, log_every_n_steps=2, run_dir=tmp_path / "second",
                               overhead_budget=None) as doc:
            doc.load_state_dict(late)
            train(doc, 2)
        # the first directory, from a checkpoint older than its first log
        doc = relu_doctor.watch(model, log_every_n_steps=2, run_dir=first, resume=True,
                                overhead_budget=None)
        doc.load_state_dict(early)
        with doc:
            meanwhile = load_run(first)
            train(doc, 3)
    second = load_run(tmp_path / "second")
    assert second.last_findings and not second.problems
    assert not meanwhile.problems and "lost_tables" not in meanwhile.meta
    assert not load_run(first).problems


def test_a_block_entered_again_after_an_error_is_no_run_that_ended_early(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    doc = relu_doctor.watch(model, log_every_n_steps=2, run_dir=run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt), doc:
            zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
            raise KeyboardInterrupt
        assert load_run(run_dir).meta["ended_by"] == "KeyboardInterrupt"
        with doc:  # training goes on, to its end
            zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
    assert doc.ended_by is None and "ended_by" not in load_run(run_dir).meta


def _fail_then_resume(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str, failing: Any, *,
        before: int, after: int, more: int, checkpoint: bool = True,
) -> tuple[list[list[int]], Run]:
    """Train ``before`` steps (a checkpoint taken there) and ``after`` more, logging every
    2nd, with ``RunWriter.<method>`` replaced by ``failing``; then resume in the same
    directory (from the checkpoint, or without one) and train ``more``: the unwritten
    ranges before the resume, and the run after it."""
    model = zoo.mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(rundir.RunWriter, method, failing)
        with relu_doctor.watch(model, log_every_n_steps=2, run_dir=run_dir) as doc:
            zoo.train(model, [torch.randn(8, 10) for _ in range(before)], doc=doc)
            state = doc.state_dict()
            zoo.train(model, [torch.randn(8, 10) for _ in range(after)], doc=doc)
        monkeypatch.undo()
        unwritten = load_run(run_dir).unwritten
        doc = relu_doctor.watch(model, log_every_n_steps=2, run_dir=run_dir, resume=True)
        if checkpoint:
            doc.load_state_dict(state)
        with doc:
            zoo.train(model, [torch.randn(8, 10) for _ in range(more)], doc=doc)
    return unwritten, load_run(run_dir)


@pytest.mark.parametrize("checkpoint", [True, False], ids=["from_checkpoint", "no_checkpoint"])
def test_a_resumed_run_keeps_the_unwritten_logs_before_it_and_drops_those_it_logs_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: bool) -> None:
    """A log failed at step 4 (disk full at its findings): resumed from step 2's checkpoint,
    the new process logs step 4 again in full, and status.json no longer says it was never
    written ('written in part' of a whole log); resumed after the last log without one, the
    old process's unwritten step stays said."""
    real = rundir.RunWriter.write_findings
    calls = [0]

    def findings(self: rundir.RunWriter, fs: object) -> None:
        calls[0] += 1
        if calls[0] == 2:  # step 4's log
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, fs)  # type: ignore[arg-type]

    unwritten, run = _fail_then_resume(tmp_path / "run", monkeypatch, "write_findings", findings,
                                       before=2, after=4, more=2, checkpoint=checkpoint)
    assert unwritten == [[4, 4]]
    if checkpoint:
        assert sorted(set(run.history["step"])) == [2, 4] and run.unwritten == []
    else:
        assert sorted(set(run.history["step"])) == [2, 4, 6, 8] and run.unwritten == [[4, 4]]


def test_a_resume_after_the_last_written_log_keeps_the_failed_logs_before_its_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills at step 4 and every later log fails; resumed from step 6's
    checkpoint, logs 4 and 6 are never written again: still said (they were dropped when the
    cut was the last step the directory held, 2)."""
    real = rundir.RunWriter.append_table

    def failing(self: rundir.RunWriter, table: str, step: int, data: object) -> None:
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, table, step, data)  # type: ignore[arg-type]

    unwritten, run = _fail_then_resume(tmp_path / "run", monkeypatch, "append_table", failing,
                                       before=6, after=2, more=4)
    assert unwritten == [[4, 8]]
    assert sorted(set(run.history["step"])) == [2, 8, 10] and run.unwritten == [[4, 6]]
