"""FSDP2 (``torch.distributed.fsdp.fully_shard``), 2 processes on CPU (gloo): site
statistics equal one process over the same samples, and per-layer gradient norms of sharded
parameters equal the unsharded norms (each process adds its shards' squares; the log-time
cross-process sum makes the total)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import relu_doctor

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo processes: Linux only"),
]

WORLD, BATCH, STEPS, LOG_EVERY = 2, 6, 4, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 1))


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * BATCH, 8, generator=g) for _ in range(STEPS)]


def train(model: nn.Module, doc: relu_doctor.Doctor, opt: torch.optim.Optimizer,
          xs: list[torch.Tensor]) -> None:
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        doc.step()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.set_num_threads(1)
        model = make_model()
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        xs = [x[rank * BATCH : (rank + 1) * BATCH] for x in batches()]
        with relu_doctor.watch(model, log_every_n_steps=LOG_EVERY, every_n_steps=1,
                               optimizer=opt, all_reduce=all_reduce, world_size=WORLD,
                               is_writer=rank == 0) as doc:
            train(model, doc, opt, xs)
        if rank == 0:
            doc.history().to_pickle(Path(out) / "history.pkl")
            pd.concat([r.layer_table for r in doc.records]).to_pickle(Path(out) / "layers.pkl")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fsdp2_two_processes_equal_one_process_over_the_same_samples(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    sharded_hist = pd.read_pickle(tmp_path / "history.pkl")
    sharded_layers = pd.read_pickle(tmp_path / "layers.pkl")

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with relu_doctor.watch(model, log_every_n_steps=LOG_EVERY, every_n_steps=1,
                           optimizer=opt) as doc:
        train(model, doc, opt, batches())
    one_hist = doc.history()
    one_layers = pd.concat([r.layer_table for r in doc.records])

    assert list(sharded_hist["step"]) == list(one_hist["step"]) == [2, 2, 4, 4]
    numeric = [c for c in one_hist.columns
               if pd.api.types.is_float_dtype(one_hist[c]) and c != "cap"]
    assert "dead_fraction" in numeric and "grad_rms" in numeric
    for col in numeric:
        assert sharded_hist[col].tolist() == pytest.approx(
            one_hist[col].tolist(), rel=1e-6, abs=1e-9, nan_ok=True), col
    assert list(sharded_layers["layer"]) == list(one_layers["layer"])
    assert sharded_layers["grad_norm"].tolist() == pytest.approx(
        one_layers["grad_norm"].tolist(), rel=1e-6)
