"""The treatment plan in Keras 3 ``model.fit`` (torch backend): the plan decides and acts
through the Keras optimizer and layers, judges each change, changes nothing on a healthy run,
stops a hopeless run the Keras way, and puts the run-level numbers where ``EarlyStopping``
looks. Numbers are checked against plain torch hooks counted in numpy (brute.py) and against
the run's own history, recomputed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")

import relu_doctor  # noqa: E402
from relu_doctor.errors import ReluDoctorError  # noqa: E402
from relu_doctor.integrations._common import health_scalars  # noqa: E402
from relu_doctor.integrations.keras import ReluDoctorCallback  # noqa: E402
from relu_doctor.remedies import DEFAULT_STEPS, PlanStep  # noqa: E402
from tests.integrations.brute import Outputs, windows  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::relu_doctor.errors.ReluDoctorWarning")

STEP_OF = {"adaptive_grad_clip": "clip", "lr_rescue": "lr", "leaky_relu_swap": "swap"}


def _data(n: int = 128, seed: int = 0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    y = keras.utils.to_categorical((x @ rng.normal(size=(12, 3))).argmax(1), 3)
    return x, y


def _mlp(bias: float = 0.0, lr: float = 0.01) -> Any:
    keras.utils.set_random_seed(0)
    init = keras.initializers.Constant(bias)
    model = keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(32, activation="relu", name="h1", bias_initializer=init),
        keras.layers.Dense(32, activation="relu", name="h2", bias_initializer=init),
        keras.layers.Dense(3, activation="softmax", name="out"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="categorical_crossentropy")
    return model


class Kill(keras.callbacks.Callback):
    """Sets every bias of ``h1`` and ``h2`` to ``bias`` before batch ``at`` (counted over
    every fit it is given to): units die after the first log, a surge at the second
    (units dead from the start are no surge)."""

    def __init__(self, at: int, bias: float = -1.5) -> None:
        super().__init__()
        self.at, self.bias, self.batches = at, bias, 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.batches == self.at:
            for name in ("h1", "h2"):
                layer = self.model.get_layer(name)
                layer.bias.assign(np.full(layer.bias.shape, self.bias, dtype="float32"))
        self.batches += 1


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in relu_doctor.load_run(run_dir).events if e.get("type") == kind]


def _lr(model: Any) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def test_the_plan_treats_dying_units_and_judges_each_change(tmp_path: Path) -> None:
    model = _mlp()  # most units die at step 4 (Kill)
    x, y = _data()
    layers = {"h1": model.get_layer("h1"), "h2": model.get_layer("h2")}
    ref = Outputs(layers, {"h1": -1, "h2": -1}, keep=torch.is_grad_enabled)
    cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "run", treatment=True)
    model.fit(x, y, epochs=6, batch_size=16, verbose=0, callbacks=[cb, Kill(at=4)])
    ref.remove()
    plan = cb.plan
    assert plan is not None and cb.doctor is not None
    assert [s.remedy for s in plan.steps] == ["clip", "lr", "swap"]  # no torch-module surgery
    changes = [e for e in _events(tmp_path / "run", "intervention")
               if "clip" not in e["details"]]  # (the clipper's window reports: no change)
    results = _events(tmp_path / "run", "intervention_result")
    assert {e["remedy"] for e in changes} >= {"adaptive_grad_clip", "lr_rescue",
                                              "leaky_relu_swap"}
    # Gentlest first: the second window's surge of dead units switched the clipper on; its
    # evidence is the reference's count of that window against the first's.
    first = changes[0]
    assert (first["remedy"], first["step"]) == ("adaptive_grad_clip", 8)
    evidence = first["details"]["evidence"]
    was, now = windows(ref.passes, 4)[0], windows(ref.passes, 4)[1]
    assert evidence["dead_fraction"] == pytest.approx(now[evidence["site"]]["dead_fraction"])
    assert evidence["dead_fraction_before"] == pytest.approx(was[evidence["site"]]["dead_fraction"])
    rise = {s: now[s]["dead_fraction"] - was[s]["dead_fraction"] for s in now}
    assert max(rise.values()) == pytest.approx(evidence["jump"])  # the site that rose the most
    # One change per site per interval.
    at = [(e["site"], e["step"]) for e in changes if "switched AutoClip off" not in e["what"]]
    assert len(at) == len(set(at))
    # Each change is judged one interval later on its own target; the verdict is recomputed
    # here from the run's history and the plan's steps.
    h = cb.doctor.history()
    steps = {s.remedy: s for s in plan.steps}
    by_id = {e["id"]: e for e in changes}
    assert results and all(r["verdict"] in ("helped", "did not help") for r in results)
    for r in results:
        change = by_id[r["ref"]]
        assert r["step"] == change["step"] + 4
        rows = h[h["step"] == r["step"]]
        if r["site"] == "model":
            after = rows["dead"].sum() / rows["units_seen"].sum()
        else:
            row = rows[rows["site"] == r["site"]].iloc[0]
            after = row["dead"] / row["units_seen"]
        assert r["target"] == "dead_fraction"
        assert r["after"]["dead_fraction"] == pytest.approx(after)
        step = steps[STEP_OF[change["remedy"]]]
        helped = after <= change["before"]["dead_fraction"] * (1 - step.min_gain) + step.tolerance
        assert r["verdict"] == ("helped" if helped else "did not help")
    # What the changes did, in Keras terms: the optimizer's learning rate and the layers.
    n_lr = sum(e["remedy"] == "lr_rescue" for e in changes)
    assert _lr(model) == pytest.approx(0.01 * 0.5**n_lr)
    swapped = [e["site"] for e in changes if e["remedy"] == "leaky_relu_swap"]
    assert swapped
    probe = keras.ops.convert_to_tensor(np.array([[-2.0, 3.0]], dtype="float32"))
    for site in swapped:
        out = keras.ops.convert_to_numpy(model.get_layer(site).activation(probe))[0]
        assert out.tolist() == pytest.approx([-0.1, 3.0])  # the default plan's slope 0.05
    # A clipper that did not help is switched off and never on again.
    on = [e for e in changes if e["what"].startswith("switched AutoClip (p10) on")]
    if ("clip", "model") in plan.failed:
        assert len(on) == 1
    assert "_clip_gradients" not in vars(model.optimizer)  # unhooked at the end of fit


def test_a_healthy_run_with_the_plan_is_bit_identical(tmp_path: Path) -> None:
    x, y = _data()
    weights = {}
    for name, kw in (("bare", None), ("watched", {}), ("treated", {"treatment": True})):
        model = _mlp()
        cbs = [] if kw is None else [ReluDoctorCallback(log_every_n_steps=4,
                                                        run_dir=tmp_path / name, **kw)]
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=cbs)
        weights[name] = [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.weights]
        if name == "treated":  # weights taken before the second fit below
            assert _events(tmp_path / name, "intervention") == []
            first = cbs[0].plan  # logs at 4, 8, 12; the one at 16 ends the fit: held
            assert first is not None and first.interval == 3 and first.held.step == 16
            model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=cbs)
            second = cbs[0].plan  # a second fit: a new plan that goes on where it was
            # step 16's record decided at the first step, 20 decided, 24 held
            assert second is not None and second is not first and second.interval == 5
            assert second.held is not None and second.held.step == 24
    for name in ("watched", "treated"):
        assert all(np.array_equal(a, b) for a, b in zip(weights["bare"], weights[name],
                                                        strict=True)), name


def test_a_hopeless_run_stops_with_its_evidence_and_early_stopping_sees_health(
    tmp_path: Path,
) -> None:
    x, y = _data()
    model = _mlp(bias=-50.0)  # every unit dead, for good
    layers = {"h1": model.get_layer("h1"), "h2": model.get_layer("h2")}
    ref = Outputs(layers, {"h1": -1, "h2": -1}, keep=torch.is_grad_enabled)
    cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "stop",
                            treatment={"stop_when_hopeless": True})
    hist = model.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[cb])
    ref.remove()
    stops = [e for e in _events(tmp_path / "stop", "intervention")
             if e.get("details", {}).get("action") == "stop"]
    assert len(stops) == 1
    stop = stops[0]
    assert stop["remedy"] == "treatment_plan" and "hopeless" in stop["what"]
    # The evidence: every unit never active since the start, by the reference's count.
    passes = len(ref.passes)
    assert passes == stop["step"] == 12  # stopped at the logging step that found it hopeless
    never = [np.concatenate([p[s] for p in ref.passes]) > 0 for s in ("h1", "h2")]
    want = sum(int((~a.any(axis=0)).sum()) for a in never) / 64
    assert stop["details"]["evidence"]["lifetime_dead_fraction"] == pytest.approx(want) == 1.0
    # The plan had its chance first: born dead is no surge (no clipping, no lr cut), but
    # the swap acted on both layers and was judged.
    acted = {e["remedy"] for e in _events(tmp_path / "stop", "intervention")}
    assert acted == {"leaky_relu_swap", "treatment_plan"}
    assert stop["details"]["evidence"]["tried"] == ["swap"]
    assert len(hist.history["loss"]) == 2  # 8 steps an epoch: stopped in the second
    # The run-level numbers are in Keras' logs, where EarlyStopping looks.
    assert hist.history["relu_doctor/health"] == [0.0, 0.0]
    assert hist.history["relu_doctor/lifetime_dead_fraction"] == [1.0, 1.0]

    # Off by default, and without stop_when_hopeless: the same run goes on; Keras'
    # EarlyStopping on relu_doctor/health stops it instead, at the end of the second epoch
    # (no improvement over the first; without the metric it would warn and go on).
    for name, kw in (("default", {}), ("treated", {"treatment": True})):
        model = _mlp(bias=-50.0)
        cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / name, **kw)
        es = keras.callbacks.EarlyStopping(monitor="relu_doctor/health", mode="max", patience=1)
        hist = model.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[cb, es])
        assert len(hist.history["loss"]) == 2 and es.stopped_epoch == 1
        assert cb.doctor is not None and cb.doctor.global_step == 16  # both epochs, whole
        assert not any(e.get("details", {}).get("action") == "stop"
                       for e in _events(tmp_path / name, "intervention"))
        assert (cb.plan is None) == (name == "default")


def test_plan_arguments_are_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(ReluDoctorError, match="torch modules"):
        ReluDoctorCallback(treatment={"steps": [PlanStep("lr"), PlanStep("recycle")]})
    with pytest.raises(ReluDoctorError, match=r"steps \['recycle'\] re-initialise"):
        ReluDoctorCallback(treatment={"steps": ["lr", "recycle"]})  # names, as PlanSteps
    named = ReluDoctorCallback(treatment={"steps": ["swap", "lr"]})._plan_opts
    defaults = {s.remedy: s for s in DEFAULT_STEPS}
    assert named is not None and named["steps"] == (defaults["swap"], defaults["lr"])
    with pytest.raises(ReluDoctorError, match="plan decides every remedy"):
        ReluDoctorCallback(treatment=True, lr_rescue=True)
    with pytest.raises(ReluDoctorError, match="cooldown"):
        ReluDoctorCallback(treatment={"cooldown": 0})
    with pytest.raises(ReluDoctorError, match=r"^treatment: 'cooldwn' is not an argument of TreatmentPlan; it takes "
                       r"\[.*'cooldown'"):
        ReluDoctorCallback(treatment={"cooldwn": 2})
    with pytest.raises(ReluDoctorError, match="treatment: expected True"):
        ReluDoctorCallback(treatment="yes")
    # An optimizer that clips already: the plan's clip step stays idle, the rest works.
    model = _mlp()
    model.compile(optimizer=keras.optimizers.Adam(0.01, clipnorm=1.0),
                  loss="categorical_crossentropy")
    cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "r", treatment=True)
    model.fit(*_data(64), epochs=3, batch_size=16, verbose=0, callbacks=[cb, Kill(at=4)])
    remedies = {e["remedy"] for e in _events(tmp_path / "r", "intervention")}
    assert "adaptive_grad_clip" not in remedies and "lr_rescue" in remedies
    # its gradient findings advise no clipping: they say the optimizer clips
    assert cb.doctor is not None and cb.doctor.config.clipped_by == "the optimizer's clipnorm=1"


@pytest.mark.parametrize("epochs", [7, 5])
def test_the_plan_changes_nothing_after_the_last_step(tmp_path: Path, epochs: int) -> None:
    """The last, partial window (step 56 of 56, after the log at 55) is logged at the end of
    ``fit``, after the last optimizer step: the plan acted there, and the model ``fit`` left
    behind had a learning rate or layers no step trained with. That record is final now:
    judged on, never acted on; the plan still acts inside training. A second ``fit`` with
    the same callback starts a new window (the final log closed it). With 5 epochs (40
    steps) the last window closes on the last step itself: the callback passes
    ``last=True`` there (Keras' epochs times steps), with the same result."""
    log_every = 5
    model = _mlp(bias=-1.5)
    x, y = _data()

    class AtTrainEnd(keras.callbacks.Callback):  # listed first: before our end-of-fit log
        def on_train_end(self, logs: Any = None) -> None:
            self.lr = _lr(model)
            self.weights = [w.copy() for w in model.get_weights()]

    end = AtTrainEnd()
    cb = ReluDoctorCallback(log_every_n_steps=log_every, run_dir=tmp_path / "run",
                            treatment=True)
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=[end, cb])
    last = epochs * 8
    assert cb.doctor is not None and cb.doctor.global_step == last
    steps = {e["step"] for e in _events(tmp_path / "run", "intervention")
             if "clip" not in e["details"]}  # (a clipper's window report is no change)
    assert steps and max(steps) < last - (last - 1) % log_every, steps
    assert [r.step for r in cb.doctor.records if r.final] == [last]
    assert _lr(model) == end.lr
    assert all(np.array_equal(a, b) for a, b in zip(end.weights, model.get_weights(), strict=True))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])  # 8 steps more
    first = next(r for r in cb.doctor.records if r.step > last)
    assert first.site_rows[0]["window_steps"] == min(8, log_every - last % log_every)
    history = relu_doctor.load_run(tmp_path / "run").history
    assert last in set(history["step"])


@pytest.mark.parametrize("remedies", [{"treatment": True},
                                      {"leaky_relu_swap": {"threshold": 0.2, "patience": 1}}])
def test_a_fit_per_epoch_loop_still_gets_treated(tmp_path: Path, remedies: dict) -> None:
    """``for epoch in range(n): model.fit(..., epochs=1)``, logging once an epoch (8 steps):
    every record ends its fit, so every record is final, and a remedy that only skipped them
    never acted. Each is held and decided at the end of the next fit's first step, so the
    loop is treated (one step later than a single ``fit``), and the model each ``fit``
    returns is the one its last step left."""
    model = _mlp(bias=-1.5)  # most units dead from the start
    x, y = _data()

    class AtTrainEnd(keras.callbacks.Callback):  # listed first: before our end-of-fit log
        def on_train_end(self, logs: Any = None) -> None:
            self.state = _state(model)

    def _state(m: Any) -> tuple[list[Any], list[str], float]:
        kinds = [type(getattr(layer, "activation", None)).__name__ for layer in m.layers]
        return [w.copy() for w in m.get_weights()], kinds, _lr(m)

    end = AtTrainEnd()
    cb = ReluDoctorCallback(log_every_n_steps=8, run_dir=tmp_path / "run", **remedies)
    for _ in range(4):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[end, cb])
        assert cb.doctor is not None and [r.final for r in cb.doctor.records] == [True]
        weights, kinds, lr = _state(model)  # as the fit's last step left it
        assert kinds == end.state[1] and lr == end.state[2]
        assert all(np.array_equal(a, b) for a, b in zip(weights, end.state[0], strict=True))
    acted = _events(tmp_path / "run", "intervention")
    assert acted and {e["step"] for e in acted} <= {8, 16, 24}, acted


@pytest.mark.parametrize("remedies", [{"leaky_relu_swap": True}, {"lr_rescue": True},
                                      {"autoclip": True}, {"treatment": True}],
                         ids=lambda r: next(iter(r)))
def test_a_fit_per_epoch_loop_is_treated_as_one_fit(tmp_path: Path, remedies: dict) -> None:
    """Each ``fit`` of the loop rebuilds the remedies; they go on from the last fit's whole
    state, not only its held record: a swap's patience counts readings across fits, the
    learning-rate rescue keeps its baseline and cooldown, AutoClip its norm history, event
    ids stay unique, and ``restore()`` undoes swaps made in earlier fits. Decisions on the
    loop's records are those of one 4-epoch ``fit`` over the same batches (made one step
    later, at the next fit's first step); AutoClip changes nothing at a log, so there the
    two runs are the same run: the same clipping reports, the final one included, and the
    same weights."""
    x, y = _data()
    runs = {}
    # the rescue needs a surge: units that die after the first log (born dead is none)
    surge = "lr_rescue" in remedies
    for name, fits in (("one", [4]), ("loop", [1, 1, 1, 1])):
        model = _mlp(bias=0.0 if surge else -1.5)
        cb = ReluDoctorCallback(log_every_n_steps=8, every_n_steps=1,
                                run_dir=tmp_path / name, **remedies)
        kill = [Kill(at=8)] if surge else []
        for epochs in fits:
            model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0,
                      callbacks=[cb, *kill])
        acted = _events(tmp_path / name, "intervention")
        runs[name] = {"acted": [(e["remedy"], e["site"], e["step"]) for e in acted],
                      "ids": [e["id"] for e in acted], "model": model, "cb": cb}
    one, loop = runs["one"], runs["loop"]
    assert one["acted"], one
    assert loop["acted"] == one["acted"]
    assert len(set(loop["ids"])) == len(loop["ids"]), loop["ids"]
    if "autoclip" in remedies:
        assert [a[2] for a in loop["acted"]] == [8, 16, 24, 32]  # the final window's too
        for a, b in zip(one["model"].get_weights(), loop["model"].get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    if "leaky_relu_swap" in remedies:
        swapped = sorted({a[1] for a in loop["acted"]})
        assert sorted(loop["cb"].remedies["leaky_relu_swap"].restore()) == swapped
        assert [layer.activation.__name__ for layer in loop["model"].layers[:2]] == [
            "relu", "relu"]


def test_a_callback_passed_to_another_model_starts_a_new_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hyper-parameter search passes one callback to each model's ``fit``: each model gets
    a run of its own (a new directory, steps from the start, remedies from scratch), the
    run a callback of its own makes; nothing of the model before is carried over (a swap's
    streaks, its undo records, the steps counted)."""
    monkeypatch.chdir(tmp_path)  # the default run directories
    x, y = _data()
    swap = {"threshold": 0.2, "patience": 2}

    def fit(cb: ReluDoctorCallback) -> tuple[Path, list[tuple[str, int]], list[int]]:
        model = _mlp(bias=-1.5)  # the same model each time
        model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, callbacks=[cb])
        assert cb.doctor is not None and cb.doctor.run_dir is not None
        run = cb.doctor.run_dir
        acted = [(e["site"], e["step"]) for e in _events(run, "intervention")]
        return run, acted, sorted(set(relu_doctor.load_run(run).history["step"]))

    shared = ReluDoctorCallback(log_every_n_steps=4, every_n_steps=1, leaky_relu_swap=swap)
    first, second = fit(shared), fit(shared)
    alone = fit(ReluDoctorCallback(log_every_n_steps=4, every_n_steps=1,
                                   leaky_relu_swap=swap))
    assert len({first[0], second[0], alone[0]}) == 3
    assert first[1], "the swap acted"
    assert first[1:] == second[1:] == alone[1:]
    assert sorted(shared.remedies["leaky_relu_swap"].restore()) == sorted(
        {site for site, _ in second[1]})


def test_another_model_s_epoch_logs_carry_none_of_the_last_model_s_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An epoch of a new run that logs no window yet puts no run-level numbers in Keras'
    logs: the last model's would reach its ``History``, ``EarlyStopping`` or
    ``ModelCheckpoint`` as if they were this model's."""
    monkeypatch.chdir(tmp_path)  # the default run directories
    x, y = _data()
    cb = ReluDoctorCallback(log_every_n_steps=4)
    first = _mlp(bias=-1.5).fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    assert "relu_doctor/health" in first.history  # 8 steps: logged at 4 and 8
    second = _mlp().fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[cb])
    assert not [k for k in second.history if k.startswith("relu_doctor/")], second.history


def test_an_epoch_that_logged_no_interval_puts_no_run_level_numbers_in_keras_logs(
    tmp_path: Path,
) -> None:
    """Epoch logs carry the numbers of an interval logged during that epoch only: the last
    interval's, repeated at every epoch's end, made ``EarlyStopping``'s patience count one
    measurement as several epochs' (and stopped a run on it)."""
    x, y = _data()  # 128 samples: 4 steps an epoch at batch size 32
    seen: list[dict[str, Any]] = []
    epoch_logs = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(dict(logs)))
    cb = ReluDoctorCallback(log_every_n_steps=8, run_dir=tmp_path / "run")
    hist = _mlp(bias=-1.5).fit(x, y, epochs=4, batch_size=32, verbose=0,
                               callbacks=[cb, epoch_logs])
    assert cb.doctor is not None
    logged = {r.step: r for r in cb.doctor.records}
    assert sorted(logged) == [8, 16]  # in the second and the fourth epoch
    got = [logs.get("relu_doctor/health") for logs in seen]
    want = [None, logged[8], None, logged[16]]
    assert got == [None if r is None else health_scalars(r)["relu_doctor/health"] for r in want]
    assert hist.history["relu_doctor/dead_fraction"] == [
        health_scalars(logged[s])["relu_doctor/dead_fraction"] for s in (8, 16)]
