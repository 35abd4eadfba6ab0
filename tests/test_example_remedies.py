"""examples/remedies_treated_vs_untreated.py runs as a test (150 steps instead of 300)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

import relu_doctor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "remedies_treated_vs_untreated.py"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning:lightning.*", "ignore:.*LeafSpec.*")
def test_example_treats_what_kills_the_untreated_run(tmp_path, capsys):
    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    results = main(["--out", str(tmp_path), "--steps", "150"])
    out = capsys.readouterr().out
    assert "untreated     treated" in out and "Interventions in the treated run" in out

    u, t = results["untreated"], results["treated"]
    # Untreated, the glitches kill the second layer; treated, it lives and the task is learnt.
    assert u["dead net.3"] > 0.5 and t["dead net.3"] < 0.1
    assert u["below tau net.3"] > 0.5 and t["below tau net.3"] < 0.2
    assert t["accuracy"] > u["accuracy"] + 0.3
    remedies = {e["remedy"] for e in t["interventions"]}
    assert {"adaptive_grad_clip", "dormant_reset", "lr_rescue"} <= remedies
    assert not u["interventions"]
    # Each intervention has its metrics before and (one interval later) after, but the
    # clipper's reports of what each window clipped, which are not judged.
    done = [e for e in t["interventions"] if e["step"] < 150]
    reports = [e for e in done if e["remedy"] == "adaptive_grad_clip"]
    assert reports and all(e["details"]["judged"] is False for e in reports)
    assert all(e["before"] is not None and (e["after"] is not None or e in reports)
               for e in done)

    run = relu_doctor.load_run(tmp_path / "treated" / "relu_doctor")
    assert len(run.interventions()) == len(t["interventions"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(
        str(tmp_path / "treated" / "relu_doctor"), size_guidance={"tensors": 0}
    )
    ea.Reload()
    assert "relu_doctor/events/text_summary" in ea.Tags()["tensors"]
    texts = [
        t.tensor_proto.string_val[0].decode() for t in ea.Tensors("relu_doctor/events/text_summary")
    ]
    assert any("dormant_reset" in s for s in texts) and any("lr_rescue" in s for s in texts)
