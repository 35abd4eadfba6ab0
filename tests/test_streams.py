"""Which forward passes the statistics describe: the training stream, evaluation kept apart,
``paused()``, the evaluation stream; and who a call is attributed to (a module outside the
model, a module swapped in while watched).

Every count is checked against a brute-force reference computed here from the batches the
test drove (numpy, float64), on the passes of the stream in question only.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

import relu_doctor
from relu_doctor.remedies import swap_activation
from tests.reference_functional import site_fields

D_IN, HIDDEN = 4, 6


def _net() -> nn.Sequential:
    """Linear-ReLU-Linear whose hidden unit 0 is ``x[:, 0]``: dead on training data (where
    ``x[:, 0] < 0``), firing on evaluation data (where it is > 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    with torch.no_grad():
        net[0].weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        net[0].bias[0] = 0.0
    return net


def _batch(seed: int, sign: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, D_IN, generator=g)
    x[:, 0] = sign * (x[:, 0].abs() + 0.1)
    return x


TRAIN = [_batch(i, -1.0) for i in range(4)]
EVAL = [_batch(100 + i, +1.0) for i in range(3)]


def _reference(net: nn.Sequential, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-unit counts of the hidden ReLU over ``batches``, the slow obvious way."""
    with torch.no_grad():
        h = np.concatenate(
            [torch.relu(net[0](x)).double().numpy() for x in batches], axis=0
        )
    return {"elements": np.full(HIDDEN, h.shape[0], dtype=float),
            "active": (h > 0).sum(0).astype(float), "sum": h.sum(0)}


def _train_step(net: nn.Module, x: torch.Tensor, doc: relu_doctor.Doctor) -> None:
    net.train()
    net(x).pow(2).mean().backward()
    doc.step()


def _assert_counts(site, want: dict[str, np.ndarray]) -> None:
    got = site_fields(site)
    np.testing.assert_array_equal(got["elements"], want["elements"])
    np.testing.assert_array_equal(got["active"], want["active"])
    np.testing.assert_allclose(got["sum"], want["sum"], rtol=1e-6)


# ---------------------------------------------------------------------------- training stream


def test_unit_dead_on_training_data_is_dead_though_it_fires_on_validation():
    net = _net()  # no optimizer: the weights stay fixed, so the reference is exact
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=100) as doc:
        for i, x in enumerate(TRAIN):
            _train_step(net, x, doc)
            if i % 2:  # validation inside the loop, as users write it
                net.eval()
                with torch.no_grad():
                    for v in EVAL:
                        net(v)
        units = doc.unit_table("1")
        _assert_counts(doc.probe.site("1"), _reference(net, TRAIN))
    want_dead = _reference(net, TRAIN)["active"] == 0
    assert want_dead[0] and _reference(net, EVAL)["active"][0] > 0  # the premise
    np.testing.assert_array_equal(units["dead"].to_numpy(), want_dead)
    assert doc.eval is None


@pytest.mark.parametrize("how", ["no_grad", "eval", "inference_mode", "paused"])
def test_passes_that_are_not_training_are_left_out(how):
    net = _net()
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=100) as doc:
        for x in TRAIN:
            _train_step(net, x, doc)
            for v in EVAL:
                if how == "no_grad":
                    with torch.no_grad():
                        net(v)
                elif how == "inference_mode":
                    with torch.inference_mode():
                        net(v)
                elif how == "eval":  # eval mode, gradients on: still not training
                    net.eval()
                    net(v).sum().backward()
                else:  # a training-mode pass the user keeps out by hand
                    with doc.paused():
                        net(v).sum().backward()
        _assert_counts(doc.probe.site("1"), _reference(net, TRAIN))
        assert doc.probe.passes == len(TRAIN)
        assert not doc.probe.paused


def test_functional_sites_follow_the_same_gating():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _net()[0]

        def forward(self, x):
            return F.relu(self.fc(x))

    net = Net()
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=100) as doc:
        for x in TRAIN:
            _train_step(net, x, doc)
            with torch.no_grad():
                net(EVAL[0])
            with doc.paused():
                net(EVAL[1])
        site = doc.probe.site("(root):relu#0")
        got = site_fields(site)
    with torch.no_grad():
        h = np.concatenate([F.relu(net.fc(x)).double().numpy() for x in TRAIN])
    np.testing.assert_array_equal(got["active"], (h > 0).sum(0))
    np.testing.assert_array_equal(got["elements"], np.full(HIDDEN, h.shape[0]))


# ---------------------------------------------------------------------------- eval stream


def test_eval_stream_counts_exactly_the_evaluation_rows(tmp_path):
    net = _net()
    run_dir = tmp_path / "run"
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2, eval_stream=True, run_dir=run_dir) as doc:
        for i, x in enumerate(TRAIN):
            _train_step(net, x, doc)
            if i == 0:  # evaluation between steps 1 and 2: closed with the step-2 log
                net.eval()
                with torch.no_grad():
                    for v in EVAL:
                        net(v)
                    with doc.paused():  # paused leaves out both streams
                        net(TRAIN[0])
        train_site = doc.probe.site("1")
        net.eval()
        with torch.no_grad():
            net(EVAL[0])  # a second evaluation, closed explicitly
        rec = doc.log_eval()
    assert rec is not None and rec.step == len(TRAIN)
    ev = doc.eval.history()
    assert ev["step"].tolist() == [2, 4] and ev["window_steps"].tolist() == [3, 1]
    first = ev[ev["step"] == 2].iloc[0]
    want = _reference(net, EVAL)
    assert first["elements"] == want["elements"].sum()
    assert first["sparsity"] == pytest.approx(1 - want["active"].sum() / want["elements"].sum())
    assert first["dead"] == int((want["active"] == 0).sum())
    # The eval stream's lifetime holds exactly the four eval passes; training holds TRAIN.
    life = site_fields(doc.eval.probe.site("1"), "lifetime")
    both = _reference(net, EVAL + EVAL[:1])
    np.testing.assert_array_equal(life["active"], both["active"])
    np.testing.assert_array_equal(life["elements"], both["elements"])
    train_life = site_fields(train_site, "lifetime")
    np.testing.assert_array_equal(train_life["active"], _reference(net, TRAIN)["active"])
    # Its own run directory, named in the training run's meta.json.
    assert json.loads((run_dir / "meta.json").read_text())["eval_stream"] == "eval"
    loaded = relu_doctor.load_run(run_dir / "eval")
    assert loaded.history["step"].tolist() == [2, 4]
    assert json.loads((run_dir / "eval" / "meta.json").read_text())["stream"] == "eval"


def test_the_open_evaluation_window_is_read_between_logs():
    """A T5 trial read doc.eval.to_pandas() between logs: before the first log it was
    empty, later it was the last closed window; the training Doctor's reads give the open
    window. The evaluation stream's open window holds the passes since its last log, at
    the training step it is read at, and its log is the same window."""
    net = _net()
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2, eval_stream=True) as doc:
        for i, x in enumerate(TRAIN):
            _train_step(net, x, doc)
            if i in (0, 2):  # before the first log, and after it
                net.eval()
                with torch.no_grad():
                    for v in EVAL[: i + 1]:
                        net(v)
                net.train()
                want = _reference(net, EVAL[: i + 1])
                row = doc.eval.to_pandas().set_index("site").loc["1"]
                assert row["elements"] == want["elements"].sum() and row["window_steps"] == i + 1
                assert row["dead"] == int((want["active"] == 0).sum())
                rec = doc.eval.current()
                assert rec is not None and rec.step == i + 1
    logged = doc.eval.history().set_index("step")  # (closed with the training logs)
    assert logged.loc[4, "elements"] == row["elements"] and logged.loc[4, "window_steps"] == 3


def test_a_read_of_the_open_evaluation_window_leaves_a_checkpoint_as_it_was(tmp_path):
    """A review: doc.eval.to_pandas() between logs left the evaluation Doctor's step counts
    at the open window's, a checkpoint saved then held them, and the resumed run cut the
    evaluation record logged at that step from its run directory. The read puts them back."""
    def fit(read: bool) -> tuple[dict[str, int], list[int], list[int]]:
        net = _net()
        run_dir = tmp_path / f"read-{read}"
        doc = relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2, eval_stream=True,
                                run_dir=run_dir)
        for x in TRAIN[:2]:
            _train_step(net, x, doc)
            net.eval()
            with torch.no_grad():
                net(EVAL[0])
        net.eval()
        with torch.no_grad():  # validation after the step-2 log, read before the next
            for v in EVAL:
                net(v)
        if read:
            assert doc.eval.to_pandas().set_index("site").loc["1", "window_steps"] == 4
        state = doc.state_dict()
        doc.detach()  # the run dies here: no final log (its locks gone with its process)
        for lock in run_dir.rglob(".lock"):
            lock.unlink()
        before = relu_doctor.load_run(run_dir / "eval").history["step"].unique().tolist()
        with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2, eval_stream=True,
                               run_dir=run_dir, resume=True) as resumed:
            resumed.load_state_dict(state)
            after = relu_doctor.load_run(run_dir / "eval").history["step"].unique().tolist()
        counts = {k: state["eval"][k] for k in ("global_step", "window_steps", "steps_run")}
        return counts, before, after

    unread, read = fit(False), fit(True)
    assert read == unread and read[1] == read[2] == [2]


def _evaluate(net: nn.Module, doc: relu_doctor.Doctor, batches: list[torch.Tensor], *,
              log: bool = True) -> None:
    net.eval()
    with torch.no_grad():
        for v in batches:
            net(v)
    net.train()
    if log:
        doc.log_eval()


@pytest.mark.parametrize("full_disk", [False, True], ids=["", "full-disk"])
@pytest.mark.parametrize("order", ["lightning", "lightning-first", "again", "mid"])
def test_an_evaluation_logged_at_the_checkpoints_step_is_logged_once_on_resume(
        tmp_path, monkeypatch, order, full_disk):
    """A checkpoint at a step's end, then the evaluation at that step, logged, then the
    process dies; the run resumes from the checkpoint in the same run directory.

    - ``lightning``: the resume does not run that evaluation again (Lightning, after a
      batch-end checkpoint). The evaluation stream kept its logs up to its own step, its
      last log's, and dropped that one for good (a Lightning trial).
    - ``lightning-first``: the same with no evaluation before the checkpoint (its step 0):
      taken for a resume with no state loaded, said so, its lifetime counts begun again.
    - ``again``: a plain loop that evaluates at the step it resumes from: that log is
      replaced, not written twice (a review).
    - ``mid``: the checkpoint taken mid-evaluation: the log after it holds the passes the
      checkpoint kept open, which were logged again at the next log (a review).

    Each resumed record equals the uninterrupted run's: every evaluation log's step, passes
    and per-unit counts. ``full-disk``: the evaluation stream's writer cannot open at the
    resume, and opens at its first log (its kept log was not looked at then: a review)."""
    from relu_doctor import rundir

    opened = rundir.RunWriter.__init__

    def full(self, path, *args, **kwargs):  # (the resume's first open of the eval writer)
        if path.name == "eval":
            monkeypatch.setattr(rundir.RunWriter, "__init__", opened)
            raise OSError(28, "No space left on device")
        opened(self, path, *args, **kwargs)

    died: list[relu_doctor.Doctor] = []

    def run(name: str, die: bool) -> relu_doctor.RunRecord:
        run_dir = tmp_path / name
        net = _net()
        watch = dict(every_n_steps=1, log_every_n_steps=2, eval_stream=True, run_dir=run_dir)
        doc = relu_doctor.watch(net, **watch)
        for x in TRAIN[:2]:
            _train_step(net, x, doc)
        if order != "lightning-first":
            _evaluate(net, doc, EVAL[:1])  # (logged at step 2)
        for x in TRAIN[2:]:
            _train_step(net, x, doc)
        if order == "mid":
            _evaluate(net, doc, EVAL[:1], log=False)
        state = doc.state_dict()  # the checkpoint at step 4's end
        _evaluate(net, doc, EVAL[1:])
        if die:
            doc.detach()  # the run dies here (its locks gone with its process)
            died.append(doc)  # (kept: collected, it would take the resumed run's locks)
            for lock in run_dir.rglob(".lock"):
                lock.unlink()
            if full_disk:
                monkeypatch.setattr(rundir.RunWriter, "__init__", full)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                doc = relu_doctor.watch(net, **watch, resume=True)
                doc.load_state_dict(state)
                if order == "again":
                    _evaluate(net, doc, EVAL[1:])
            assert not [w for w in caught if "no Doctor state" in str(w.message)]
            assert [w for w in caught if "No space" in str(w.message)] or not full_disk
        for x in TRAIN[:2]:
            _train_step(net, x, doc)
        _evaluate(net, doc, EVAL[:2], log=False)  # (logged with the last window, at 6)
        doc.close()
        return relu_doctor.load_run(run_dir / "eval")

    straight, resumed = run("straight", False), run("resumed", True)
    cols = ["step", "site", "window_steps", "elements", "dead", "lifetime_dead"]
    assert resumed.history[cols].equals(straight.history[cols])
    assert resumed.units.drop(columns=["lifetime_dead"]).equals(
        straight.units.drop(columns=["lifetime_dead"]))
    first = [2] if order != "lightning-first" else []
    assert straight.history["step"].tolist() == [*first, 4, 6]


def test_eval_stream_survives_a_checkpoint():
    net = _net()
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=100, eval_stream=True) as doc:
        _train_step(net, TRAIN[0], doc)
        with torch.no_grad():
            net(EVAL[0])
        state = doc.state_dict()
    other = relu_doctor.watch(_net(), every_n_steps=1, eval_stream=True)
    other.load_state_dict(state)
    with torch.no_grad():
        other.model(EVAL[1])
    _assert_counts(other.eval.probe.site("1"), _reference(net, EVAL[:2]))
    other.detach()


@pytest.mark.parametrize("after", [True, False], ids=["pass-after-resume", "none-after"])
def test_a_resumed_evaluation_window_is_logged_whole_at_its_step(after):
    """A checkpoint saved with evaluation passes not logged yet: the resumed run logged the
    window at the next training log with the passes since the resume as its steps (its
    counts held all of them), or, with no evaluation pass since, lost it."""
    net = _net()
    doc = relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2, eval_stream=True)
    _train_step(net, TRAIN[0], doc)
    net.eval()
    with torch.no_grad():
        net(EVAL[0])
        net(EVAL[1])
    state = doc.state_dict()
    doc.detach()
    passes = EVAL[:3] if after else EVAL[:2]
    want = _reference(net, passes)
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2,
                           eval_stream=True) as resumed:
        resumed.load_state_dict(state)
        if after:
            with torch.no_grad():
                net(EVAL[2])
        _train_step(net, TRAIN[1], resumed)  # the log at step 2 closes the evaluation window
        logged = resumed.eval.history().set_index("site").loc["1"]
    assert int(logged["step"]) == 2 and int(logged["window_steps"]) == len(passes)
    assert logged["elements"] == want["elements"].sum()
    assert logged["dead"] == int((want["active"] == 0).sum())


class _FunctionalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.relu(self.fc(x))


class _Checkpointed(nn.Module):
    """Two blocks run through reentrant activation checkpointing (as Hugging Face models do
    with gradient_checkpointing): their first forward runs without autograd, inside a
    training pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList([_FunctionalBlock(), _FunctionalBlock()])
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
        return self.out(h)


def test_no_grad_segments_of_a_training_pass_are_not_evaluation_passes():
    """A training pass is one pass for every stream, though checkpointed segments inside it
    run without autograd: the evaluation stream counts no pass and records nothing from
    training (it counted one per segment after the first: functional capture ended the pass
    it had left out at the first call that returned)."""
    torch.manual_seed(0)
    net = _Checkpointed()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with relu_doctor.watch(
        net, optimizer=opt, every_n_steps=1, overhead_budget=None, eval_stream=True
    ) as doc:
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(4, 5)).square().mean().backward()
            opt.step()
            doc.step()
        assert doc.eval.probe.passes == 0
        assert doc.eval.sites == []
        assert doc.probe.passes == 3
        net.eval()
        with torch.no_grad():
            net(torch.randn(4, 5))
        assert doc.eval.probe.passes == 1
        assert len(doc.eval.sites) == 2


def test_eval_stream_argument_is_checked():
    with pytest.raises(relu_doctor.ReluDoctorError, match="eval_stream: expected True, False"):
        relu_doctor.watch(_net(), eval_stream="a/b")


# ---------------------------------------------------------------------------- attribution


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_IN, 3)

    def forward(self, x):
        return F.relu(self.fc(x))


class Student(nn.Module):
    def __init__(self, teacher: Teacher):
        super().__init__()
        self.fc = nn.Linear(D_IN, 1)
        self._teacher = [teacher]  # a frozen teacher held outside the module tree

    def forward(self, x):
        with torch.no_grad():
            t = self._teacher[0](x)
        return F.relu(self.fc(x)) + t.sum(1, keepdim=True)


def _trained_sites(net: nn.Module, name: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """Train ``net`` on TRAIN, watched at every step: ``(its sites' names, the raw fields of
    site ``name``)``."""
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=100) as doc:
        for x in TRAIN:
            _train_step(net, x, doc)
        return [s.name for s in doc.sites], site_fields(doc.probe.site(name))


def test_a_call_inside_a_module_outside_the_model_is_named_after_it():
    torch.manual_seed(0)
    teacher = Teacher()
    net = Student(teacher)
    names, got = _trained_sites(net, "Teacher#0:relu#0")
    assert names == ["Teacher#0:relu#0", "(root):relu#0"]
    with torch.no_grad():
        h = np.concatenate([F.relu(teacher.fc(x)).double().numpy() for x in TRAIN])
    np.testing.assert_array_equal(got["active"], (h > 0).sum(0))


def test_a_module_swapped_in_while_watched_is_picked_up_without_refresh():
    hooks_before = len(torch_module._global_module_registration_hooks)
    net = _net()
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=100) as doc:
        _train_step(net, TRAIN[0], doc)
        swap_activation(net, path="1", slope=0.1)  # no doc.probe.refresh()
        _train_step(net, TRAIN[1], doc)
        net[1] = nn.ELU()  # a plain setattr, too
        _train_step(net, TRAIN[2], doc)
        assert len(torch_module._global_module_registration_hooks) == hooks_before + 1
        assert [s.name for s in doc.sites] == ["1"]  # never "(root):leaky_relu#0"
        assert doc.sites[0].family.name == "elu"
        assert site_fields(doc.sites[0])["elements"][0] == 3 * 5
    assert len(torch_module._global_module_registration_hooks) == hooks_before


def test_a_site_added_while_watched_counts_from_its_first_pass():
    """A block put into the watched model brings a new site: its first pass is counted
    (before, it went to finding the site's producing layer, and the site began a step
    late), with units along the layer that made it."""
    torch.manual_seed(0)
    net = _net()
    outs: list[torch.Tensor] = []
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=100) as doc:
        _train_step(net, TRAIN[0], doc)
        net.append(nn.Sequential(nn.Linear(1, 7), nn.ReLU()))  # after the 1-feature output
        net[-1][1].register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
        for x in TRAIN[1:3]:
            _train_step(net, x, doc)
        site = doc.probe.site("3.1")
        assert (site.unit_rule, site.units) == ("Linear `3.0` -> last dim", 7)
        got = site_fields(site)
    h = torch.cat(outs).double()
    assert len(outs) == 2  # both passes since it was added, the first too
    np.testing.assert_array_equal(got["elements"], [len(h)] * 7)
    np.testing.assert_array_equal(got["active"], (h > 0).sum(0).numpy())


def test_report_has_an_evaluation_section(tmp_path):
    from relu_doctor.reports.context import build_context
    from relu_doctor.reports.html import render_context

    net = _net()
    run_dir = tmp_path / "run"
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2, eval_stream=True, run_dir=run_dir) as doc:
        for x in TRAIN[:2]:
            _train_step(net, x, doc)
            with torch.no_grad():
                net(EVAL[0])
    ctx = build_context(relu_doctor.load_run(run_dir))
    ev = ctx.evaluation
    # The step-2 training log closed the window of step 1's evaluation; the one after it
    # was closed when the block ended (also at step 2): one pass each.
    assert ev is not None and ev.name == "eval" and ev.steps == [2] and ev.passes == 1
    want = _reference(net, [EVAL[0]])
    row = {r.site: r for r in ev.sites}["1"]
    assert row.raw["dead"] == int((want["active"] == 0).sum())
    assert 'id="rd-eval"' in render_context(ctx)
    # A run without an evaluation stream has no such section.
    plain = relu_doctor.load_run(run_dir / "eval")
    assert build_context(plain).evaluation is None


class InlineHead(nn.Module):
    """An activation module made in ``forward`` (DistilBERT's classifier head does
    ``nn.ReLU()(pooled)``), beside a functional call in the same forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_IN, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = nn.ReLU()(self.fc(x))
        return self.out(F.relu(h - 0.1))


def test_an_activation_module_made_in_forward_is_a_call_of_the_module_that_made_it():
    """It is named as the calling module's own calls are (``(root):relu#0``), so a report
    says where it is and ``include=`` can name it; not after its class (``ReLU#0:relu#0``),
    as a module outside the model with modules of its own is."""
    torch.manual_seed(0)
    net = InlineHead()
    seen = []  # the inline ReLU's input at each step, from the layer feeding it
    net.fc.register_forward_hook(lambda m, a, out: seen.append(out.detach().double()))
    names, got = _trained_sites(net, "(root):relu#0")
    assert names == ["(root):relu#0", "(root):relu#1"]
    h = torch.cat(seen).numpy()
    np.testing.assert_array_equal(got["active"], (h > 0).sum(0))
    np.testing.assert_array_equal(got["elements"], np.full(4, len(h)))


def test_evaluation_units_dead_since_its_first_evaluation_are_not_said_to_be_from_init():
    """A trial's units fired in training and died there (lr 0.03) before the first
    validation: the evaluation stream's findings said they "have not fired since monitoring
    began (from initialisation)" and that no lower learning rate revives them, against the
    training stream's own advice. The evaluation stream's lifetime began at its first
    evaluation: its dead units are not said to be the initialisation's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    fired: list[torch.Tensor] = []
    net[1].register_forward_hook(lambda m, a, out: fired.append((out > 0).any(0)))
    with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2, eval_stream=True) as doc:
        for i, x in enumerate(TRAIN):
            if i == 2:  # units 0-3 die in training, after firing in the first window
                with torch.no_grad():
                    net[0].bias[:4] = -50.0
            _train_step(net, x, doc)
        net.eval()
        with torch.no_grad():
            for v in EVAL:
                net(v)
        doc.log_eval()
    train_fired = torch.stack(fired[:2]).any(0)  # (the first window: training's passes)
    assert bool(train_fired[:4].all())  # (the plant: they fired in training before)
    dead = next(f for f in doc.eval.findings() if f.kind == "dead")
    eval_dead = ~torch.stack(fired[len(TRAIN):]).any(0)
    assert dead.evidence["dead_units"] == eval_dead.nonzero().flatten().tolist()
    assert dead.evidence["never_fired"] is False
    assert dead.remedy.startswith("Lower the learning rate") and "from initialisation" not in (
        dead.remedy)
