"""TensorBoard's run names, read as ``tensorboard --logdir DIR`` reads them (tensorboard's own
``EventMultiplexer.AddRunsFromDirectory``: a run is the folder holding event files, named by
its path relative to ``DIR``): each run is named after its run directory, for plain
``watch(run_dir=...)`` loops, for ``write_run`` of a copied run directory, and for the demo's
two runs under the ``--logdir`` the demo prints (issue 15: not ``treated/tensorboard``, not
``treated/.``)."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor import cli
from relu_doctor.reports import tensorboard as tb

pytest.importorskip("tensorboard")


def runs_of(logdir: Path) -> dict[str, set[str]]:
    """``{run name: its tags}`` as TensorBoard names the runs under ``logdir``."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0, "histograms": 1})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out: dict[str, set[str]] = {}
    for run, tags in mux.Runs().items():
        out[run] = {t for kind in tags.values() if isinstance(kind, list) for t in kind}
    return out


def _train(run_dir: Path, steps: int = 4) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with relu_doctor.watch(net, log_every_n_steps=2, run_dir=run_dir) as doc:
        for _ in range(steps):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
            opt.step()
            doc.step(loss=loss.detach())


def test_plain_watch_runs_are_named_after_their_run_directories(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name in ("baseline", "lower-lr"):
        _train(runs / name)
    found = runs_of(runs)
    assert set(found) == {"baseline", "lower-lr"}
    for tags in found.values():
        assert {"relu_doctor/dead_fraction/1", "train/loss"} <= tags
    # one run directory given as the logdir is the run itself
    assert set(runs_of(runs / "baseline")) == {"."}


def test_write_run_of_a_copied_run_directory_names_it_after_the_copy(tmp_path: Path) -> None:
    _train(tmp_path / "run", steps=2)
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(tmp_path / "run", copy,
                    ignore=shutil.ignore_patterns("events.out.tfevents.*", ".lock"))
    assert set(runs_of(copy.parent)) == set()  # no event files came along
    assert tb.write_run(relu_doctor.load_run(copy)) == tb.run_log_dir(copy) == copy
    found = runs_of(copy.parent)
    assert set(found) == {"copied"} and "relu_doctor/dead_fraction/1" in found["copied"]


@pytest.mark.slow
def test_the_demo_prints_a_logdir_whose_runs_are_untreated_and_treated(
    tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--steps", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (command,) = [ln for ln in printed.splitlines() if "tensorboard" in ln and "--logdir" in ln]
    args = shlex.split(command)
    logdir = Path(args[args.index("--logdir") + 1])
    assert logdir == out.resolve()
    found = runs_of(logdir)
    assert set(found) == {"untreated", "treated"}
    for name, tags in found.items():
        # the run directory's statistics and the demo's own scalars are one run
        assert {"relu_doctor/dead_fraction/relu1", "demo/test_accuracy"} <= tags, name
        assert tb.run_log_dir(out / name) == out / name


def test_a_run_resumed_from_an_older_checkpoint_shows_each_step_once(tmp_path: Path) -> None:
    """A run resumed from a checkpoint older than its last log logs those steps again: the
    run directory's tables keep one of each, but TensorBoard read the killed process's
    event file too, and its curves doubled back over steps 6-8 (an operations trial). The
    continued run's event file begins a session at its first step (torch's ``purge_step``),
    which hides the older file's later steps: each step once, the continued run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    run_dir = tmp_path / "run"

    def train(doc: Any, steps: int, lr: float) -> None:
        g = torch.Generator().manual_seed(int(lr * 100))
        for _ in range(steps):
            x = torch.randn(16, 4, generator=g)
            F.cross_entropy(net(x) * lr, torch.randint(0, 2, (16,), generator=g)).backward()
            doc.step(loss=torch.tensor(lr))

    with relu_doctor.watch(net, log_every_n_steps=2, run_dir=run_dir) as doc:
        train(doc, 4, 0.1)
        state = doc.state_dict()  # a checkpoint at step 4
        train(doc, 4, 0.2)  # steps 5-8, logged, then lost to a kill
    with relu_doctor.watch(net, log_every_n_steps=2, run_dir=run_dir, resume=True) as doc:
        doc.load_state_dict(state)
        train(doc, 6, 0.3)  # steps 5-10
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    tag = next(t for t in ea.Tags()["scalars"] if t.endswith("loss"))
    seen = [(e.step, round(e.value, 6)) for e in ea.Scalars(tag)]
    assert [s for s, _ in seen] == [2, 4, 6, 8, 10], seen
    assert dict(seen) == {2: 0.1, 4: 0.1, 6: 0.3, 8: 0.3, 10: 0.3}
