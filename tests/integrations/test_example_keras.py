"""examples/keras_dense_relu.py runs as a test (--quick: one seed, smaller runs)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytest.importorskip("keras")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "keras_dense_relu.py"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_keras_example_treated_run_has_fewer_dead_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    results = main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "dead untreated" in out and "channels as units" in out
    pair = results["mlp"][0]
    u, t = pair["untreated"], pair["treated"]
    assert u["site"] == "dense" and u["units"] == 64
    assert u["dead"] > 16  # the learning rate kills a quarter of the units or more
    assert t["dead"] < u["dead"] and t["accuracy"] >= u["accuracy"]
    assert not u["interventions"] and t["interventions"]
    assert (tmp_path / "seed0" / "treated" / "report.html").is_file()
    conv = {s["site"]: s for s in results["convnet"]}
    assert [conv[n]["units"] for n in ("conv2d", "conv2d_1", "dense")] == [32, 64, 128]
    assert conv["conv2d"]["unit_dim"] == 3  # channels_last: filters on the last dim
