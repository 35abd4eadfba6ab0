"""examples/lightning_monitor.py runs as a test (two epochs instead of four)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

import relu_doctor
from relu_doctor.callbacks import ReluDoctorWarning

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_monitor.py"


@pytest.mark.filterwarnings("ignore::UserWarning:lightning.*")
def test_example_runs_and_finds_dying_units(tmp_path, capsys):
    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    with pytest.warns(ReluDoctorWarning, match=r"dead at net\.3 .*Remedy: Lower the learning rate .*swap ReLU for LeakyReLU"):
        monitor = main(["--out", str(tmp_path), "--epochs", "2"])
    out = capsys.readouterr().out
    assert "Findings at the last step:" in out and "dead (no activation)" in out

    doctor = monitor.doctor
    assert doctor.global_step == 2 * 1024 // 32
    run = relu_doctor.load_run(doctor.run_dir)
    assert sorted(run.history["site"].unique()) == ["net.1", "net.3"]
    assert run.history["step"].max() == 64
    assert any(f.kind == "dead" and f.site == "net.3" for f in run.findings())
    val = relu_doctor.load_run(doctor.run_dir / "validation")
    assert sorted(val.history["step"].unique()) == [32, 64]  # one window per epoch's validation

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(doctor.run_dir.parent))
    ea.Reload()
    scalars = ea.Tags()["scalars"]
    assert "relu_doctor/dead_fraction/net.3" in scalars
    assert "relu_doctor_val/sparsity/net.1" in scalars
    assert "train_loss" in scalars  # the model's own metrics share the logger
