"""FSDP, 2 processes on CPU (gloo): with FSDP2 (``torch.distributed.fsdp.fully_shard``) site
statistics equal one process over the same samples, and per-layer gradient norms of sharded
parameters equal the unsharded norms (each process adds its shards' squares; the log-time
cross-process sum makes the total).

Remedies: those that edit whole weights or optimizer state (ReDo recycling, Continual
Backprop, a PReLU swap) or measure gradient norms on the local shards (AGC) refuse sharded
parameters before training, naming what they found; AutoClip (with the whole gradient's norm
from the DTensor shards), the learning-rate cut and the LeakyReLU swap act on FSDP2 as on one
process. The remedy callbacks refuse Lightning's
sharding strategies (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy), which Lightning
runs on GPUs only, by name at ``setup``/``on_train_start`` (checked on a stand-in Trainer).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)

import relu_doctor
from relu_doctor.callbacks import (
    AdaptiveGradClip,
    DormantReset,
    LeakyReluSwap,
    LRRescue,
    ReluDoctorTreatment,
)
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import (
    AGC,
    ActivationSwapper,
    AutoClip,
    ContinualBackprop,
    DormantRecycler,
    LRRescuer,
    PlanStep,
    TreatmentPlan,
    swap_activation,
)
from relu_doctor.remedies.base import sharding_of
from tests.callbacks.spawned import WORLD, all_reduce, member, spawn, spawned

BATCH, STEPS, LOG_EVERY = 6, 4, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 1))


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * BATCH, 8, generator=g) for _ in range(steps)]


#: The steps of a treatment plan that act the same on shards.
SHARD_SAFE_STEPS = (PlanStep("lr"), PlanStep("swap", options={"threshold": 0.3}))
#: ... and on DTensor shards (FSDP2).
DTENSOR_STEPS = (PlanStep("clip"), *SHARD_SAFE_STEPS)
PLANS = {"lr, swap": SHARD_SAFE_STEPS, "clip, lr, swap": DTENSOR_STEPS}
TREAT_STEPS = 12


def make_dying_model() -> nn.Module:
    """``make_model``, whose hidden units :func:`push` kills in training."""
    return make_model()


def push(model: nn.Module) -> None:
    """Push half of each hidden layer's units dead by their bias (sharded or not): done
    after the first log, a surge at the second (units dead from the start are none)."""
    for layer, n in ((model[0], 8), (model[2], 6)):
        bias = layer.bias  # type: ignore[union-attr]
        delta = torch.zeros(bias.shape)
        delta[:n] = 3.0
        if hasattr(bias, "device_mesh"):  # a DTensor shard: the same shift, sharded alike
            from torch.distributed.tensor import distribute_tensor

            delta = distribute_tensor(delta, bias.device_mesh, bias.placements)
        with torch.no_grad():
            bias.sub_(delta)


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model


def treat(model: nn.Module, xs: list[torch.Tensor], steps: tuple[PlanStep, ...], **kw: Any
          ) -> dict[str, Any]:
    """Train under a plan of ``steps``; what it did and the whole weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    events: list[dict[str, Any]] = []
    with relu_doctor.watch(model, log_every_n_steps=LOG_EVERY, every_n_steps=1, optimizer=opt,
                           **kw) as doc:
        doc.add_event_listener(events.append)
        plan = TreatmentPlan(model, optimizer=opt, steps=steps, cooldown=1).bind(doc)
        train(model, doc, opt, xs, push_at=LOG_EVERY)
    plan.detach()
    whole = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in model.state_dict().items()}
    return {
        "events": [(e["remedy"], e["site"], e["step"]) for e in events
                   if e.get("type") == "intervention"],
        "modules": [type(m).__name__.removeprefix("FSDP") for m in model],
        "lr": opt.param_groups[0]["lr"],
        "state": whole,
        "norms": plan.remedy("clip").norm_history if steps[0].remedy == "clip" else None,
    }


def refusals(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    """What each remedy says about a sharded model: its error, or "accepted"."""
    out: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            out[name] = "accepted"
        except ReluDoctorError as e:
            out[name] = str(e)

    attempt("DormantRecycler", lambda: DormantRecycler(model))
    attempt("ContinualBackprop", lambda: ContinualBackprop(model))
    attempt("TreatmentPlan", lambda: TreatmentPlan(model, optimizer=opt))
    attempt("AutoClip.attach", lambda: AutoClip().attach(opt).detach())
    attempt("AGC.attach", lambda: AGC().attach(opt))
    attempt("AGC.clip_", lambda: AGC().clip_(model.parameters()))
    attempt("ActivationSwapper(prelu)", lambda: ActivationSwapper(model, kind="prelu"))
    attempt("swap_activation(prelu)", lambda: swap_activation(model, path="1", kind="prelu"))
    attempt("AutoClip.clip_", lambda: AutoClip().clip_(model.parameters()))
    attempt("LRRescuer", lambda: LRRescuer(opt))
    attempt("ActivationSwapper", lambda: ActivationSwapper(model))
    attempt("TreatmentPlan(clip, lr, swap)",
            lambda: TreatmentPlan(model, optimizer=opt, steps=DTENSOR_STEPS))
    return out


def train(model: nn.Module, doc: relu_doctor.Doctor, opt: torch.optim.Optimizer,
          xs: list[torch.Tensor], push_at: int | None = None) -> None:
    for step, x in enumerate(xs):
        if step == push_at:
            push(model)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        doc.step()


def _worker(rank: int, store: str, out: str) -> None:
    with member(rank, store):
        torch.set_num_threads(1)
        model = shard(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        xs = [x[rank * BATCH : (rank + 1) * BATCH] for x in batches()]
        with relu_doctor.watch(model, log_every_n_steps=LOG_EVERY, every_n_steps=1,
                               optimizer=opt, all_reduce=all_reduce, world_size=WORLD,
                               is_writer=rank == 0) as doc:
            train(model, doc, opt, xs)
        if rank == 0:
            doc.history().to_pickle(Path(out) / "history.pkl")
            pd.concat([r.layer_table for r in doc.records]).to_pickle(Path(out) / "layers.pkl")
        # gradients of the last step are still there: AutoClip.clip_ sees sharded ones
        (Path(out) / f"said{rank}.json").write_text(json.dumps(refusals(model, opt)))
        xs = [x[rank * BATCH : (rank + 1) * BATCH] for x in batches(TREAT_STEPS)]
        treated = {name: treat(shard(make_dying_model()), xs, steps, all_reduce=all_reduce,
                               world_size=WORLD, is_writer=rank == 0)
                   for name, steps in PLANS.items()}
        torch.save(treated, Path(out) / f"treated{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process FSDP run for every test of this module; its outputs' folder."""
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_worker, out)
    return out


@spawned
def test_fsdp2_two_processes_equal_one_process_over_the_same_samples(fsdp_run):
    tmp_path = fsdp_run
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


REFUSED = ("DormantRecycler", "ContinualBackprop", "TreatmentPlan", "AGC.attach", "AGC.clip_",
           "ActivationSwapper(prelu)", "swap_activation(prelu)")
ACCEPTED = ("AutoClip.attach", "AutoClip.clip_", "LRRescuer", "ActivationSwapper",
            "TreatmentPlan(clip, lr, swap)")


@spawned
def test_remedies_refuse_sharded_parameters_and_the_safe_ones_act_as_one_process(fsdp_run):
    tmp_path = fsdp_run
    said = [json.loads((tmp_path / f"said{r}.json").read_text()) for r in range(WORLD)]
    assert said[0] == said[1]
    fsdp2 = said[0]
    for name in REFUSED:
        assert "needs parameters that every process holds whole" in fsdp2[name] or \
            "expected one process" in fsdp2[name], (name, fsdp2[name])
        assert "FSDP2" in fsdp2[name] or "DTensor" in fsdp2[name], (name, fsdp2[name])
    assert "DormantRecycler" in fsdp2["DormantRecycler"]
    assert "AGC" in fsdp2["AGC.clip_"] and "params:" in fsdp2["AGC.clip_"]
    assert "kind:" in fsdp2["swap_activation(prelu)"]
    for name in ACCEPTED:
        assert fsdp2[name] == "accepted", (name, fsdp2[name])

    # AutoClip, the lr cut and the LeakyReLU swap on FSDP2: as one process, on both ranks
    treated = [torch.load(tmp_path / f"treated{r}.pt", weights_only=False) for r in range(WORLD)]
    for name, fired in (("lr, swap", {"lr_rescue", "leaky_relu_swap"}),
                        ("clip, lr, swap", {"adaptive_grad_clip", "leaky_relu_swap"})):
        one = treat(make_dying_model(), batches(TREAT_STEPS), PLANS[name])
        assert {e[0] for e in one["events"]} >= fired, one["events"]
        for t in treated:
            t = t[name]
            assert t["events"] == one["events"]
            assert t["modules"] == one["modules"] and "LeakyReLU" in t["modules"]
            assert t["lr"] == one["lr"]
            if one["norms"] is not None:  # the whole gradient's norm, clipped the same
                torch.testing.assert_close(t["norms"], one["norms"], rtol=1e-5, atol=0)
            for k, v in one["state"].items():
                torch.testing.assert_close(t["state"][k], v, rtol=1e-5, atol=1e-6)


def test_sharding_is_recognised_without_importing_the_strategies():
    # FSDP1 and DeepSpeed need an accelerator (or DeepSpeed) to run: recognised by what they
    # leave on a model, as sharding_of looks for it
    fsdp1 = type("FullyShardedDataParallel", (nn.Sequential,), {})(nn.Linear(2, 2))
    assert sharding_of(fsdp1) == "FSDP (FullyShardedDataParallel modules)"
    flat = type("FlatParameter", (nn.Parameter,), {})(torch.zeros(3))
    assert sharding_of(params=[flat]) == "FSDP (flat parameters)"
    zero3 = nn.Parameter(torch.zeros(0))
    zero3.ds_id = 7  # type: ignore[attr-defined]
    assert sharding_of(params=[zero3]) == "DeepSpeed ZeRO-3 (partitioned parameters)"
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert sharding_of(net) is None
    with pytest.raises(ReluDoctorError, match=r"^model: DormantRecycler needs .* got FSDP "):
        DormantRecycler(nn.Sequential(fsdp1, nn.ReLU()))
    DormantRecycler(net)  # whole parameters: accepted


# ---------------------------------------------------------------------- Lightning strategies


def stand_in(strategy: type) -> SimpleNamespace:
    """A Trainer as the remedy callbacks see it, with ``strategy`` (not constructed: these
    need GPUs or DeepSpeed)."""
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    return SimpleNamespace(
        strategy=object.__new__(strategy), callbacks=[], lightning_module=net, world_size=1,
        optimizers=[torch.optim.SGD(net.parameters(), lr=0.1)], lr_scheduler_configs=[],
    )


def start(cb: Any, trainer: SimpleNamespace) -> None:
    """The hooks a Trainer calls before the first step."""
    net = trainer.lightning_module
    for hook in ("setup", "on_fit_start", "on_train_start"):
        fn = getattr(cb, hook)
        fn(trainer, net, "fit") if hook == "setup" else fn(trainer, net)


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy])
@pytest.mark.parametrize(
    "make, remedy",
    [
        (ReluDoctorTreatment, "AutoClip"),
        (lambda: ReluDoctorTreatment(steps=(PlanStep("lr"), PlanStep("recycle"))),
         "DormantRecycler"),
        (lambda: ReluDoctorTreatment(steps=(PlanStep("clip"), PlanStep("lr"))), "AutoClip"),
        (DormantReset, "DormantRecycler"),
        (AdaptiveGradClip, "AutoClip"),
        (lambda: AdaptiveGradClip("agc"), "AGC"),
    ],
)
def test_remedy_callbacks_refuse_sharding_strategies_by_name(strategy, make, remedy):
    with pytest.raises(ReluDoctorError) as err:
        start(make(), stand_in(strategy))
    msg = str(err.value)
    assert msg.startswith("strategy: ") and f"Lightning's {strategy.__name__}" in msg, msg
    assert f"({remedy})" in msg and "PlanStep('lr'), PlanStep('swap')" in msg, msg


@pytest.mark.parametrize("strategy", [FSDPStrategy, DDPStrategy])
@pytest.mark.parametrize(
    "make",
    [lambda: ReluDoctorTreatment(steps=SHARD_SAFE_STEPS), LeakyReluSwap,
     lambda: LRRescue(factor=0.5)],
)
def test_shard_safe_callbacks_pass_the_strategy_check(strategy, make):
    # past the check, they look for the ReluDoctor monitor (absent here)
    with pytest.raises(ReluDoctorError, match="has no ReluDoctor callback"):
        start(make(), stand_in(strategy))


def test_treatment_refuses_at_setup_naming_the_step_that_cannot_act_on_shards():
    cb = ReluDoctorTreatment()
    with pytest.raises(ReluDoctorError, match=r"ReluDoctorTreatment step 'clip' \(AutoClip\)"):
        cb.setup(stand_in(FSDPStrategy), nn.Identity(), "fit")
    cb.setup(stand_in(DDPStrategy), nn.Identity(), "fit")  # DDP: every step acts the same
