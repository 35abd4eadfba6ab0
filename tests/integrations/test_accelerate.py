"""An ``accelerate`` loop (``Accelerator.prepare``, ``accumulate``, ``backward``) watched with
the standalone ``watch``: the optimizer inside accelerate's wrapper is the one hooked, its
per-layer gradient norms are the accumulated gradients' at the steps that update (checked
against an optimizer pre-hook of the test's own), training is unchanged, and a loop calling
``doc.step()`` at every micro-batch is told so once."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn

accelerate = pytest.importorskip("accelerate")

import relu_doctor  # noqa: E402
from relu_doctor.errors import ReluDoctorWarning  # noqa: E402
from tests import zoo  # noqa: E402
from tests.reference import StepNorms  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    """accelerate keeps its state in class-level singletons: none left to later tests."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _run(watch: str | None, micro: int = 8, accumulation: int = 2, seed: int = 0
         ) -> tuple[nn.Module, list[dict[str, float]], relu_doctor.Doctor | None, list[str]]:
    """``micro`` micro-batches under ``accumulate``; ``watch``: None (unwatched), "sync"
    (``doc.step()`` where ``sync_gradients``) or "every" (at every micro-batch). Returns
    the model, each update's per-layer gradient norms (the test's own pre-hook on the
    optimizer inside the wrapper), the Doctor and the ReluDoctorWarnings."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = zoo.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    norms = StepNorms(model, opt.optimizer).norms
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(micro)]
    doc = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if watch is not None:  # the wrapped optimizer, as prepare returned it
            doc = relu_doctor.watch(model, optimizer=opt, log_every_n_steps=1,
                                    overhead_budget=None)
        for x, y in batches:
            with acc.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
            if doc is not None and (watch == "every" or acc.sync_gradients):
                doc.step()
        if doc is not None:
            doc.close()
    said = [str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)]
    return model, norms, doc, said


def test_the_optimizer_inside_accelerates_wrapper_is_read_at_the_steps_that_update() -> None:
    plain, _, _, _ = _run(None)
    model, norms, doc, said = _run("sync")
    assert doc is not None and len(norms) == 4  # 8 micro-batches, 2 per update
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)  # training unchanged
    assert not [m for m in said if "doc.step() was called" in m]
    layers = doc.to_run().layers
    got = layers.pivot(index="step", columns="layer", values="grad_norm")
    assert list(got.index) == [1, 2, 3, 4]
    for step, want in enumerate(norms, start=1):
        for layer, norm in want.items():
            assert got.loc[step, layer] == pytest.approx(norm, rel=1e-6)


def test_doc_step_at_every_micro_batch_is_said_once() -> None:
    _, norms, doc, said = _run("every", micro=32, accumulation=4)
    assert doc is not None and len(norms) == 8
    calls = [m for m in said if "doc.step() was called" in m]
    assert len(calls) == 1
    assert "called at 16 collecting steps, and the optimizer it watches stepped at 4" in calls[0]
    assert "accelerator.sync_gradients" in calls[0]
