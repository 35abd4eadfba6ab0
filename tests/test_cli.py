"""The ``relu-doctor`` command. Everything runs in-process (``cli.main([...])``) except what
checks the console script itself: ``--version`` and ``--help`` through the installed script,
without importing torch or pandas, and a training process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.nn as nn

import relu_doctor
from relu_doctor._version import __version__
from relu_doctor.cli import main
from relu_doctor.history import load_run
from relu_doctor.reports.report import Report

SCRIPT = Path(sys.executable).with_name("relu-doctor")
HEAVY = ("torch", "pandas", "numpy", "matplotlib", "jinja2")


def one_line_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    assert "error:" in lines[0]
    return lines[0]


def data_island(path: Path) -> dict:
    page = path.read_text(encoding="utf-8")
    m = re.search(r'id="relu-doctor-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


# ---------------------------------------------------------------------- the console script


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_console_script_version_and_help_import_no_torch(flag: str) -> None:
    """The installed script answers --version and --help without importing torch or pandas
    (``-X importtime`` lists every module the interpreter imported)."""
    assert SCRIPT.exists(), f"console script not installed at {SCRIPT} (pip install -e .)"
    r = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), flag],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    if flag == "--version":
        assert r.stdout.strip() == f"relu-doctor {__version__}"
    else:
        assert "demo" in r.stdout and "report" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert "relu_doctor.cli" in imported  # the listing is real
    assert not {m for m in imported if m.split(".")[0] in HEAVY}


def test_main_version_leaves_torch_unimported() -> None:
    """The same through ``cli.main`` in a fresh interpreter, checked on ``sys.modules``."""
    code = textwrap.dedent(
        """
        import sys
        from relu_doctor.cli import main
        try:
            main(["--version"])
        except SystemExit as e:
            assert e.code == 0, e.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:])
        assert not heavy, heavy
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def _train_script(run_dir: Path) -> str:
    return textwrap.dedent(
        f"""
        import time, torch, torch.nn as nn, torch.nn.functional as F, relu_doctor
        torch.set_num_threads(1)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        with relu_doctor.watch(net, log_every_n_steps=2, optimizer=opt, run_dir={str(run_dir)!r}) as doc:
            while True:
                F.cross_entropy(net(torch.randn(16, 6)), torch.randint(0, 2, (16,))).backward()
                opt.step(); opt.zero_grad(); doc.step()
                time.sleep(0.005)
        """
    )


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in the history table, read while (or after) it is written."""
    import warnings

    from relu_doctor.rundir import read_table

    if not (run_dir / "history").is_dir():
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the open stream may end mid-batch
        frame = read_table(run_dir, "history")
    return [] if frame.empty else sorted(int(s) for s in frame["step"].unique())


def test_run_killed_with_sigkill_still_gives_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _train_script(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(logged_steps(run_dir)) < 4:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "training wrote too few parts in 120 s"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Report:" in out
    # ... that says the run did not end cleanly, in both forms
    said = f"its writer, process {proc.pid}, ended without closing it (killed, or crashed)"
    assert f"Not closed: {said}" in out
    assert said in (run_dir / "report.html").read_text(encoding="utf-8")
    data = data_island(run_dir / "report.html")
    assert data["steps"] == logged_steps(run_dir)  # every logged step, and no other
    assert data["steps"][:4] == [2, 4, 6, 8]
    assert {s["site"] for s in data["sites"]} == {"1", "3"}


@pytest.mark.parametrize("ending", ["raise", "never closed", "closed"])
def test_a_process_that_exits_with_its_run_open_leaves_it_marked_not_closed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ending: str
) -> None:
    """An uncaught error in a loop no callback sees end (HF's Trainer, Keras' fit), or a
    script that never closes its watch: the run reads as not closed (it read as closed: the
    lock went at exit), with what was logged; closed, it reads as closed. A new writer
    takes the directory over."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import torch, torch.nn as nn, relu_doctor
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        doc = relu_doctor.watch(net, log_every_n_steps=2, optimizer=opt, run_dir={str(run_dir)!r})
        for step in range(1, 8):
            net(torch.randn(16, 6)).square().mean().backward()
            opt.step(); opt.zero_grad(); doc.step()
            if step == 5 and {ending!r} == "raise":
                raise RuntimeError("boom")
        if {ending!r} == "closed":
            doc.close()
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == (1 if ending == "raise" else 0), proc.stderr
    # (closed: its last, partial window logged, as leaving a with block does)
    assert logged_steps(run_dir) == {"raise": [2, 4], "never closed": [2, 4, 6],
                                     "closed": [2, 4, 6, 7]}[ending]
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    said = ("exited without closing it (an error it did not catch, or a loop that never "
            "closed its watch)")
    if ending == "closed":
        assert "Not closed" not in out and load_run(run_dir).writer_open == ""
        return
    assert "Not closed: its writer, process " in out and said in out
    assert said in (run_dir / "report.html").read_text(encoding="utf-8")
    with pytest.warns(relu_doctor.ReluDoctorWarning, match="taking over the lock"):
        relu_doctor.watch(nn.Sequential(nn.Linear(6, 12), nn.ReLU()), run_dir=run_dir,
                          resume=True).close()
    assert load_run(run_dir).writer_open == ""


# ---------------------------------------------------------------------- in process


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"relu-doctor {__version__}"


@pytest.mark.parametrize("argv, needles", [
    ([], ["a command is required"]),
    (["bogus"], ["invalid choice"]),
    (["report"], ["RUN_DIR"]),
    (["demo", "--steps", "many"], ["--steps: invalid int value: 'many'"]),
    # the checks of relu_doctor._validate, naming the option and the value
    (["demo", "--steps", "0"], ["--steps: expected", ">= 1", "got 0"]),
    (["demo", "--threads", "-2"], ["--threads: expected", ">= 1", "got -2"]),
    (["demo", "--lr", "-1"], ["--lr: expected a positive", "got -1.0"]),
    (["demo", "--lr", "nan"], ["--lr: expected a positive", "got nan"]),
    # an unknown option of a command is the command's, its help named (a report trial:
    # "relu-doctor: error: unrecognized arguments: --bogus (see 'relu-doctor --help')")
    (["demo", "--frobnicate"], ["relu-doctor demo: error: unrecognized arguments: "
                                "--frobnicate (see 'relu-doctor demo --help')"]),
    (["report", "--bogus", "run"], ["relu-doctor report: error: unrecognized arguments: "
                                    "--bogus (see 'relu-doctor report --help')"]),
    (["report", "run1", "run2"], ["relu-doctor report: error: unrecognized arguments: run2"]),
    (["--bogus"], ["relu-doctor: error: unrecognized arguments: --bogus"]),
    # (before the command word: not the command's, whose own option it may be, a review)
    (["--quiet", "report", "run"], ["relu-doctor: error: unrecognized arguments: --quiet"]),
])
def test_argument_errors(
    argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("relu-doctor")
    for needle in needles:
        assert needle in line


@pytest.mark.parametrize("command", [[], ["demo"], ["report"]])
def test_help_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: relu-doctor" in capsys.readouterr().out


def test_report_of_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["empty", "foreign", "file", "old-format"])
def test_report_of_an_unusable_directory(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "d"
    if kind == "file":
        d.write_text("x")
    else:
        d.mkdir()
    if kind == "foreign":
        (d / "data.csv").write_text("a,b\n")
    if kind == "old-format":
        (d / "meta.json").write_text(json.dumps({"format_version": 99, "versions": {"relu_doctor": "9.9"}}))
    assert main(["report", str(d)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("relu-doctor report: error:") and str(d) in line


def test_report_of_an_empty_path_and_to_a_path_through_a_file_say_which(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``report ""`` read the current directory; ``-o afile/x.html`` said 'File exists'."""
    assert main(["report", ""]) == 2
    assert "RUN_DIR: got an empty path ''" in one_line_error(capsys.readouterr().err)
    from relu_doctor.history import RunWriter

    writer = RunWriter(tmp_path / "run")
    writer.write_meta({"sites": []})
    writer.close()
    (tmp_path / "afile").write_text("x")
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "afile" / "x.html")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{str(tmp_path / 'afile')!r} is a file, not a directory" in line, line


def test_report_names_the_runs_inside_a_parent_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relu_doctor.history import RunWriter

    RunWriter(tmp_path / "untreated").write_meta({"sites": []})
    assert main(["report", str(tmp_path)]) == 2
    assert "It holds run directories: untreated" in one_line_error(capsys.readouterr().err)


def test_a_reader_that_leaves_the_pipe_stops_the_report_quietly(tmp_path: Path) -> None:
    """``relu-doctor report RUN | head -1``: the reader leaves before the summary is printed.
    The report is written; the command stops without a word, with a tool's SIGPIPE status
    (it said "cannot make the report ...: BrokenPipeError" and exited 2)."""
    from tests.reports.conftest import dead_unit_model, train

    run_dir = tmp_path / "run"
    train(dead_unit_model(), run_dir, steps=6, log_every=3, report=False)
    proc = subprocess.Popen([sys.executable, "-m", "relu_doctor.cli", "report", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it prints: it takes seconds to import and render
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "" and (run_dir / "report.html").is_file()


def test_report_writes_html_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.reports.conftest import dead_unit_model, train

    run_dir = tmp_path / "run"
    train(dead_unit_model(), run_dir, steps=6, log_every=3, report=False)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert (run_dir / "report.html").is_file()
    assert "problem" in out.splitlines()[0]
    assert "Not closed" not in out  # a run that ended cleanly
    assert "act1" in out and f"Report: {run_dir / 'report.html'}" in out
    # -o into a directory that does not exist yet; -q prints only the path
    target = tmp_path / "new" / "sub" / "r.html"
    assert main(["report", str(run_dir), "-o", str(target), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert data_island(target)["steps"] == [3, 6]
    assert load_run(run_dir).last_step == 6
    # an unwritable output is a one-line error
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    assert main(["report", str(run_dir), "-o", str(blocker / "r.html")]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "cannot write the report" in error and "-o PATH" not in error  # (-o was given)
    # a run directory it may not write into (a read-only copy): told how to write elsewhere
    def denied(self: object, path: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Report, "save", denied)
        assert main(["report", str(run_dir)]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        f"relu-doctor report: error: cannot write the report to "
        f"{str(run_dir / 'report.html')!r}: Permission denied. Write it elsewhere with -o PATH "
        "(a read-only copy of a run, say).")
    # an output that would overwrite one of the run's own files is refused, the run kept
    meta = (run_dir / "meta.json").read_bytes()
    assert main(["report", str(run_dir), "-o", str(run_dir / "meta.json")]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(
        f"relu-doctor report: error: --output: {str(run_dir / 'meta.json')!r} is inside the run "
        "directory the report is made from and is not an .html file")
    assert (run_dir / "meta.json").read_bytes() == meta
    # ... and so is one among a table's parts: a folder of the run's records
    parts = sorted(p.name for p in (run_dir / "history").iterdir())
    for given, named, folder in [
        (run_dir / "history", run_dir / "history" / "report.html", "history"),
        (run_dir / "history" / "r.html", run_dir / "history" / "r.html", "history"),
        (run_dir / "sub" / "x.html", run_dir / "sub" / "x.html", "sub"),  # (not made: said so)
    ]:
        assert main(["report", str(run_dir), "-o", str(given)]) == 2
        assert one_line_error(capsys.readouterr().err).startswith(
            f"relu-doctor report: error: --output: {str(named)!r} is in a folder ({folder!r}) "
            "of the run directory the report is made from, where the run keeps its records")
    assert not (run_dir / "sub").exists()
    assert sorted(p.name for p in (run_dir / "history").iterdir()) == parts
    assert main(["report", str(run_dir), "-o", str(run_dir / "again.html"), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "again.html")
    # a directory is given its report.html: the run directory's own, or another
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir), "-o", str(run_dir), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    assert data_island(run_dir / "report.html")["steps"] == [3, 6]
    assert Report(load_run(run_dir)).save(tmp_path / "new") == tmp_path / "new" / "report.html"
    # a path ending in a slash is a directory, made if new (it wrote a file named "fresh")
    assert Report(load_run(run_dir)).save(f"{tmp_path}/fresh/") == tmp_path / "fresh" / "report.html"
    assert main(["report", str(run_dir), "-o", f"{tmp_path}/cli/", "-q"]) == 0
    assert (tmp_path / "cli" / "report.html").is_file()


def test_the_interpreters_resource_warnings_go_to_the_caller_not_onto_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unclosed file of the caller's, collected while ``main`` runs in process, is not a
    warning about the run: it goes back to the caller's filters, and the report's stderr keeps
    only the run's own warnings."""
    import warnings

    import relu_doctor.cli as cli

    def report(args: object, prog: str) -> int:
        warnings.warn("unclosed file <_io.BufferedReader name=7>", ResourceWarning, stacklevel=1)
        warnings.warn("relu_doctor: part 3 of the history is damaged", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_report", report)
    with pytest.warns(ResourceWarning, match="unclosed file"):
        assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["relu-doctor report: warning: part 3 of the history is damaged"]


def test_output_never_overwrites_another_runs_records_or_a_file_not_a_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``-o`` guarded the reported run only: ``-o runs/other/meta.json`` wrote HTML over
    another run's meta, which then could not be read, and ``-o notes.txt`` replaced a user's
    file (a report trial). Both are refused with one line, the files left as they were; a
    report of ours is still replaced, and a path elsewhere still written."""
    from tests.reports.conftest import dead_unit_model, train

    runs = tmp_path / "runs"
    train(dead_unit_model(), runs / "a", steps=6, log_every=3, report=False)
    train(dead_unit_model(), runs / "b", steps=6, log_every=3, report=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    meta = (runs / "b" / "meta.json").read_bytes()
    for out in (runs / "b" / "meta.json", runs / "b" / "report.html", runs / "b",
                runs / "b" / "history" / "x.html", notes):
        assert main(["report", str(runs / "a"), "-o", str(out)]) == 2, out
        error = one_line_error(capsys.readouterr().err)
        assert ("another run's directory" in error) == (out != notes), error
        assert ("is not a relu_doctor report" in error) == (out == notes), error
    assert (runs / "b" / "meta.json").read_bytes() == meta and notes.read_text() == "my notes"
    assert not (runs / "b" / "report.html").exists()
    load_run(runs / "b")  # still readable
    mine = tmp_path / "out" / "a.html"
    for _ in range(2):  # a report of ours is replaced
        assert main(["report", str(runs / "a"), "-o", str(mine), "-q"]) == 0
        assert capsys.readouterr().out.strip() == str(mine)
    assert data_island(mine)["steps"] == [3, 6]
    foreign = tmp_path / "dataset"  # another tool's meta.json: no run of ours
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"classes": 10}')
    assert main(["report", str(runs / "a"), "-o", str(foreign / "r.html"), "-q"]) == 0
    empty = tmp_path / "made.html"  # an empty file made for it (mkstemp, touch): written
    empty.touch()
    assert main(["report", str(runs / "a"), "-o", str(empty), "-q"]) == 0
    assert data_island(empty)["steps"] == [3, 6]
    train(dead_unit_model(), runs / "c", steps=6, log_every=3)  # (its own report.html)
    link = tmp_path / "pub" / "latest.html"  # a link elsewhere to another run's report
    link.parent.mkdir()
    link.symlink_to(runs / "c" / "report.html")
    kept = (runs / "c" / "report.html").read_bytes()
    assert main(["report", str(runs / "a"), "-o", str(link), "-q"]) == 0  # the link replaced
    assert (runs / "c" / "report.html").read_bytes() == kept and not link.is_symlink()


def test_report_shows_its_progress_on_a_terminal_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report trial: a report of 120 sites x 400 logs took 29 s with nothing said. On a
    terminal, stderr shows one line of progress, each replacing the last, the last cleared,
    a line a figure; elsewhere (a pipe, a log) stderr holds warnings and errors alone."""
    import io

    from tests.reports.conftest import dead_unit_model, train

    run_dir = tmp_path / "run"
    train(dead_unit_model(), run_dir, steps=6, log_every=3, report=False)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(["report", str(run_dir)]) == 0
    lines = sys.stderr.getvalue().split("\r\033[K")
    sites = len(load_run(run_dir).history["site"].unique())  # (a heatmap a site, here)
    drawn = [line for line in lines if "drawing figure" in line]
    assert lines[1] == f"relu-doctor report: reading {run_dir}..."
    assert drawn == [f"relu-doctor report: drawing figure {i} of {4 + sites}..."
                     for i in range(1, 5 + sites)]
    assert lines[-1] == ""  # (cleared before the summary)
    # an error clears the line first (a review: "reading nonexist...relu-doctor report: error")
    sys.stderr.truncate(0)
    sys.stderr.seek(0)
    assert main(["report", str(tmp_path / "nonexist")]) == 2
    assert sys.stderr.getvalue().split("\r\033[K")[-1].startswith("relu-doctor report: error:")
    monkeypatch.undo()
    assert main(["report", str(run_dir), "-q"]) == 0
    assert capsys.readouterr().err == ""
