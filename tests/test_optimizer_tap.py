"""The optimizer tap's checkpointed window is restored layer by layer (by name)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from relu_doctor.errors import ReluDoctorWarning
from relu_doctor.optimizer_tap import OptimizerTap
from tests.reference import step_beside


def _tap(model: nn.Module) -> OptimizerTap:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return OptimizerTap(model, [opt], is_update_step=lambda: False, collecting=lambda: True).attach()


def _step(model: nn.Module, tap: OptimizerTap) -> None:
    model(torch.randn(4, 3)).sum().backward()
    tap.optimizers[0].step()
    tap.optimizers[0].zero_grad()


def test_a_layer_added_since_the_checkpoint_starts_at_zero_and_the_others_keep_theirs():
    torch.manual_seed(0)
    before = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    tap = _tap(before)
    _step(before, tap)
    state = tap.state_dict()
    expected = dict(zip(tap.layers, state["grad_sq"].tolist(), strict=True))
    # The same model with a PReLU (parameters of its own) in place of the ReLU.
    after = nn.Sequential(before[0], nn.PReLU(), before[2])
    fresh = _tap(after)
    fresh.load_state_dict(state)
    got = dict(zip(fresh.layers, fresh.grad_sq.tolist(), strict=True))
    assert fresh.layers == ["0", "1", "2"] and got == {**expected, "1": 0.0}
    assert fresh.steps == state["steps"] == 1


def test_a_checkpointed_layer_the_model_lacks_is_dropped_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2))
    tap = _tap(model)
    _step(model, tap)
    state = tap.state_dict()
    smaller = nn.Sequential(model[0], nn.ReLU(), model[2])
    fresh = _tap(smaller)
    with pytest.warns(ReluDoctorWarning, match=r"lacks \(\['1'\]\)"):
        fresh.load_state_dict(state)
    assert fresh.grad_sq.tolist() == [state["grad_sq"][0].item(), state["grad_sq"][2].item()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_update_ratio_and_gradient_norms_equal_a_float64_reference(fused, dtype):
    from relu_doctor import _kernels

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(),
        nn.Linear(5, 2, bias=False),
    ).to(dtype).to(memory_format=torch.channels_last)  # the conv weight channels-last
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    tap = OptimizerTap(model, [opt], is_update_step=lambda: True, collecting=lambda: True).attach()
    x = torch.randn(8, 3, 6, 6, dtype=dtype)
    grad_sq = torch.zeros(len(tap.layers), dtype=torch.float64)
    layer_of = {id(p): tap.layers.index(name.rsplit(".", 1)[0])
                for name, p in model.named_parameters()}
    for _ in range(3):
        model(x).float().square().mean().backward()
        before = {id(p): p.detach().double().clone() for p in model.parameters()}
        for p in model.parameters():
            grad_sq[layer_of[id(p)]] += p.grad.double().square().sum()
        if fused:
            opt.step()
        else:
            with _kernels.disabled():
                opt.step()
        opt.zero_grad()
    d = torch.zeros(len(tap.layers), dtype=torch.float64)
    w = torch.zeros_like(d)
    for p in model.parameters():
        d[layer_of[id(p)]] += (p.detach().double() - before[id(p)]).square().sum()
        w[layer_of[id(p)]] += p.detach().double().square().sum()
    got_sq, steps, ratio = tap.read_and_reset()
    assert steps == 3 and tap.layers == ["0", "3", "5"]
    torch.testing.assert_close(got_sq, grad_sq, rtol=1e-5, atol=0)
    # bfloat16 weights: the eager path subtracts in bfloat16 (one rounding of the update)
    rtol = 1e-5 if fused or dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ratio, d.sqrt() / w.sqrt(), rtol=rtol, atol=0)
    assert not tap._before  # the transient copy is gone


def test_the_update_ratio_is_the_logging_steps_whether_or_not_it_collects():
    """The update ratio belongs to the log: a logging step that collects no statistics (the
    overhead budget collects every n-th step) still measures it, against a float64
    reference; its gradient norms stay out of the window."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tap = OptimizerTap(model, [opt], is_update_step=lambda: True, collecting=lambda: False).attach()
    model(torch.randn(4, 3)).sum().backward()
    before = [p.detach().double().clone() for p in model.parameters()]
    opt.step()
    got_sq, steps, ratio = tap.read_and_reset()
    assert got_sq is None and steps == 0
    after = [p.detach().double() for p in model.parameters()]
    want = torch.stack([
        ((a0 - b0).square().sum() + (a1 - b1).square().sum()).sqrt()
        / (a0.square().sum() + a1.square().sum()).sqrt()
        for a0, a1, b0, b1 in ((after[0], after[1], before[0], before[1]),
                               (after[2], after[3], before[2], before[3]))
    ])
    assert ratio is not None
    torch.testing.assert_close(ratio, want, rtol=1e-5, atol=0)


def _exact_ratios(model: nn.Module, layers: list[str], before: dict[int, torch.Tensor]) -> torch.Tensor:
    """Each layer's ``||W_after - W_before|| / ||W_after||`` over all its elements, in float64."""
    d = torch.zeros(len(layers), dtype=torch.float64)
    w = torch.zeros_like(d)
    for name, p in model.named_parameters():
        i = layers.index(name.rsplit(".", 1)[0])
        d[i] += (p.detach().double() - before[id(p)]).square().sum()
        w[i] += p.detach().double().square().sum()
    return d.sqrt() / w.sqrt()


def _one_logged_step(model: nn.Module, cap: int, grads: dict[int, torch.Tensor], fused: bool):
    """One SGD step with ``grads`` under a tap sampling at ``cap``: ``(tap, exact ratios, the
    largest copy the tap held)``."""
    from relu_doctor import _kernels

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tap = OptimizerTap(model, [opt], is_update_step=lambda: True, collecting=lambda: False,
                       update_sample=cap).attach()
    held: list[int] = []
    # registered after the tap's: runs after it took its copy
    opt.register_step_pre_hook(lambda *_: held.extend(
        x.numel() for copies in tap._before.values() for _, x, _, _ in copies))
    before = {id(p): p.detach().double().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = grads[id(p)].to(p.dtype)
    if fused:
        opt.step()
    else:
        with _kernels.disabled():
            opt.step()
    return tap, _exact_ratios(model, tap.layers, before), max(held)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_a_large_tensors_update_ratio_is_estimated_from_a_bounded_sample(fused):
    """Tensors over ``update_sample`` elements are read through a strided sample: the copy
    held at the logging step stays within the bound, and each layer's ratio (a sampled
    weight alone, a sampled weight beside an exact bias whose update is far larger, a
    channels-last conv filter bank) is within a few percent of the exact ratio."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(600, 512), nn.ReLU(),
        nn.Linear(512, 400, bias=False),
    ).to(memory_format=torch.channels_last)
    cap = 4096
    grads = {id(p): 0.1 * torch.randn_like(p) for p in model.parameters()}
    # Layer 3's bias: an update as large as its weight's (whose sample reads 1 in ~75) on
    # weights ~20 times smaller; unscaled, the sample would read a ratio three times as large.
    bias = model[3].bias
    grads[id(bias)] = 2.5 * torch.randn_like(bias)
    tap, exact, held = _one_logged_step(model, cap, grads, fused)
    _, _, ratio = tap.read_and_reset()
    assert held <= cap  # no copy of a whole large tensor
    assert tap.layers == ["0", "3", "5"] and ratio is not None
    torch.testing.assert_close(ratio, exact, rtol=0.05, atol=0)


def test_the_sample_reads_every_column_of_a_row_whatever_the_row_length():
    """A stride sharing a factor with the row length would read the same few columns of
    every row: an update only to the columns that such a stride (3 here) skips would read
    as none. The tap's stride shares no factor with the tensor's size, so the estimate of an
    update to every third column is close to the exact ratio."""
    model = nn.Sequential(nn.Linear(48, 64, bias=False))
    nn.init.ones_(model[0].weight)
    cap = 1024  # 3,072 elements: the smallest stride within the bound is 3
    g = torch.zeros(64, 48)
    g[:, 1::3] = 1.0  # the columns a stride of 3 from column 0 never reads
    _tap, exact, held = _one_logged_step(model, cap, {id(model[0].weight): g}, fused=True)
    _, _, ratio = _tap.read_and_reset()
    assert held <= cap and exact[0] > 0
    torch.testing.assert_close(ratio, exact, rtol=0.05, atol=0)


def test_the_sample_moves_at_each_log_so_an_update_to_one_row_reads_right_on_average():
    """An update to one row of a weight meets a few of the sample's elements, unevenly: at
    one log its estimate can be off by half. The sample's offset moves at every logging
    step, every element is read at 1 in s of them, and over many logs the estimated
    squared ratio averages to the exact one (a sample fixed at one offset stays at ~0.5 of
    it, log after log)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 500, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tap = OptimizerTap(model, [opt], is_update_step=lambda: True, collecting=lambda: False,
                       update_sample=2048).attach()
    g = torch.zeros(500, 64)
    g[3] = torch.randn(64)
    squared = []
    for _ in range(170):  # 10 turns of the sample's 17 offsets
        before = model[0].weight.detach().double().clone()
        model[0].weight.grad = g.clone()
        opt.step()
        after = model[0].weight.detach().double()
        exact = (after - before).norm() / after.norm()
        _, _, ratio = tap.read_and_reset()
        squared.append(float(ratio[0] / exact) ** 2)
    assert max(squared) > 1.2 * min(squared)  # the sample did move
    assert sum(squared) / len(squared) == pytest.approx(1.0, abs=0.1)


def test_the_update_ratio_sums_every_optimizer_stepped_at_the_logging_step():
    """Two optimizers, each over its own layers, stepped one after the other: each layer's
    ratio is its own (the second optimizer's hook used to overwrite the first's layers with
    0), and a layer no optimizer steps has none (NaN)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 2))
    o1 = torch.optim.SGD(model[0].parameters(), lr=0.05)
    o2 = torch.optim.Adam(model[2].parameters(), lr=1e-3)  # model[4]: in no optimizer
    tap = OptimizerTap(model, [o1, o2], is_update_step=lambda: True, collecting=lambda: True).attach()
    model(torch.randn(16, 30)).square().mean().backward()
    before = {id(p): p.detach().double().clone() for p in model.parameters()}
    o1.step()
    o2.step()
    _, _, ratio = tap.read_and_reset()
    exact = _exact_ratios(model, tap.layers, before)
    assert tap.layers == ["0", "2", "4"] and ratio is not None
    torch.testing.assert_close(ratio[:2], exact[:2], rtol=1e-6, atol=0)
    assert exact[0] > 0 and exact[1] > 0 and torch.isnan(ratio[2])


def test_sparse_gradients_are_read_as_their_coalesced_values():
    """``nn.Embedding(sparse=True)``: its gradient's squared norm (a token seen twice in the
    batch adds up before it is squared) equals the dense gradient's; the update ratio is read
    as for any tensor. (A sparse gradient used to raise in the step's pre-hook and stop
    training.)"""
    torch.manual_seed(0)
    emb = nn.Embedding(100, 8, sparse=True)
    model = nn.Sequential(emb, nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tap = OptimizerTap(model, [opt], is_update_step=lambda: True, collecting=lambda: True).attach()
    tokens = torch.tensor([3, 5, 3, 7, 3])  # 3 repeats: its gradient rows add up
    model(tokens).square().mean().backward()
    assert emb.weight.grad.is_sparse
    want = [emb.weight.grad.to_dense().double().square().sum(),
            model[2].weight.grad.double().square().sum() + model[2].bias.grad.double().square().sum()]
    before = {id(p): p.detach().double().clone() for p in model.parameters()}
    opt.step()
    got_sq, steps, ratio = tap.read_and_reset()
    assert steps == 1 and tap.layers == ["0", "2"]
    torch.testing.assert_close(got_sq, torch.stack(want), rtol=1e-6, atol=0)
    torch.testing.assert_close(ratio, _exact_ratios(model, tap.layers, before), rtol=1e-6, atol=0)


def test_a_failing_hook_warns_once_and_the_optimizer_steps_as_without_it(monkeypatch):
    """A hook that raises (here the gradient read) never reaches the optimizer's step: one
    warning, the per-layer statistics stop, and the parameters move as a plain copy's do."""
    from relu_doctor import optimizer_tap

    def broken(*args, **kwargs):
        raise RuntimeError("a gradient of a kind the tap cannot read")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    plain.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    tap = OptimizerTap(model, [opt], is_update_step=lambda: True, collecting=lambda: True).attach()
    monkeypatch.setattr(optimizer_tap, "_squared_norms", broken)
    monkeypatch.setattr(optimizer_tap._kernels, "sum_squares_into", lambda *a, **k: False)
    x = torch.randn(8, 3)
    with pytest.warns(ReluDoctorWarning, match="optimizer hooks .* failed") as caught:
        step_beside([(model, opt), (plain, plain_opt)], x)
    assert sum("optimizer hooks" in str(w.message) for w in caught) == 1
    assert tap.read_and_reset() == (None, 0, None)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    opt.param_groups[0]["lr"] = 0.05  # the rate a log reports is still the step's own
    step_beside([(model, opt)], x, steps=1)
    assert tap.used_lrs[id(opt)] == [0.05]


def test_a_layer_with_no_gradient_has_no_gradient_norm_not_zero():
    """A frozen layer (in no optimizer, no gradient) read as a gradient norm of 0.0, a
    vanished gradient; it is NaN (not measured), as its update ratio was, and the others
    are the RMS over steps of their float64 norms."""
    import math

    import relu_doctor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    sq: list[list[float]] = []
    with relu_doctor.watch(model, log_every_n_steps=3, every_n_steps=1, optimizer=opt) as doc:
        for _ in range(3):
            model(torch.randn(16, 8)).pow(2).mean().backward()
            sq.append([sum(float(p.grad.double().square().sum()) for p in model[i].parameters())
                       for i in (2, 4)])
            opt.step()
            opt.zero_grad()
            doc.step()
    table = doc.records[-1].layer_table.set_index("layer")
    assert math.isnan(table.loc["0", "grad_norm"]) and math.isnan(table.loc["0", "update_ratio"])
    want = [math.sqrt(sum(s[k] for s in sq) / 3) for k in range(2)]
    assert table.loc[["2", "4"], "grad_norm"].tolist() == pytest.approx(want, rel=1e-6)
    # The remedies' model-wide norm (what clipping and the lr rescue are judged on) is that
    # of the layers that have one: the NaN made it None.
    from relu_doctor.remedies import model_snapshot

    total = model_snapshot(doc.records[-1])["grad_norm"]
    assert total == pytest.approx(math.sqrt(sum(w * w for w in want)), rel=1e-6)


@pytest.mark.parametrize("copies", [True, False])
def test_an_optimizer_holding_none_of_the_models_parameters_is_said_once(copies):
    """``functional_call`` training with copies of the parameters: the optimizer holds none
    of the model's, so no layer has a gradient norm; that was silent (an empty layer table)."""
    import warnings

    from torch.func import functional_call

    import relu_doctor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    params = {k: v.detach().clone().requires_grad_(True) if copies else v
              for k, v in model.named_parameters()}
    opt = torch.optim.SGD(params.values(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, log_every_n_steps=2, every_n_steps=1, optimizer=opt) as doc:
            for _ in range(2):
                functional_call(model, params, (torch.randn(16, 8),)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert said == (["relu_doctor: optimizer SGD holds none of the model's parameters (trained "
                     "through torch.func.functional_call with copies of them?): its per-layer "
                     "gradient norms and update ratios are not measured. The activation "
                     "statistics are."] if copies else [])
    record = doc.records[-1]
    assert record.site_rows[0]["elements"] == 2 * 16 * 16  # the activations: watched
    assert record.layer_table.empty == copies


def test_the_model_wide_norm_leaves_out_layers_with_no_gradient_only():
    """A layer with no gradient (graded False) is left out of the remedies' model-wide
    norm; a NaN or Inf of a layer that has one is not: the norm is then unknown (None), as
    a finite total over the others would hide the blow-up that clipping is judged on."""
    import math
    import types

    import pandas as pd

    from relu_doctor.remedies import model_snapshot

    def norm(values: list[float], graded: list[bool]) -> float | None:
        table = pd.DataFrame({"layer": [str(i) for i in range(len(values))],
                              "grad_norm": values, "graded": graded})
        record = types.SimpleNamespace(site_rows=[], layer_table=table, findings=[])
        return model_snapshot(record)["grad_norm"]

    assert norm([1.0, 2.0, math.nan], [True, True, False]) == pytest.approx(math.sqrt(5))
    assert norm([1.0, math.inf, math.nan], [True, True, False]) is None
    assert norm([1.0, math.nan, math.nan], [True, True, False]) is None


@pytest.mark.parametrize("critic_steps", [1, 2])
def test_each_layers_norm_is_over_the_steps_of_the_optimizer_holding_it(critic_steps):
    """Two optimizers stepping apart (a GAN under manual optimization: the critic
    ``critic_steps`` times per generator step): each layer's gradient norm is the RMS over
    its own optimizer's steps, not over every optimizer's (it read 1/sqrt(2) of the truth)."""
    import math

    import relu_doctor

    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    critic = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    model = nn.ModuleDict({"g": gen, "d": critic})
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(critic.parameters(), lr=1e-3)
    sq: dict[str, list[float]] = {name: [] for name in ("g.0", "g.2", "d.0", "d.2")}

    def note(prefix: str, net: nn.Module) -> None:
        for i in (0, 2):
            sq[f"{prefix}.{i}"].append(
                sum(float(p.grad.double().square().sum()) for p in net[i].parameters()))

    with relu_doctor.watch(model, log_every_n_steps=3, every_n_steps=1,
                           optimizer=[opt_g, opt_d]) as doc:
        for _ in range(3):
            for _ in range(critic_steps):
                opt_d.zero_grad()
                critic(gen(torch.randn(8, 4)).detach()).mean().backward()
                note("d", critic)
                opt_d.step()
            opt_g.zero_grad()
            critic(gen(torch.randn(8, 4))).mean().neg().backward()
            note("g", gen)
            opt_g.step()
            doc.step()
    table = doc.records[-1].layer_table.set_index("layer")
    for name, values in sq.items():
        want = math.sqrt(sum(values) / len(values))
        assert table.loc[name, "grad_norm"] == pytest.approx(want, rel=1e-6), name


def _said_ahead(opt_class, said_at: tuple[int, ...]):
    """Seven steps of a small MLP logged every 3, ``doc.expect_last_step()`` before the
    ``opt.step()`` of each step in ``said_at`` (0-based): ``(doc, the test's own ratios)``."""
    import relu_doctor
    from tests.reference import UpdateSpy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = opt_class(model.parameters(), lr=0.01)
    spy = UpdateSpy(model, opt)
    x = torch.randn(16, 3)
    with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=3) as doc:
        for i in range(7):
            model(x).square().mean().backward()
            if i in said_at:
                doc.expect_last_step()
            opt.step()
            opt.zero_grad()
            doc.step()
    assert doc.records[-1].step == 7
    return doc, spy.ratios


@pytest.mark.parametrize("said", [True, False], ids=["expected", "not-said"])
def test_the_last_partial_windows_update_ratio_is_read_when_its_step_is_said_ahead(said):
    """``doc.expect_last_step()`` before the last ``opt.step()`` keeps the copy there: the
    last, partial window (steps 7 of a 3-step interval) has the last step's update ratio,
    against a float64 reference of the test's own step hooks, and its record is final.
    Unsaid, that window's ratio is NaN (its end was not known at its step)."""
    import math

    doc, ratios = _said_ahead(torch.optim.Adam, (6,) if said else ())
    last = doc.records[-1]
    assert last.final
    got = last.layer_table.set_index("layer")["update_ratio"]
    assert set(got.index) == {"0", "2"}
    for layer, want in ratios[-1].items():
        assert math.isclose(got[layer], want, rel_tol=1e-5) if said else math.isnan(got[layer])
    # the whole windows before: their logging steps' ratios (steps 3 and 6: the steps
    # before them collect, as every step does here)
    for rec in doc.records[:-1]:
        ref = ratios[rec.step - 1]
        for layer, v in rec.layer_table.set_index("layer")["update_ratio"].items():
            assert math.isclose(v, ref[layer], rel_tol=1e-5)


@pytest.mark.parametrize("said_at", [(5,), (5, 6)], ids=["too-early", "then-right"])
def test_a_step_said_last_too_early_leaves_no_stale_update_ratio(said_at):
    """expect_last_step() at step 6 of 7: the last window (steps 4-7) showed step 6's update
    ratio under step 7's label (review). Training went on past it: NaN, as when unsaid; and a
    second prediction, right, reads step 7's."""
    import math

    doc, ratios = _said_ahead(torch.optim.SGD, said_at)
    got = doc.records[-1].layer_table.set_index("layer")["update_ratio"]
    if said_at == (5,):
        assert got.isna().all()
    else:
        for layer, want in ratios[-1].items():
            assert math.isclose(got[layer], want, rel_tol=1e-5)


class _Growing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.ReLU())])
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_layers_put_in_after_watch_are_measured_and_a_replaced_one_is_the_new_copy() -> None:
    """A block appended (its parameters in a param group added) was never measured, and a
    layer replaced by a new one at the same path, the old one left in the optimizer, was
    measured on the old copy (a growing-model trial). Each step's per-layer gradient norm
    is checked against an optimizer pre-hook of the test's own, over the model's layers as
    they are at that step."""
    import warnings

    import relu_doctor

    torch.manual_seed(0)
    net = _Growing()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    want: list[dict[str, float]] = []

    def pre(o: torch.optim.Optimizer, *_: object) -> None:
        sq: dict[str, float] = {}
        for path, mod in net.named_modules():
            for p in mod.parameters(recurse=False):
                if p.grad is not None:
                    sq[path] = sq.get(path, 0.0) + float(p.grad.double().square().sum())
        want.append({k: v ** 0.5 for k, v in sq.items()})

    opt.register_step_pre_hook(pre)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))

    def train(n: int) -> None:
        for _ in range(n):
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            doc.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=1,
                               overhead_budget=None) as doc:
            train(2)
            new = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
            net.blocks.append(new)
            opt.add_param_group({"params": list(new.parameters())})
            train(2)
            wider = nn.Linear(6, 6)  # at the same path; the old one stays in the optimizer
            net.blocks[0][0] = wider
            opt.add_param_group({"params": list(wider.parameters())})
            train(2)
    got = doc.to_run().layers.pivot(index="step", columns="layer", values="grad_norm")
    assert list(got.index) == [1, 2, 3, 4, 5, 6] and len(want) == 6
    assert "blocks.1.0" in got.columns
    for step, norms in enumerate(want, start=1):
        assert set(norms) <= set(got.columns)
        for layer, norm in norms.items():
            assert got.loc[step, layer] == pytest.approx(norm, rel=1e-6), (step, layer)
        for layer in set(got.columns) - set(norms):  # (before it was put in: none)
            assert got.loc[step, layer] != got.loc[step, layer]
    # the first group's rate keeps its name when groups are added (its curve was split)
    metrics = doc.to_run().tables["metrics"]
    steps = {n: sorted(metrics.loc[metrics["name"] == n, "step"]) for n in ("lr", "lr/1", "lr/2")}
    assert steps == {"lr": [1, 2, 3, 4, 5, 6], "lr/1": [3, 4, 5, 6], "lr/2": [5, 6]}
    assert "lr/0" not in set(metrics["name"])


def test_an_optimizer_made_anew_mid_run_is_said_and_taken_with_set_optimizer() -> None:
    """Training went on with a new optimizer (a model grown, its optimizer made again): the
    layer table was empty from then on and the learning rate recorded was the old one's,
    with nothing said (a growing-model trial). Its stopping is said once, and
    doc.set_optimizer() reads the new one: its gradient norms (against the test's own
    pre-hook) and its learning rate."""
    import warnings

    import relu_doctor

    torch.manual_seed(0)
    net = _Growing()
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    first = torch.optim.SGD(net.parameters(), lr=0.05)
    second = torch.optim.SGD(net.parameters(), lr=0.02)
    norms: list[float] = []
    second.register_step_pre_hook(
        lambda o, *_: norms.append(float(net.head.weight.grad.double().square().sum()
                                         + net.head.bias.grad.double().square().sum()) ** 0.5))

    def train(opt: torch.optim.Optimizer, n: int) -> None:
        for _ in range(n):
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            doc.step()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, optimizer=first, log_every_n_steps=2,
                               overhead_budget=None) as doc:
            train(first, 4)
            train(second, 16)
            said = [str(w.message) for w in seen if "has not stepped" in str(w.message)]
            assert len(said) == 1 and "the last 16 collecting steps" in said[0]
            assert "doc.set_optimizer" in said[0]
            doc.set_optimizer(second)
            norms.clear()
            train(second, 4)
    assert len([w for w in seen if "has not stepped" in str(w.message)]) == 1
    # (set mid-window: its steps before are none of the new one's to step at, a review)
    assert not [w for w in seen if "doc.step() was called" in str(w.message)]
    run = doc.to_run()
    head = run.layers[run.layers["layer"] == "head"].set_index("step")["grad_norm"]
    assert head.loc[[22, 24]].notna().all() and not {6, 20} & set(head.index)  # (no update)
    # (log every 2: each log's norm is the RMS of its two steps' norms)
    want = [((norms[0] ** 2 + norms[1] ** 2) / 2) ** 0.5, ((norms[2] ** 2 + norms[3] ** 2) / 2) ** 0.5]
    assert head.loc[[22, 24]].tolist() == pytest.approx(want, rel=1e-6)
    lr = run.tables["metrics"].query("name == 'lr'").set_index("step")["value"]
    assert lr.loc[4] == 0.05 and lr.loc[20] == 0.05 and lr.loc[24] == 0.02


def test_a_window_resumed_midway_is_no_sign_of_step_called_too_often() -> None:
    """A checkpoint taken mid-window carries its collecting steps and its optimizer steps:
    the resumed window's steps before the checkpoint counted as calls without an update,
    and a loop stepping once per doc.step() was told it called it too often (a review)."""
    import warnings

    import relu_doctor

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    def train(m: nn.Module, opt: torch.optim.Optimizer, doc: relu_doctor.Doctor, n: int) -> None:
        for _ in range(n):
            m(torch.randn(8, 10)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()

    kw = {"log_every_n_steps": 20, "overhead_budget": None}
    m, opt = make()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        doc = relu_doctor.watch(m, optimizer=opt, **kw)
        train(m, opt, doc, 12)
        state, weights, opt_state = doc.state_dict(), m.state_dict(), opt.state_dict()
        doc.detach()
        m2, opt2 = make()
        m2.load_state_dict(weights)
        opt2.load_state_dict(opt_state)
        doc2 = relu_doctor.watch(m2, optimizer=opt2, **kw)
        doc2.load_state_dict(state)
        train(m2, opt2, doc2, 8)  # the window of 20 collecting steps closes here
        assert doc2.records[-1].step == 20
        doc2.close()
    assert not [w for w in seen if "doc.step() was called" in str(w.message)]


@pytest.mark.parametrize("every", [3, 2])
def test_a_whole_windows_update_ratio_is_the_step_befores_where_that_step_collects_not(every):
    """So that a logging step pays for the log alone, the update ratio of a whole window is
    read at the step before its log (the copy of the parameters and its pass cost the
    256-site benchmark MLP's logging step ~9 ms of ~65), and at the logging step where the
    step before collects (no step pays for two of the three). Against the test's own step
    hooks: collecting every ``every``-th step (0-based steps 0, 3, 6... or 0, 2, 4...),
    logging every 3rd."""
    import math

    import relu_doctor
    from tests.reference import UpdateSpy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    spy = UpdateSpy(model, opt)
    x = torch.randn(16, 3)
    with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=3,
                           every_n_steps=every) as doc:
        for _ in range(9):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            doc.step()
    assert [r.step for r in doc.records] == [3, 6, 9]
    for rec in doc.records:
        before = rec.step - 2  # (0-based: the step before the log)
        read = before if before % every else before + 1
        for layer, v in rec.layer_table.set_index("layer")["update_ratio"].items():
            assert math.isclose(v, spy.ratios[read][layer], rel_tol=1e-5), (rec.step, layer)
    if every == 3:  # (steps 1, 4, 7 collect nothing: each log's ratio is the step's before)
        assert all(not math.isclose(spy.ratios[r.step - 2]["0"], spy.ratios[r.step - 1]["0"])
                   for r in doc.records)


@pytest.mark.parametrize("case", ["resumed at the step before", "said last then on", "skipped"])
def test_a_log_whose_step_before_read_no_update_ratio_reads_its_own(case):
    """The step before a log reads the window's update ratio; where none reached the log
    (a resume at that step, a step said last there and training went on, its optimizer
    step skipped), the logging step reads its own: the ratio was NaN (a review's fuzzing
    of positions, logs and resumes). Against the test's own step hooks."""
    import math

    import relu_doctor
    from tests.reference import UpdateSpy

    kw = {"log_every_n_steps": 4, "every_n_steps": 3}

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        return m, torch.optim.SGD(m.parameters(), lr=0.05)

    model, opt = make()
    spy = UpdateSpy(model, opt)
    x = torch.randn(16, 3)
    doc = relu_doctor.watch(model, optimizer=opt, **kw)
    stepped = []
    for i in range(4):  # 0-based 0..3: the log at step 4 (0-based 3), its step before 2
        model(x).square().mean().backward()
        if case == "said last then on" and i == 2:
            doc.expect_last_step()
        if not (case == "skipped" and i == 2):
            opt.step()
            stepped.append(i)
        opt.zero_grad()
        doc.step()
        if case == "resumed at the step before" and i == 2:
            state, weights, opt_state = doc.state_dict(), model.state_dict(), opt.state_dict()
            doc.detach()
            model, opt = make()
            model.load_state_dict(weights)
            opt.load_state_dict(opt_state)
            spy = UpdateSpy(model, opt)  # (its ratios from here: the logging step's)
            doc = relu_doctor.watch(model, optimizer=opt, **kw)
            doc.load_state_dict(state)
    doc.close()
    log = next(r for r in doc.records if r.step == 4)
    got = log.layer_table.set_index("layer")["update_ratio"]
    want = spy.ratios[-1]  # the last step's: the log's own
    if case == "said last then on":
        want = spy.ratios[2]  # the step before, read as the schedule reads it
    for layer, v in got.items():
        assert math.isclose(v, want[layer], rel_tol=1e-5), (case, layer, v)


def test_an_optimizer_set_mid_window_is_no_sign_of_step_called_too_often() -> None:
    """set_optimizer() mid-window: the new optimizer's steps were counted against the whole
    window's, and a loop stepping once per doc.step() was told it called it too often."""
    import warnings

    import relu_doctor

    torch.manual_seed(0)
    net = _Growing()
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    first = torch.optim.SGD(net.parameters(), lr=0.05)
    second = torch.optim.SGD(net.parameters(), lr=0.02)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, optimizer=first, log_every_n_steps=20,
                               overhead_budget=None) as doc:
            for i in range(40):
                if i == 12:
                    doc.set_optimizer(second)
                opt = first if i < 12 else second
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
                doc.step()
    said = [str(w.message) for w in seen if "doc.step() was called" in str(w.message)
            or "has not stepped" in str(w.message)]
    assert not said, said
    assert [r.step for r in doc.records] == [20, 40]


def test_a_grown_models_first_rate_keeps_its_name_across_a_resume() -> None:
    """The first group's rate keeps the name ``lr`` when groups are added; a checkpoint
    carries that naming, so a resumed process (two groups from its start) does not split
    the curve into ``lr/0`` (a review)."""
    import relu_doctor

    torch.manual_seed(0)
    net = _Growing()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))

    def train(doc: relu_doctor.Doctor, n: int) -> None:
        for _ in range(n):
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            doc.step()

    kw = {"log_every_n_steps": 2, "overhead_budget": None}
    with relu_doctor.watch(net, optimizer=opt, **kw) as doc:
        train(doc, 2)
        new = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        net.blocks.append(new)
        opt.add_param_group({"params": list(new.parameters()), "lr": 0.01})
        train(doc, 2)
        state = doc.state_dict()
    with relu_doctor.watch(net, optimizer=opt, **kw) as again:
        again.load_state_dict(state)
        train(again, 2)
    names = {k for k in again.records[-1].metrics if k.startswith("lr")}
    assert names == {"lr", "lr/1"}
    assert again.records[-1].metrics["lr/1"] == 0.01
