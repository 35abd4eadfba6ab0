"""Smoke test of the overhead benchmark (benchmarks/overhead.py) in its quick mode.

It checks the harness, never the timings: every configuration runs, all configurations
follow the same trajectory (same seed, same data; hooks only read), relu_doctor's counts
are exact and equal to the hand-written baseline's, and missing peers are reported as
"not installed" instead of failing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import overhead
from relu_doctor.stats import FIELDS

pytestmark = pytest.mark.benchmark

CORE_KEYS = ("plain", "control", "rd_every", f"rd_{overhead.EVERY_N}", "rd_every_act", "naive")


@pytest.fixture(scope="module")
def results() -> list[overhead.ModelResult]:
    return overhead.run_benchmark(("cnn", "mlp", "resnet"), quick=True, rounds=1, peers=False)


def test_every_core_configuration_is_timed(results: list[overhead.ModelResult]) -> None:
    assert [r.spec.key for r in results] == ["cnn", "mlp", "resnet"]
    for r in results:
        for key in CORE_KEYS:
            t = r.core[key]
            assert t.ok, (r.spec.key, key, t.status)
            assert len(t.blocks) == 1 and len(t.blocks[0]) == overhead.EVERY_N
            assert all(x > 0 for x in t.blocks[0])
            assert t.ms_step() > 0
        q = r.ratio("rd_every")
        assert q is not None and q[0] <= q[1] <= q[2]
        assert r.log_step_s is not None and r.log_step_s > 0


def test_harness_checks_pass(results: list[overhead.ModelResult]) -> None:
    for r in results:
        assert set(r.checks) >= {
            "same_trajectory[rd_every]",
            f"same_trajectory[rd_{overhead.EVERY_N}]",
            "same_trajectory[naive]",
            "same_trajectory[control]",
            "exact_counts[rd_every]",
            f"exact_counts[rd_{overhead.EVERY_N}]",
            "exact_counts[rd_every_act]",
            "naive_active==relu_doctor",
            "naive_grad_sq~relu_doctor",
        }
        assert all(r.checks.values()), (r.spec.key, r.checks)


def test_persistent_state_is_per_unit(results: list[overhead.ModelResult]) -> None:
    for r in results:
        nbytes, units = r.core["rd_every"].state_bytes  # type: ignore[misc]
        assert units > 0
        assert nbytes / units == 2 * len(FIELDS) * 8  # window + lifetime, float64 per field
        _, naive_units = r.core["naive"].state_bytes  # type: ignore[misc]
        if r.spec.key != "resnet":  # the baseline mixes the calls of a reused module
            assert naive_units == units


def test_report_has_one_table_with_every_model(results: list[overhead.ModelResult]) -> None:
    text = overhead.format_report(results, torch.device("cpu"))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("configuration"))
    assert "CNN" in header and "MLP" in header and "ResNet" in header
    for label in ("relu_doctor, every step", "naive hooks", "Cockpit", "wandb.watch"):
        assert any(line.startswith(label) for line in lines), label
    assert "harness checks: all passed" in text


def test_missing_peers_are_reported_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *a: object, **k: object) -> object:
        if name.split(".")[0] in {"cockpit", "backpack", "wandb"}:
            return None
        return real(name, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(overhead.importlib.util, "find_spec", find_spec)
    rc = overhead.main(["--quick", "--models", "mlp", "--rounds", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    cockpit = next(line for line in out.splitlines() if line.startswith("Cockpit"))
    wandb = next(line for line in out.splitlines() if line.startswith("wandb.watch"))
    assert "not installed" in cockpit and "not installed" in wandb


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="--models"):
        overhead.run_benchmark(("vgg",), quick=True)


def test_floor_script_times_every_site_shape() -> None:
    from benchmarks import floor

    rows = floor.measure(reps=1)
    assert [(r["model"], r["shape"]) for r in rows] == [(m, s) for m, s, _ in floor.SITES]
    for r in rows:
        assert r["floor"] == pytest.approx(r["sum"] + r["sum sq"] + r["count"])
        assert all(r[k] > 0 for k in ("relu_", "forward_rows", "grad_rows"))
    text = floor.format_rows(rows)
    assert all(f"  {m}: " in text for m in ("CNN", "MLP", "ResNet"))


def test_the_per_call_benchmark_runs_and_restores_the_front() -> None:
    from benchmarks import percall
    from relu_doctor._kernels import cpu

    cpu._load()
    front = cpu._front
    got = percall.measure(sites=2, blocks=2, steps=2)
    assert {"plain", "forward hook, empty", "+ node hook, empty", "relu_doctor"} <= got.keys()
    assert got["plain"] == 0.0
    assert cpu._front is front  # the ctypes copy swapped it only while it ran


def test_the_in_step_split_runs_and_restores_the_front() -> None:
    from benchmarks import percall
    from relu_doctor import _kernels
    from relu_doctor._kernels import cpu

    cpu._load()
    front = cpu._front
    squares = _kernels.sum_squares_into
    got = percall.in_step("cnn", blocks=2, steps=2, quick=True)
    assert cpu._front is front and _kernels.sum_squares_into is squares
    assert 0 < got["hooks"] < got["step"]
    if front is not None:  # (without a built kernel there is nothing to swap)
        assert got["hooks, no kernels"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_harness_holds_under_autocast(dtype: torch.dtype) -> None:
    # --autocast: relu_doctor reads 16-bit activations (fp16 through a GradScaler), and its
    # counts still match the hand-written baseline's and every run's trajectory
    (r,) = overhead.run_benchmark(("resnet",), quick=True, rounds=1, peers=False, autocast=dtype)
    assert all(r.checks.values()) and "naive_grad_sq~relu_doctor" in r.checks, r.checks
    rd = r.core["rd_every"]
    assert rd.ok, rd.status


def test_the_paired_logging_step_benchmark_runs() -> None:
    from benchmarks import logstep

    ratios = logstep.paired_log_ratio("mlp", logs=2, log_every=2, threads=1)
    assert len(ratios) == 2 and all(r > 0 for r in ratios)


def test_the_paired_benchmark_splits_a_sampling_configuration_by_phase() -> None:
    from benchmarks import paired

    plain = [1.0, 2.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    times = [1.5, 2.2, 1.0, 1.4, 2.4, 0.9, 1.3]
    collected = [True, False, False, True, False, False, True]
    line = paired._phases("default", times, plain, collected)
    total = sum(plain)  # 9.0
    # collecting: steps 0, 3, 6 (ratios 1.5, 1.4, 1.3); after: 1, 4 (1.1, 1.2); others: 2, 5
    assert line == (
        f"  default: collecting 3 steps {1.4:.3f}x (adds {(0.5 + 0.4 + 0.3) / total:+.1%}), "
        f"after 2 steps {1.15:.3f}x (adds {(0.2 + 0.4) / total:+.1%}), "
        f"others 2 steps {0.95:.3f}x (adds {-0.1 / total:+.1%})"
    )


def test_the_paired_benchmark_runs_and_times_each_doctor_on_its_own_steps(monkeypatch) -> None:
    from benchmarks import paired

    lines = paired.paired("mlp", ["default", "every"], rounds=10, threads=1, quick=True)
    rows = {line.split()[0]: line for line in lines[2:] if not line.startswith(" ")}
    assert set(rows) == {"plain", "A/A", "default", "every"}, lines
    assert "every 1" in rows["every"] and "its estimate" in rows["default"]
    # a default-settings copy's budget reads the copy's own clock
    spec = overhead.model_specs(quick=True)["mlp"]
    cpu = torch.device("cpu")
    runner = overhead.DoctorRunner(spec, overhead._make_data(spec, cpu), cpu, every_n=None)
    runner.attach()
    try:
        own = paired.own_clock(runner)
        assert runner.doc.sampler.clock.now == own.now
    finally:
        runner.close()
    # the clock stops between a configuration's steps: other copies' steps are not its time
    now = [0.0]
    monkeypatch.setattr(paired.time, "perf_counter", lambda: now[0])
    own = paired.OwnTime()
    own.begin()
    now[0] = 2.0
    assert own.now() == 2.0 and own.end() == 2.0
    now[0] = 10.0  # another copy's step
    assert own.now() == 2.0
    own.begin()
    now[0] = 11.5
    assert own.end() == 1.5 and own.now() == 3.5
