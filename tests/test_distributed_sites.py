"""Processes that do not hold the same sites (2 gloo processes on CPU, a plain loop).

A site is made where its activation first runs, so under DDP the processes' sites can
differ: an expert, or a branch, that one process has not run yet has no site there, and
the order of first runs (the order of the sites) can differ even where the sets agree. The
log-time sum is matched by name: sites run in another order are each summed with themselves;
where the sets differ, every process reads its own windows, with one warning, and the run
goes on (a sum over windows of other sizes aborted both processes in gloo; a process with no
site at all, its model in eval mode, made no collective call, and the others waited for it;
one whose passes ran no activation yet stopped with an error, the others waiting for it).

Every count is checked against the test's own: forward hooks on the experts' ReLUs count
each unit's positive outputs, summed across processes by the test's own ``all_reduce``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import RunDirError
from relu_doctor.remedies import (
    AutoClip,
    ContinualBackprop,
    DormantRecycler,
    PlanStep,
    TreatmentPlan,
)
from relu_doctor.reports.context import build_context
from relu_doctor.stats import ROW
from tests.callbacks.spawned import WORLD, all_reduce, member, spawn, spawned

BATCH, WIDTH, STEPS, LOG_EVERY = 4, 16, 4, 2


class Experts(nn.Module):
    """Two experts (Linear, ReLU, Linear) after a shared layer; ``forward`` runs those it
    is told to, in the order given (a router that sent this process's tokens elsewhere runs
    fewer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, WIDTH)
        self.e0 = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.e1 = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.out = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor, experts: list[int]) -> torch.Tensor:
        h = self.inp(x)
        y = torch.zeros_like(h)
        for i in experts:
            y = y + getattr(self, f"e{i}")(h)
        return self.out(y)


# Which experts each process runs at each step (steps 1..4, logs at 2 and 4):
SCENARIOS = {
    # the same sites, made in another order on each process
    "order": lambda rank, step: [0, 1] if rank == 0 else [1, 0],
    # process 1 runs expert 1 from step 3 on: the sites agree from the second window
    "joins": lambda rank, step: [0, 1] if rank == 0 or step >= 3 else [0],
    # process 1's model is in eval mode before step 3: no site at all in the first window
    "none": lambda rank, step: [0, 1],
    # process 1 runs no expert before step 3: its training passes run no activation
    "branch": lambda rank, step: [0, 1] if rank == 0 or step >= 3 else [],
    # process 1's model is in eval mode at step 2 only: it collects one step fewer
    "eval_step": lambda rank, step: [0, 1],
}
# Whether each process's model trains at each step (else it is in eval mode).
TRAINS = {
    "none": lambda rank, step: rank == 0 or step >= 3,
    "eval_step": lambda rank, step: rank == 0 or step != 2,
}


def _run(rank: int, scenario: str) -> dict:
    """Train ``STEPS`` steps; the Doctor's windows and lifetimes, and the test's own counts
    of each window (this process's and summed across processes; since the last judged
    window)."""
    model = Experts()
    experts = SCENARIOS[scenario]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(10 + rank)
    own: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}  # each site's first call's rows on this process

    def counter(name: str):
        def hook(module, args, output):
            if not module.training:  # (the Doctor's stream: training passes)
                return
            rows = torch.stack([torch.full((WIDTH,), float(output.shape[0])),
                                (output > 0).sum(0).double(), output.abs().sum(0).double()])
            own[name] = own.get(name, torch.zeros(3, WIDTH, dtype=torch.float64)) + rows
            first.setdefault(name, rows.clone())
        return hook

    for name in ("e0", "e1"):
        getattr(model, name)[1].register_forward_hook(counter(f"{name}.1"))
    windows: list[dict] = []
    heard: list[int] = []  # the steps of the records the listeners (remedies) got
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=LOG_EVERY,
                               every_n_steps=1, all_reduce=all_reduce, world_size=WORLD,
                               is_writer=rank == 0) as doc:
            doc.add_listener(lambda record: heard.append(record.step))
            for step in range(1, STEPS + 1):
                opt.zero_grad()
                model.train(TRAINS.get(scenario, lambda rank, step: True)(rank, step))
                model(torch.randn(BATCH, 8, generator=g), experts(rank, step)).pow(2).mean(
                ).backward()
                opt.step()
                if step == 1:  # mid-window reads: every process calls them, as at a log
                    doc.findings()
                    doc.state_dict(reduce=True)
                doc.step()
                if step % LOG_EVERY == 0:
                    mine = {k: v.clone() for k, v in own.items()}
                    # the test's own sum across processes, over both experts on each
                    both = torch.stack([mine.get(f"e{i}.1", torch.zeros(3, WIDTH,
                                        dtype=torch.float64)) for i in (0, 1)])
                    dist.all_reduce(both)
                    rec = doc.records[-1]
                    windows.append({
                        "step": step,
                        "mine": mine,
                        "summed": {f"e{i}.1": both[i] for i in (0, 1)},
                        "rows": {r["site"]: r["elements"] for r in rec.site_rows},
                        "units": rec.unit_table.copy(),
                        "judged": rec.judged,
                        "first_dead": dict(rec.first_dead),
                        "steps_collected": (rec.steps_collected, {
                            r["steps_collected"] for r in rec.site_rows}),
                    })
                    if rec.judged:  # (a window read alone stays open: see below)
                        own.clear()
    # the test's own dead fraction at first sight: the first calls of every process, summed
    first_dead = {}
    for name in ("e0.1", "e1.1"):
        rows = first.get(name, torch.zeros(3, WIDTH, dtype=torch.float64))
        dist.all_reduce(rows)
        seen = rows[0] > 0
        first_dead[name] = float((seen & (rows[1] == 0)).sum() / seen.sum())
    return {
        "windows": windows,
        "first_dead": first_dead,
        "lifetime": {s.name: s.stats.lifetime.clone() for s in doc.sites},
        "heard": heard,
        "warnings": [str(w.message) for w in caught
                     if issubclass(w.category, relu_doctor.ReluDoctorWarning)],
    }


GRADS = 52  # the size of the gradient all-reduce the other process is in (DDP's)


def _raising(rank: int) -> dict:
    """Process 1 raises at step 4, inside the ``with`` block, while process 0 is in a
    gradient all-reduce (DDP's); each catches its error after the block, and both then meet
    in that all-reduce."""
    model = Experts()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(10 + rank)
    caught = ""
    try:
        with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=LOG_EVERY,
                               every_n_steps=1, all_reduce=all_reduce, world_size=WORLD,
                               is_writer=rank == 0) as doc:
            for step in range(1, STEPS + 1):
                if step == 4 and rank == 1:
                    raise ValueError("the user's own error")
                opt.zero_grad()
                model(torch.randn(BATCH, 8, generator=g), [0, 1]).pow(2).mean().backward()
                if step == 4:  # process 0: DDP's all-reduce, which process 1 never reaches
                    raise RuntimeError("process 1 left")
                opt.step()
                doc.step()
    except (ValueError, RuntimeError) as e:
        caught = str(e)
    grads = torch.ones(GRADS)
    dist.all_reduce(grads)  # where the other process is
    last = doc.records[-1]
    return {"caught": caught, "grads": grads.tolist(),
            "last": (last.step, last.judged, last.final, {r["site"]: r["elements"]
                                                          for r in last.site_rows})}


def _recycling(rank: int, remedy: str) -> dict:
    """Both experts hold dead units. Process 1's even steps run expert 0 alone, so its
    latest call at a log (the inputs a remedy reads the experts' producers and consumers
    from) runs no expert 1: that expert has no links there. Its odd steps run expert 1
    first: its records list the sites in the other order."""
    model = Experts()
    with torch.no_grad():
        model.e0[0].bias[:4] = -100.0
        model.e1[0].bias[:4] = -100.0
    # DDP averages the gradients: the replicas stay the same unless a remedy parts them.
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(10 + rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=LOG_EVERY,
                               every_n_steps=1, all_reduce=all_reduce, world_size=WORLD,
                               is_writer=rank == 0) as doc:
            if remedy == "plan":  # the plan's recycling step calls recycle() on each site
                TreatmentPlan(model, optimizer=opt, patience=1, cooldown=1, steps=(
                    PlanStep("recycle", options={"threshold": 0.1}),)).bind(doc)
            else:
                cls = {"recycler": DormantRecycler, "cbp": ContinualBackprop}[remedy]
                kw = {"maturity": 1, "replacement_rate": 0.5} if remedy == "cbp" else {}
                cls(model, optimizers=opt, **kw).bind(doc)
            events: list[dict] = []
            doc.add_event_listener(events.append)
            for step in range(1, (12 if remedy == "plan" else STEPS) + 1):
                opt.zero_grad()
                experts = [0, 1] if rank == 0 else [1, 0] if step % 2 else [0]
                ddp(torch.randn(BATCH, 8, generator=g), experts).pow(2).mean().backward()
                opt.step()
                doc.step()
    return {
        "acted": sorted({e["site"] for e in events if e.get("type") == "intervention"}),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "warnings": [str(w.message) for w in caught
                     if "alone" in str(w.message) or "cannot treat" in str(w.message)
                     or "for now" in str(w.message)],
    }


def _evaluating(rank: int) -> dict:
    """``eval_stream=True``; process 0 alone evaluates, after steps 1 and 3."""
    model = Experts()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(10 + rank)
    with relu_doctor.watch(model, optimizer=opt, log_every_n_steps=LOG_EVERY, every_n_steps=1,
                           all_reduce=all_reduce, world_size=WORLD, is_writer=rank == 0,
                           eval_stream=True) as doc:
        for step in range(1, STEPS + 1):
            opt.zero_grad()
            model(torch.randn(BATCH, 8, generator=g), [0, 1]).pow(2).mean().backward()
            opt.step()
            doc.step()
            if rank == 0 and step % 2:
                model.eval()
                with torch.no_grad():
                    model(torch.randn(BATCH, 8, generator=g), [0, 1])
                model.train()
    assert doc.eval is not None
    return {"training": [(r.step, r.judged) for r in doc.records],
            "eval": [(r.step, r.judged, {row["site"]: row["elements"] for row in r.site_rows})
                     for r in doc.eval.records]}


def _eval_resumed(rank: int) -> dict:
    """``eval_stream=True``; both processes evaluate 2 passes after step 1, and the second
    run checkpoints then (``reduce=True``; process 0's state given to both, as Lightning
    and the HF Trainer keep one file) and resumes in new Doctors: the evaluation window the
    step-2 log closes, uninterrupted and resumed."""
    out: dict = {}
    for name in ("straight", "resumed"):
        model = Experts()
        g = torch.Generator().manual_seed(20 + rank)
        watch = dict(log_every_n_steps=LOG_EVERY, every_n_steps=1, all_reduce=all_reduce,
                     world_size=WORLD, eval_stream=True)
        doc = relu_doctor.watch(model, **watch)
        model(torch.randn(BATCH, 8, generator=g), [0, 1]).pow(2).mean().backward()
        doc.step()
        model.eval()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(BATCH, 8, generator=g), [0, 1])
        model.train()
        if name == "resumed":
            shared = [doc.state_dict(reduce=True)]
            dist.broadcast_object_list(shared, src=0)
            doc.detach()
            doc = relu_doctor.watch(model, **watch)
            doc.load_state_dict(shared[0])
        model(torch.randn(BATCH, 8, generator=g), [0, 1]).pow(2).mean().backward()
        doc.step()
        assert doc.eval is not None
        out[name] = [(r.step, r.steps_collected, {row["site"]: row["elements"]
                                                  for row in r.site_rows})
                     for r in doc.eval.records]
        doc.detach()
    return out


def _loss_of(rank: int, step: int) -> float:
    """The loss process ``rank`` gives at ``step`` (NaN on process 1 at step 3 alone)."""
    return math.nan if (rank, step) == (1, 3) else float(10 * rank + step)


def _losses(rank: int) -> dict:
    """Each process gives its own losses, through ``step(loss=...)`` in the first run and
    through an integration's measure (``window_loss``) in the second and third: the window
    losses the remedies' guard reads. The third is checkpointed after its first step (in
    its first window), as Lightning and the HF Trainer save (``reduce=True``), and resumed
    by a new Doctor (process 0 carries the windows, by default: a load of a reduced state).
    The fourth saves each process's state unreduced and gives process 0's to both, as
    ``fabric.save`` does (a Fabric trial): process 1 says it restores another's part."""
    out: dict = {}
    for name in ("step", "integration", "resumed", "unreduced"):
        model = Experts()
        watch = dict(log_every_n_steps=LOG_EVERY, every_n_steps=1, all_reduce=all_reduce,
                     world_size=WORLD)
        doc = relu_doctor.watch(model, **watch)
        records = []
        for step in range(1, STEPS + 1):
            model(torch.randn(BATCH, 8), [0, 1]).pow(2).mean().backward()
            loss = torch.tensor(_loss_of(rank, step))
            if name == "step":
                doc.step(loss=loss)
            else:
                doc.window_loss.add(loss)
                doc.step()
            if name in ("resumed", "unreduced") and step == 1:
                state = doc.state_dict(reduce=name == "resumed")
                if name == "unreduced":  # (process 0's, as the one file saved)
                    shared = [state]
                    dist.broadcast_object_list(shared, src=0)
                    state = shared[0]
                records += doc.records  # (not the window close() logs: the run goes on)
                doc.close()
                doc = relu_doctor.watch(model, **watch)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    doc.load_state_dict(state)
                out[f"{name}_said"] = [str(w.message) for w in caught]
                if name == "unreduced":  # a single process's state: its window is whole
                    single = relu_doctor.watch(Experts(), **watch)
                    single.load_state_dict({**state, "processes": 1})
                    out["single_window_losses"] = single.window_loss.state_dict()["count"]
                    single.detach()
                    # a state from before the processes were recorded: restored as then
                    older = relu_doctor.watch(Experts(), **watch)
                    older.load_state_dict({k: v for k, v in state.items()
                                           if k not in ("processes", "rank", "reduced")})
                    out["older_window_losses"] = older.window_loss.state_dict()["count"]
                    older.detach()
        doc.close()
        out[name] = [(r.step, r.window_loss) for r in records + doc.records]
    return out


def _unsummed(rank: int, run_dir: str) -> dict:
    """``watch`` without ``all_reduce=`` while the 2 processes run: what it says, and what
    binding a remedy does."""
    model = Experts()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out: dict = {}
    for name, kw in (("alone", {}), ("summed", {"all_reduce": all_reduce}),
                     ("shares", {"world_size": WORLD})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            doc = relu_doctor.watch(model, optimizer=opt, every_n_steps=1, **kw)
        bound = {}
        for remedy in (AutoClip(), DormantRecycler(model, optimizers=opt),
                       TreatmentPlan(model, optimizer=opt)):
            with warnings.catch_warnings(record=True) as at_bind:
                warnings.simplefilter("always")
                remedy.bind(doc)
            bound[type(remedy).__name__] = [str(w.message) for w in at_bind
                                            if "processes run" in str(w.message)]
        doc.close()
        out[name] = {"said": [str(w.message) for w in caught
                              if "torch.distributed runs" in str(w.message)],
                     "bound": bound}
    # both processes given one run directory, no is_writer=: the second is refused, told
    # how to have one process write (it was told "pass a new directory")
    shared = Path(run_dir) / "shared"
    doc = None
    if rank == 0:
        doc = relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=1, run_dir=shared,
                                all_reduce=None, world_size=WORLD)
        model(torch.randn(BATCH, 8), [0, 1]).pow(2).mean().backward()
        doc.step()
    dist.barrier()
    if rank == 1:
        try:
            relu_doctor.watch(model, run_dir=shared, world_size=WORLD).close()
        except RunDirError as e:
            out["shared"] = str(e)
    dist.barrier()
    if doc is not None:
        doc.close()
        config = dict(build_context(relu_doctor.load_run(shared)).configuration)
        out["config"] = {k: config.get(k) for k in ("processes", "statistics")}
    return out


def _worker(rank: int, store: str, out: str) -> None:
    with member(rank, store):
        torch.set_num_threads(1)
        results = {name: _run(rank, name) for name in SCENARIOS}
        results["raising"] = _raising(rank)
        results["evaluating"] = _evaluating(rank)
        results["eval_resumed"] = _eval_resumed(rank)
        results["losses"] = _losses(rank)
        for remedy in ("recycler", "cbp", "plan"):
            results[remedy] = _recycling(rank, remedy)
        results["unsummed"] = _unsummed(rank, out)
        torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sites")
    spawn(_worker, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check_window(window: dict, counts: dict[str, torch.Tensor]) -> None:
    """The window's site rows and unit table equal ``counts`` (elements, active, sum |h|
    per unit, by site)."""
    assert set(window["rows"]) == set(counts)
    units = window["units"]
    for site, c in counts.items():
        assert window["rows"][site] == c[0].sum().item()
        u = units[units["site"] == site].sort_values("unit")
        assert u["activation_rate"].tolist() == pytest.approx((c[1] / c[0]).tolist(), rel=1e-12)
        assert u["mean_abs"].tolist() == pytest.approx((c[2] / c[0]).tolist(), rel=1e-6)


@spawned
def test_sites_made_in_another_order_on_each_process_are_each_summed_with_themselves(runs):
    for rank in range(WORLD):
        run = runs[rank]["order"]
        assert runs[rank]["order"]["warnings"] == []
        for w in run["windows"]:
            _check_window(w, w["summed"])  # both processes' batches, each site with itself
            assert w["judged"]
        assert run["heard"] == [w["step"] for w in run["windows"]]
    assert runs[0]["order"]["windows"][0]["rows"] == runs[1]["order"]["windows"][0]["rows"]


@spawned
@pytest.mark.parametrize("scenario", ["joins", "none", "branch"])
def test_processes_holding_other_sites_read_their_own_windows_until_they_agree(runs, scenario):
    for rank in range(WORLD):
        run = runs[rank][scenario]
        first, second = run["windows"]
        # The first window: each process's own batches, on each process, and one warning,
        # by the writing process.
        # It judges nothing, on any process, and goes to no listener: a remedy acting on
        # one process's findings alone would make the replicas differ.
        if first["mine"]:
            _check_window(first, first["mine"])
        else:  # process 1 of "none": no site yet, no rows
            assert first["rows"] == {}
        assert not first["judged"] and second["judged"] and run["heard"] == [second["step"]]
        said = [m for m in run["warnings"] if "do not hold the same activation sites" in m]
        assert len(said) == (rank == 0), run["warnings"]
        assert all(f"the {WORLD} processes" in m for m in said)
        # A process whose passes ran no activation yet is not stopped (one process raises:
        # the model has nothing to watch), which would leave the other waiting for it.
        no_site = [m for m in run["warnings"] if "ran no ReLU-family activation" in m]
        assert len(no_site) == (scenario == "branch" and rank == 1), run["warnings"]
        # The second window: the same sites everywhere, summed across processes, the
        # first window's steps with it: a window read alone was left open, not folded
        # into this process's lifetime counts alone (they would differ between processes).
        _check_window(second, second["summed"])
        for site, life in run["lifetime"].items():
            want = second["summed"][site]  # every step, every process's
            assert life[ROW["elements"]].tolist() == want[0].tolist()
            assert life[ROW["active"]].tolist() == want[1].tolist()
    lifetimes = [r[scenario]["lifetime"] for r in runs]  # the same on every process
    assert all(set(life) == set(lifetimes[0]) for life in lifetimes)
    for site, life in lifetimes[0].items():
        assert all(torch.equal(life, other[site]) for other in lifetimes[1:])


@spawned
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_sites_first_reading_is_summed_across_processes_and_stated_once(runs, scenario):
    """The remedies' surge baseline (IntervalRecord.first_dead): every process's first call
    of the site, summed, stated by the first log whose windows were summed, on every
    process alike; a log read alone keeps it for later."""
    for rank in range(WORLD):
        run = runs[rank][scenario]
        stated: dict[str, float] = {}
        for w in run["windows"]:
            assert w["judged"] or not w["first_dead"]
            assert not set(w["first_dead"]) & set(stated)  # once
            stated.update(w["first_dead"])
        assert stated == pytest.approx(run["first_dead"])
        assert run["windows"][0]["first_dead"] == runs[0][scenario]["windows"][0]["first_dead"]


@spawned
def test_every_process_states_the_same_collected_steps_the_mean_of_theirs(runs):
    """Process 1 was in eval mode for one step of the first window: it collected 1 step,
    process 0 collected 2. Each stated its own, and a remedy reading them as a finding's
    evidence acted at another log on each (a LeakyReLU swap on one replica only); both
    now state the mean, rounded down."""
    for rank in range(WORLD):
        first, second = runs[rank]["eval_step"]["windows"]
        assert first["judged"] and second["judged"]
        _check_window(first, first["summed"])  # process 0's 2 steps and process 1's 1
        assert first["steps_collected"] == (1, {1})  # (2 + 1) // 2
        assert second["steps_collected"] == (2, {2})


@spawned
def test_every_process_reads_the_window_loss_of_them_all(runs):
    """The loss guard's window loss is the mean over every process's steps, NaN where one
    process's is: each process's own would let the remedies judge a change apart on each,
    and the copies of the model part."""
    for name in ("step", "integration", "resumed"):
        expected = []
        for end in range(LOG_EVERY, STEPS + 1, LOG_EVERY):
            values = [_loss_of(r, s) for r in range(WORLD) for s in range(end - LOG_EVERY + 1,
                                                                             end + 1)]
            expected.append((end, sum(values) / len(values)))
        assert any(math.isnan(v) for _, v in expected)
        for rank in range(WORLD):
            got = runs[rank]["losses"][name]
            assert [s for s, _ in got] == [s for s, _ in expected]
            for (_, g), (_, e) in zip(got, expected, strict=True):
                assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e, rel=1e-6)
    assert [runs[r]["losses"]["resumed_said"] for r in range(WORLD)] == [[], []]
    assert runs[0]["losses"]["unreduced_said"] == []
    # a single process's state loaded by two: process zero restores its window, alone
    assert [runs[r]["losses"]["single_window_losses"] for r in range(WORLD)] == [1, 0]
    assert [runs[r]["losses"]["older_window_losses"] for r in range(WORLD)] == [1, 1]
    [said] = runs[1]["losses"]["unreduced_said"]
    assert "holds process 0's statistics alone, of 2" in said and "reduce=True" in said


@spawned
def test_an_exception_on_one_process_leaves_the_block_without_a_cross_process_call(runs):
    """The ``with`` block logs its last window on every exit. On an exception's it summed
    it across processes while the other process was elsewhere (in DDP's all-reduce): the
    two calls met, gloo aborted both processes, and the user's traceback was never shown.
    That window is now the process's own, unjudged, with no cross-process call."""
    for rank, caught in enumerate(["process 1 left", "the user's own error"]):
        got = runs[rank]["raising"]
        assert got["caught"] == caught
        assert got["grads"] == [float(WORLD)] * GRADS  # the calls met as the user's own
        step, judged, final, rows = got["last"]
        assert (step, judged, final) == (3, False, True)
        passes = 2 if rank == 0 else 1  # its own step 3 (and process 0's unfinished 4)
        assert rows == {"e0.1": passes * BATCH * WIDTH, "e1.1": passes * BATCH * WIDTH}


@spawned
@pytest.mark.parametrize("remedy", ["recycler", "cbp", "plan"])
def test_a_remedy_acts_only_on_sites_whose_links_every_process_found(runs, remedy):
    """Each process reads an expert's producer and consumers from a pass on its own latest
    inputs. Process 1's ran no expert 1: ReDo (and Continual Backprop) left it alone there
    and recycled it on process 0, and the replicas' weights parted. Now both leave it alone
    while it is not found on both, saying why once, and recycle expert 0 alike; process 1
    finds expert 1 in a later pass that runs it (its odd steps), and then both recycle it
    alike too."""
    got = [runs[rank][remedy] for rank in range(WORLD)]
    assert got[0]["acted"] == got[1]["acted"] == ["e0.1", "e1.1"]
    for rank in range(WORLD):
        said = [w for w in got[rank]["warnings"] if "'e1.1'" in w]
        assert len(said) == 1 and "skipping site 'e1.1' for now" in said[0], said
        assert ("found on 1 of 2 processes" in said[0]) == (rank == 0), said
    for name, value in got[0]["state"].items():
        assert torch.equal(value, got[1]["state"][name]), name


@spawned
def test_evaluating_on_rank_zero_alone_with_an_eval_stream_goes_on(runs):
    """The evaluation window was read where this process had run evaluation passes: process
    0 summed it across processes and process 1 made no call, and gloo aborted both. Every
    process now reads it at each log; process 0's windows are its own, unjudged (the
    processes do not hold the same evaluation sites), and left open, so they add up."""
    for rank in range(WORLD):
        assert runs[rank]["evaluating"]["training"] == [(2, True), (4, True)]
    assert runs[1]["evaluating"]["eval"] == []
    per_pass = BATCH * WIDTH
    assert runs[0]["evaluating"]["eval"] == [
        (2, False, {"e0.1": per_pass, "e1.1": per_pass}),
        (4, False, {"e0.1": 2 * per_pass, "e1.1": 2 * per_pass}),
    ]


@spawned
def test_a_resumed_evaluation_window_of_every_process_is_logged_whole(runs):
    """A review: the open evaluation window's passes were the saving process's alone in a
    reduced state, so the resumed window (its elements whole) read half its steps. Its
    steps, as each process's, are the mean of the processes' passes: 2 here. Process 0
    carries the restored window; process 1, which ran no evaluation pass since, takes part
    in the sum and keeps no record of it, as a process that evaluated nothing does."""
    per_pass = BATCH * WIDTH
    want = [(2, 2, {"e0.1": 2 * WORLD * per_pass, "e1.1": 2 * WORLD * per_pass})]
    for rank in range(WORLD):
        assert runs[rank]["eval_resumed"]["straight"] == want
    assert runs[0]["eval_resumed"]["resumed"] == want
    assert runs[1]["eval_resumed"]["resumed"] == []


@spawned
def test_a_doctor_summing_nothing_across_running_processes_says_so_at_watch_and_bind(runs):
    """A plain DDP loop that forgot ``all_reduce=``: each process read its own batches and
    a remedy acted on its own copy of the model (a DDP trial: one process recycled 12 units,
    the other 11, and the replicas parted without a word). ``watch`` now says so, and so
    does binding the first remedy that decides from the statistics (once per Doctor; not a
    clipper, which clips by the gradients DDP made the same on every process). Not an error:
    a process may train a model of its own in a group (an RL learner beside its actors, a
    pipeline stage), and a review's single-device Lightning fit in such a group failed. A
    world_size given without all_reduce (each process watching its own share, on purpose)
    is not warned of at watch, but binding a remedy is."""
    for rank in range(WORLD):
        got = runs[rank]["unsummed"]
        (alone,) = got["alone"]["said"]
        assert "sums nothing across them" in alone and f"world_size={WORLD}" in alone
        (summed,) = got["summed"]["said"]
        assert "with world_size=1" in summed and f"{WORLD} times" in summed
        assert got["shares"]["said"] == []
        for case in ("alone", "shares"):  # said once, at the first remedy that decides
            bound = got[case]["bound"]
            assert bound["AutoClip"] == [] and bound["TreatmentPlan"] == [], bound
            (said,) = bound["DormantRecycler"]
            assert said.startswith("relu_doctor: DormantRecycler decides from this process's "
                                   f"statistics alone: {WORLD} processes run"), said
            assert "the copies would part" in said and "this is as meant" in said
        assert all(w == [] for w in got["summed"]["bound"].values()), got["summed"]
    # the run says how many processes ran and that its statistics are one process's
    assert runs[0]["unsummed"]["config"] == {"processes": "2",
                                             "statistics": "this process's own batches alone"}
    shared = runs[1]["unsummed"]["shared"]
    assert "is still writing it; under torch.distributed (2 processes) one process writes: " \
        "pass is_writer=(rank == 0)" in shared, shared
