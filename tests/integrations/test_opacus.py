"""Differentially private training with Opacus (a trial's): watched, it trains as unwatched;
its ``DPOptimizer`` is taken as the optimizer it wraps; no remedy acts on it.

Opacus wraps the model in a ``GradSampleModule`` whose hooks compute per-sample gradients,
and the optimizer in a ``DPOptimizer`` that clips them, adds noise and steps the optimizer it
holds. relu_doctor's statistics are of the raw data, outside the privacy accounting: a
remedy's change made from them would leave the reported epsilon untrue (and a PReLU swap's
new parameter has no per-sample gradient: Opacus raised at the next step).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import ActivationSwapper, DormantRecycler, TreatmentPlan

opacus = pytest.importorskip("opacus")


def _private(seed: int = 0, wrap: bool = True, mode: str = "hooks"):
    """A small ReLU network made private (Poisson sampling off: the batches are fixed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 2))
    with torch.no_grad():
        model[0].bias[:8] = -30.0  # 8 dead units, seen by any watch
    x, y = torch.randn(256, 10), torch.randint(0, 2, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if not wrap:
        return model, opt, loader
    gm, dp_opt, loader = opacus.PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
    return gm, dp_opt, loader


def _train(model, opt, loader, doc=None, steps: int = 8):
    torch.manual_seed(1)  # (the noise)
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if doc is not None:
            doc.step(loss=loss.detach())


def test_a_private_run_watched_trains_as_unwatched_and_its_dp_optimizer_is_taken() -> None:
    """``watch(gm, optimizer=dp_opt)`` raised an AttributeError (a DPOptimizer has no step
    hooks of its own); it takes the optimizer the DPOptimizer steps. The parameters after
    8 steps are those of an unwatched run, no hook is left, the dead units are counted, and
    the per-layer gradient norm is that of the gradient the optimizer stepped with: after
    Opacus's clipping and noise (computed here from the gradients at each step)."""
    gm, dp_opt, loader = _private()
    _train(gm, dp_opt, loader)
    want = [p.detach().clone() for p in gm.parameters()]

    gm, dp_opt, loader = _private()
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in gm.modules())
    stepped: list[float] = []
    dp_opt.original_optimizer.register_step_pre_hook(  # the gradient it steps with
        lambda o, a, k: stepped.append(sum(float(p.grad.pow(2).sum())
                                           for p in gm._module[2].parameters())))
    with warnings.catch_warnings():
        warnings.simplefilter("error", relu_doctor.ReluDoctorWarning)
        with relu_doctor.watch(gm, optimizer=dp_opt, log_every_n_steps=8,
                               overhead_budget=None) as doc:
            assert doc.optimizers == [dp_opt.original_optimizer]
            _train(gm, dp_opt, loader, doc)
    assert all(torch.equal(a, b) for a, b in zip(want, gm.parameters(), strict=True))
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in gm.modules()) == hooks
    row = doc.to_pandas().set_index("site").loc["_module.1"]
    assert row["dead"] == 8 and row["units"] == 32
    layer = doc.records[-1].layer_table.set_index("layer").loc["_module.2"]
    assert layer["grad_norm"] == pytest.approx((sum(stepped) / len(stepped)) ** 0.5, rel=1e-5)


@pytest.mark.parametrize(("remedy", "mode", "inner"), [
    ("recycle", "hooks", False), ("plan", "hooks", False), ("prelu", "hooks", False),
    ("recycle", "hooks", True), ("recycle", "ew", True)])
def test_no_remedy_binds_to_a_private_model(remedy: str, mode: str, inner: bool) -> None:
    """A remedy decides from statistics of the raw data: bound to a private model it is
    refused before training, saying why (the PReLU swap raised at Opacus's next step); the
    model inside the wrapper too, in hooks and expanded-weights modes."""
    gm, dp_opt, loader = _private(mode=mode)
    model = gm._module if inner else gm
    with relu_doctor.watch(model, optimizer=dp_opt, overhead_budget=None) as doc:
        make = {"recycle": lambda: DormantRecycler(model, optimizers=dp_opt),
                "plan": lambda: TreatmentPlan(model, optimizer=dp_opt),
                "prelu": lambda: ActivationSwapper(model, kind="prelu", optimizer=dp_opt)}[remedy]
        what = "per-sample gradients on its parameters" if inner else "GradSampleModule"
        with pytest.raises(ReluDoctorError, match=rf"^model: .* differential privacy, got "
                           rf"Opacus \({what}\): .*epsilon"):
            make().bind(doc)
        _train(gm, dp_opt, loader, doc, steps=2)  # training goes on, watched
    assert len(doc.records) == 1


def test_a_remedy_bound_before_the_model_was_made_private_steps_aside() -> None:
    """Bound to the plain model, which ``make_private`` then wraps (its hooks on the model's
    layers): the recycler makes no change from then on, says so once, and training goes on
    as it would unwatched."""
    model, opt, loader = _private(wrap=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=2,
                               overhead_budget=None) as doc:
            recycler = DormantRecycler(model, optimizers=opt).bind(doc)
            gm, dp_opt, loader = opacus.PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False)
            _train(gm, dp_opt, loader, doc, steps=6)
    said = [str(w.message) for w in caught if "differential privacy" in str(w.message)]
    assert len(said) == 1 and "dormant_reset remedy makes no changes from step 2" in said[0]
    assert not doc.to_run().interventions()
    assert recycler._stepped_aside


def test_a_clipper_bound_before_the_model_was_made_private_stops_clipping() -> None:
    """AutoClip, bound to the plain model: after make_private it said it made no more
    changes, and its optimizer hook went on clipping the noised gradient by a history of
    raw norms (a review). Its hook is taken off: the steps after its next log train as
    without it."""
    from relu_doctor.remedies import AutoClip

    model, opt, loader = _private(wrap=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=2,
                               overhead_budget=None) as doc:
            clip = AutoClip(percentile=1).bind(doc)
            clip.attach(opt)
            gm, dp_opt, loader = opacus.PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False)
            _train(gm, dp_opt, loader, doc, steps=3)  # (a log at step 2: it steps aside)
            assert clip._stepped_aside and not clip._handles
            hooks = opt._optimizer_step_pre_hooks.values()  # (the monitor's own stays)
            assert all(getattr(h, "__self__", None) is not clip for h in hooks)


def test_a_model_holding_a_private_model_after_a_layer_of_its_own_is_refused() -> None:
    gm, dp_opt, _ = _private()
    outer = nn.Sequential(nn.Linear(10, 10), gm)
    with (relu_doctor.watch(outer, optimizer=dp_opt, overhead_budget=None) as doc,
          pytest.raises(ReluDoctorError, match=r"Opacus \(GradSampleModule\)")):
        DormantRecycler(outer, optimizers=dp_opt).bind(doc)
