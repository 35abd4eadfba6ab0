"""``relu-doctor demo --quick`` end to end (a subprocess, as a user runs it), the demo's
handling of its output directory, and where its progress lines go."""

from __future__ import annotations

import io
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relu_doctor.cli import main
from relu_doctor.demo import (
    MARKER,
    DemoConfig,
    compare_seeds,
    make_model,
    make_task,
    prepare_out,
    run_demo,
)
from relu_doctor.errors import ReluDoctorError
from relu_doctor.history import load_run

SCRIPT = Path(sys.executable).with_name("relu-doctor")


def _data(report: Path) -> dict:
    m = re.search(r'id="relu-doctor-data">(.*?)</script>', report.read_text(encoding="utf-8"), re.S)
    assert m is not None
    return json.loads(m.group(1))


@pytest.mark.slow
def test_quick_demo_kills_units_untreated_and_treats_them(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "relu_doctor.cli"]
    r = subprocess.run([*cmd, "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # progress on stderr, where everything is on stdout
    assert "[untreated] step" in r.stderr and "[  treated] step" in r.stderr
    assert f"tensorboard --logdir {out}" in r.stdout
    for name in ("untreated", "treated"):
        run_dir = out / name
        assert str(run_dir / "report.html") in r.stdout
        assert list(run_dir.glob("events.out.tfevents.*"))
        run = load_run(run_dir)
        assert run.last_step == DemoConfig.quick().steps
    untreated, treated = load_run(out / "untreated"), load_run(out / "treated")
    dead = {
        name: run.history[run.history["step"] == run.last_step]["dead"].sum()
        / run.history[run.history["step"] == run.last_step]["units"].sum()
        for name, run in (("untreated", untreated), ("treated", treated))
    }
    assert dead["untreated"] > 0.3  # the learning rate really kills units
    assert dead["treated"] < dead["untreated"] / 2  # and the remedies keep most alive
    assert not untreated.interventions()
    remedies = {e["remedy"] for e in treated.interventions()}
    assert {"dormant_reset", "lr_rescue"} <= remedies  # the plan's recycling and lr cuts
    # the plan: one change per site per cooldown (2 intervals of 10 steps), each judged
    changes = [e for e in treated.interventions()  # (a clipper's window reports: no change)
               if not str(e["what"]).startswith("switched AutoClip off")
               and "clip" not in (e.get("details") or {})]
    steps: dict[str, list[int]] = {}
    for e in changes:
        steps.setdefault(e["site"], []).append(int(e["step"]))
    assert all(b - a >= 20 for s in steps.values() for a, b in itertools.pairwise(s))
    assert all(e.get("verdict") in ("helped", "did not help") for e in changes[:-2])
    assert _data(out / "untreated" / "report.html")["verdict"] == "critical"
    # the report's count is the demo's table's (rows: a clipper's run of windows is one),
    # and it embeds the events too
    data = _data(out / "treated" / "report.html")
    printed = re.search(r"^\s*interventions\s+(\d+)\s+(\d+)$", r.stdout, re.M)
    assert printed is not None and printed.group(1) == "0"
    assert data["interventions"] == int(printed.group(2)) <= data["intervention_events"]
    assert data["intervention_events"] == len(treated.interventions())


def test_demo_refuses_a_foreign_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not made by the demo" in err
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_demo_replaces_its_own_previous_output(tmp_path: Path) -> None:
    out = prepare_out(tmp_path / "d")
    (out / "untreated").mkdir()
    (out / "untreated" / "meta.json").write_text("{}")
    (out / "keep.txt").write_text("user file next to the runs")
    prepare_out(out)
    assert not (out / "untreated").exists()
    assert (out / MARKER).is_file() and (out / "keep.txt").is_file()
    with pytest.raises(ReluDoctorError, match="not a directory"):
        prepare_out(out / "keep.txt")


def test_task_and_model_are_deterministic() -> None:
    cfg = DemoConfig.quick()
    a, b = make_task(cfg), make_task(cfg)
    for x, y in zip(a, b, strict=True):
        assert (x == y).all()
    assert a[0].shape == (cfg.train_size, cfg.dim) and int(a[1].max()) < cfg.classes
    # every class is present: the task is not degenerate
    assert len(set(a[1].tolist())) == cfg.classes
    m1, m2 = make_model(cfg), make_model(cfg)
    assert all((p == q).all() for p, q in zip(m1.parameters(), m2.parameters(), strict=True))
    assert [n for n, _ in m1.named_children()] == ["fc1", "relu1", "fc2", "relu2", "fc3", "relu3", "head"]


def test_demo_with_fewer_steps_than_one_interval_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--steps", "5", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps" in err
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_stream_false_silences_the_demo(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Regression: ``run_demo(stream=False)`` crashed (it printed to ``False``) though its
    docstring says False silences it."""
    res = run_demo(tmp_path / "d", quick=True, steps=10, stream=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert list(res.runs) == ["untreated", "treated"]  # the remedies are always there
    for r in res.runs.values():
        assert r.report.is_file() and load_run(r.run_dir).last_step == 10
        assert 0 <= r.dead_units <= r.units == 3 * DemoConfig.quick().width
    assert not hasattr(res, "treated_available")


def test_progress_goes_to_the_given_stream(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    sink = io.StringIO()
    res = run_demo(tmp_path / "d", quick=True, steps=10, stream=sink)
    lines = sink.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[untreated", "[  treated"]
    assert all("step   10/10" in line for line in lines)
    last = load_run(res.runs["untreated"].run_dir)
    final = last.history[last.history["step"] == 10]
    assert f"dead units {int(final['dead'].sum())}/{int(final['units'].sum())}" in lines[0]
    assert capfd.readouterr().err == ""  # not also on stderr


@pytest.mark.slow
def test_treated_beats_untreated_over_three_seeds(tmp_path: Path) -> None:
    """The issue's bar: fewer dead units and a better accuracy, by a clear margin, over 3
    seeds (mean and spread printed), the plan's loss curve without a jump."""
    out = io.StringIO()
    table = compare_seeds(tmp_path / "seeds", seeds=3, quick=True, stream=out)
    text = out.getvalue()
    assert "treated: accuracy" in text and "(3 seeds)" in text
    acc_u, acc_t = table["untreated"]["accuracy"], table["treated"]["accuracy"]
    dead_u, dead_t = table["untreated"]["dead"], table["treated"]["dead"]
    for seed in range(3):  # on every seed, not only on average
        assert acc_t[seed] > acc_u[seed] + 0.02, (seed, acc_u, acc_t)
        assert dead_t[seed] < dead_u[seed] / 2, (seed, dead_u, dead_t)
    # no loss jump: the logged loss never rises by half between two logging steps
    assert all(j < 1.5 for j in table["treated"]["loss_jump"]), table["treated"]["loss_jump"]
