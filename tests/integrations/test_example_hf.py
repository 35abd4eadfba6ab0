"""examples/hf_trainer.py runs as a test (--quick: 8 optimizer steps)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_hf_example_resumes_with_the_same_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    results = main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "counts equal the uninterrupted run's: True" in out
    assert results["same"]
    assert results["sites"] == [
        f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)
    ]
    full = results["full"]
    assert sorted(full["step"].unique()) == [4, 8]
    assert (tmp_path / "full" / "relu_doctor" / "meta.json").is_file()
    assert (tmp_path / "full" / "checkpoint-4" / "relu_doctor.pt").is_file()
