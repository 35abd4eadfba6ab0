"""The monitor callback under 2-process DDP on CPU (ddp_spawn, gloo).

Each rank sees different samples (rank r takes indices r, r+2, ...), so the one-process
reference runs over their union: batch size 8 against 4 per rank, the same samples in every
step. DDP averages the ranks' gradients, so parameters follow the same path (up to rounding)
and the summed statistics must equal the one-process run's.

Lightning's own DistributedSampler always shuffles training data, with a permutation that
the one-process run would not share; the ranks' split is therefore made by
:class:`Interleaved` (no shuffle) with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Sampler, TensorDataset

import relu_doctor
from relu_doctor.callbacks import ReluDoctor
from tests.callbacks.test_monitor import TinyNet, dataset, make_model, numeric_close, trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers.*",
        "ignore:.*is smaller than the logging interval.*",
        "ignore:.*LeafSpec.*",
        "ignore::relu_doctor.callbacks.ReluDoctorWarning",
        "ignore:.*ddp_spawn.*",
        "ignore:.*callbacks used to create the checkpoint.*",
    ),
]


class Interleaved(Sampler[int]):
    """Rank r of w takes indices r, r + w, r + 2w, ... in order (rank read when iterated,
    inside the spawned process)."""

    def __init__(self, n: int) -> None:
        self.n = n

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


def periodic_loader(batch_size: int) -> DataLoader:
    """16 samples repeating with period 8: every step, on one process (batch 8) or on two
    (batch 4 each, even and odd indices), sees exactly the 8 distinct samples. That also
    makes Lightning's batch order after a resume irrelevant."""
    x, y = dataset(8).tensors
    ds = TensorDataset(x.repeat(2, 1), y.repeat(2, 1))
    return DataLoader(ds, batch_size=batch_size, sampler=Interleaved(len(ds)))


def test_ddp_equals_one_process_and_writes_one_run_dir(tmp_path):
    every = 3
    # One process, 6 steps: the reference.
    one = ReluDoctor(log_every_n_steps=every)
    trainer(tmp_path / "one", [one], max_steps=6).fit(make_model(), periodic_loader(8))
    ref = one.doctor.history()

    # Two processes, 4 steps (2 epochs), a checkpoint at each epoch end.
    ddp_root = tmp_path / "ddp"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer(
        ddp_root, [ReluDoctor(log_every_n_steps=every), ckpt], max_steps=4,
        strategy="ddp_spawn", devices=2, enable_checkpointing=True,
        use_distributed_sampler=False,
        logger=CSVLogger(ddp_root, name="csv", version=0),
    ).fit(make_model(), periodic_loader(4))

    metas = sorted(ddp_root.rglob("meta.json"))
    assert [m.parent.relative_to(ddp_root).as_posix() for m in metas] == ["csv/version_0/relu_doctor"]
    run = relu_doctor.load_run(metas[0].parent)
    assert sorted(run.history["step"].unique()) == [3, 4]  # interval, then the final flush
    # Summed across ranks at log time: equal to one process over the union.
    numeric_close(ref[ref["step"] == 3], run.history[run.history["step"] == 3], rel=1e-5)
    assert (run.history["elements"][run.history["step"] == 3] == 3 * 8 * 16).all()
    assert {k: run.meta["config"].get(k) for k in ("processes", "statistics")} == {
        "processes": 2, "statistics": "summed across the processes"}
    ref_layers = one.doctor.records[0].layer_table
    got_layers = run.layers[run.layers["step"] == 3].reset_index(drop=True)
    assert list(got_layers["layer"]) == list(ref_layers["layer"])
    for a, b in zip(ref_layers["grad_norm"], got_layers["grad_norm"], strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    for a, b in zip(ref_layers["update_ratio"], got_layers["update_ratio"], strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    # Metrics reached the (rank-zero) CSV logger.
    csv = (ddp_root / "csv" / "version_0" / "metrics.csv").read_text()
    assert "relu_doctor/sparsity/net.1" in csv

    # The checkpoint at step 4 holds the window (step 4) summed over both ranks: a
    # one-process resume continues it, and its step-6 window equals the reference's.
    resumed = ReluDoctor(log_every_n_steps=every)
    trainer(tmp_path / "resume", [resumed], max_steps=6).fit(
        make_model(seed=3), periodic_loader(8), ckpt_path=tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    )
    hist = resumed.doctor.history()
    assert sorted(hist["step"].unique()) == [6]
    numeric_close(ref[ref["step"] == 6], hist, rel=1e-5)
    assert not any(math.isnan(v) for v in hist["grad_rms"])
    for s_ref, s_res in zip(one.doctor.sites, resumed.doctor.sites, strict=True):
        torch.testing.assert_close(s_ref.stats.lifetime, s_res.stats.lifetime, rtol=1e-5, atol=0)


class SkipsActivations(TinyNet):
    """Process 1 runs its first ``skip`` steps without the ReLUs (a branch it did not take):
    no site there until step ``skip``."""

    def __init__(self, skip: int) -> None:
        super().__init__()
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_rank == 1 and self.trainer.global_step < self.skip:
            return self.net[4](self.net[2](self.net[0](x)))
        return self.net(x)


def test_a_process_whose_first_passes_ran_no_activation_neither_stops_nor_blocks_the_others(
    tmp_path,
):
    """On one process the callback steps aside when the model's pass ran no activation.
    Under DDP one process doing so left the other waiting in its log-time sum (here the
    process group's timeout ends that wait); it goes on instead, and the window the
    processes did not both see is rank zero's own, unjudged, summed at the next log."""
    every, skip = 2, 2
    root = tmp_path / "ddp"
    torch.manual_seed(0)
    trainer(
        root, [ReluDoctor(log_every_n_steps=every)], max_steps=4,
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)), devices=2,
        use_distributed_sampler=False, logger=CSVLogger(root, name="csv", version=0),
    ).fit(SkipsActivations(skip), periodic_loader(4))
    run = relu_doctor.load_run(root / "csv" / "version_0" / "relu_doctor")
    windows = run.tables["windows"].set_index("step")
    assert list(windows.index) == [2, 4]
    assert not windows.loc[2, "judged"] and windows.loc[4, "judged"]
    elements = run.history.groupby("step")["elements"].unique()
    units = 16
    assert list(elements[2]) == [every * 4 * units]  # process 0's 4 samples per step
    # The first window, read alone, stayed open: process 0's 4 steps, process 1's last 2.
    assert list(elements[4]) == [(2 * every + every) * 4 * units]
