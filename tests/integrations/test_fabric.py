"""A Lightning Fabric loop (``fabric.setup``, ``fabric.backward``) watched with the standalone
``watch``, given what ``setup`` returned: the sites are named by the model's own paths (not
``_forward_module.*``), each layer's gradient norm is the RMS over the window's steps of the
norms the test's own optimizer pre-hook reads, the learning rate logged is the one each
step used under a per-step scheduler, training is unchanged, and a treatment plan given the
model itself binds to a Doctor watching Fabric's wrapper (a trial found each wrong)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

fabric_mod = pytest.importorskip("lightning.fabric")

import relu_doctor  # noqa: E402
from relu_doctor.errors import ReluDoctorWarning  # noqa: E402
from tests import zoo  # noqa: E402
from tests.reference import StepNorms  # noqa: E402

STEPS, LOG = 10, 5


def _run(watch: bool, wrapped: bool = True) -> dict[str, Any]:
    """``STEPS`` steps of SGD with a scheduler halving the rate each step; ``wrapped``: give
    ``watch`` what ``fabric.setup`` returned (else the model and optimizer themselves).
    Returns the model, the Doctor, the test's own per-step layer norms and used rates."""
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    raw = zoo.mlp()
    raw_opt = torch.optim.SGD(raw.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(raw_opt, lambda s: 0.5 ** s)
    model, opt = fabric.setup(raw, raw_opt)
    assert type(model).__name__ == "_FabricModule" and type(opt).__name__.startswith("Fabric")
    own = StepNorms(raw, raw_opt)
    gen = torch.Generator().manual_seed(1)
    doc = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if watch:
            doc = relu_doctor.watch(model if wrapped else raw, optimizer=opt if wrapped else raw_opt,
                                    log_every_n_steps=LOG, every_n_steps=1, overhead_budget=None)
        for _ in range(STEPS):
            x, y = torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
            sched.step()
            if doc is not None:
                doc.step()
        if doc is not None:
            doc.close()
    own.handle.remove()
    return {"model": raw, "wrapper": model, "doc": doc, "norms": own.norms, "rates": own.rates,
            "said": [str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)]}


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_fabric_loop_is_watched_through_what_setup_returned() -> None:
    plain, fab, own = _run(False), _run(True), _run(True, wrapped=False)
    doc = fab["doc"]
    assert doc is not None and own["doc"] is not None and not fab["said"]
    # the model's own paths, as when the model itself is watched
    sites = list(doc.to_pandas()["site"])
    assert sites == list(own["doc"].to_pandas()["site"]) and sites
    assert not any("_forward_module" in s for s in sites)
    run = doc.to_run()
    layers = run.layers
    assert not layers.empty and not layers["layer"].str.contains("_forward_module").any()
    # each layer's norm: the RMS over the window's steps of the test's own per-step norms
    for window, step in ((fab["norms"][:LOG], LOG), (fab["norms"][LOG:], STEPS)):
        got = layers[layers["step"] == step].set_index("layer")["grad_norm"]
        assert set(got.index) == set(window[0])
        for layer, value in got.items():
            want = math.sqrt(sum(n[layer] ** 2 for n in window) / len(window))
            assert value == pytest.approx(want, rel=1e-5), layer
    # the rate each logged step used, not the scheduler's next
    lr = run.metrics.query("name == 'lr'").set_index("step")["value"]
    assert list(lr.index) == [LOG, STEPS]
    assert list(lr) == pytest.approx([fab["rates"][LOG - 1], fab["rates"][STEPS - 1]])
    assert fab["rates"][LOG - 1] != fab["rates"][LOG]
    # training unchanged, every hook taken off
    assert all(torch.equal(a, b) for a, b in zip(plain["model"].state_dict().values(),
                                                  fab["model"].state_dict().values(), strict=True))
    assert _hooks(fab["model"]) == _hooks(plain["model"])


def test_the_doctor_is_state_in_fabric_save_and_load(tmp_path: Any) -> None:
    """The README's ``fabric.save(path, {..., "relu_doctor": doc})``: a resumed Doctor gets
    the saved one's state through ``fabric.load``."""
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = fabric.setup(zoo.mlp())
    doc = relu_doctor.watch(model, log_every_n_steps=4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        fabric.backward(model(torch.randn(8, 10, generator=gen)).square().mean())
        doc.step()
    fabric.save(tmp_path / "ckpt.pt", {"relu_doctor": doc})
    saved = doc.state_dict()
    doc.close()  # (as a process that ended)
    again = relu_doctor.watch(model, log_every_n_steps=4)
    assert again.global_step == 0
    fabric.load(tmp_path / "ckpt.pt", {"relu_doctor": again})
    assert again.global_step == doc.global_step == 6
    assert again.state_dict().keys() == saved.keys()
    again.detach()


def test_a_plan_given_the_model_itself_binds_to_a_doctor_watching_fabrics_wrapper() -> None:
    from relu_doctor.remedies import TreatmentPlan

    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    raw = zoo.mlp()
    model, opt = fabric.setup(raw, torch.optim.SGD(raw.parameters(), lr=0.1))
    doc = relu_doctor.watch(model, optimizer=opt)
    plan = TreatmentPlan(raw, optimizer=opt).bind(doc)
    assert plan.model is doc.model is raw
    assert TreatmentPlan(model, optimizer=opt).model is raw
    doc.detach()


def test_fabrics_loss_scaler_is_divided_out_of_the_gradient_statistics() -> None:
    """Under Fabric's ``16-mixed`` (its precision plugin's GradScaler) the gradient statistics
    read the scale times the gradient (65536x: a trial); the scaler of what ``setup``
    returned is now found. The test's own: each ReLU output's gradient divided by the scale
    of that backward."""
    from lightning.fabric.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1,
                               plugins=MixedPrecision("16-mixed", "cpu", scaler=scaler))
    torch.manual_seed(0)
    raw = zoo.mlp()
    model, opt = fabric.setup(raw, torch.optim.SGD(raw.parameters(), lr=0.01))
    squares, count = 0.0, 0

    def keep(_: nn.Module, __: Any, out: torch.Tensor) -> None:
        scale = float(scaler.get_scale())

        def grad(g: torch.Tensor) -> None:
            nonlocal squares, count
            squares += float((g.double() / scale).square().sum())
            count += g.numel()
        out.register_hook(grad)

    handle = raw[1].register_forward_hook(keep)
    gen = torch.Generator().manual_seed(1)
    with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=LOG, every_n_steps=1,
                           overhead_budget=None) as doc:
        assert doc.grad_scaler is scaler
        for _ in range(LOG):
            x, y = torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
            doc.step()
    handle.remove()
    row = doc.to_pandas().set_index("site").loc["1"]
    assert row["grad_rms"] == pytest.approx(math.sqrt(squares / count), rel=1e-4)
