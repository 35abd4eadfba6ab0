"""Faults never stop training, and damaged input never gives a traceback or silence: write
failures (disk full, a removed directory), damaged run directories read by ``load_run`` and
``relu-doctor report``, one writer per directory (the lock), orphaned temporary files,
terminal control characters, and the pyarrow floor against crafted Parquet."""

from __future__ import annotations

import builtins
import errno
import io
import json
import operator
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor import rundir
from relu_doctor.cli import main
from relu_doctor.errors import ReluDoctorWarning, RunDirError
from relu_doctor.history import load_run
from relu_doctor.rundir import RunWriter, read_table
from tests import zoo


def train_logged(run_dir: Path, steps: int, **kwargs):
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, optimizer=opt,
                           **kwargs) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(steps)], doc=doc, optimizer=opt)
    return doc


def train_full_at_logs_3_to_5(
    run_dir: Path, disk_full: Callable[[bool], None]
) -> tuple[relu_doctor.Doctor, list[str]]:
    """Eight logged steps, ``disk_full(True)`` before steps 3-5 and ``disk_full(False)``
    before the others: the Doctor and the messages of its ReluDoctorWarnings."""
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir, optimizer=opt) as doc:
            for step in range(1, 9):
                disk_full(3 <= step <= 5)
                zoo.train(model, [torch.randn(8, 10)], doc=doc, optimizer=opt)
    disk_full(False)
    return doc, [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]


# ---------------------------------------------------------------------- write failures


def test_disk_full_warns_once_training_goes_on_and_writing_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected at the segment writes of steps 3-5: one warning naming the cause and
    the path; steps keep coming; writing resumes at step 6; the run says what is missing."""
    real_write = rundir._Segment.write

    def no_space(self: Any, table: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_full(full: bool) -> None:
        monkeypatch.setattr(rundir._Segment, "write", no_space if full else real_write)

    run_dir = tmp_path / "run"
    doc, ours = train_full_at_logs_3_to_5(run_dir, disk_full)
    assert len(ours) == 1, ours
    assert "No space left on device" in ours[0] and str(run_dir) in ours[0]
    assert doc.global_step == 8 and [r.step for r in doc.records][-1] == 8
    run = load_run(run_dir)
    assert sorted(run.history["step"].unique()) == [1, 2, 6, 7, 8]
    assert run.unwritten == [[3, 5]]
    assert sorted(run.units["step"].unique()) == [1, 2, 6, 7, 8]


@pytest.mark.parametrize(("tensorboard", "code"), [
    (False, errno.ENOSPC), (True, errno.ENOSPC), (False, errno.EFBIG)])
def test_a_full_disk_when_watch_starts_warns_and_training_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tensorboard: bool, code: int) -> None:
    """ENOSPC opening the run directory at watch() may pass: a warning, not the error a
    run_dir that cannot be created gets (test_first_run); writing starts when the disk has room.
    With TensorBoard on, its event file lands in the directory first: it is this run's, and
    does not make the retry refuse the directory as someone else's."""
    from relu_doctor import recording

    real = recording.RunWriter
    full = [True]

    def writer(*args: Any, **kwargs: Any) -> RunWriter:
        if full[0]:  # (EFBIG: a file-size limit, RLIMIT_FSIZE, a quota on file size)
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(recording, "RunWriter", writer)
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with (pytest.warns(ReluDoctorWarning,
                       match=f"cannot write the run directory .*{os.strerror(code)}"),
          relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir,
                            tensorboard=tensorboard) as doc):
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        assert bool(list(run_dir.glob("events.out.tfevents.*"))) == tensorboard
        full[0] = False
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
    assert doc.global_step == 4
    assert sorted(load_run(run_dir).history["step"].unique()) == [3, 4]


def test_a_removed_run_directory_does_not_stop_training(tmp_path):
    run_dir = tmp_path / "run"
    model = zoo.mlp()
    with (pytest.warns(ReluDoctorWarning, match="cannot write the run directory"),
          relu_doctor.watch(model, log_every_n_steps=1, run_dir=run_dir) as doc):
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc)
        shutil.rmtree(run_dir)
        (tmp_path / "run").write_text("a file now")  # cannot be re-created either
        zoo.train(model, [torch.randn(8, 10) for _ in range(3)], doc=doc)
    assert doc.global_step == 5 and doc.records[-1].step == 5


def _thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> list[threading.ExceptHookArgs]:
    """What reaches ``threading.excepthook`` (the user's hook) from now on: a background
    writer re-raising a write error in its thread would land here (and print a traceback)."""
    seen: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    return seen


def _join_new_threads(before: set[threading.Thread]) -> None:
    """Let threads started since ``before`` finish (a writer thread dying of its error
    reports to the excepthook as it ends); costs time only when such a thread exists."""
    for t in set(threading.enumerate()) - before:
        t.join(timeout=2)


def _scalar_steps(log_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.startswith("relu_doctor/dead_fraction/"))
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_tensorboard_warns_once_and_never_prints_a_thread_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """At logs 3-5 every write of a TensorBoard event file fails with ENOSPC (opened on
    /dev/full, whichever thread writes it): training completes, one warning names the cause
    and the file, nothing reaches threading.excepthook or stderr (the user's hook still gets
    another thread's exception), and the event file holds logs 1, 2, 6-8, readable."""
    seen = _thread_exceptions(monkeypatch)
    real_open, full = builtins.open, [False]

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if (full[0] and isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wa+")
                and "events.out.tfevents" in os.fsdecode(file)):
            file = "/dev/full"
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # tensorboard's own file system calls io.open
    before = set(threading.enumerate())
    run_dir = tmp_path / "run"
    doc, ours = train_full_at_logs_3_to_5(run_dir, lambda on: full.__setitem__(0, on))
    _join_new_threads(before)
    assert seen == [], [a.exc_value for a in seen]
    assert "Traceback" not in capfd.readouterr().err
    assert doc.global_step == 8 and doc.records[-1].step == 8
    assert len(ours) == 1, ours
    assert "No space left on device" in ours[0] and "events.out.tfevents" in ours[0]
    assert str(run_dir) in ours[0]
    user = threading.Thread(target=operator.truediv, args=(1, 0))
    user.start()
    user.join()
    assert [type(a.exc_value) for a in seen] == [ZeroDivisionError]  # the user's hook works
    assert _scalar_steps(run_dir) == [1, 2, 6, 7, 8]  # retried; the file is whole
    assert sorted(load_run(run_dir).history["step"].unique()) == list(range(1, 9))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_the_run_directory_and_its_event_file_is_one_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk fails the run directory's tables and its TensorBoard event file alike:
    one warning (the run directory's, naming the cause), not one per file."""
    real_open, real_write, full = builtins.open, rundir._Segment.write, [False]

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if (full[0] and isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wa+")
                and "events.out.tfevents" in os.fsdecode(file)):
            file = "/dev/full"
        return real_open(file, mode, *args, **kwargs)

    def no_space(self: Any, table: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_full(on: bool) -> None:
        full[0] = on
        monkeypatch.setattr(rundir._Segment, "write", no_space if on else real_write)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    run_dir = tmp_path / "run"
    _doc, ours = train_full_at_logs_3_to_5(run_dir, disk_full)
    assert len(ours) == 1, ours
    assert ours[0].startswith(f"relu_doctor: cannot write the run directory {str(run_dir)!r}")
    assert _scalar_steps(run_dir) == [1, 2, 6, 7, 8]  # the event file retried all the same


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="mounting a tmpfs needs root on Linux")
def test_a_real_full_tmpfs_does_not_stop_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    seen = _thread_exceptions(monkeypatch)
    before = set(threading.enumerate())
    try:
        with pytest.warns(ReluDoctorWarning, match="No space left"):
            doc = train_logged(mnt / "run", 60)
        _join_new_threads(before)
        assert doc.global_step == 60
        assert seen == [], [a.exc_value for a in seen]  # no writer thread's traceback
        assert "Traceback" not in capfd.readouterr().err
        run = load_run(mnt / "run")
        assert run.unwritten and run.unwritten[-1][1] == 60
        steps = _scalar_steps(mnt / "run")  # what reached the event file reads back whole
        assert steps and steps == sorted(set(steps))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------------- damaged input


def _damage(run_dir: Path, how: str) -> None:
    part = sorted((run_dir / "units").glob("seg-*.parquet"))[0]
    ev = run_dir / "events.jsonl"
    if how == "another schema":
        pq.write_table(pa.table({"x": [1.0]}), run_dir / "units" / "seg-000099.parquet")
    elif how == "step as text":
        pq.write_table(pa.table({"step": ["twenty"], "site": ["1"], "unit": [0]}),
                       run_dir / "units" / "seg-000099.parquet")
    elif how == "truncated part":
        part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2])
    elif how == "random bytes part":
        part.write_bytes(os.urandom(4096))
    elif how in ("[1,2,3]", "null", '{"type": "finding", "step": "twenty"}'):
        ev.write_bytes(ev.read_bytes() + how.encode() + b"\n")
    elif how == "invalid utf-8":
        ev.write_bytes(ev.read_bytes() + b'{"type": "finding", "site": "\xff\xfe"}\n')
    elif how == "findings.json a dict":
        (run_dir / "findings.json").write_text('{"kind": 1}')
    elif how == "findings.json missing":
        (run_dir / "findings.json").unlink()


def test_a_sick_runs_findings_outlive_a_missing_findings_json(tmp_path):
    """With findings.json gone, a run whose units died read "Healthy" and said nothing of
    the missing file. Its open findings are taken from events.jsonl, as for a damaged one."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:12] = -100.0  # 12 of 16 units never active
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with relu_doctor.watch(model, log_every_n_steps=2, run_dir=tmp_path / "r",
                           optimizer=opt) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(6)], doc=doc, optimizer=opt)
    kept = {(f.kind, f.site, f.severity) for f in load_run(tmp_path / "r").findings()}
    assert ("dead", "1", "critical") in kept
    (tmp_path / "r" / "findings.json").unlink()
    with pytest.warns(ReluDoctorWarning, match=r"findings.json' is missing, though the run "
                      r"logged; the findings are taken from events.jsonl"):
        run = load_run(tmp_path / "r")
    assert {(f.kind, f.site, f.severity) for f in run.findings()} == kept
    assert not relu_doctor.reports.summary(run).splitlines()[0].endswith("Healthy")


def test_findings_taken_from_events_say_which_step_their_evidence_is_from(tmp_path):
    """Rebuilt from events.jsonl, a finding holds the evidence of the log where it began or
    last changed: a report showed it under the last log's step as if it were that log's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:12] = -100.0  # dead from the start: its finding begins at step 2
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with relu_doctor.watch(model, log_every_n_steps=2, run_dir=tmp_path / "r",
                           optimizer=opt) as doc:
        zoo.train(model, [torch.randn(8, 10) for _ in range(4)], doc=doc, optimizer=opt)
        with torch.no_grad():
            model[2].bias[:] = -100.0  # the second layer dies after step 4: its finding at 6
        zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc, optimizer=opt)
    intact = relu_doctor.reports.summary(load_run(tmp_path / "r"))
    assert "evidence from step" not in intact
    (tmp_path / "r" / "findings.json").unlink()
    with pytest.warns(ReluDoctorWarning, match="taken from events.jsonl"):
        run = load_run(tmp_path / "r")
    began = {f.site: f.step for f in run.findings() if f.kind == "dead"}
    assert began == {"1": 2, "3": 6}
    lines = relu_doctor.reports.summary(run).splitlines()
    assert any(line.startswith("  [critical] 1:") and line.endswith("(evidence from step 2)")
               for line in lines), lines
    assert not any(line.startswith("  [critical] 3:") and "evidence from" in line for line in lines)
    html = relu_doctor.reports.render_report(run)
    assert html.count("evidence from step 2") == 1 and "evidence from step 6" not in html


@pytest.mark.parametrize("how", [
    "another schema", "step as text", "truncated part", "random bytes part", "[1,2,3]",
    "null", '{"type": "finding", "step": "twenty"}', "invalid utf-8", "findings.json a dict",
    "findings.json missing",
])
def test_a_damaged_file_or_line_is_skipped_with_a_warning_naming_it(tmp_path, capsys, how):
    run_dir = tmp_path / "run"
    doc = train_logged(run_dir, 3)
    _damage(run_dir, how)
    with pytest.warns(ReluDoctorWarning) as caught:
        run = load_run(run_dir)
    assert len(run.problems) == 1, run.problems
    named = str(caught[0].message)
    assert ("events.jsonl" in named) or ("units" in named) or ("findings.json" in named), named
    assert sorted(run.history["step"].unique()) == [1, 2, 3]
    if how in ("another schema", "step as text", "[1,2,3]", "null", "invalid utf-8"):
        assert len(run.units) == sum(len(r.unit_table) for r in doc.records)
    # The CLI goes on: exit 0, the warning on stderr, one line per problem.
    assert main(["report", str(run_dir)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relu-doctor report: warning: "), err
    assert "Traceback" not in "".join(err)


def test_bytes_changed_inside_a_part_are_found_not_read_as_numbers(tmp_path):
    """Bytes overwritten inside a Parquet part (a bad copy, a failing disk) that leave it
    readable were read back as wrong numbers (grad RMS ~1e200) with no warning: its pages
    carry a CRC now, so the part is skipped with a warning naming it."""
    run_dir = tmp_path / "run"
    train_logged(run_dir, 3)
    part = sorted((run_dir / "units").glob("seg-*.parquet"))[0]
    intact = load_run(run_dir).units
    meta = pq.ParquetFile(part).metadata
    column = meta.schema.names.index("mean_abs")
    chunk = meta.row_group(0).column(column)
    end = chunk.data_page_offset + chunk.total_compressed_size  # the chunk's last bytes: values
    data = bytearray(part.read_bytes())
    data[end - 6:end - 2] = b"\x7f\x7f\x7f\x7f"
    part.write_bytes(bytes(data))
    with pytest.warns(ReluDoctorWarning, match=re.escape(part.name) + ".*CRC"):
        units = load_run(run_dir).units
    assert len(intact) > 0 and units.empty  # the run's one units part: skipped, not misread


@pytest.mark.parametrize(("meta", "message"), [
    ("[1, 2, 3]", r"holds a JSON list, not an object"),
    (b'{"format_version": 3, "sites": "\xff"}', r"cannot be read as JSON"),
    ('{"format_version": 3, "sites": [1, 2]}', r"'sites' must be a list of objects"),
    ('{"format_version": 3, "sites": [], "config": []}', r"'config' must be a JSON object"),
    ('{"format_version": 2.5}', r"format 2.5"),
])
def test_a_damaged_meta_json_is_one_line_and_exit_status_2(tmp_path, capsys, meta, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "meta.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    with pytest.raises(RunDirError, match=message):
        load_run(run_dir)
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relu-doctor report: error: ")


def test_terminal_control_characters_never_reach_the_screen(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train_logged(run_dir, 2)
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["model"] = "Net\x1b[2J\x1b]0;pwned\x07"
    (run_dir / "meta.json").write_text(json.dumps(meta))
    (run_dir / "events.jsonl").write_bytes(
        (run_dir / "events.jsonl").read_bytes() + b'{"type": "\\u001b[31m"}\n')
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert "Net?[2J" in out.out
    assert not any(ord(c) < 32 and c != "\n" for c in out.out + out.err)


# ---------------------------------------------------------------------- one writer


def test_a_second_live_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    first = RunWriter(tmp_path / "r")
    first.write_meta({"sites": []})
    with pytest.raises(RunDirError, match=r"being written by another writer \(process \d+"):
        RunWriter(tmp_path / "r", resume=True)
    # Another live process holds it.
    first.close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from relu_doctor.rundir import RunWriter; "
         f"w = RunWriter({str(tmp_path / 'r')!r}, resume=True); print('ok', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ok"
        with pytest.raises(RunDirError, match=f"process {holder.pid}"):
            RunWriter(tmp_path / "r", resume=True)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    # Its process is dead now: the lock is stale and taken over with a warning.
    (tmp_path / "r" / ".meta.json.0123.tmp").write_text("orphan")
    with pytest.warns(ReluDoctorWarning, match=rf"taking over the lock left by process {holder.pid}"):
        w = RunWriter(tmp_path / "r", resume=True)
    assert not list((tmp_path / "r").glob("*.tmp")), "orphaned temporary files are cleaned"
    w.close()
    assert not (tmp_path / "r" / ".lock").exists()


class _NoSpace:
    """A file opened for writing on a full disk: its write fails with ENOSPC."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def __enter__(self) -> _NoSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_full_as_the_run_starts_leaves_no_lock_and_writing_resumes(tmp_path, monkeypatch):
    """The lock's own write fails (the disk is full as the watch starts): the empty lock it
    left made every retry refuse the directory as another writer's (os.kill(-1, 0), which
    signals every process, read as alive), so nothing was ever written, the lock stayed after
    close, and no report could be made. Now the failed lock is removed, writing resumes once
    there is room, and the report names the logs lost."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(rundir.os, "fdopen", lambda fd, *a, **k: _NoSpace(real_fdopen(fd, *a, **k)))
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=2, run_dir=tmp_path / "r",
                               optimizer=opt, tensorboard=False) as doc:
            for step in range(1, 9):
                if step == 5:
                    monkeypatch.setattr(rundir.os, "fdopen", real_fdopen)  # room again
                    assert not (tmp_path / "r" / ".lock").exists()
                zoo.train(model, [torch.randn(8, 10)], doc=doc, optimizer=opt)
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert len(said) == 1 and "No space left on device" in said[0], said
    assert not (tmp_path / "r" / ".lock").exists()
    run = load_run(tmp_path / "r")
    assert sorted(run.history["step"].unique()) == [6, 8]
    assert run.unwritten == [[2, 4]]
    assert "the logs of steps 2–4 are not in the run directory" in relu_doctor.reports.summary(run)


@pytest.mark.parametrize("body", ["", "{\"pid\": -1}", "{\"pid\": 0}"])
def test_a_lock_that_names_no_process_is_taken_over(tmp_path, body):
    """An empty lock (a writer stopped while taking it) or one naming pid 0 or -1 (which
    os.kill would signal as a group, so read as alive) belongs to no live writer."""
    (tmp_path / "r").mkdir()
    lock = tmp_path / "r" / ".lock"
    lock.write_text(body)
    os.utime(lock, (1e9, 1e9))  # not being written now
    with pytest.warns(ReluDoctorWarning, match="taking over the lock"):
        w = RunWriter(tmp_path / "r")
    w.close()
    assert not lock.exists()


@pytest.mark.parametrize("removed_at, tensorboard", [(6, True), (6, False), (None, False)])
def test_a_run_directory_removed_while_written_is_started_again(tmp_path, removed_at,
                                                                tensorboard):
    """``rm -rf`` of the run directory mid-run: the open segments went on writing to files in
    no directory (and TensorBoard made the directory again), so the run never got its
    meta.json or tables back and no report could be made; removed after the last log
    (``None``: before the block ends), close left it with no record at all. Now the next log,
    or close, sees the lock gone, says so once (at the user's code), starts the directory
    again, and the report names the logs lost."""
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run_dir = tmp_path / "r"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=2, run_dir=run_dir, optimizer=opt,
                               tensorboard=tensorboard) as doc:
            for step in range(1, 13):
                if step == removed_at:
                    shutil.rmtree(run_dir)
                zoo.train(model, [torch.randn(8, 10)], doc=doc, optimizer=opt)
            if removed_at is None:
                shutil.rmtree(run_dir)
    said = [w for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert len(said) == 1 and "was removed while it was being written" in str(said[0].message)
    assert said[0].filename in (__file__, zoo.__file__)  # the caller's code, not ours
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not (run_dir / ".lock").exists()
    run = load_run(run_dir)
    lost = "2–4" if removed_at else "2–12"
    steps = [] if run.history.empty else sorted(run.history["step"].unique())
    assert steps == ([6, 8, 10, 12] if removed_at else [])
    assert run.unwritten == [[int(x) for x in lost.split("–")]]
    text = relu_doctor.reports.summary(run)
    assert f"the logs of steps {lost} are not in the run directory" in text


def test_an_event_whose_write_fails_is_cut_back_and_written_with_the_next_log(tmp_path,
                                                                             monkeypatch):
    """An intervention recorded on a full disk left half a line in events.jsonl, the next
    event was appended onto it, and the report lost both ("damaged line"). Now the failed
    write is cut back and its events are written with the next log that reaches disk."""
    from relu_doctor.events import Intervention

    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    real_fsync = os.fsync

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=2, run_dir=tmp_path / "r",
                               optimizer=opt, tensorboard=False) as doc:
            zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc, optimizer=opt)
            monkeypatch.setattr(rundir.os, "fsync", no_space)  # the line is written, then fails
            doc.record_event(Intervention(remedy="manual", site="1", step=2, what="first"))
            monkeypatch.setattr(rundir.os, "fsync", real_fsync)
            doc.record_event(Intervention(remedy="manual", site="1", step=2, what="second"))
            zoo.train(model, [torch.randn(8, 10) for _ in range(2)], doc=doc, optimizer=opt)
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)
            and "announce" not in str(w.message) and "changed the training" not in str(w.message)]
    assert len(said) == 1 and "No space left on device" in said[0], said
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        run = load_run(tmp_path / "r")
    assert run.problems == []
    assert [e["what"] for e in run.interventions()] == ["first", "second"]


def test_a_write_that_fails_half_way_leaves_no_torn_file(tmp_path, monkeypatch):
    """A full disk mid-batch: the stream is cut back to its last complete batch, and a
    segment whose header could not be written is removed, so that the reader does not
    report relu_doctor's own leftovers as damaged files."""
    w = RunWriter(tmp_path / "r")
    w.write_meta({"sites": []})
    w.append_table("history", 1, {"step": [1], "site": ["a"], "x": [1.0]})
    w.write_findings([])
    seg = w._segs["history"]

    def torn(table: pa.Table) -> None:
        seg._file.write(b"\xff" * 37)  # part of a batch reached the file
        seg._file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(seg._writer, "write_table", torn)
    with pytest.raises(OSError, match="No space left"):
        w.append_table("history", 2, {"step": [2], "site": ["a"], "x": [2.0]})
    real_new_stream = rundir.ipc.new_stream

    def no_room(f: Any, schema: pa.Schema) -> Any:
        f.write(b"\xff" * 11)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.ipc, "new_stream", no_room)
    with pytest.raises(OSError, match="No space left"):
        w.append_table("units", 2, {"step": [2], "site": ["a"], "unit": [0]})
    assert not list((tmp_path / "r" / "units").iterdir())
    monkeypatch.setattr(rundir.ipc, "new_stream", real_new_stream)
    w.append_table("history", 3, {"step": [3], "site": ["a"], "x": [3.0]})  # room again: a new segment
    w.abandon()  # the writer dies: nothing compacted
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        run = load_run(tmp_path / "r")
    assert run.problems == [] and run.history["step"].tolist() == [1, 3]


def test_a_close_that_fails_leaves_no_segment_file_open(tmp_path, monkeypatch):
    """A full disk at close (the first segment's compaction fails): the other open
    segments are closed too, not left to the garbage collector."""
    w = RunWriter(tmp_path / "r")
    w.write_meta({"sites": []})
    for table in ("history", "units", "layers"):
        w.append_table(table, 1, {"step": [1], "x": [1.0]})
    segs = list(w._segs.values())

    def no_space(stream: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "_compact", no_space)
    with pytest.raises(OSError, match="No space left"):
        w.close()
    assert len(segs) == 3 and all(seg._file.closed for seg in segs)
    assert not (tmp_path / "r" / ".lock").exists()


def test_two_doctors_on_one_run_directory(tmp_path):
    model = zoo.mlp()
    with (relu_doctor.watch(model, run_dir=tmp_path / "r"),
          pytest.raises(RunDirError, match="being written by another writer")):
        relu_doctor.watch(zoo.mlp(), run_dir=tmp_path / "r", resume=True)
    # Without resume=True it says the run is being written, not to pass resume=True.
    with (relu_doctor.watch(model, run_dir=tmp_path / "s"),
          pytest.raises(RunDirError, match=r"already holds run '\w+', and this process is "
                        r"still writing it; pass a new directory\.$")):
        relu_doctor.watch(zoo.mlp(), run_dir=tmp_path / "s")


# ---------------------------------------------------------------------- the floor


def test_the_pyarrow_floor_refuses_a_crafted_parquet_part(tmp_path):
    """CVE-2023-47248: pyarrow < 14.0.1 unpickles the metadata of a column typed
    ``arrow.py_extension_type`` when reading a Parquet file. This writes such a part whose
    payload creates a file when unpickled, reads the run, and checks that nothing ran. With
    pyarrow 14.0.0 the same test fails (the payload runs); it proves the installed version
    does not deserialise it, not that no other path in pyarrow could."""
    from importlib.metadata import version

    installed = tuple(int(x) for x in version("pyarrow").split(".")[:3] if x.isdigit())
    assert installed >= (14, 0, 1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    run_dir = tmp_path / "run"
    train_logged(run_dir, 1)
    field = pa.field("step", pa.int64(), metadata={
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": pickle.dumps(Payload()),
    })
    crafted = pa.table({"step": pa.array([1], pa.int64()), "site": ["1"], "unit": [0]})
    crafted = crafted.cast(pa.schema([field, crafted.schema.field(1), crafted.schema.field(2)]))
    pq.write_table(crafted, run_dir / "units" / "seg-000050.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_table(run_dir, "units")
        assert main(["report", str(run_dir), "-q"]) in (0, 2)
    assert not marker.exists(), "reading a crafted part ran its payload"


def test_reading_keeps_working_while_a_table_has_mixed_types(tmp_path):
    w = RunWriter(tmp_path / "r")
    w.write_meta({"sites": []})
    w.append_table("history", 1, pd.DataFrame({"step": [1], "site": ["a"], "cap": [None]}))
    w.append_table("history", 2, pd.DataFrame({"step": [2], "site": ["a"], "cap": [6.0]}))
    w.close()
    got = read_table(tmp_path / "r", "history")
    assert list(got["step"]) == [1, 2] and got["cap"].iloc[1] == 6.0


def _outputs_by_step(
    model: torch.nn.Module, steps: int, body: Callable[[int], None],
    seen: dict[int, dict[str, list[torch.Tensor]]],
) -> None:
    """Run ``body(i)`` for each step, putting in ``seen``, per step and ReLU path, the
    outputs of its training passes (a reference of plain forward hooks)."""
    now = [0]
    hooks = [
        m.register_forward_hook(
            lambda m, a, out, name=name: seen.setdefault(now[0], {}).setdefault(name, []).append(
                out.detach().clone()) if torch.is_grad_enabled() else None)
        for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)
    ]
    try:
        for i in range(steps):
            now[0] = i
            body(i)
    finally:
        for h in hooks:
            h.remove()


def _rate(seen, site: str, first: int, last: int) -> list[float]:
    outs = torch.cat([o for i in range(first, last + 1) for o in seen.get(i, {}).get(site, [])])
    return ((outs > 0).double().mean(0)).tolist()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_a_log_stopped_midway_loses_no_window_and_a_bug_there_does_not_stop_training(
    tmp_path, monkeypatch, fault
):
    """Ctrl-C landing while a log read its window closed the window first: the record made
    at the exit held nothing, and a warning and the report blamed the model ("recorded
    nothing"). A bug there (any exception) escaped doc.step() into the training loop. The
    windows (the sites', the optimizer tap's layer norms, the loss scaler's skips) now close
    once their record is made, and a failing read warns once and training goes on: the next
    record holds every step of the window, as a reference counts them."""
    import relu_doctor.interval as interval

    calls = [0]
    real = interval.diagnose

    def fails_third(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:  # the log at step 15
            raise fault("stopped here")
        return real(*a, **k)

    monkeypatch.setattr(interval, "diagnose", fails_third)
    torch.manual_seed(0)
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    steps = 15 if fault is KeyboardInterrupt else 20
    seen: dict[int, dict[str, list[torch.Tensor]]] = {}
    layer_sq: dict[int, dict[str, float]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with relu_doctor.watch(model, log_every_n_steps=5, overhead_budget=None,
                                   optimizer=opt, grad_scaler=scaler,
                                   run_dir=tmp_path / "run") as doc:

                def body(i: int) -> None:
                    loss = model(torch.randn(16, 10)).pow(2).mean()
                    if i == 11:  # one step the scaler skips, in the window that fails
                        loss = loss * float("inf")
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    layer_sq[i] = {name: float(sum(p.grad.double().pow(2).sum()
                                                   for p in m.parameters()))
                                   for name, m in model.named_children() if
                                   isinstance(m, torch.nn.Linear)} if i != 11 else {}
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()
                    doc.step()

                _outputs_by_step(model, steps, body, seen)
        except KeyboardInterrupt:
            assert fault is KeyboardInterrupt
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert not [m for m in said if "recorded nothing" in m], said
    failed = [m for m in said if "reading the window at step 15 failed" in m]
    assert len(failed) == (fault is RuntimeError), said
    run = load_run(tmp_path / "run")
    hist = run.history
    last = hist[hist["step"] == hist["step"].max()]
    for site in ("1", "3"):
        row = last[last["site"] == site].iloc[0]
        assert row["steps_collected"] == (5 if fault is KeyboardInterrupt else 10)
        got = doc.unit_table(site)["activation_rate"].tolist()
        assert got == pytest.approx(_rate(seen, site, 10, steps - 1))
    # the skipped step is said as the scaler's calibration, not as non-finite gradients
    kinds = {(f.kind, f.severity) for f in doc.findings()}
    assert ("loss_scale_overflow", "info") in kinds and ("nonfinite", "critical") not in kinds
    # the layer norms of every step of the window (the skipped one's were not finite)
    layers = run.layers[run.layers["step"] == hist["step"].max()].set_index("layer")
    for name in ("0", "2", "4"):
        want = [layer_sq[i][name] for i in range(10, steps) if layer_sq[i]]
        assert layers.loc[name, "grad_norm"] ** 2 == pytest.approx(sum(want) / len(want))


def test_what_a_listener_of_the_users_raises_reaches_the_training_loop():
    """A log's own failure is contained (above), not what a listener added by the user
    raises: that is the user's, and stops training as before."""

    class Stop(Exception):
        pass

    def stop(record: Any) -> None:
        raise Stop

    model = zoo.mlp()
    with relu_doctor.watch(model, log_every_n_steps=2, overhead_budget=None) as doc:
        doc.add_listener(stop)
        with pytest.raises(Stop):
            for _ in range(4):
                model(torch.randn(8, 10)).sum().backward()
                doc.step()
    assert doc.global_step == 2


@pytest.mark.parametrize("where", ["diagnose", "IntervalRecord"])
def test_a_read_that_fails_after_its_diagnosis_changes_nothing_it_would_have_recorded(
    monkeypatch, where
):
    """A read that failed once its diagnosis was made (the second review) had already
    committed its findings (their "began" events never written), stated the sites'
    first-dead fractions (lost for good) and added its gradient norm to the history (one
    too many). What a read changes is now done once its record is made: the next record
    says what the failed one would have, as a run without the failure does."""
    import relu_doctor.interval as interval

    def train(fail: bool) -> list[Any]:
        calls = [0]
        real = getattr(interval, where)

        def fails_once(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            if fail and calls[0] == 1:
                raise RuntimeError("stopped here")
            return real(*a, **k)

        monkeypatch.setattr(interval, where, fails_once)
        torch.manual_seed(0)
        model = zoo.mlp()
        with torch.no_grad():
            model[0].bias[:8] = -100.0  # dead from the start: a first-dead fraction to state
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        records = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReluDoctorWarning)
            with relu_doctor.watch(model, log_every_n_steps=5, overhead_budget=None,
                                   optimizer=opt) as doc:
                for _ in range(10):
                    model(torch.randn(16, 10)).pow(2).mean().backward()
                    opt.step()
                    opt.zero_grad()
                    if (r := doc.step()) is not None:
                        records.append(r)
        monkeypatch.setattr(interval, where, real)
        return [records, list(doc._grad_norm_history)]

    (failed,), history = train(True)
    plain, _ = train(False)
    assert failed.step == 10 and failed.steps_collected == 10 and len(history) == 1
    assert failed.first_dead == plain[0].first_dead != {}
    began = {(e.status, e.finding.kind, e.finding.site) for e in failed.finding_events}
    assert {("began", f.kind, f.site) for f in failed.findings} <= began


def test_a_failing_read_of_the_evaluation_stream_is_contained_and_counts_its_passes(
    monkeypatch,
):
    """The evaluation stream's read, made at the training log, was not contained (it
    raised out of doc.step()), and a window whose read failed lost its passes' count while
    its statistics stayed: the next record held 4 passes' elements as 2 steps. It warns,
    and the next record counts every pass it holds."""
    import relu_doctor.interval as interval

    real = interval.IntervalReading._frozen_layers
    calls = [0]

    def fails_once(self: Any, sites: Any, *args: Any) -> Any:
        if self.probe.stream == "eval":
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("stopped here")
        return real(self, sites, *args)

    monkeypatch.setattr(interval.IntervalReading, "_frozen_layers", fails_once)
    torch.manual_seed(0)
    model = zoo.mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=5, overhead_budget=None,
                               eval_stream=True) as doc:
            for i in range(10):
                model(torch.randn(16, 10)).pow(2).mean().backward()
                if i % 5 == 1:  # two evaluation passes a window
                    model.eval()
                    with torch.no_grad():
                        model(torch.randn(16, 10))
                        model(torch.randn(16, 10))
                    model.train()
                doc.step()
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert [m for m in said if "reading the window at step 5 failed" in m], said
    (rec,) = [r for r in doc.eval._records]
    assert rec.step == 10 and rec.steps_run == 4
    assert [row["elements"] for row in rec.site_rows] == [4 * 16 * 32, 4 * 16 * 32]


@pytest.mark.parametrize("then", ["kept", "removed", "another run"])
def test_an_event_after_the_run_closed_goes_into_that_run_only(tmp_path: Path, then: str) -> None:
    """A remedy acting after the run closed (a swap undone at trainer.test's checkpoint
    load) appends its event to the closed run's directory: only while it holds that run.
    A removed directory was made again holding events alone, and another run's took the
    old run's event (a review): said once, kept in memory."""
    from relu_doctor.events import Intervention

    run_dir = tmp_path / "run"
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc = relu_doctor.watch(net, log_every_n_steps=1, run_dir=run_dir)
        for _ in range(2):
            net(torch.randn(8, 4)).sum().backward()
            doc.step()
        doc.close()
    if then != "kept":
        shutil.rmtree(run_dir)
    if then == "another run":
        other = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with relu_doctor.watch(other, log_every_n_steps=1, run_dir=run_dir) as doc2:
                other(torch.randn(8, 4)).sum().backward()
                doc2.step()
    told: list[str] = []
    doc.add_event_listener(lambda e: told.append(e["what"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2):
            doc.record_event(Intervention("leaky_relu_swap", "1", 2, f"restored ReLU {i}",
                                          id=f"leaky_relu_swap:1:{i}:restore"))
    said = [str(w.message) for w in caught if "after the run closed" in str(w.message)]
    assert told == ["restored ReLU 0", "restored ReLU 1"]  # recorded, whatever the disk
    if then == "removed":
        assert not run_dir.exists() and len(said) == 1, said
        return
    written = [json.loads(line)["what"] for line in (run_dir / "events.jsonl").read_text().splitlines()
               if line.strip() and json.loads(line).get("type") == "intervention"]
    if then == "kept":
        assert written == ["restored ReLU 0", "restored ReLU 1"] and not said
        assert relu_doctor.load_run(run_dir).meta["run_id"]  # still a run that loads
    else:
        assert written == [] and len(said) == 1, said
