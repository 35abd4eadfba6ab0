"""The ``relu-doctor`` command: exit codes and one-line errors (through the installed console
script, in a subprocess), the report command, and a run killed with SIGKILL mid-training."""

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

from relu_doctor import __version__
from relu_doctor.cli import main
from relu_doctor.history import load_run

SCRIPT = Path(sys.executable).with_name("relu-doctor")


def relu_doctor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "relu_doctor.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


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


# ---------------------------------------------------------------------- subprocess


def test_version_and_help_through_the_console_script() -> None:
    r = relu_doctor("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"relu-doctor {__version__}"
    r = relu_doctor("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "report" in r.stdout


def test_bad_argument_exits_2_with_one_line() -> None:
    r = relu_doctor("demo", "--steps", "many")
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert "--steps" in line and "'many'" in line


def test_report_of_a_missing_directory_exits_2(tmp_path: Path) -> None:
    r = relu_doctor("report", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "does not exist" in one_line_error(r.stderr)


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


def test_run_killed_with_sigkill_still_gives_a_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _train_script(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list((run_dir / "history").glob("part-*.parquet"))) < 4:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "training wrote too few parts in 120 s"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    r = relu_doctor("report", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "Report:" in r.stdout
    parts = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "history").glob("part-*.parquet"))
    data = data_island(run_dir / "report.html")
    assert data["steps"] == parts  # every logged step, and no other
    assert data["steps"][:4] == [2, 4, 6, 8]
    assert {s["site"] for s in data["sites"]} == {"1", "3"}


# ---------------------------------------------------------------------- in process


@pytest.mark.parametrize("argv, needle", [
    ([], "a command is required"),
    (["bogus"], "invalid choice"),
    (["report"], "RUN_DIR"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--lr", "-1"], "--lr"),
    (["demo", "--frobnicate"], "unrecognized arguments"),
])
def test_argument_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("command", [[], ["demo"], ["report"]])
def test_help_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: relu-doctor" in capsys.readouterr().out


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


def test_report_names_the_runs_inside_a_parent_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relu_doctor.history import RunWriter

    RunWriter(tmp_path / "untreated").write_meta({"sites": []})
    assert main(["report", str(tmp_path)]) == 2
    assert "It holds run directories: untreated" in one_line_error(capsys.readouterr().err)


def test_report_writes_html_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.reports.conftest import dead_unit_model, train

    run_dir = tmp_path / "run"
    train(dead_unit_model(), run_dir, steps=6, log_every=3, report=False)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert (run_dir / "report.html").is_file()
    assert "problem" in out.splitlines()[0]
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
    assert "cannot write the report" in one_line_error(capsys.readouterr().err)
