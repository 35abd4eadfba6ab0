"""The Hugging Face callback on real ``transformers.Trainer`` runs (tiny BERT from a config,
random weights, CPU), checked against plain torch hooks counted in numpy."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import relu_doctor  # noqa: E402
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, RunDirError  # noqa: E402
from relu_doctor.integrations._common import (  # noqa: E402
    health_scalars,
    record_scalars,
    summary_scalars,
)
from relu_doctor.integrations.hf import STATE_FILE, ReluDoctorCallback  # noqa: E402
from relu_doctor.reports import tensorboard as tb  # noqa: E402
from tests.integrations.brute import Outputs, windows  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::relu_doctor.errors.ReluDoctorWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

SITES = [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]


def _model(seed: int = 0, dead_bias: float | None = None) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, hidden_act="relu", max_position_embeddings=32, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(cfg)
    if dead_bias is not None:  # every unit of layer 0's MLP starts (and stays) dead
        with torch.no_grad():
            model.bert.encoder.layer[0].intermediate.dense.bias.fill_(dead_bias)
    return model


class Kill(transformers.TrainerCallback):
    """Kills every unit of layer 0's MLP (bias ``bias``) before step ``at`` trains: after
    the first log, a surge at the second (units dead from the start are no surge)."""

    def __init__(self, at: int = 2, bias: float = -50.0) -> None:
        self.at, self.bias = at, bias

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                      **kw: Any) -> None:
        if state.global_step == self.at:
            with torch.no_grad():
                model.bert.encoder.layer[0].intermediate.dense.bias.fill_(self.bias)


def _data(n: int = 64, length: int = 12) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
         "labels": int(ids[i, 0] % 2)}
        for i in range(n)
    ]


def _args(out: Path, **kw: Any) -> Any:
    base = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=8, logging_steps=2,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        per_device_eval_batch_size=16,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _hooked(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` holds a forward hook (relu_doctor's, in these tests)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _Logs(transformers.TrainerCallback):  # type: ignore[misc]
    """Keeps every ``logs`` dict the Trainer hands to the callbacks after ours."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logs.append({"step": state.global_step, **(logs or {})})


def test_logged_numbers_equal_the_reference_with_accumulation_and_eval(tmp_path: Path) -> None:
    model = _model()
    acts = {s: model.get_submodule(s) for s in SITES}
    ref = Outputs(acts, {s: -1 for s in SITES},
                  keep=lambda: torch.is_grad_enabled() and model.training)
    cb = ReluDoctorCallback(eval_stream=True)
    seen = _Logs()
    args = _args(tmp_path, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   eval_dataset=_data(32), callbacks=[cb, seen])
    trainer.train()
    ref.remove()
    assert len(ref.passes) == 12  # 6 optimizer steps x 2 micro-batches; eval passes left out
    expected = windows(ref.passes, 4)  # logging_steps=2 optimizer steps = 4 micro-batches
    logged = [entry for entry in seen.logs if f"relu_doctor/dead_fraction/{SITES[0]}" in entry]
    assert [e["step"] for e in logged] == [2, 4, 6]
    assert cb.doctor is not None
    h = cb.doctor.history()
    for i, entry in enumerate(logged):
        for site in SITES:
            want = expected[i][site]
            assert entry[f"relu_doctor/dead_fraction/{site}"] == pytest.approx(want["dead_fraction"])
            assert entry[f"relu_doctor/mean_abs/{site}"] == pytest.approx(want["mean_abs"], rel=1e-5)
            row = h[(h["step"] == entry["step"]) & (h["site"] == site)].iloc[0]
            assert row["elements"] == want["elements"]
            assert row["activation_rate"] == pytest.approx(want["activation_rate"], rel=1e-9)
    # Evaluation: its own stream, one window per evaluate() run, in the logs beside eval_loss.
    evals = [e for e in seen.logs if "eval_loss" in e]
    assert len(evals) == 2
    assert all(f"relu_doctor_val/sparsity/{SITES[0]}" in e for e in evals)
    run_dir = tmp_path / "relu_doctor"
    ev = relu_doctor.load_run(run_dir / "eval").history
    assert int(ev[ev["site"] == SITES[0]]["elements"].sum()) == 2 * 32 * 12 * 32
    # The run directory and its TensorBoard tags are those of the Lightning monitor.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    assert {f"relu_doctor/dead_fraction/{s}" for s in SITES} <= set(ea.Tags()["scalars"])


@pytest.mark.parametrize("console", [False, True])
def test_console_lines_hold_the_model_wide_numbers_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], console: bool
) -> None:
    # A 2-layer model put about 100 relu_doctor keys in every console line of the Trainer.
    cb = ReluDoctorCallback(console=console)
    seen, later = _Logs(), _Logs()
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=_data(),
                                   callbacks=[cb, seen])
    trainer.add_callback(later)  # after the printer
    trainer.train()
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "relu_doctor" in ln]
    assert len(printed) == 3  # logging_steps=2 of 6 steps
    site_key = f"relu_doctor/dead_fraction/{SITES[0]}"
    for line in printed:
        assert "'relu_doctor/dead_fraction'" in line and "'relu_doctor/health'" in line
        assert (site_key in line) == console
    # The callbacks before the printer (and so the report_to backends) get every scalar, and
    # so do those after it: the keys are put back once the printer has its line.
    assert sum(site_key in e for e in seen.logs) == sum(site_key in e for e in later.logs) == 3
    trainer.train()  # a second train(): trimmed once still
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks].count("_ConsoleTrim") == (
        0 if console else 2
    )


def _train(out: Path, resume: str | bool | None = None, **kw: Any) -> ReluDoctorCallback:
    cb = ReluDoctorCallback(log_every_n_steps=4)
    args = _args(out, save_strategy="steps", save_steps=3, **kw)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=_data(),
                                   callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    return cb


def test_checkpoint_and_resume_continue_the_counts_exactly(tmp_path: Path) -> None:
    full = _train(tmp_path / "full", max_steps=8)
    assert (tmp_path / "full" / "checkpoint-3" / STATE_FILE).is_file()
    # A second run is stopped after the checkpoint at step 3 and resumed from it.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", part / "checkpoint-3")
    resumed = _train(part, resume=str(part / "checkpoint-3"), max_steps=8)
    assert full.doctor is not None and resumed.doctor is not None
    assert resumed.doctor.global_step == full.doctor.global_step == 8
    a, b = full.doctor.history(), resumed.doctor.history()
    cols = ["dead", "lifetime_dead", "elements", "activation_rate", "window_steps"]
    # Step 4's window straddles the checkpoint: its first 3 steps came from the checkpoint.
    for step in (4, 8):
        ra = a[a["step"] == step].sort_values("site")[cols].reset_index(drop=True)
        rb = b[b["step"] == step].sort_values("site")[cols].reset_index(drop=True)
        assert ra.equals(rb), (step, ra, rb)
    # The resumed run's directory is its own output_dir's, and holds what it logged.
    assert resumed.doctor.run_dir == part / "relu_doctor"
    assert sorted(relu_doctor.load_run(part / "relu_doctor").history["step"].unique()) == [4, 8]
    sa, sb = full.doctor.state_dict(), resumed.doctor.state_dict()
    for token, site in sa["sites"].items():
        assert torch.equal(site["lifetime"], sb["sites"][token]["lifetime"])


def test_a_run_resumed_in_a_new_process_does_not_warn_again_what_was_warned_before(
        tmp_path: Path) -> None:
    """The findings already warned about are saved with the checkpoint: a new callback
    (as in a new process) resuming from it does not say them again."""

    def dead_said(out: Path, resume: str | None = None) -> tuple[list[str], Any]:
        cb = ReluDoctorCallback(log_every_n_steps=2, warn="warning")
        args = _args(out, save_strategy="steps", save_steps=3, max_steps=8)
        trainer = transformers.Trainer(model=_model(dead_bias=-50.0), args=args,
                                       train_dataset=_data(), callbacks=[cb])
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer.train(resume_from_checkpoint=resume)
        return [str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)
                and str(w.message).startswith(f"relu_doctor: dead at {SITES[0]}")], cb

    said, _ = dead_said(tmp_path / "full")
    assert len(said) == 1 and "(step 2," in said[0]
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", part / "checkpoint-3")
    again, resumed = dead_said(part, resume=str(part / "checkpoint-3"))
    assert any(f.kind == "dead" and f.site == SITES[0] for f in resumed.doctor.findings())
    assert again == []


def test_remedies_change_what_they_say_and_record_it(tmp_path: Path) -> None:
    model = _model()
    opt_lr = 1e-3
    cb = ReluDoctorCallback(
        log_every_n_steps=2,
        leaky_relu_swap={"threshold": 0.5, "patience": 1, "include": [SITES[0]]},
        lr_rescue={"factor": 0.5, "cooldown": 10},
        autoclip={"percentile": 10},
        dormant_reset={"include": [SITES[1]], "tau": 0.9, "on_unlinkable": "raise"},
    )
    args = _args(tmp_path, learning_rate=opt_lr, max_grad_norm=0.0, lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   callbacks=[cb, Kill(at=2)])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)]
    act0 = model.get_submodule(SITES[0])
    assert isinstance(act0, torch.nn.LeakyReLU)
    # LR rescue: the surge of dead units at the second interval halved the learning rate,
    # and the Trainer's (constant) scheduler kept the cut.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(opt_lr * 0.5)
    events = [e for e in relu_doctor.load_run(tmp_path / "relu_doctor").events
              if e.get("type") == "intervention"]
    by = {e["remedy"] for e in events}
    assert {"leaky_relu_swap", "lr_rescue", "adaptive_grad_clip", "dormant_reset"} <= by
    swap = next(e for e in events if e["remedy"] == "leaky_relu_swap")
    assert swap["site"] == SITES[0]
    assert cb.remedies["autoclip"].norm_history.numel() == 6
    # a refusal of a remedy made from an option would spell exclude in that option's form
    assert [cb.remedies[n].options_name for n in ("leaky_relu_swap", "dormant_reset")] == [
        "leaky_relu_swap", "dormant_reset"]
    # ReDo on the HF MLP: producer and consumer found from the model's own dataflow.
    redo = next(e for e in events if e["remedy"] == "dormant_reset")
    assert redo["site"] == SITES[1] and redo["details"]["units"]
    assert "bert.encoder.layer.1.intermediate.dense" in redo["what"]
    assert "bert.encoder.layer.1.output.dense" in redo["what"]
    # Step 6 is max_steps, and closes a window: the callback passes last=True there, so that
    # record is final; the clipper reports the clipping done in it, nothing changes anything.
    assert [r.final for r in cb.doctor.records] == [False, False, True]
    assert {e["remedy"] for e in events if e["step"] == 6} <= {"adaptive_grad_clip"}
    assert {e["step"] for e in events if e["remedy"] == "dormant_reset"} == {2, 4}
    # Each remedy's first change at each site was said, once; the findings whose remedy is
    # a switch this run has on say it is on, not to switch it on.
    changed = [m for m in said if " changed the training at " in m]
    assert sorted(changed) == sorted(
        next(m for m in changed if m.startswith(f"relu_doctor: step {e['step']}: {e['remedy']} "
                                                f"changed the training at {e['site']}: "))
        for e in {(e["remedy"], e["site"]): e for e in reversed(events)}.values())
    advising = [m for m in said if "Remedy:" in m and "=True" in m.split("Remedy:")[1]]
    assert advising and all("is on in this run" in m or "are on in this run" in m
                            for m in advising)


class _Interrupt(transformers.TrainerCallback):  # type: ignore[misc]
    """Raises at the end of step 3 of the first train() (an error, Ctrl-C in a notebook)."""

    def __init__(self) -> None:
        self.armed = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.armed and state.global_step == 3:
            self.armed = False
            raise RuntimeError("interrupted")


def test_a_train_after_one_that_raised_ends_that_run_first(tmp_path: Path) -> None:
    # The Trainer calls no on_train_end when train() raises: the next train() with the
    # callback ends that run as on_train_end would (its last partial window logged, its
    # directory closed), where its last window was lost and its directory left open.
    cb = ReluDoctorCallback(overhead_budget=None)
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path / "out"),
                                   train_dataset=_data(), callbacks=[cb, _Interrupt()])
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.train()
    first = cb.doctor
    assert first is not None and first.run_dir is not None
    trainer.train()
    assert cb.doctor is not first and cb.doctor.run_dir != first.run_dir  # a new run
    run = relu_doctor.load_run(first.run_dir)
    assert sorted(run.history["step"].unique()) == [2, 3] and run.writer_open == ""  # closed
    # Into a run directory named by the user, a train() that does not resume is refused
    # with what to do instead (the message said "pass resume=True", which this has not).
    named = ReluDoctorCallback(run_dir=first.run_dir)
    again = transformers.Trainer(model=_model(), args=_args(tmp_path / "out2"),
                                 train_dataset=_data(), callbacks=[named])
    with pytest.raises(RunDirError, match=r"already holds run .*; continue it with "
                       r"trainer\.train\(resume_from_checkpoint=\.\.\.\)"):
        again.train()
    assert named.doctor is None and not _hooked(again.model)  # nothing left behind


def test_a_new_train_does_not_log_the_last_runs_final_scalars(tmp_path: Path) -> None:
    # The last window's scalars, logged at on_train_end after the Trainer's last log, wait
    # for a next on_log: a new train() must not log them at its own first step.
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None)
    logs = _Logs()  # the Trainer logs at every step, relu_doctor at every second
    trainer = transformers.Trainer(
        model=_model(), args=_args(tmp_path / "out", max_steps=5, logging_steps=1),
        train_dataset=_data(), callbacks=[cb, logs])
    trainer.train()
    assert cb._pending  # the final window's, unlogged
    first_run = len(logs.logs)
    trainer.train()
    second = [entry for entry in logs.logs[first_run:] if "relu_doctor/health" in entry]
    assert second and second[0]["step"] == 2
    assert cb.doctor is not None
    want = health_scalars(cb.doctor.records[0])
    assert {k: second[0][k] for k in want} == pytest.approx(want)


def test_a_process_that_does_not_write_takes_a_run_dir_rank_zero_made(tmp_path: Path) -> None:
    # With several processes sharing run_dir, rank zero's on_train_begin writes meta.json
    # first; the refusal of a run_dir that holds a run is rank zero's alone (the others,
    # which write nothing, had raised and ended the job).
    args = _args(tmp_path / "out", max_grad_norm=0)

    def begin(zero: bool) -> ReluDoctorCallback:
        state = transformers.TrainerState()
        state.is_world_process_zero, state.global_step = zero, 0
        model = _model()
        cb = ReluDoctorCallback(run_dir=tmp_path / "rd", overhead_budget=None)
        cb.on_train_begin(args, state, transformers.TrainerControl(), model=model,
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        return cb

    first = begin(True)
    assert (tmp_path / "rd" / "meta.json").is_file()
    other = begin(False)
    assert other.doctor is not None and not other.doctor.is_writer
    for cb in (other, first):
        cb.on_train_end(args, transformers.TrainerState(), transformers.TrainerControl())
    # A train() resuming from a checkpoint saved without this callback (global step 3, no
    # relu_doctor state in it) cannot continue the run: it is told so, on rank zero.
    state = transformers.TrainerState()
    state.is_world_process_zero, state.global_step = True, 3
    model = _model()
    with pytest.raises(RunDirError, match=r"the checkpoint of step 3 this train\(\) resumes from "
                       r"holds no relu_doctor state .*: pass ReluDoctorCallback a new run_dir"):
        ReluDoctorCallback(run_dir=tmp_path / "rd").on_train_begin(
            args, state, transformers.TrainerControl(), model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert not _hooked(model)


def test_bad_input_gets_one_clear_message(tmp_path: Path) -> None:
    args = _args(tmp_path)  # max_grad_norm=1.0 by default
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=_data(),
                                   callbacks=[ReluDoctorCallback(autoclip=True)])
    with pytest.raises(ReluDoctorError, match="max_grad_norm"):
        trainer.train()
    cb = ReluDoctorCallback()
    with pytest.raises(ReluDoctorError, match="no optimizer yet"):
        cb.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl(),
                          model=_model(), optimizer=None)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("x", r"^unit_dims: expected \{pattern: int dim\}, e\.g\. .* got str 'x'"),
        ({"act": "last"}, r"^unit_dims: expected \{pattern: int dim\}.* 'act': 'last'"),
    ],
)
def test_unit_dims_is_checked_when_the_callback_is_made(value: Any, match: str) -> None:
    """Not a raw ValueError from ``dict('x')``, nor a bad dim found at ``trainer.train()``."""
    with pytest.raises(ReluDoctorError, match=match):
        ReluDoctorCallback(unit_dims=value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"leaky_relu_swap": {"bogus": 1}},
         r"^leaky_relu_swap: 'bogus' is not an argument of ActivationSwapper; it takes \['kind', "),
        ({"dormant_reset": {"evry": 2}}, r"^dormant_reset: 'evry' is not an argument of DormantRecycler"),
        ({"lr_rescue": {"factr": 0.5}}, r"^lr_rescue: 'factr' is not an argument of LRRescuer"),
        ({"autoclip": {"pct": 10}}, r"^autoclip: 'pct' is not an argument of AutoClip; it takes "
                                    r"\['percentile', 'history', 'warmup_steps'\]"),
        ({"dormant_reset": {"optimizers": None}},
         r"^dormant_reset: leave 'optimizers' out of the dict: \['model', 'optimizers'\] come from "
         r"the training framework\. DormantRecycler's other arguments: \['tau', "),
        ({"leaky_relu_swap": {"model": None}},
         r"^leaky_relu_swap: leave 'model' out of the dict: .* come from the training framework"),
        ({"treatment": {"cooldwn": 2}},
         r"^treatment: 'cooldwn' is not an argument of TreatmentPlan; .* Did you mean 'cooldown'\?$"),
        # values too, by the remedy's own checks
        ({"dormant_reset": {"every": 0}}, r"^dormant_reset: every: expected a positive integer \(>= 1\), got 0\.$"),
        ({"leaky_relu_swap": {"slope": 2.0}}, r"^leaky_relu_swap: slope: expected a number in"),
        ({"leaky_relu_swap": {"kind": "tanh"}}, r"^leaky_relu_swap: kind: "),
        ({"lr_rescue": {"triggers": ["vanishing"]}}, r"^lr_rescue: triggers: expected a non-empty"),
        ({"autoclip": {"percentile": 150}}, r"^autoclip: percentile: "),
        ({"treatment": {"cooldown": -1}}, r"^treatment: cooldown: "),
        # and the site selection
        ({"include": 3}, r"^include: expected a glob pattern or a list of them .* got int 3"),
        ({"exclude": ["ok", ""]}, r"^exclude: expected glob patterns .* got ''"),
        ({"functional": "yes"}, r"^functional: "),
    ],
)
def test_remedy_dicts_are_checked_when_the_callback_is_made(kwargs: dict[str, Any], match: str) -> None:
    """Not at ``trainer.train()`` with "__init__() got an unexpected keyword argument": the
    callback argument, the bad key and the keys allowed; a bad value in the remedy's own words."""
    with pytest.raises(ReluDoctorError, match=match):
        ReluDoctorCallback(**kwargs)


def test_the_training_curve_holds_the_trainers_loss_at_each_log(tmp_path: Path) -> None:
    """The run's metrics table and its event files (``train/loss``): the loss the Trainer
    logs right after each of our logs, at that step; the learning rates its steps used, as
    the Trainer logs them (its default schedule decays them at every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = ReluDoctorCallback(log_every_n_steps=2)
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path, gradient_accumulation_steps=2),
                                   train_dataset=_data(), callbacks=[cb])
    trainer.train()
    assert cb.doctor is not None and cb.doctor.run_dir is not None
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == [2, 4, 6]
    metrics = relu_doctor.load_run(cb.doctor.run_dir).metrics
    loss = metrics[metrics["name"] == "loss"]
    assert dict(zip(loss["step"], loss["value"], strict=True)) == pytest.approx(logged)
    rates = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "loss" in h}
    assert len(set(rates.values())) == 3  # a rate that moves at each log
    for group in ("lr/0", "lr/1"):  # (weight decay and none: the same rate)
        lr = metrics[metrics["name"] == group]
        assert dict(zip(lr["step"], lr["value"], strict=True)) == pytest.approx(rates)
    assert {r.step: r.metrics["loss"] for r in cb.doctor.records} == pytest.approx(logged)
    # the run-level numbers reach the Trainer's own log history (trainer_state.json), the
    # per-site detail does not
    ours = {h["step"]: {k: v for k, v in h.items() if k.startswith("relu_doctor/")}
            for h in trainer.state.log_history if "loss" in h}
    assert sum(r.step in ours for r in cb.doctor.records) == 3
    for r in cb.doctor.records:
        if r.step in ours:
            assert ours[r.step] == pytest.approx({**summary_scalars(r), **health_scalars(r)})
            seen = sum(int(row["units_seen"]) for row in r.site_rows)  # (nothing frozen here)
            dead = sum(int(row["dead"]) for row in r.site_rows)
            assert ours[r.step]["relu_doctor/health"] == pytest.approx(1 - dead / seen)
            assert ours[r.step]["relu_doctor/dead_fraction"] == pytest.approx(dead / seen)
            assert len(ours[r.step]) < len(record_scalars(r, tb.DEFAULT_METRICS))
    ea = EventAccumulator(str(cb.doctor.run_dir))
    ea.Reload()
    assert {e.step: e.value for e in ea.Scalars("train/loss")} == pytest.approx(logged)


class _LossAtLog(transformers.TrainerCallback):  # type: ignore[misc]
    """After ours in the list: at each of our logs, whether the record held the loss when
    made (before the Trainer's on_log, which is when the remedies judged)."""

    def __init__(self, cb: ReluDoctorCallback) -> None:
        self.cb, self.seen = cb, {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        last = self.cb._last
        if last is not None and last.step == state.global_step:
            from relu_doctor.remedies.judging import loss_of

            self.seen[last.step] = (last.window_loss, loss_of(last))


def test_each_record_holds_the_loss_when_made_for_the_remedies(tmp_path: Path) -> None:
    """The Trainer logs its loss only after our log: the remedies, which judge a change on
    the training loss too, never saw it (a review). The callback takes each training pass's
    ``loss`` from the model's output: the record holds the window's mean as
    ``window_loss`` when made, which the remedies read (the training curve keeps the
    Trainer's own figure: with gradient accumulation this Trainer sums its micro-batches'
    losses). Checked against the losses of the model's training passes taken here."""
    cb = ReluDoctorCallback(log_every_n_steps=2)
    spy = _LossAtLog(cb)
    model = _model()
    taken: list[float] = []
    model.register_forward_hook(
        lambda m, a, out: taken.append(float(out.loss)) if m.training and torch.is_grad_enabled() else None)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2),
                                   train_dataset=_data(), callbacks=[cb, spy])
    trainer.train()
    want = {2 * (i + 1): sum(taken[4 * i:4 * i + 4]) / 4 for i in range(3)}  # (2 steps x 2)
    assert sorted(spy.seen) == [2, 4, 6]
    assert {k: v[0] for k, v in spy.seen.items()} == pytest.approx(want, rel=1e-6)
    assert {k: v[1] for k, v in spy.seen.items()} == pytest.approx(want, rel=1e-6)
    assert cb._loss_hook is None  # (taken off at the end)


class _Step(transformers.TrainerCallback):  # type: ignore[misc]
    """A hand-written loop hook: the standalone ``watch`` stepped at each optimizer step."""

    def __init__(self, doc: Any) -> None:
        self.doc = doc

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.doc.step()


def test_callback_numbers_equal_the_standalone_watch(tmp_path: Path) -> None:
    cb = ReluDoctorCallback(log_every_n_steps=2)
    args = _args(tmp_path / "cb", gradient_accumulation_steps=2, eval_strategy="steps",
                 eval_steps=3)
    transformers.Trainer(model=_model(), args=args, train_dataset=_data(),
                         eval_dataset=_data(32), callbacks=[cb]).train()
    model = _model()
    args = _args(tmp_path / "watch", gradient_accumulation_steps=2, eval_strategy="steps",
                 eval_steps=3)
    with relu_doctor.watch(model, log_every_n_steps=2) as doc:
        transformers.Trainer(model=model, args=args, train_dataset=_data(),
                             eval_dataset=_data(32), callbacks=[_Step(doc)]).train()
    assert cb.doctor is not None
    cols = ["step", "site", "elements", "dead", "activation_rate", "mean_abs", "grad_rms"]
    a = cb.doctor.history().sort_values(["step", "site"])[cols].reset_index(drop=True)
    b = doc.history().sort_values(["step", "site"])[cols].reset_index(drop=True)
    assert len(a) == len(b) == 6
    assert list(a["site"]) == list(b["site"])
    for c in cols[2:]:
        assert a[c].to_numpy() == pytest.approx(b[c].to_numpy(), rel=1e-6), c


def test_a_finding_says_which_of_its_remedies_are_on() -> None:
    from relu_doctor.diagnosis import Finding
    from relu_doctor.integrations._common import FindingWarner

    f = Finding("dead", "s", "warning", "half dead.", {},
                "Swap (leaky_relu_swap=True) or recycle (dormant_reset=True).", 3)
    said: list[str] = []
    record = type("R", (), {"findings": [f]})()
    FindingWarner("info", said.append,
                  on={"leaky_relu_swap=True": None, "dormant_reset=True": None})(record)
    FindingWarner("info", said.append, on={"dormant_reset=True": None})(record)
    FindingWarner("info", said.append)(record)
    # A remedy whose include/exclude leave the finding's site out says so.
    FindingWarner("info", said.append, on={"leaky_relu_swap=True": lambda site: site != "s",
                                           "dormant_reset=True": lambda site: site == "s"})(record)
    assert said[0].endswith("(leaky_relu_swap, dormant_reset are on in this run: they act by "
                            "their own rule, and say when they do.)")
    assert said[1].endswith("(dormant_reset is on in this run: it acts by its own rule, and "
                            "says when it does.)")
    assert said[2].endswith("recycle (dormant_reset=True).")
    assert said[3].endswith("(dormant_reset is on in this run: it acts by its own rule, and says "
                            "when it does.) (leaky_relu_swap is on in this run, but does not "
                            "act at s: its include/exclude, or the kind of site it treats, "
                            "leave it out.)")
    # An evaluation stream's finding: the remedies (or the plan) on act on training's, so
    # "it acts by its own rule" (or the plan deciding) would promise what no remedy does.
    for on in ({"plan": None}, {"dormant_reset=True": None}):
        FindingWarner("info", said.append, on=on)(record, "evaluation")
        assert said[-1].startswith("relu_doctor: evaluation dead at s")
        assert said[-1].endswith("recycle (dormant_reset=True). (Found in the evaluation "
                                 "passes: the remedies act on what training shows, not on "
                                 "these.)")
    FindingWarner("info", said.append)(record, "evaluation")  # no remedy on: nothing to add
    assert said[-1].endswith("recycle (dormant_reset=True).")


def test_fp16_gradient_statistics_are_the_unscaled_gradients(tmp_path: Path) -> None:
    """Under fp16 the Trainer scales the loss (its scaler in accelerate's optimizer wrapper,
    which the callback is handed): the gradient statistics held the scale (1024x here). They
    are divided by it now, as in Lightning: grad_rms equals an unscaled run's."""
    rms = {}
    for scaled in (False, True):
        cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None)
        trainer = transformers.Trainer(model=_model(), args=_args(tmp_path / str(scaled)),
                                       train_dataset=_data())
        if scaled:  # what fp16 gives the Trainer on a GPU, on the CPU: accelerate's loss
            # scaler (backward scales the loss; the optimizer wrapper made in train() unscales,
            # skips a non-finite step and updates the scale)
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        trainer.add_callback(cb)
        trainer.train()
        assert cb.doctor is not None
        assert (cb.doctor.grad_scaler is not None) is scaled
        rms[scaled] = cb.doctor.history().sort_values(["step", "site"])["grad_rms"].to_numpy()
    assert rms[True] == pytest.approx(rms[False], rel=1e-3)  # (was 1024x)


def test_padding_mask_leaves_the_padding_of_the_trainers_batches_out(tmp_path: Path) -> None:
    """``padding_mask="attention_mask"`` reads the mask of each batch the Trainer passes
    (``model(**inputs)``): each site counts the real tokens only, against hooks of our own
    that keep the real positions of every training pass (one epoch: every sample)."""
    data = _data()
    g = torch.Generator().manual_seed(1)
    for row in data:  # real tokens first, 3 to 12 of them
        n = int(torch.randint(3, 13, (), generator=g))
        row["attention_mask"] = (torch.arange(12) < n).long()
        row["input_ids"] = row["input_ids"] * row["attention_mask"]
    model = _model()
    masks: list[torch.Tensor] = []
    active = {s: torch.zeros(32) for s in SITES}

    def take_mask(module: Any, args: Any, kwargs: Any) -> None:
        if module.training:
            masks.append(kwargs["attention_mask"].bool())

    def count(site: str) -> Any:
        def hook(module: Any, args: Any, out: torch.Tensor) -> None:
            if model.training:
                active[site] += (out.detach()[masks[-1]] > 0).sum(0)
        return hook

    handles = [model.register_forward_pre_hook(take_mask, with_kwargs=True)]
    handles += [model.get_submodule(s).register_forward_hook(count(s)) for s in SITES]
    cb = ReluDoctorCallback(padding_mask="attention_mask", every_n_steps=1)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=8),
                                   train_dataset=data, callbacks=[cb])
    trainer.train()
    for h in handles:
        h.remove()
    assert cb.doctor is not None and len(masks) == 8
    real = sum(int(m.sum()) for m in masks)
    assert real == sum(int(r["attention_mask"].sum()) for r in data) < 64 * 12
    for site in cb.doctor.sites:
        total = (site.stats.window + site.stats.lifetime)
        assert total[0].tolist() == [float(real)] * 32  # elements: the real tokens
        assert total[1].tolist() == active[site.name].tolist()  # active
    assert relu_doctor.load_run(tmp_path / "relu_doctor").meta["config"]["padding_mask"] == \
        "attention_mask"
    # HF clips at max_grad_norm=1.0 by default: the gradient findings say so, not "clip"
    assert cb.doctor.config.clipped_by == "the Trainer's max_grad_norm=1"


@pytest.mark.parametrize("mask", ["attention_mask", None])
def test_a_padding_mask_on_an_encoder_decoder_model_is_warned_of(tmp_path: Path,
                                                                 mask: str | None) -> None:
    """An audio trial's Whisper, its decoder padded to the encoder's length: the one mask
    of a pass was laid on the encoder's sites and the decoder's alike, silently (the README
    said "not for encoder-decoder models"). Said once at train(); not without a mask."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg)
    data = [{"input_ids": torch.randint(1, 32, (8,)), "attention_mask": torch.ones(8).long(),
             "labels": torch.randint(1, 32, (8,))} for _ in range(16)]
    cb = ReluDoctorCallback(padding_mask=mask, every_n_steps=1)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=2),
                                   train_dataset=data, callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "encoder-decoder" in str(w.message)]
    assert len(said) == (1 if mask else 0), said
    if mask:
        assert "T5ForConditionalGeneration" in said[0] and "Leave padding_mask off" in said[0]


@pytest.mark.parametrize("kind", ["t5", "nn.Transformer", "bert", "held t5", "t5, stream all"])
def test_watch_warns_of_a_padding_mask_on_an_encoder_decoder_as_the_callback_does(kind: str
                                                                                 ) -> None:
    """A T5 trial's plain loop: watch(padding_mask=) on T5 said nothing, where the HF
    callback warned. The Doctor says it, once (its evaluation stream's Doctor not again),
    of a model that holds one too (a wrapper, a LightningModule: a review) and on any
    stream; not on an encoder alone."""
    stream = "all" if kind.endswith("stream all") else "train"
    if kind.startswith(("t5", "held")):
        model: torch.nn.Module = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    elif kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, hidden_act="relu"))
    else:
        model = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1,
                                     num_decoder_layers=1, dim_feedforward=32)
    named = type(model).__name__
    if kind.startswith("held"):
        model = torch.nn.ModuleDict({"seq2seq": model})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relu_doctor.watch(model, padding_mask="attention_mask", eval_stream=stream == "train",
                          stream=stream).close()
    said = [w for w in caught if "encoder-decoder" in str(w.message)]
    assert len(said) == (0 if kind == "bert" else 1), [str(w.message) for w in said]
    if said:
        assert said[0].filename == __file__ and f"({named})" in str(said[0].message)


class _Spy(transformers.TrainerCallback):  # type: ignore[misc]
    """The test's own update ratios at each optimizer step (tests.reference.UpdateSpy)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kw: Any) -> None:
        from tests.reference import UpdateSpy

        self.spy = UpdateSpy(model, getattr(optimizer, "optimizer", optimizer))  # Accelerate's wrap


def test_the_last_partial_windows_update_ratio_is_the_last_steps(tmp_path: Path) -> None:
    """The Trainer knows its last optimizer step ahead (max_steps, set from the epochs when
    not given): the last, partial window (steps 5-7 of 4-step intervals, accumulation 2)
    has that step's update ratio, against the test's own step hooks, as the logs before."""
    spy = _Spy()
    cb = ReluDoctorCallback(log_every_n_steps=4)
    trainer = transformers.Trainer(
        model=_model(), args=_args(tmp_path, max_steps=7, gradient_accumulation_steps=2),
        train_dataset=_data(), callbacks=[spy, cb],
    )
    trainer.train()
    records = cb.doctor.records
    assert [r.step for r in records] == [4, 7] and records[-1].final
    for rec in records:
        want = spy.spy.ratios[rec.step - 1]
        got = rec.layer_table.set_index("layer")["update_ratio"].dropna()
        assert len(got) >= 10 and set(got.index) <= set(want)
        for layer, v in got.items():
            assert abs(v - want[layer]) <= 1e-5 * want[layer] + 1e-12, (rec.step, layer)
