"""Shared fixtures: a seeded RNG for every test, the default overhead budget pinned to every
step (tests marked ``real_overhead_budget`` excepted), and ``run_watched`` which trains a zoo
model under :func:`relu_doctor.watch` and the independent reference recorder side by side."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# Keras 3 runs on PyTorch here; set before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor import sampling
from tests import reference as ref
from tests import zoo

# One intra-op thread per test process: these tensors are tiny, and on a small shared
# machine (2 cores, pytest-xdist workers) OpenMP threads spinning against each other made
# the suite many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so its data and weights are reproducible."""
    torch.manual_seed(0)


REAL_BUDGET = "real_overhead_budget"


@pytest.fixture(scope="session", autouse=True)
def _pin_overhead_budget() -> Iterator[None]:
    """The default ``overhead_budget`` collects every step in the suite, so that default
    ``watch()`` runs (and the Lightning, Keras and HF callbacks) compare exactly with the
    every-step reference computations: with a budget, which steps collect depends on timing.
    Set through the environment (relu_doctor.sampling.ENV) for the whole session, before any
    module-scoped fixture trains, and reaching processes that DDP spawns and subprocesses."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(sampling.ENV, "none")
        yield


@pytest.fixture(autouse=True)
def _real_overhead_budget(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked ``real_overhead_budget`` gets the real default (0.03)."""
    if request.node.get_closest_marker(REAL_BUDGET) is not None:
        monkeypatch.delenv(sampling.ENV, raising=False)


@dataclass
class WatchedRun:
    """A model trained for ``steps`` steps under a Doctor, with a reference recording."""

    model: nn.Module
    doc: relu_doctor.Doctor
    recorder: ref.Recorder
    batches: list[torch.Tensor]
    outputs: list[torch.Tensor]

    @property
    def steps(self) -> int:
        return len(self.batches)

    def site_of(self, key: tuple[str, int]) -> Any:
        """The relu_doctor site that the reference call ``(path, index)`` should map to."""
        return self.doc.probe.site(ref.site_names(self.recorder)[key])


def _recorder_for(model: nn.Module) -> type[ref.Recorder]:
    random_slopes = any(isinstance(m, nn.RReLU) for m in model.modules())
    return ref.GradOutRecorder if random_slopes else ref.Recorder


@pytest.fixture
def run_watched() -> Callable[..., WatchedRun]:
    """``run_watched(case, steps=4, batch_size=8, lr=0.05, model=None, batches=None,
    **watch_kwargs)``.

    Trains ``case``'s model (or ``model``) on fresh batches (or ``batches``), one per step,
    with SGD so that weights move and windows differ (no optimizer when ``lr`` is None),
    while relu_doctor and the reference recorder both watch. ``optimizer=True`` among the
    watch arguments passes that SGD optimizer to :func:`relu_doctor.watch`. The Doctor and the
    recorder are detached on return; their numbers stay readable.
    """

    def run(
        case: zoo.Case,
        *,
        steps: int = 4,
        batch_size: int = 8,
        lr: float | None = 0.05,
        model: nn.Module | None = None,
        batches: list[torch.Tensor] | None = None,
        **watch_kwargs: Any,
    ) -> WatchedRun:
        model = case.model() if model is None else model
        if batches is None:
            batches = [case.batch(batch_size) for _ in range(steps)]
        recorder = _recorder_for(model)(model)
        opt = None if lr is None else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
        if watch_kwargs.get("optimizer") is True:
            watch_kwargs["optimizer"] = opt
        try:
            with relu_doctor.watch(model, **watch_kwargs) as doc:
                outputs = zoo.train(model, batches, doc=doc, optimizer=opt)
        finally:
            recorder.remove()
        return WatchedRun(model, doc, recorder, batches, outputs)

    return run
