"""The Lightning monitor callback, driven by a real Trainer on tiny models (CPU)."""

from __future__ import annotations

import math
import re
import signal
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import relu_doctor
from relu_doctor.callbacks import LeakyReluSwap, ReluDoctor, ReluDoctorTreatment, ReluDoctorWarning
from relu_doctor.diagnosis import DiagnosisConfig
from relu_doctor.errors import ReluDoctorError, RunDirError
from relu_doctor.events import Intervention
from relu_doctor.history import load_run
from relu_doctor.metrics import site_metrics, unit_metrics
from relu_doctor.reports import tensorboard as tb
from relu_doctor.reports.findings import kind_label
from relu_doctor.stats import FIELDS
from tests.reference import findings_table_rows, open_findings_by_step

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*is smaller than the logging interval.*",
    "ignore:.*LeafSpec.*",
)

SITES = ["net.1", "net.3"]
LAYERS = ["net.0", "net.2", "net.4"]


class TinyNet(L.LightningModule):
    """Linear-ReLU-Linear-ReLU-Linear; ``dead`` units of ``net.1`` never fire."""

    def __init__(self, d_in: int = 8, hidden: int = 16, lr: float = 0.1, dead: int = 0,
                 fail_at: int | None = None, interrupt_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        if dead:
            with torch.no_grad():
                self.net[0].bias[:dead] = -100.0
        self.lr = lr
        self.fail_at = fail_at
        self.interrupt_at = interrupt_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        if self.interrupt_at is not None and self.global_step == self.interrupt_at:
            raise KeyboardInterrupt
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_model(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def dataset(n: int = 48, d_in: int = 8, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(n: int = 48, batch_size: int = 8, seed: int = 1) -> DataLoader:
    return DataLoader(dataset(n, seed=seed), batch_size=batch_size, shuffle=False)


def trainer(root: Path, callbacks: list, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu", devices=1, max_epochs=100, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


def standalone(model: TinyNet, dl: DataLoader, steps: int, accumulate: int = 1, **kw):
    """The same training with relu_doctor.watch on a plain loop."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr)
    batches = [b for _ in range(steps * accumulate // len(dl) + 1) for b in dl]
    with relu_doctor.watch(model, optimizer=opt, **kw) as doc:
        for i in range(steps * accumulate):
            loss = model.loss(batches[i])
            (loss / accumulate if accumulate > 1 else loss).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()
                doc.step()
    return doc


def no_hooks_left(model: nn.Module, optimizers=()) -> bool:
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return False
    for opt in optimizers:
        if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
            return False
    return True


def expected_scalars(history: pd.DataFrame, layers: pd.DataFrame, metrics=tb.DEFAULT_METRICS,
                     prefix: str = "relu_doctor") -> dict[str, dict[int, float]]:
    """Tag -> {step: value}, built from a standalone run's tables (written out by hand)."""
    out: dict[str, dict[int, float]] = {}
    for row in history.to_dict("records"):
        for m in metrics:
            if m in ("saturated_fraction", "fully_saturated") and row["cap"] is None:
                continue
            v = float(row[m])
            if not math.isnan(v):
                out.setdefault(f"{prefix}/{m}/{row['site']}", {})[int(row["step"])] = v
        if row["steps_run"]:  # the window's sampling (one value per step, from any site)
            out.setdefault(f"{prefix}/steps_collected_fraction", {})[int(row["step"])] = (
                row["steps_collected"] / row["steps_run"]
            )
    for row in layers.to_dict("records"):
        for m in ("grad_norm", "update_ratio"):
            v = float(row[m])
            if not math.isnan(v):
                out.setdefault(f"{prefix}/{m}/{row['layer']}", {})[int(row["step"])] = v
    return out


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def numeric_close(a: pd.DataFrame, b: pd.DataFrame, rel: float = 1e-9) -> None:
    a = a.reset_index(drop=True)
    b = b.reset_index(drop=True)
    assert list(a["site"]) == list(b["site"])
    assert list(a["step"]) == list(b["step"])
    for col in tb.SITE_METRICS:
        for x, y in zip(a[col], b[col], strict=True):
            if isinstance(x, float) and math.isnan(x):
                assert math.isnan(y), col
            else:
                assert y == pytest.approx(x, rel=rel, abs=1e-12), col


# ---------------------------------------------------------------------------- TensorBoard


class StopAt(L.Callback):
    """Stops the fit after the batch of step ``step``, as EarlyStopping would: the callback
    cannot know in advance that it is the last."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.mark.parametrize(("stop", "last"), [(None, 22), (10, 10)], ids=["max_steps", "stopped"])
def test_tensorboard_findings_table_where_they_change_and_at_the_end_of_fit(tmp_path, stop, last):
    """Under a TensorBoardLogger the findings' table is written at the first log, at each
    log where a finding began, changed severity or ended, and at the last log (a final
    record at max_steps; at the end of a fit stopped early, whose last record is not), each
    the findings open then, replayed from the run's finding events; these go to their own
    table at the steps they happened."""
    from tensorboard.util import tensor_util

    cb = ReluDoctor(log_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callbacks = [cb] + ([StopAt(stop)] if stop else [])
    trainer(tmp_path, callbacks, max_steps=22, logger=logger).fit(make_model(), loader())
    run = cb.doctor.to_run()
    steps = sorted(int(s) for s in run.history["step"].unique())
    changed = {e.step for e in run.finding_events()}
    # a log in the middle and the last one with no change: both rules are at work
    assert steps[-1] == last and last not in changed and set(steps[1:-1]) - changed
    assert cb.doctor.records[-1].final == (stop is None)

    ea = read_events(Path(logger.log_dir))

    def texts(tag: str) -> dict[int, str]:
        return {t.step: tensor_util.make_ndarray(t.tensor_proto).item().decode()
                for t in ea.Tensors(f"{tag}/text_summary")}

    tables = texts("relu_doctor/findings")
    assert sorted(tables) == sorted(changed | {steps[0], steps[-1]})
    want = open_findings_by_step(run)
    for step, table in tables.items():
        assert findings_table_rows(table) == {
            (sev, kind_label(k), site) for sev, k, site in want[step]}, step
    assert tables[last] == tb.findings_markdown(cb.doctor.findings())
    assert sorted(texts("relu_doctor/finding_events")) == sorted(changed)


def test_tensorboard_matches_standalone(tmp_path):
    steps, every = 6, 3
    cb = ReluDoctor(log_every_n_steps=every)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(tmp_path, [cb], max_steps=steps, logger=logger).fit(make_model(), loader())
    ref = standalone(make_model(), loader(), steps, log_every_n_steps=every)

    # The callback's own record equals the standalone API on the same data and seed.
    numeric_close(ref.history(), cb.doctor.history())

    ea = read_events(Path(logger.log_dir))
    tags = ea.Tags()
    want = expected_scalars(ref.history(), pd.concat([r.layer_table for r in ref.records]))
    ours = {t for t in tags["scalars"] if t.startswith("relu_doctor/")}
    assert ours == set(want)
    assert {f"relu_doctor/grad_norm/{layer}" for layer in LAYERS} <= ours
    assert not [t for t in tags["scalars"] if t.startswith("train/")]  # Lightning logs those
    for t, by_step in want.items():
        got = {e.step: e.value for e in ea.Scalars(t)}
        assert set(got) == set(by_step) == {3, 6}
        for step, v in by_step.items():
            assert got[step] == pytest.approx(v, rel=1e-6, abs=1e-7), (t, step)

    # Histograms of per-unit activation rates: one per site and log step.
    units = pd.concat([r.unit_table for r in ref.records])
    for site in SITES:
        hist = ea.Histograms(f"relu_doctor/unit_activation_rate/{site}")
        assert [h.step for h in hist] == [3, 6]
        for h in hist:
            u = units[(units["site"] == site) & (units["step"] == h.step)]
            assert h.histogram_value.num == len(u) == 16
            assert h.histogram_value.sum == pytest.approx(u["activation_rate"].sum(), rel=1e-6)

    # The findings' table at the first log and at the last (see the next test).
    texts = ea.Tensors("relu_doctor/findings/text_summary")
    assert [t.step for t in texts] == [3, 6]

    # Custom scalars: one chart per metric whose regex holds every site of that metric.
    from tensorboard.plugins.custom_scalar import layout_pb2

    raw = ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    for metric in ("dead_fraction", "sparsity", "grad_rms", "grad_norm"):
        (pattern,) = charts[metric]
        matched = {t for t in ours if re.search(pattern, t)}
        assert matched == {t for t in ours if t.split("/")[1] == metric} and len(matched) >= 2

    # Nothing on the progress bar or in the LightningModule's logged metrics.
    assert not any("relu_doctor" in k for k in cb._trainer.progress_bar_metrics)
    # only the run-level numbers EarlyStopping/ModelCheckpoint may watch (issue 15)
    assert {k for k in cb._trainer.callback_metrics if "relu_doctor" in k} == {
        "relu_doctor/dead_fraction", "relu_doctor/dormant_fraction",
        "relu_doctor/lifetime_dead_fraction", "relu_doctor/health"}
    # The run directory is next to the logger's files and loads.
    run = relu_doctor.load_run(Path(logger.log_dir) / "relu_doctor")
    assert sorted(run.history["step"].unique()) == [3, 6]
    assert not list((Path(logger.log_dir) / "relu_doctor").rglob("events.out.tfevents.*"))
    assert no_hooks_left(cb.doctor.model)


def test_csv_logger_gets_scalars_and_run_dir_gets_tensorboard(tmp_path):
    cb = ReluDoctor(log_every_n_steps=2, metrics=["dead_fraction", "sparsity"], run_dir=tmp_path / "run")
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, [cb], max_steps=4, logger=logger).fit(make_model(), loader())
    df = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    hist = cb.doctor.history()
    cols = {c for c in df.columns if c.startswith("relu_doctor/")}
    assert cols == {f"relu_doctor/{m}/{s}" for m in ("dead_fraction", "sparsity") for s in SITES} | {
        f"relu_doctor/{m}/{layer}" for m in ("grad_norm", "update_ratio") for layer in LAYERS
    }
    for row in hist.to_dict("records"):
        got = df.loc[df["step"] == row["step"], f"relu_doctor/sparsity/{row['site']}"].dropna()
        assert got.iloc[0] == pytest.approx(row["sparsity"], rel=1e-9)
    assert sorted(df["step"].unique()) == [2, 4]
    # Without a TensorBoardLogger the run directory holds its own event files.
    ea = read_events(tmp_path / "run")
    assert "relu_doctor/sparsity/net.1" in ea.Tags()["scalars"]
    run = relu_doctor.load_run(tmp_path / "run")
    assert sorted(run.history["step"].unique()) == [2, 4]
    # ... with the training curve as train/<name>, equal to the run's metrics table
    recorded = {(f"train/{r['name']}", int(r["step"])): r["value"]
                for r in run.metrics.to_dict("records")}
    assert {t for t, _ in recorded} == {"train/lr"}
    events = {(t, e.step): e.value for t in ea.Tags()["scalars"] if t.startswith("train/")
              for e in ea.Scalars(t)}
    assert events == pytest.approx(recorded)


class LoggingNet(TinyNet):
    """TinyNet that logs its loss in training and in validation, with a learning rate that
    a scheduler changes at every step (the loss and the rate of each step kept)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.train_losses: dict[int, float] = {}
        self.rates: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.train_losses[self.global_step + 1] = float(loss)  # the step it ends
        self.rates[self.global_step + 1] = self.optimizers().param_groups[0]["lr"]
        self.log("train_loss", loss)
        self.log("shared", float(self.global_step + 1))  # logged in validation too
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")  # after this batch's self.log
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("val_loss", loss)
        self.log("shared", -1.0)
        return loss


def test_the_training_curve_holds_training_metrics_not_validations(tmp_path):
    """Lightning keeps validation's metrics in callback_metrics until the next validation:
    the run's training curve leaves them out and holds what training_step logged, at each
    logging step the value of that step, and the learning rate that step used."""
    torch.manual_seed(0)
    model = LoggingNet()
    cb = ReluDoctor(log_every_n_steps=2, run_dir=tmp_path / "run")
    trainer(tmp_path, [cb], max_steps=9, val_check_interval=3, limit_val_batches=2,
            num_sanity_val_steps=1).fit(model, loader(), loader(seed=9))
    run = relu_doctor.load_run(tmp_path / "run")
    assert set(run.metrics["name"]) == {"lr", "train_loss", "shared"}
    got = run.metrics[run.metrics["name"] == "train_loss"].set_index("step")["value"]
    assert sorted(got.index) == [2, 4, 6, 8, 9]  # 9: the partial window at the fit's end
    # a key logged in training and validation (the sanity check first): training's values;
    # at the fit's end (Lightning has reset the training loop's results, and validation ran
    # at step 9) it is left out, not guessed
    shared = run.metrics[run.metrics["name"] == "shared"].set_index("step")["value"]
    assert shared.to_dict() == {s: float(s) for s in (2, 4, 6, 8)}
    for step, value in got.items():
        assert value == pytest.approx(model.train_losses[step], rel=1e-6)
    lr = run.metrics[run.metrics["name"] == "lr"].set_index("step")["value"]
    assert lr.to_dict() == pytest.approx({s: model.rates[s] for s in (2, 4, 6, 8, 9)})
    events = read_events(tmp_path / "run").Tags()["scalars"]
    assert "train/train_loss" in events and not any("val_loss" in t for t in events)


def test_a_fit_that_raises_logs_its_last_steps_without_the_failed_batchs_values(tmp_path):
    """The batch that raised had self.logged already: its values are not a step's, and stay
    out of the window logged at the failure; the learning rate is the last step's."""
    torch.manual_seed(0)
    model = LoggingNet(fail_at=5)  # the sixth batch raises, after its self.log
    cb = ReluDoctor(log_every_n_steps=2, run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [cb], max_steps=9).fit(model, loader())
    metrics = relu_doctor.load_run(tmp_path / "run").metrics
    by_step = {s: dict(zip(g["name"], g["value"], strict=True)) for s, g in metrics.groupby("step")}
    assert sorted(by_step) == [2, 4, 5]
    assert by_step[4]["shared"] == 4.0 and by_step[4]["train_loss"] == pytest.approx(
        model.train_losses[4], rel=1e-6)
    assert by_step[5] == pytest.approx({"lr": model.rates[5]})


def test_default_run_dir_without_logger(tmp_path):
    cb = ReluDoctor(log_every_n_steps=2)
    trainer(tmp_path, [cb], max_steps=2).fit(make_model(), loader())
    run = relu_doctor.load_run(tmp_path / "relu_doctor_logs")
    assert list(run.history["site"]) == SITES


def test_default_run_dir_never_collides_and_a_checkpoint_continues_its_own(tmp_path):
    """Run again in the same default_root_dir: the next free ``relu_doctor_logs_1``, not a
    RunDirError at fit start. A fit resumed from that run's checkpoint continues
    ``relu_doctor_logs_1``, not a new ``_2``."""
    dl = loader()
    trainer(tmp_path, [ReluDoctor(log_every_n_steps=2)], max_steps=2).fit(make_model(), dl)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    second = ReluDoctor(log_every_n_steps=2)
    trainer(tmp_path, [second, ckpt], max_steps=4, enable_checkpointing=True).fit(
        make_model(), dl)
    assert second.doctor.run_dir == tmp_path / "relu_doctor_logs_1"
    [path] = (tmp_path / "ckpt").glob("*step=4.ckpt")
    trainer(tmp_path, [ReluDoctor(log_every_n_steps=2)], max_steps=8).fit(
        make_model(), dl, ckpt_path=path)
    assert sorted(p.name for p in tmp_path.glob("relu_doctor_logs*")) == [
        "relu_doctor_logs", "relu_doctor_logs_1"]
    steps = [sorted(load_run(tmp_path / d).history["step"].unique())
             for d in ("relu_doctor_logs", "relu_doctor_logs_1")]
    assert steps == [[2], [2, 4, 6, 8]]


class _Interrupt(L.Callback):
    """An error at a step (the fit stops; the window open there is logged)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("stopped")


def test_a_fit_resumed_beside_a_logger_continues_the_run_directory_of_the_run_that_saved_it(
        tmp_path):
    """Beside a logger the run directory is ``<trainer.log_dir>/relu_doctor``, and a fit
    resumed from a checkpoint gets a new logger version: it started a second, partial run
    directory there without a word, and no directory held the whole run (the first held the
    steps before the interruption, the second counted lifetime units from steps it did not
    hold). Where the run that saved the checkpoint stopped early, the resumed fit continues
    its directory now, said once; records after the checkpoint's step are replaced, as
    with an explicit run_dir, and the whole run reads as one. A run that finished is left
    whole: a fit from one of its checkpoints is a branch, recorded in its own version's
    directory, said (review: it replaced the finished run's later records); so is a run
    whose directory is gone."""
    import shutil

    def fit(steps: int, *cbs: L.Callback, ckpt_path: Path | None = None) -> ReluDoctor:
        mon = ReluDoctor(log_every_n_steps=2)
        trainer(tmp_path, [mon, *cbs], max_steps=steps, enable_checkpointing=bool(cbs),
                logger=CSVLogger(tmp_path, name="logs")).fit(make_model(), dl, ckpt_path=ckpt_path)
        return mon

    def steps(version: int) -> list[int]:
        path = tmp_path / "logs" / f"version_{version}" / "relu_doctor"
        return [int(s) for s in sorted(load_run(path).history["step"].unique())]

    dl = loader()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(RuntimeError, match="stopped"):
        fit(10, ckpt, _Interrupt(6))
    assert steps(0) == [2, 4, 6]  # (6: the window open at the interruption, logged)
    [path] = (tmp_path / "ckpt").glob("*step=4.ckpt")
    with pytest.warns(ReluDoctorWarning, match=r"continues the run directory .*version_0"):
        resumed = fit(10, ckpt_path=path)
    assert resumed.doctor.run_dir == tmp_path / "logs" / "version_0" / "relu_doctor"
    assert not (tmp_path / "logs" / "version_1" / "relu_doctor").exists()
    assert (tmp_path / "logs" / "version_1").is_dir()  # (the logger's own, as Lightning makes)
    assert steps(0) == [2, 4, 6, 8, 10]
    # that run finished at step 10: a fit from its step-4 checkpoint is a branch
    with pytest.warns(ReluDoctorWarning, match=r"went on past step 4 and finished: this fit, a "
                      r"branch from its checkpoint, keeps its records apart"):
        branch = fit(6, ckpt_path=path)
    assert branch.doctor.run_dir == tmp_path / "logs" / "version_2" / "relu_doctor"
    assert steps(0) == [2, 4, 6, 8, 10] and steps(2) == [6]
    # moved elsewhere (that directory gone): the logger's directory, said
    shutil.rmtree(tmp_path / "logs" / "version_0")
    with pytest.warns(ReluDoctorWarning, match=r"is not here .*records go to"):
        moved = fit(10, ckpt_path=path)
    assert moved.doctor.run_dir == tmp_path / "logs" / "version_3" / "relu_doctor"


# ---------------------------------------------------------------------------- steps


def test_gradient_accumulation_one_step_per_optimizer_step(tmp_path):
    cb = ReluDoctor(log_every_n_steps=2)
    grads = GradRecorder()
    trainer(tmp_path, [cb, grads], max_steps=4, accumulate_grad_batches=2).fit(
        make_model(), loader(n=64)
    )
    hist = cb.doctor.history()
    assert cb.doctor.global_step == 4
    assert sorted(hist["step"].unique()) == [2, 4]
    # Each window: 2 optimizer steps x 2 batches x 8 samples per unit.
    assert (hist["elements"] == 2 * 2 * 8 * 16).all() and (hist["window_steps"] == 2).all()
    ref = standalone(make_model(), loader(n=64), 4, accumulate=2, log_every_n_steps=2)
    numeric_close(ref.history(), hist, rel=1e-6)
    check_layer_norms(cb.doctor, grads)


class GradRecorder(L.Callback):
    """Reference: each layer's squared gradient norm when the optimizer is about to step."""

    def __init__(self) -> None:
        self.sq: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        per: dict[str, float] = {}
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                layer = name.rsplit(".", 1)[0]
                per[layer] = per.get(layer, 0.0) + float(p.grad.double().square().sum())
        self.sq.append(per)


def check_layer_norms(doctor, grads: GradRecorder) -> None:
    every = doctor.log_every_n_steps
    for rec in doctor.records:
        window = grads.sq[rec.step - every : rec.step]
        for row in rec.layer_table.to_dict("records"):
            want = math.sqrt(sum(w[row["layer"]] for w in window) / len(window))
            assert row["grad_norm"] == pytest.approx(want, rel=1e-5), row


def test_bf16_mixed_precision(tmp_path):
    cb = ReluDoctor(log_every_n_steps=2)
    grads = GradRecorder()
    trainer(tmp_path, [cb, grads], max_steps=4, precision="bf16-mixed").fit(make_model(), loader())
    hist = cb.doctor.history()
    assert sorted(hist["step"].unique()) == [2, 4]
    for col in ("sparsity", "mean_abs", "grad_rms", "grad_zero_fraction"):
        assert hist[col].map(math.isfinite).all(), col
    assert (hist["nonfinite"] == 0).all() and (hist["grad_nonfinite"] == 0).all()
    # Parameter-gradient norms are those the optimizer steps with (fresh, not the last step's).
    check_layer_norms(cb.doctor, grads)
    # Close to full precision (bf16 keeps ~3 significant digits).
    ref = standalone(make_model(), loader(), 4, log_every_n_steps=2)
    for a, b in zip(ref.history()["sparsity"], hist["sparsity"], strict=True):
        assert abs(a - b) < 0.05


def test_fp16_mixed_with_grad_scaler(tmp_path):
    """fp16 AMP on CPU through an explicit plugin (Trainer(precision="16-mixed") on CPU falls
    back to bf16): the scaler drives the step, so parameter gradients are read in the
    optimizer's pre-hook (after unscale_), and activation gradients are divided by the scale."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    cb = ReluDoctor(log_every_n_steps=2)
    grads = GradRecorder()
    trainer(tmp_path, [cb, grads], max_steps=4,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(make_model(), loader())
    assert cb.doctor.grad_scaler is scaler
    check_layer_norms(cb.doctor, grads)
    ref = standalone(make_model(), loader(), 4, log_every_n_steps=2).history()
    got = cb.doctor.history()
    # Unscaled: the fp32 run's gradient RMS, not 2**10 times it.
    for a, b in zip(ref["grad_rms"], got["grad_rms"], strict=True):
        assert b == pytest.approx(a, rel=2e-3)


def test_every_n_steps(tmp_path):
    cb = ReluDoctor(log_every_n_steps=4, every_n_steps=2)
    trainer(tmp_path, [cb], max_steps=4).fit(make_model(), loader())
    hist = cb.doctor.history()
    assert (hist["window_steps"] == 2).all() and (hist["elements"] == 2 * 8 * 16).all()


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_resume_continues_counts_and_windows(tmp_path):
    # 3 identical batches per epoch: Lightning's resume at an epoch end replays batch order
    # differently (it runs one more batch of the finished epoch), so make order irrelevant.
    x, y = dataset(8).tensors
    dl = DataLoader(TensorDataset(x.repeat(3, 1), y.repeat(3, 1)), batch_size=8)
    full = ReluDoctor(log_every_n_steps=4)
    trainer(tmp_path / "full", [full], max_steps=12).fit(make_model(), dl)

    first = ReluDoctor(log_every_n_steps=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path / "a", [first, ckpt], max_steps=6, enable_checkpointing=True).fit(
        make_model(), dl
    )
    path = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    assert saved["doctor"]["global_step"] == 6 and saved["doctor"]["window_steps"] == 2

    second = ReluDoctor(log_every_n_steps=4)
    trainer(tmp_path / "b", [second], max_steps=12).fit(make_model(seed=5), dl, ckpt_path=path)
    assert second.doctor.global_step == 12
    resumed = second.doctor.history()
    assert sorted(resumed["step"].unique()) == [8, 12]
    # The window open at the checkpoint continues: step 8 covers steps 5-8 as in one run.
    assert (resumed.loc[resumed["step"] == 8, "window_steps"] == 4).all()
    continuous = full.doctor.history()
    numeric_close(continuous[continuous["step"] >= 8], resumed, rel=1e-9)
    # Lifetime accumulators continue too.
    for s_full, s_res in zip(full.doctor.sites, second.doctor.sites, strict=True):
        assert torch.equal(s_full.stats.lifetime, s_res.stats.lifetime)


def test_resume_in_the_same_run_directory_equals_an_uninterrupted_run(tmp_path):
    """The per-layer gradient-norm window open at the checkpoint is checkpointed too, and
    the run directory continues after the checkpoint (the first fit's partial log of the
    open window is replaced by the resumed run's full one)."""
    x, y = dataset(8).tensors
    dl = DataLoader(TensorDataset(x.repeat(3, 1), y.repeat(3, 1)), batch_size=8)
    full = ReluDoctor(log_every_n_steps=4, run_dir=tmp_path / "full_run")
    trainer(tmp_path / "full", [full], max_steps=12).fit(make_model(), dl)
    run_dir = tmp_path / "run"
    first = ReluDoctor(log_every_n_steps=4, run_dir=run_dir)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path / "a", [first, ckpt], max_steps=6, enable_checkpointing=True).fit(
        make_model(), dl
    )
    assert sorted(load_run(run_dir).history["step"].unique()) == [4, 6]  # 6: partial
    second = ReluDoctor(log_every_n_steps=4, run_dir=run_dir)
    path = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    trainer(tmp_path / "b", [second], max_steps=12).fit(make_model(seed=5), dl, ckpt_path=path)
    got, want = load_run(run_dir), load_run(tmp_path / "full_run")
    assert sorted(got.history["step"].unique()) == [4, 8, 12]
    assert not got.problems
    w, g = (t.sort_values(["step", "layer"]).reset_index(drop=True)
            for t in (want.layers, got.layers))
    assert list(w["step"]) == list(g["step"]) and list(w["layer"]) == list(g["layer"])
    assert sorted(set(w["step"])) == [4, 8, 12]
    assert g["grad_norm"].tolist() == pytest.approx(w["grad_norm"].tolist(), rel=1e-9)
    numeric_close(want.history, got.history, rel=1e-9)
    # Without the checkpoint, a third fit into the same directory is refused.
    # It says how a Lightning fit continues a run (this callback has no resume=True).
    with pytest.raises(RunDirError, match=r"already holds run .*; continue it with "
                       r"trainer\.fit\(\.\.\., ckpt_path=\.\.\.\)"):
        trainer(tmp_path / "c", [ReluDoctor(run_dir=run_dir)], max_steps=2).fit(make_model(), dl)


def test_a_fit_resumed_in_a_new_process_does_not_warn_again_what_was_warned_before(tmp_path):
    """The findings already warned about are in the checkpoint: a fresh callback (as in a
    new process) resuming from it says only what is new."""
    x, y = dataset(8).tensors
    dl = DataLoader(TensorDataset(x.repeat(3, 1), y.repeat(3, 1)), batch_size=8)

    def dead_said(cb, root, also=(), ckpt=None, **kw):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer(root, [cb, *also], **kw).fit(make_model(dead=12), dl, ckpt_path=ckpt)
        return [str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)
                and str(w.message).startswith("relu_doctor: dead at net.1")]

    first = ReluDoctor(log_every_n_steps=2, warn="warning")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    assert len(dead_said(first, tmp_path / "a", max_steps=6, enable_checkpointing=True,
                         also=[ckpt])) == 1
    second = ReluDoctor(log_every_n_steps=2, warn="warning")
    again = dead_said(second, tmp_path / "b", max_steps=12,
                      ckpt=tmp_path / "ckpt" / "epoch=1-step=6.ckpt")
    assert any(f.kind == "dead" and f.site == "net.1" for f in second.doctor.findings())
    assert again == []
    # Without a checkpoint, a new run warns again.
    assert len(dead_said(ReluDoctor(log_every_n_steps=2, warn="warning"), tmp_path / "c",
                         max_steps=4)) == 1


def test_a_fit_whose_last_batches_skip_the_optimizer_is_told_nothing_about_stray_passes(
        tmp_path):
    """Manual gradient accumulation that skips the optimizer on the last batch: the
    warning about passes after the last step() is for a watch block's own loop, not for
    a fit whose loop the callback follows (it told the user to call step())."""

    class Accumulating(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.manual_backward(self.loss(batch) / 2)
            if (batch_idx + 1) % 2 == 0:
                opt = self.optimizers()
                opt.step()
                opt.zero_grad()

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path, [ReluDoctor(log_every_n_steps=100, every_n_steps=1)], max_epochs=1,
                max_steps=-1).fit(Accumulating(), loader(n=40))
    assert not [w for w in seen if "after the last step()" in str(w.message)]


def test_state_round_trip_and_state_key(tmp_path):
    cb = ReluDoctor(log_every_n_steps=4)
    trainer(tmp_path, [cb], max_steps=5).fit(make_model(), loader())
    state = cb.state_dict()
    other = ReluDoctor(log_every_n_steps=10)
    other.load_state_dict(state)
    again = other.state_dict()
    assert again["doctor"]["global_step"] == state["doctor"]["global_step"] == 5
    for key, site in state["doctor"]["sites"].items():
        assert torch.equal(again["doctor"]["sites"][key]["lifetime"], site["lifetime"])
        assert torch.equal(again["doctor"]["sites"][key]["window"], site["window"])
    assert ReluDoctor().state_key == ReluDoctor(log_every_n_steps=7).state_key
    assert ReluDoctor(include="net.1").state_key != ReluDoctor(include="net.3").state_key
    assert ReluDoctor().state_dict() == {}
    with pytest.raises(ReluDoctorError, match="version"):
        ReluDoctor().load_state_dict({"version": 99})


# ---------------------------------------------------------------------------- validation


def test_validation_is_excluded_by_default(tmp_path):
    plain = ReluDoctor(log_every_n_steps=3)
    trainer(tmp_path / "a", [plain], max_steps=6).fit(make_model(), loader())
    with_val = ReluDoctor(log_every_n_steps=3)
    trainer(tmp_path / "b", [with_val], max_steps=6, val_check_interval=2,
            num_sanity_val_steps=2, limit_val_batches=2).fit(make_model(), loader(), loader(seed=9))
    numeric_close(plain.doctor.history(), with_val.doctor.history())
    assert with_val.val_doctor is None


def test_validation_stream(tmp_path):
    cb = ReluDoctor(log_every_n_steps=3, monitor_validation=True, run_dir=tmp_path / "run")
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, [cb], max_steps=6, val_check_interval=3, limit_val_batches=2,
            num_sanity_val_steps=1, logger=logger).fit(make_model(), loader(), loader(seed=9))
    val = cb.val_doctor.history()
    assert sorted(val["step"].unique()) == [3, 6]  # one window per validation run
    assert (val["elements"] == 2 * 8 * 16).all()  # 2 batches of 8: the sanity check left out
    assert val["grad_rms"].isna().all()
    # Validation statistics are those of a scan of the same batches with the same weights.
    df = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    assert "relu_doctor_val/sparsity/net.1" in df.columns
    assert "relu_doctor/sparsity/net.1" in df.columns
    assert relu_doctor.load_run(tmp_path / "run" / "validation").history["step"].tolist() == [3, 3, 6, 6]
    # The training stream is untouched by validation.
    plain = ReluDoctor(log_every_n_steps=3)
    trainer(tmp_path / "p", [plain], max_steps=6).fit(make_model(), loader())
    numeric_close(plain.doctor.history(), cb.doctor.history())
    # Last validation equals a scan of the same batches with the final weights.
    model = cb.doctor.model
    res = relu_doctor.scan(model, loader(seed=9), max_batches=2)
    last = val[val["step"] == 6]
    for row in res.sites.to_dict("records"):
        got = last[last["site"] == row["site"]].iloc[0]
        assert got["sparsity"] == pytest.approx(row["sparsity"], rel=1e-9)


# ---------------------------------------------------------------------------- findings, events


def test_findings_warn_once_per_kind_and_site(tmp_path):
    cb = ReluDoctor(log_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=6).fit(make_model(dead=8), loader())
    ours = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    dead = [m for m in ours if m.startswith("relu_doctor: dead at net.1 ")]
    assert len(dead) == 1, ours
    assert "Remedy:" in dead[0] and "LeakyReLU" in dead[0]
    assert len(ours) == len(set(m.split(" (step")[0] for m in ours))
    assert len(cb.doctor.records) == 3  # found at every log, warned once


class MySwap(LeakyReluSwap):
    """A user's own subclass: it is still the LeakyReluSwap remedy."""


@pytest.mark.parametrize("remedy, said", [
    (lambda: MySwap(patience=100),
     "(LeakyReluSwap is on in this run: it acts by its own rule, and says when it does.)"),
    (lambda: MySwap(patience=100, exclude="net.*"),
     "(LeakyReluSwap is on in this run, but does not act at net.1: its include/exclude, or "
     "the kind of site it treats, leave it out.)"),
    (lambda: MySwap(patience=100, include="net.1"),
     "(LeakyReluSwap is on in this run: it acts by its own rule, and says when it does.)"),
    # (its step named, not "the plan is on"; the units dead since the start, its recycling
    # too, which can revive them)
    (lambda: ReluDoctorTreatment(check_init=False),
     "the treatment plan bound here (ReluDoctorTreatment) swaps this site once its dead "
     "fraction passes its swap step's threshold. (The treatment plan bound here "
     "(ReluDoctorTreatment) recycles this site's dead and dormant units once its dead "
     "fraction stays past its recycle step's threshold: see its interventions.)"),
    (lambda: None, None),
])
def test_a_finding_says_when_its_remedy_callback_is_on(tmp_path, remedy, said):
    """As under HF and Keras: a finding whose remedy is a callback of this fit says it is on,
    not to add it."""
    extra = remedy()
    callbacks = [ReluDoctor(log_every_n_steps=2)] + ([extra] if extra is not None else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks, max_steps=2).fit(make_model(dead=8), loader())
    dead = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)
            and str(w.message).startswith("relu_doctor: dead at net.1 ")]
    assert len(dead) == 1 and ("LeakyReluSwap" in dead[0]) == ("ReluDoctorTreatment" not in (said or ""))
    if said is None:
        assert "on in this run" not in dead[0] and "plan is on" not in dead[0]
    else:
        assert dead[0].endswith(said)


SWAP = Intervention(remedy="fake_swap", site="net.1", step=2, what="swapped net.1", id="f:1")


class FakeRemedy(L.Callback):
    """What a remedy callback does: listen to records, record an intervention."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_start(self, trainer, pl_module):
        mon = next(c for c in trainer.callbacks if isinstance(c, ReluDoctor))
        mon.doctor.add_listener(self.on_record)
        self.doctor = mon.doctor

    def on_record(self, record):
        self.seen.append(record.step)
        if len(self.seen) == 1:
            self.doctor.record_event(SWAP)


def test_listeners_and_events_reach_tensorboard_and_run_dir(tmp_path):
    remedy = FakeRemedy()
    cb = ReluDoctor(log_every_n_steps=2, run_dir=tmp_path / "run")
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(tmp_path, [remedy, cb], max_steps=4, logger=logger).fit(make_model(), loader())
    assert remedy.seen == [2, 4]
    run = relu_doctor.load_run(tmp_path / "run")
    assert run.interventions() == [SWAP.to_dict()]
    ea = read_events(Path(logger.log_dir))
    (text,) = ea.Tensors("relu_doctor/events/text_summary")
    assert text.step == 2 and b"swap" in text.tensor_proto.string_val[0]


def test_a_failing_tensorboard_logger_warns_once_and_training_goes_on(tmp_path):
    """The user's TensorBoardLogger on a full disk: its writer raises; the fit completes,
    one warning names the logger's folder and the cause, the run directory is complete."""
    import errno

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    logger.experiment.add_custom_scalars = full  # relu_doctor's first write; not Lightning's
    cb = ReluDoctor(log_every_n_steps=2, run_dir=tmp_path / "run", warn=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=6, logger=logger).fit(make_model(), loader())
    ours = [str(w.message) for w in caught if "TensorBoard logging" in str(w.message)]
    assert len(ours) == 1 and "No space left on device" in ours[0], ours
    assert logger.log_dir in ours[0]
    assert len(calls) == 1  # left out after its first failure
    assert relu_doctor.load_run(tmp_path / "run").history["step"].unique().tolist() == [2, 4, 6]


# ---------------------------------------------------------------------------- detaching


def test_exception_mid_fit_leaves_no_hook(tmp_path):
    cb = ReluDoctor(log_every_n_steps=2)
    model = make_model(fail_at=3)
    tr = trainer(tmp_path, [cb], max_steps=6)
    with pytest.raises(RuntimeError, match="boom"):
        tr.fit(model, loader())
    assert not cb.doctor.probe.attached
    assert no_hooks_left(model, tr.optimizers)
    # What was logged before the failure is on disk, and the step after it (the failure
    # came at the fourth step's training_step: three were taken).
    run = relu_doctor.load_run(tmp_path / "relu_doctor_logs")
    assert sorted(run.history["step"].unique()) == [2, 3]
    assert run.tables["windows"].set_index("step").loc[3, "steps_run"] == 1
    assert run.writer_open == ""
    # ... and the run directory says the fit ended on that error, not that it ran its course
    assert run.meta["ended_by"].startswith("RuntimeError: boom")


def test_an_error_in_a_validate_after_the_fit_is_not_the_fits(tmp_path):
    class BadValidation(TinyNet):
        def validation_step(self, batch, batch_idx):
            raise ValueError("bug in validation_step")

    cb = ReluDoctor(log_every_n_steps=2, run_dir=tmp_path / "run")
    model = BadValidation()
    tr = trainer(tmp_path, [cb], max_steps=4)
    tr.fit(model, loader())
    with pytest.raises(ValueError, match="bug in validation_step"):
        tr.validate(model, loader())
    assert cb.doctor.ended_by is None
    assert "ended_by" not in relu_doctor.load_run(tmp_path / "run").meta


def test_interrupt_mid_fit_leaves_no_hook(tmp_path):
    cb = ReluDoctor(log_every_n_steps=2)
    model = make_model(interrupt_at=3)
    tr = trainer(tmp_path, [cb], max_steps=6)
    old = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown
            tr.fit(model, loader())
    finally:
        signal.signal(signal.SIGINT, old)
    assert no_hooks_left(model, tr.optimizers)


def test_fit_end_detaches_and_doctor_stays_readable(tmp_path):
    model = make_model()
    cb = ReluDoctor(log_every_n_steps=2)
    assert cb.doctor is None
    tr = trainer(tmp_path, [cb], max_steps=3)
    tr.fit(model, loader())
    assert no_hooks_left(model, tr.optimizers)
    assert cb.doctor is not None and not cb.doctor.probe.attached
    # The last, partial window (step 3) was logged when training ended.
    assert sorted(cb.doctor.history()["step"].unique()) == [2, 3]
    assert all(f.step == 3 for f in cb.doctor.findings())


@pytest.mark.parametrize("forward", [True, False])
def test_no_relu_warns_once_and_steps_aside(tmp_path, forward):
    """Also when the module has no forward and its training_step calls ``self.net``: told
    there is nothing to watch, not that no training pass ran (the root is never called)."""

    class NoRelu(TinyNet):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x) if forward else self.net(x), y)

    cb = ReluDoctor(log_every_n_steps=2)
    model = NoRelu()
    with pytest.warns(ReluDoctorWarning, match="ran no ReLU-family activation") as seen:
        tr = trainer(tmp_path, [cb], max_steps=4)
        tr.fit(model, loader())
    assert sum("no ReLU-family" in str(w.message) for w in seen) == 1
    assert tr.global_step == 4  # training went on
    assert not cb.doctor.probe.attached and cb.doctor.history().empty


def test_a_first_batch_that_skips_the_models_relu_does_not_set_the_callback_aside(tmp_path):
    """A block dropped on the first batch (stochastic depth): the callback stepped aside for
    the whole fit, saying the model holding an nn.ReLU had nothing to watch."""

    class Dropped(TinyNet):
        def forward(self, x):
            return self.net[4](self.net[2](x.new_zeros(x.shape[0], 16))) + (
                0 if self.global_step == 0 else self.net(x))

    cb = ReluDoctor(log_every_n_steps=2, overhead_budget=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=4).fit(Dropped(), loader())
    assert not any("nothing to watch" in str(w.message) for w in seen)
    assert not any("steps aside" in str(w.message) for w in seen)
    assert {s.name for s in cb.doctor.sites} == {"net.1", "net.3"}
    assert sorted(cb.doctor.history()["step"].unique()) == [2, 4]


def test_functional_only_module_is_watched_without_a_flag(tmp_path):
    class Functional(TinyNet):  # as Lightning's DemoModel: F.relu in forward, no nn.ReLU
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.net[1](F.relu(self.net[0](x)))

    cb = ReluDoctor(log_every_n_steps=2)
    torch.manual_seed(0)
    model = Functional()
    trainer(tmp_path, [cb], max_steps=4).fit(model, loader())
    hist = cb.doctor.history()
    assert sorted(hist["site"].unique()) == ["(root):relu#0"]
    # 2 logs, each of 2 steps of 8 samples through 16 units.
    assert hist["step"].tolist() == [2, 4]
    assert (hist["units"] == 16).all() and (hist["elements"] == 2 * 8 * 16).all()


# ---------------------------------------------------------------------------- host syncs


class _CountSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else (kwargs or {}).get("device")
            if src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
                self.count += 1
        return func(*args, **(kwargs or {}))


class SyncCounter(L.Callback):
    """Counts host syncs from batch start to batch end (training_step, backward, optimizer
    step and the callbacks' hooks), keyed by global step."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode = _CountSyncs()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mode.__exit__(None, None, None)
        self.counts[trainer.global_step] = self.mode.count


def test_no_host_sync_on_non_logging_steps(tmp_path):
    counter = SyncCounter()
    # ReluDoctor before the counter: its on_train_batch_end (step marking) is counted.
    trainer(tmp_path, [ReluDoctor(log_every_n_steps=4), counter], max_steps=8).fit(
        make_model(), loader(n=64)
    )
    assert set(counter.counts) == set(range(1, 9))
    non_logging = {s: n for s, n in counter.counts.items() if s % 4}
    assert non_logging == dict.fromkeys(non_logging, 0)
    assert counter.counts[4] > 0 and counter.counts[8] > 0  # the reads happen at log steps


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"every_n_steps": 1.5}, "every_n_steps"),
        ({"tau": 1.5}, "tau"),
        ({"include": [3]}, "include"),
        ({"exclude": ""}, "exclude"),
        ({"run_dir": 5}, "run_dir"),
        ({"unit_dims": [1]}, r"^unit_dims: expected \{pattern: int dim\}.* got list \[1\]"),
        ({"unit_dims": {"net.1": 1.5}}, r"^unit_dims: expected \{pattern: int dim\}.* 'net.1': 1.5"),
        ({"gradients": "yes"}, "gradients"),
        ({"monitor_validation": 1}, "monitor_validation"),
        ({"metrics": ["dead_fraction", "nope"]}, "metrics.*nope.*sparsity"),
        ({"warn": "loud"}, "warn.*critical"),
        ({"config": {"tau": 0.2}}, "config"),
        ({"tau": 0.2, "config": DiagnosisConfig()}, r"tau: 0\.2 conflicts with config\.tau = 0\.1"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ReluDoctorError, match=match):
        ReluDoctor(**kwargs)


class Records(L.Callback):
    """Keeps the monitor's interval records (a listener, as a remedy would be)."""

    def __init__(self) -> None:
        self.records: list = []

    def on_train_start(self, trainer, pl_module):
        mon = next(c for c in trainer.callbacks if isinstance(c, ReluDoctor))
        mon.doctor.add_listener(self.records.append)


def test_config_tau_is_used_and_tau_is_its_shortcut(tmp_path):
    """Regression: ReluDoctor(config=DiagnosisConfig(tau=0.25)) diagnosed with tau 0.1 (the
    default of a ``tau`` argument silently won over the config)."""
    cb = ReluDoctor(log_every_n_steps=2, config=DiagnosisConfig(tau=0.25))
    assert cb.tau == cb.config.tau == 0.25
    seen = Records()
    trainer(tmp_path, [cb, seen], max_steps=2).fit(make_model(hidden=64), loader())
    assert cb.doctor.config.tau == 0.25
    (rec,) = seen.records
    units = rec.unit_table
    at = {t: int((units["dormant_score"] <= t).sum()) for t in (0.1, 0.25)}
    assert at[0.25] > at[0.1]  # the data tells the two thresholds apart
    assert sum(int(r["below_tau"]) for r in rec.site_rows) == at[0.25]
    dormant = (units["dormant_score"] <= 0.25) & ~units["dead"].astype(bool)
    assert sum(int(r["dormant"]) for r in rec.site_rows) == int(dormant.sum())
    assert {"dormant", "net.1"} <= {k for f in rec.findings for k in (f.kind, f.site)}
    # tau= is a shortcut for config=DiagnosisConfig(tau=...); both at once must agree.
    assert ReluDoctor(tau=0.25).config == DiagnosisConfig(tau=0.25, loop="lightning")
    assert ReluDoctor().config == DiagnosisConfig(loop="lightning")  # its remedies' names
    cfg = DiagnosisConfig(tau=0.25, dead_warning=0.2)
    assert ReluDoctor(tau=0.25, config=cfg).config == replace(cfg, loop="lightning")
    with pytest.raises(ReluDoctorError, match=r"tau: 0\.3 conflicts with config\.tau = 0\.25"):
        ReluDoctor(tau=0.3, config=cfg)


def test_bad_include_pattern_names_the_modules(tmp_path):
    with pytest.raises(ReluDoctorError, match=r"include.*'nope\*'.*net\.1"):
        trainer(tmp_path, [ReluDoctor(include="nope*")], max_steps=1).fit(make_model(), loader())


def test_site_metrics_list_matches_the_diagnosis():
    ones = torch.ones(len(FIELDS), 3, dtype=torch.float64)
    row = site_metrics(ones, unit_metrics(ones, ones, 0.1))
    assert set(tb.SITE_METRICS) == set(row)


def test_write_run_from_a_run_directory(tmp_path):
    cb = ReluDoctor(log_every_n_steps=2, run_dir=tmp_path / "run")
    trainer(tmp_path, [cb], max_steps=4, logger=CSVLogger(tmp_path)).fit(make_model(), loader())
    out = tb.write_run(relu_doctor.load_run(tmp_path / "run"), tmp_path / "tb2")
    ea = read_events(out)
    got = [(e.step, e.value) for e in ea.Scalars("relu_doctor/sparsity/net.3")]
    hist = cb.doctor.history()
    want = hist[hist["site"] == "net.3"][["step", "sparsity"]].itertuples(index=False)
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in want] == got


class _Padded(L.LightningModule):
    """A sequence model called with its batch's mask as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin(x))).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, mask = batch
        out = self(x, attention_mask=mask)
        return (out * mask).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_the_monitor_leaves_the_padding_out_with_padding_mask(tmp_path):
    """``ReluDoctor(padding_mask="attention_mask")``: the mask the LightningModule's forward
    is called with, against our own count of the real positions' activity."""
    torch.manual_seed(0)
    x = torch.randn(16, 5, 4)
    lengths = torch.randint(1, 6, (16,))
    mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
    model = _Padded()
    active = torch.zeros(6)

    def count(module, args, out):
        active.add_((out.detach()[seen[-1]] > 0).sum(0))

    seen: list[torch.Tensor] = []
    handles = [model.register_forward_pre_hook(
                   lambda m, a, k: seen.append(k["attention_mask"].bool()), with_kwargs=True),
               model.act.register_forward_hook(count)]
    mon = ReluDoctor(log_every_n_steps=2, every_n_steps=1, padding_mask="attention_mask")
    trainer = L.Trainer(max_steps=4, callbacks=[mon], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(x, mask), batch_size=4))
    for h in handles:
        h.remove()
    (site,) = mon.doctor.sites
    total = site.stats.window + site.stats.lifetime
    assert total[0].tolist() == [float(mask.sum())] * 6 < [20.0 * 4] * 6
    assert total[1].tolist() == active.tolist()


class _Spy(L.Callback):
    """The test's own update ratios at each optimizer step (tests.reference.UpdateSpy)."""

    def on_train_start(self, trainer, pl_module):
        from tests.reference import UpdateSpy

        self.spy = UpdateSpy(pl_module, trainer.optimizers[0])


@pytest.mark.parametrize("stop", [dict(max_steps=7), dict(max_epochs=2, accumulate_grad_batches=2)],
                         ids=["max_steps", "epochs-accumulated"])
def test_the_fits_last_partial_window_has_its_update_ratio(tmp_path, stop):
    """Lightning knows the fit's last optimizer step ahead: the last, partial window's
    update ratio is that step's (7 steps, or 2 epochs of 6 batches by 2), against the test's
    own step hooks, as at every logging step before it."""
    spy = _Spy()
    cb = ReluDoctor(log_every_n_steps=4)
    trainer(tmp_path, [spy, cb], **stop).fit(make_model(), loader())
    records = cb.doctor.records
    assert [r.step for r in records] == ([4, 6] if "max_epochs" in stop else [4, 7])
    assert records[-1].final
    for rec in records:
        want = spy.spy.ratios[rec.step - 1]
        got = rec.layer_table.set_index("layer")["update_ratio"]
        assert set(got.index) == set(LAYERS) == set(want)
        for layer in LAYERS:
            assert math.isclose(got[layer], want[layer], rel_tol=1e-5), (rec.step, layer)


class _LossTaking(TinyNet):
    """TinyNet recording each training batch's loss as ``training_step`` returns it (as a
    dict, with another output beside it)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.taken: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.taken.append(loss.item())
        self.log("train_loss", loss)
        return {"loss": loss, "other": loss * 0}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_record_holds_the_windows_mean_training_step_loss(tmp_path, accumulate):
    """The remedies' loss guard reads ``window_loss``, the mean of ``training_step``'s loss
    over the window's batches (Lightning divides what it hands back by the accumulation:
    multiplied back); what the module logs reaches the record as one step's value, too
    noisy for the guard (a smoke run's read 1086, then 4878), and is not it. Checked
    against the losses the module computed."""
    torch.manual_seed(0)
    model = _LossTaking()
    cb = ReluDoctor(log_every_n_steps=2, every_n_steps=1)
    trainer(tmp_path, [cb], max_steps=6, accumulate_grad_batches=accumulate).fit(
        model, loader())
    per = 2 * accumulate  # batches in a window
    records = cb.doctor.records
    assert [r.step for r in records] == [2, 4, 6]
    for i, r in enumerate(records):
        want = sum(model.taken[i * per:(i + 1) * per]) / per
        assert r.window_loss == pytest.approx(want, rel=1e-6)
        assert r.window_loss != pytest.approx(r.metrics["train_loss"], rel=1e-3)


def test_a_logger_folder_holding_a_run_gets_the_fits_record_beside_it(tmp_path):
    """Two jobs launched at once were given the same logger folder (Lightning's
    ``version_0``): the second's fit raised at its start, refused the folder's
    ``relu_doctor`` run directory, where without relu_doctor it trained (an operations
    trial). A folder the user did not name that holds a run sends the fit's record to the
    first free ``relu_doctor_1``..., said once; the first run stays whole."""
    from lightning.pytorch.loggers import TensorBoardLogger

    records = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cb = ReluDoctor(log_every_n_steps=2)
        logger = TensorBoardLogger(tmp_path, name="exp", version=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, [cb], max_steps=4, logger=logger).fit(make_model(seed), loader())
        said = [str(w.message) for w in caught if "holds another run" in str(w.message)]
        assert len(said) == seed, said
        records.append(cb.doctor.run_dir)
    base = tmp_path / "exp" / "version_0"
    assert records == [base / "relu_doctor", base / "relu_doctor_1"]
    for run_dir in records:
        assert sorted(set(load_run(run_dir).history["step"])) == [2, 4]
