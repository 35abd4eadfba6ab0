"""The treatment plan in a Hugging Face ``Trainer`` (tiny BERT from a config, random weights,
CPU): the plan decides on the Trainer's model, optimizer and scheduler, judges each change,
changes nothing on a healthy run, stops a hopeless run the Trainer's way, and puts the
run-level numbers in the evaluation metrics that ``EarlyStoppingCallback`` and
``metric_for_best_model`` read. Numbers are checked against plain torch hooks counted in
numpy (brute.py) and against the run's own history, recomputed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import relu_doctor  # noqa: E402
from relu_doctor.errors import ReluDoctorError  # noqa: E402
from relu_doctor.integrations.hf import ReluDoctorCallback  # noqa: E402
from relu_doctor.remedies import PlanStep  # noqa: E402
from tests.integrations.brute import Outputs, windows  # noqa: E402
from tests.integrations.test_hf import SITES, Kill, _args, _data, _model  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::relu_doctor.errors.ReluDoctorWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

STEP_OF = {"adaptive_grad_clip": "clip", "lr_rescue": "lr", "dormant_reset": "recycle",
           "leaky_relu_swap": "swap"}


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in relu_doctor.load_run(run_dir).events if e.get("type") == kind]


def _trainer(out: Path, model: Any, cb: Any, *more: Any, **kw: Any) -> Any:
    args = _args(out, lr_scheduler_type="constant", **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                eval_dataset=_data(16), callbacks=[cb, *more])


def test_the_plan_treats_a_dead_layer_and_judges_each_change(tmp_path: Path) -> None:
    model = _model()  # layer 0's MLP units all die at step 2 (Kill)
    act0 = model.get_submodule(SITES[0])
    ref = Outputs({SITES[0]: act0}, {SITES[0]: -1},
                  keep=lambda: torch.is_grad_enabled() and model.training)
    cb = ReluDoctorCallback(log_every_n_steps=2, treatment=True)
    # (the plan's clip step acts where the Trainer does not clip: see below)
    trainer = _trainer(tmp_path, model, cb, Kill(at=2), max_steps=12, max_grad_norm=0)
    trainer.train()
    ref.remove()
    run_dir = tmp_path / "relu_doctor"
    changes = _events(run_dir, "intervention")
    results = _events(run_dir, "intervention_result")
    plan = cb.remedies["treatment_plan"]
    # Gentlest first: the second window's surge switched the clipper on; its evidence is
    # the reference's count of that window, against the first window's.
    first = changes[0]
    assert (first["remedy"], first["step"]) == ("adaptive_grad_clip", 4)
    assert first["details"]["evidence"]["site"] == SITES[0]
    assert first["details"]["evidence"]["dead_fraction"] == pytest.approx(
        windows(ref.passes, 2)[1][SITES[0]]["dead_fraction"]) == 1.0
    before = windows(ref.passes, 2)[0][SITES[0]]["dead_fraction"]
    assert first["details"]["evidence"]["dead_fraction_before"] == pytest.approx(before)
    assert before < 1.0
    # Surgery once the model-wide change was judged: ReDo on the dead layer, through the
    # Trainer's optimizer (the plan's, bound to the Trainer's model).
    redo = [e for e in changes if e["remedy"] == "dormant_reset"]
    assert redo and redo[0]["site"] == SITES[0] and plan.model is model
    # Every change is judged one interval later on its own target, recomputed here.
    h = cb.doctor.history() if cb.doctor is not None else None
    assert h is not None
    steps = {s.remedy: s for s in plan.steps}
    by_id = {e["id"]: e for e in changes}
    assert results and all(r["verdict"] in ("helped", "did not help") for r in results)
    for r in results:
        change = by_id[r["ref"]]
        step = steps[STEP_OF[change["remedy"]]]
        assert r["step"] == change["step"] + 2
        if r["target"] == "dead_fraction":
            rows = h[h["step"] == r["step"]]
            after = rows["dead"].sum() / rows["units_seen"].sum()
            before = change["before"]["dead_fraction"]
        else:  # recycling: judged on the recycled units themselves
            assert r["target"].startswith("changed_units_")
            before = 1.0
            after = r["efficacy"]["still_" + r["target"].removeprefix("changed_units_")]
            # the share still dead, from the reference's outputs of the window after
            window = windows(ref.passes, 2)[r["step"] // 2 - 1][SITES[0]]
            assert window["elements"] > 0
            passes = ref.passes[r["step"] - 2:r["step"]]
            x = np.concatenate([p[SITES[0]] for p in passes])
            units = change["details"]["units"]
            dead = sum(not (x[:, u] > 0).any() for u in units) / len(units)
            assert r["efficacy"]["still_dead"] == pytest.approx(dead)
        helped = after <= before * (1 - step.min_gain) + step.tolerance
        assert r["verdict"] == ("helped" if helped else "did not help")
    # The plan's learning-rate step cuts the optimizer the Trainer's scheduler steps, so the
    # (constant, closed-form) schedule keeps the cut.
    lr = trainer.optimizer.param_groups[0]["lr"]
    plan.remedy("lr").rescue(step=99, reason="test")
    trainer.lr_scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.5)


@pytest.mark.parametrize("max_grad_norm", [None, -1.0])
def test_beside_max_grad_norm_the_plans_clip_step_stays_idle_and_says_so(
    tmp_path: Path, max_grad_norm: float | None
) -> None:
    """With max_grad_norm (1.0 by default) the plan switched AutoClip on after the Trainer's
    own clipping, silently, and recorded "the gradient norm before clipping" as the norm
    already clipped (a schedulers trial). As beside Lightning's gradient_clip_val: its clip
    step stays idle, said once, and its other steps act. A max_grad_norm of 0 or below, with
    which transformers does not clip, leaves the plan its clip step (a review)."""
    import warnings

    from relu_doctor.errors import ReluDoctorWarning

    cb = ReluDoctorCallback(log_every_n_steps=2, treatment=True)
    kw = {} if max_grad_norm is None else {"max_grad_norm": max_grad_norm}
    trainer = _trainer(tmp_path, _model(), cb, Kill(at=2), max_steps=12, **kw)
    assert trainer.args.max_grad_norm == (1.0 if max_grad_norm is None else max_grad_norm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)
            and "clip step stays idle" in str(w.message)]
    changes = _events(tmp_path / "relu_doctor", "intervention")
    if max_grad_norm is not None:  # (the Trainer does not clip: the plan's clipper does)
        assert not said and changes[0]["remedy"] == "adaptive_grad_clip"
        return
    assert len(said) == 1 and "max_grad_norm=1" in said[0] and "max_grad_norm=0" in said[0]
    assert changes and not [e for e in changes if e["remedy"] == "adaptive_grad_clip"]
    assert changes[0]["remedy"] == "lr_rescue"  # (the next step acted in its place)
    assert not cb.remedies["treatment_plan"].remedy("clip")._handles  # no hook on the optimizer


def test_a_healthy_run_with_the_plan_is_bit_identical(tmp_path: Path) -> None:
    weights = {}
    for name, kw in (("watched", {}), ("treated", {"treatment": True})):
        model = _model()
        cb = ReluDoctorCallback(log_every_n_steps=2, **kw)
        _trainer(tmp_path / name, model, cb, max_steps=6).train()
        weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert _events(tmp_path / name / "relu_doctor", "intervention") == []
    assert all(torch.equal(weights["watched"][k], v) for k, v in weights["treated"].items())


class _Metrics(transformers.TrainerCallback):  # type: ignore[misc]
    """Keeps every evaluation's metrics, as EarlyStoppingCallback reads them."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                    **kw: Any) -> None:
        self.metrics.append(dict(metrics or {}))


def test_a_hopeless_run_stops_with_its_evidence_and_its_metrics_reach_early_stopping(
    tmp_path: Path,
) -> None:
    def dead_model() -> Any:
        model = _model(dead_bias=-50.0)
        with torch.no_grad():
            model.bert.encoder.layer[1].intermediate.dense.bias.fill_(-50.0)
        return model

    evals = dict(eval_strategy="steps", eval_steps=2, metric_for_best_model="relu_doctor/health",
                 greater_is_better=True)
    # born dead: no surge; the swap is what can act on it, and a LeakyReLU cannot revive
    # units whose bias is -50
    cb = ReluDoctorCallback(log_every_n_steps=2, treatment={
        "stop_when_hopeless": True, "steps": [PlanStep("swap")]})
    seen = _Metrics()
    trainer = _trainer(tmp_path / "stop", dead_model(), cb, seen, max_steps=12, **evals)
    trainer.train()
    assert trainer.state.global_step == 6  # swapped (4: patience 2), judged, hopeless (6)
    stops = [e for e in _events(tmp_path / "stop" / "relu_doctor", "intervention")
             if e["details"].get("action") == "stop"]
    assert len(stops) == 1 and stops[0]["step"] == 6 and "hopeless" in stops[0]["what"]
    assert stops[0]["details"]["evidence"]["lifetime_dead_fraction"] == 1.0
    assert stops[0]["details"]["evidence"]["tried"] == ["swap"]
    swaps = [e for e in _events(tmp_path / "stop" / "relu_doctor", "intervention")
             if e["remedy"] == "leaky_relu_swap"]
    assert [e["step"] for e in swaps] == [4, 4]  # both layers, dead for 2 logs in a row
    # metric_for_best_model found eval_relu_doctor/health in each evaluation's metrics
    # (the Trainer raises KeyError otherwise): the last interval's run-level health.
    assert [m["eval_relu_doctor/health"] for m in seen.metrics] == [0.0, 0.0, 0.0]
    assert [m["eval_relu_doctor/lifetime_dead_fraction"] for m in seen.metrics] == [1.0] * 3
    assert trainer.state.best_metric == 0.0

    # Off by default: no plan, no stop; EarlyStoppingCallback on relu_doctor/health stops the
    # run instead (no improvement at the second evaluation).
    cb = ReluDoctorCallback(log_every_n_steps=2)
    es = transformers.EarlyStoppingCallback(early_stopping_patience=1)
    trainer = _trainer(tmp_path / "default", dead_model(), cb, es, max_steps=12,
                       load_best_model_at_end=True, save_strategy="steps", save_steps=2,
                       **evals)
    trainer.train()
    assert trainer.state.global_step == 4 and "treatment_plan" not in cb.remedies
    assert not any(e["details"].get("action") == "stop"
                   for e in _events(tmp_path / "default" / "relu_doctor", "intervention"))


def test_plan_arguments_are_checked_before_training() -> None:
    with pytest.raises(ReluDoctorError, match="plan decides every remedy"):
        ReluDoctorCallback(treatment=True, dormant_reset=True)
    with pytest.raises(ReluDoctorError, match="come from the training framework"):
        ReluDoctorCallback(treatment={"optimizer": None})
    with pytest.raises(ReluDoctorError, match="hopeless_fraction"):
        ReluDoctorCallback(treatment={"hopeless_fraction": 2.0})
    # The adapters' hook into the plan: only the lr and swap steps take another controller,
    # and it must offer the step's action.
    from relu_doctor.remedies import AutoClip, LRRescuer, TreatmentPlan

    plan = TreatmentPlan(torch.nn.Identity())
    with pytest.raises(ReluDoctorError, match="only the steps"):
        plan.use("clip", AutoClip())
    with pytest.raises(ReluDoctorError, match=r"rescue\(\) method"):
        plan.use("lr", AutoClip())
    other = LRRescuer(None)
    plan.use("lr", other)
    assert plan.remedy("lr") is other


def test_an_evaluation_before_the_first_log_gets_the_open_windows_health(tmp_path: Path) -> None:
    """metric_for_best_model="relu_doctor/health" with evaluations more often than the logs:
    the first evaluation had no relu_doctor number, and the Trainer raised KeyError at step 2
    (an HF trial). An evaluation before the first log reads the open window: its health is
    the share of units not dead over the steps so far, from the test's own hooks."""
    model = _model()
    ref = Outputs({s: model.get_submodule(s) for s in SITES}, {s: -1 for s in SITES},
                  keep=lambda: torch.is_grad_enabled() and model.training)
    cb = ReluDoctorCallback(log_every_n_steps=4, overhead_budget=None)
    seen = _Metrics()
    trainer = _trainer(tmp_path, model, cb, Kill(at=1), seen, max_steps=8, eval_strategy="steps",
                       eval_steps=2, metric_for_best_model="relu_doctor/health",
                       greater_is_better=True, save_strategy="steps", save_steps=2,
                       load_best_model_at_end=True)
    trainer.train()
    ref.remove()
    assert trainer.state.global_step == 8 and len(seen.metrics) == 4
    health = []
    # at step 2 the open window (steps 1-2); at 4 and 6 the log of steps 1-4; at 8, of 5-8
    for a, b in ((0, 2), (0, 4), (0, 4), (4, 8)):
        (w,) = windows(ref.passes[a:b], b - a)
        health.append(1 - sum(v["dead"] for v in w.values()) / sum(v["units"] for v in w.values()))
    assert [m["eval_relu_doctor/health"] for m in seen.metrics] == pytest.approx(health)
    assert health[3] < health[0]  # (layer 0 killed from step 2 on: the last window sees it)


@pytest.mark.parametrize("kind", ["leaky_relu", "prelu"])
@pytest.mark.parametrize("best_at_end", [True, False])
def test_the_best_checkpoint_loaded_at_the_end_comes_without_the_swaps_made_after_it(
    tmp_path: Path, best_at_end: bool, kind: str
) -> None:
    """leaky_relu_swap with load_best_model_at_end: the best checkpoint (saved before the
    swap, ReLU) was loaded into the swapped model, which then computed neither what the
    checkpoint computes nor what trained (an HF trial: logits off by 0.02 at slope 0.3).
    The swaps made after that checkpoint are undone, recorded and said; the model is the
    checkpoint's, output for output. Without load_best_model_at_end the swap stays. A PReLU
    swap's new param group reaches the Trainer's scheduler (made for accelerate's wrapper of
    the optimizer): its next step raised out of train() (a review)."""
    import warnings

    from relu_doctor.errors import ReluDoctorWarning

    model = _model()
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, leaky_relu_swap={
        "threshold": 0.5, "patience": 1, "slope": 0.3, "include": [SITES[0]], "kind": kind})
    trainer = _trainer(tmp_path, model, cb, Kill(at=2), max_steps=8, eval_strategy="steps",
                       eval_steps=2, save_strategy="steps", save_steps=2,
                       metric_for_best_model="relu_doctor/health", greater_is_better=True,
                       load_best_model_at_end=best_at_end)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    events = _events(tmp_path / "relu_doctor", "intervention")
    swapped = [e for e in events if e["remedy"] == "leaky_relu_swap" and "replaced" in e["what"]]
    assert swapped and swapped[0]["step"] > 2  # (after the best checkpoint, step 2's)
    act = type(model.get_submodule(SITES[0])).__name__
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)
            and "load_best_model_at_end loaded" in str(w.message)]
    if not best_at_end:
        assert act == {"leaky_relu": "LeakyReLU", "prelu": "PReLU"}[kind] and not said
        return
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert act == "ReLU" and len(said) == 1 and "that swap is undone" in said[0]
    assert [e for e in events if "restored ReLU" in e["what"]]
    ref = transformers.BertForSequenceClassification.from_pretrained(
        trainer.state.best_model_checkpoint).eval()
    x = torch.randint(0, 64, (4, 8))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=x).logits, ref(input_ids=x).logits)


def test_another_train_resumed_from_before_a_swap_undoes_it(tmp_path: Path) -> None:
    """A second train() of the same Trainer, resumed from a checkpoint saved before a swap,
    built a new swapper that knew nothing of the swap in place: the checkpoint's
    ReLU-trained weights went on training through a LeakyReLU, silently (a review). The new
    swapper goes on from the last train()'s, so the checkpoint's state undoes the swap."""
    import warnings

    from relu_doctor.errors import ReluDoctorWarning

    model = _model()
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, leaky_relu_swap={
        "threshold": 0.5, "patience": 1, "slope": 0.3, "include": [SITES[0]]})
    kill = Kill(at=2)
    trainer = _trainer(tmp_path, model, cb, kill, max_steps=8, save_strategy="steps",
                       save_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert type(model.get_submodule(SITES[0])).__name__ == "LeakyReLU"
    kill.at = -1  # (nothing dies this time: the swap is not made again)
    trainer.args.max_steps = 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)
            and "saved before the LeakyReLU swap" in str(w.message)]
    assert type(model.get_submodule(SITES[0])).__name__ == "ReLU" and len(said) == 1, said
