"""A newcomer's first run: the demo's printed commands work as printed in a new shell, from
any working directory, and what a newcomer tries by mistake ends in a clear error (or, for a
``watch`` block that never called ``step()``, a warning), never a traceback or silence."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import ReluDoctorError, RunDirError
from relu_doctor.reports import Report, summary, write_report

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def one_step(doc: relu_doctor.Doctor, model: nn.Module) -> None:
    model(torch.randn(16, 4)).sum().backward()
    doc.step()


# ---------------------------------------------------------------------- clear errors


def test_run_dir_that_is_not_a_path() -> None:
    with pytest.raises(ReluDoctorError, match=r"run_dir: expected a path .* got 123"):
        relu_doctor.watch(net(), run_dir=123)


def test_unwritable_run_dir(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a place nobody may write
        target = Path("/sys/relu_doctor_test/run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    model = net()
    with pytest.raises(RunDirError, match=r"run_dir: cannot write to .*relu_doctor_test|run_dir: cannot write to .*locked"):
        relu_doctor.watch(model, run_dir=target)
    assert not any(m._forward_hooks for m in model.modules())  # nothing left attached


def test_a_run_dir_that_cannot_be_created_is_an_error_before_training() -> None:
    """Not only a permission: any run_dir the OS refuses to create at watch() (here ENOENT
    under /proc, for root too) is the user's mistake, said with the path and the OS reason,
    before a step is trained. (A write that fails later, a full disk, warns: test_faults.)"""
    model = net()
    with pytest.raises(RunDirError, match=r"^run_dir: cannot write to '/proc/relu_doctor_test/run' "
                       r"\(No such file or directory\)") as info:
        relu_doctor.watch(model, run_dir="/proc/relu_doctor_test/run")
    assert isinstance(info.value.__cause__, FileNotFoundError)  # the OS error, chained
    assert not any(m._forward_hooks for m in model.modules())  # nothing left attached


def test_scan_of_none_is_a_clear_error() -> None:
    with pytest.raises(ReluDoctorError, match=r"dataloader: expected an iterable .* got NoneType"):
        relu_doctor.scan(net(), None)  # type: ignore[arg-type]


def test_scan_of_a_bare_tensor_is_one_batch() -> None:
    x = torch.randn(4, 4)
    res = relu_doctor.scan(net(), x)  # type: ignore[arg-type]
    assert res.site_table["samples"].tolist() == [4]  # not 4 batches of one row, not 32
    assert res.site_table["batches"].tolist() == [1]
    same = relu_doctor.scan(net(), [x])
    assert res.unit_table.equals(same.unit_table)


def test_scan_of_batches_the_model_does_not_take_says_how_to_feed_them() -> None:
    """A GNN's forward(x, edge_index, batch), fed the batch's first element by scan's default,
    raised a bare TypeError (a trial): it names forward= now, and the model is left as it
    was. A model that takes the batch is not refused."""

    class ThreeInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, edge_index, batch):  # type: ignore[no-untyped-def]
            return torch.relu(self.lin(x))

    model = ThreeInputs().train()
    data = [(torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(5))]
    with pytest.raises(ReluDoctorError, match=r"dataloader: scan feeds the model the batch's first "
                       r"element, which ThreeInputs.forward does not take \(missing a required argument: "
                       r"'edge_index'\); "
                       r"pass forward=lambda model, batch"):
        relu_doctor.scan(model, data)
    assert model.training and not any(m._forward_hooks for m in model.modules())
    res = relu_doctor.scan(model, data, forward=lambda m, b: m(*b[:3]))
    assert res.site_table["samples"].tolist() == [5]
    # a pre-hook that supplies the rest: it runs as a direct call does (a review)
    model.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {"edge_index": data[0][1], "batch": data[0][2]}),
        with_kwargs=True)
    assert relu_doctor.scan(model, data).site_table["samples"].tolist() == [5]
    # a TypeError raised inside forward is the model's own, said as it is (a review)

    class Broken(ThreeInputs):
        def forward(self, x, edge_index, batch):  # type: ignore[no-untyped-def]
            return len(5)  # type: ignore[arg-type]

    broken = Broken()
    broken.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {"edge_index": data[0][1], "batch": data[0][2]}),
        with_kwargs=True)
    with pytest.raises(TypeError, match="has no len"):
        relu_doctor.scan(broken, data)


def test_write_report_of_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReluDoctorError, match=r"run_or_path: expected a run record .*got Sequential.*not from the model"):
        write_report(net(), tmp_path / "r.html")  # type: ignore[arg-type]
    assert not (tmp_path / "r.html").exists()


def test_summary_takes_a_path_and_says_when_it_is_not_a_run(tmp_path: Path) -> None:
    model = net()
    with relu_doctor.watch(model, log_every_n_steps=1, run_dir=tmp_path / "run") as doc:
        one_step(doc, model)
    text = summary(str(tmp_path / "run"))
    assert text == summary(relu_doctor.load_run(tmp_path / "run")) == Report(tmp_path / "run").summary()
    with pytest.raises(RunDirError, match="does not exist"):
        summary(str(tmp_path / "nowhere"))
    with pytest.raises(ReluDoctorError, match=r"run: expected a run record .* got Doctor .*doc.to_run"):
        summary(doc)  # type: ignore[arg-type]


def test_step_after_the_with_block_is_a_clear_error() -> None:
    model = net()
    with relu_doctor.watch(model) as doc:
        one_step(doc, model)
    with pytest.raises(ReluDoctorError, match=r"step: called after the .*block ended"):
        doc.step()


def test_watch_block_without_step_warns_at_exit() -> None:
    model = net()
    with (
        pytest.warns(UserWarning, match=r"without a call to doc.step\(\), so nothing was logged"),
        relu_doctor.watch(model),
    ):
        model(torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a block that stepped says nothing
        with relu_doctor.watch(model) as doc:
            one_step(doc, model)
    # ... nor one whose step() raised (nothing to watch) and was caught
    plain = nn.Sequential(nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with relu_doctor.watch(plain) as doc:
            plain(torch.randn(2, 4))
            with pytest.raises(ReluDoctorError, match="ran no ReLU-family activation"):
                doc.step()


# ---------------------------------------------------------------------- the demo's commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fresh_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``command`` in a new login-less shell: no venv on PATH, nothing inherited."""
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_demo_commands_work_as_printed_from_another_directory(tmp_path: Path) -> None:
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    demo = _fresh_shell(f"{shlex.quote(str(ROOT / 'scripts' / 'demo'))} --quick --steps 20 "
                        "--out out", start)
    assert demo.returncode == 0, demo.stderr[-2000:]
    out = demo.stdout
    assert (start / "out" / "treated" / "report.html").is_file()  # under the caller's directory
    # every path printed is absolute
    paths = re.findall(r"(?m)^\s+(?:untreated|treated)\s+(/\S*)$", out)
    assert len(paths) == 4 and all(Path(p).is_absolute() and Path(p).exists() for p in paths)
    lines = [ln.strip() for ln in out.splitlines()]
    report_cmd = next(ln for ln in lines if " report " in ln and "relu-doctor" in ln)
    tb_cmd = next(ln for ln in lines if "tensorboard" in ln and "--logdir" in ln)
    activate = next(ln for ln in lines if ln.startswith("source "))

    done = _fresh_shell(report_cmd, elsewhere)
    assert done.returncode == 0, done.stderr
    assert "Report: " in done.stdout
    done = _fresh_shell(f"{activate} && relu-doctor --version", elsewhere)
    assert done.returncode == 0 and done.stdout.startswith("relu-doctor "), done.stderr

    port = _free_port()
    proc = subprocess.Popen(["bash", "-c", f"exec {tb_cmd} --host 127.0.0.1 --port {port}"],
                            cwd=elsewhere, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs: list[str] = []
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2) as r:
                    runs = __import__("json").loads(r.read())
                if runs:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        # the runs are named after the runs, not after the tensorboard/ folder
        assert sorted(r.split("/")[0] for r in runs) == ["treated", "untreated"], runs
        assert not any("tensorboard" in r for r in runs)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_submodules_are_attributes_of_the_package_without_importing_them_first() -> None:
    """``import relu_doctor; relu_doctor.errors.ReluDoctorWarning`` works in a fresh
    interpreter (before, the lazy attribute lookup raised AttributeError for submodules);
    a name that is neither an export nor a submodule still raises AttributeError."""
    code = (
        "import relu_doctor\n"
        "assert relu_doctor.errors.ReluDoctorWarning is relu_doctor.ReluDoctorWarning\n"
        "assert relu_doctor.stats.FIELDS[0] == 'elements'\n"
        "try:\n"
        "    relu_doctor.no_such_thing\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_thing' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "assert not hasattr(relu_doctor, '_private')\n"
    )
    _runs_in_a_fresh_interpreter(code)


def _runs_in_a_fresh_interpreter(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("first", ["from relu_doctor.scan import ScanResult",
                                   "import relu_doctor.scan", "import relu_doctor"])
def test_relu_doctor_scan_is_the_function_however_its_module_was_imported_first(first) -> None:
    """``scan`` names both a function and its module: importing the module first (for
    ``ScanResult``, say) leaves ``relu_doctor.scan`` the function, callable, in a fresh
    interpreter; the module stays importable."""
    code = (
        f"{first}\n"
        "import sys, inspect, torch, torch.nn as nn, relu_doctor\n"
        "assert inspect.isfunction(relu_doctor.scan), relu_doctor.scan\n"
        "res = relu_doctor.scan(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), [torch.randn(5, 3)])\n"
        "assert isinstance(res, sys.modules['relu_doctor.scan'].ScanResult)\n"
        "assert relu_doctor.errors.__name__ == 'relu_doctor.errors'\n"
    )
    _runs_in_a_fresh_interpreter(code)


def test_a_model_run_only_under_vmap_is_said_to_be_so_not_left_in_eval_mode() -> None:
    """A vmap ensemble (torch.func.functional_call of the watched module under vmap): its
    activations are torch.func's transformed tensors, which are not watched, and the
    warning sent the user to model.train() (a trial). It says torch.func."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    members = [net() for _ in range(3)]
    params, buffers = stack_module_state(members)
    base = net()
    x = torch.randn(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(base, log_every_n_steps=2, overhead_budget=None) as doc:
            for _ in range(4):
                vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers).sum().backward()
                doc.step()
            base.eval()  # then left in eval mode: that window ran no transform
            for _ in range(2):
                base(x)
                doc.step()
    said = [str(w.message) for w in caught if "torch.func transforms" in str(w.message)]
    # its activations: one ReLU call a step (vmap batches the members), 2 steps to a window
    assert len(said) == 1 and "vmap, grad: 2 calls in this window" in said[0], said
