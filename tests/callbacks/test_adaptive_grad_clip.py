"""AdaptiveGradClip in a real Trainer on CPU: spikes contained, the threshold logged,
argument checks, and the norm history round-tripping through a checkpoint."""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import CSVLogger

from relu_doctor.callbacks import AdaptiveGradClip, ReluDoctor
from relu_doctor.errors import ReluDoctorError
from tests.callbacks.remedy_models import FILTERS, interventions, loader, make, resume, trainer

pytestmark = pytest.mark.filterwarnings(*FILTERS)


def test_adaptive_grad_clip_contains_spikes_and_logs_threshold(tmp_path):
    """Every 10th batch has targets x50: untreated, the spikes kill most units of net.3."""

    def run(clip: bool) -> tuple[float, ReluDoctor, AdaptiveGradClip | None]:
        model = make(spike_every=10, spike=50.0, lr=0.05, hidden=32)
        mon = ReluDoctor(log_every_n_steps=10)
        cb = AdaptiveGradClip("autoclip", percentile=10) if clip else None
        root = tmp_path / str(clip)
        trainer(
            root,
            [mon] + ([cb] if cb else []),
            max_steps=120,
            logger=CSVLogger(root, name="csv", version=0),
        ).fit(model, loader())
        return (
            float(mon.doctor.history().query("site == 'net.3'")["dead_fraction"].iloc[-1]),
            mon,
            cb,
        )

    dead_u, _, _ = run(False)
    dead_t, mon, cb = run(True)
    print(f"dead fraction of net.3 at the last log: {dead_u:.3f} -> {dead_t:.3f}")
    assert not dead_u < 0.5 and dead_t < 0.1, (dead_u, dead_t)  # NaN: diverged, counts
    evs = interventions(mon)
    assert evs and all(
        e["remedy"] == "adaptive_grad_clip" and e["details"]["clip"]["clipped"] > 0
        for e in evs
    )
    csv = (tmp_path / "True" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "relu_doctor/clip/threshold" in csv and "relu_doctor/clip/fraction" in csv
    assert "relu_doctor/clip/grad_norm" in csv
    assert len(cb.clippers[0].norm_history) == 120
    # each window's norm before clipping: the RMS of the norms of its steps, as the history
    # holds them
    history = cb.clippers[0].norm_history.double()
    for e in evs:
        window = history[e["step"] - 10 : e["step"]]
        want = float(window.square().mean().sqrt())
        assert e["before"]["unclipped_grad_norm"] == pytest.approx(want, rel=1e-6)


def test_arguments_are_validated():
    with pytest.raises(ReluDoctorError, match="mode: expected one of"):
        AdaptiveGradClip("norm")
    with pytest.raises(ReluDoctorError, match="percentile"):
        AdaptiveGradClip(percentile=200)
    with pytest.raises(ReluDoctorError, match="clipping"):
        AdaptiveGradClip("agc", clipping=-1.0)
    with pytest.raises(ReluDoctorError, match="exclude"):
        AdaptiveGradClip(exclude=["head.*", ""])
    with pytest.raises(TypeError):
        AdaptiveGradClip("autoclip", 10.0)  # type: ignore[misc]  # keyword-only after the first


def test_the_trainers_own_clipping_is_refused_before_anything_is_hooked(tmp_path):
    """``gradient_clip_val`` beside AdaptiveGradClip: both clipped, silently, and the norms
    relu_doctor recorded were before the Trainer's clip. Refused now at the fit's start, as
    HF's ``max_grad_norm`` and Keras' ``clipnorm`` are, naming what to do; nothing was
    hooked, so the same callbacks fit again once the Trainer clips no more, on the same run
    directory, and clip."""
    model = make(lr=0.05, hidden=32)
    mon, cb = ReluDoctor(log_every_n_steps=4, run_dir=tmp_path / "run"), AdaptiveGradClip()
    with pytest.raises(ReluDoctorError, match=r"gradient_clip_val=0\.5, gradient_clip_algorithm="
                       r"'norm'\).*pass Trainer\(gradient_clip_val=None\)"):
        trainer(tmp_path, [mon, cb], max_steps=8, gradient_clip_val=0.5,
                gradient_clip_algorithm="norm").fit(model, loader())
    assert mon.doctor is None or not mon.doctor.probe.attached
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    trainer(tmp_path, [mon, cb], max_steps=8).fit(model, loader())
    assert len(cb.clippers[0].norm_history) == 8


def test_norm_history_round_trips_through_a_checkpoint(tmp_path):
    def cbs():
        return [ReluDoctor(log_every_n_steps=4), AdaptiveGradClip("autoclip", history=50)]

    first, saved, second, probe = resume(tmp_path, cbs, steps=8, resume_steps=9)
    assert len(first[1].clippers[0].norm_history) == 8
    assert probe.remedies["AdaptiveGradClip"] == saved["AdaptiveGradClip"]
    assert len(second[1].clippers[0].norm_history) == 9  # 8 restored + the step after resume
    # Restored before the optimizers exist, the state waits in the callback, as it came.
    waiting = AdaptiveGradClip("autoclip", history=50)
    waiting.load_state_dict(first[1].state_dict())
    assert not waiting.clippers and waiting.state_dict().keys() == {"mode", "clippers"}
    # A state of the other mode is refused, naming both.
    with pytest.raises(ReluDoctorError, match=r"'autoclip'.*'agc'"):
        AdaptiveGradClip("agc").load_state_dict(first[1].state_dict())


def test_each_optimizers_clipper_has_events_of_its_own(tmp_path):
    """Manual optimization with two optimizers: each has a clipper, whose events had the
    same id and site as the other's (a result referred to both), and the report merged
    them into one row that counted twice the intervals."""
    import lightning as L
    import torch
    import torch.nn as nn

    import relu_doctor
    from relu_doctor.reports.context import build_context

    class TwoParts(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.a, self.b = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            for opt in self.optimizers():
                opt.zero_grad()
            scale = 50.0 if batch_idx % 3 == 0 else 1.0  # spikes: some steps get clipped
            self.manual_backward(((self.b(self.a(x)) - scale * y) ** 2).mean())
            for opt in self.optimizers():
                opt.step()

        def configure_optimizers(self):
            return (torch.optim.SGD(self.a.parameters(), lr=0.01),
                    torch.optim.SGD(self.b.parameters(), lr=0.01))

    import warnings

    mon = ReluDoctor(log_every_n_steps=4, every_n_steps=1, run_dir=tmp_path / "run")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path, [mon, AdaptiveGradClip("autoclip", percentile=50)],
                max_epochs=1, max_steps=-1).fit(TwoParts(), loader(n=192))
    evs = interventions(mon, "adaptive_grad_clip")
    assert {e["details"]["optimizer"] for e in evs} == {0, 1}
    assert len({e["id"] for e in evs}) == len(evs)
    assert all(e["what"].startswith(f"optimizer {e['details']['optimizer']}: ") for e in evs)
    rows = [r for r in build_context(relu_doctor.load_run(tmp_path / "run")).timeline
            if r.remedy == "adaptive_grad_clip"]
    for i in (0, 1):
        (row,) = [r for r in rows if r.optimizer == i]
        assert row.count == sum(e["details"]["optimizer"] == i for e in evs)
        # still model-wide (what the findings' "already done" reads), each said once
        assert row.site == "model"
    import re

    said = {m.group(1) for w in seen
            if (m := re.search(r"adaptive_grad_clip changed the training at (.+?): ", str(w.message)))}
    assert said == {"model (optimizer 0)", "model (optimizer 1)"}
