"""The Triton (CUDA) fused kernel against the eager reference path, run by Triton's
interpreter on the CPU (relu_doctor._kernels.triton_stats).

``TRITON_INTERPRET=1`` takes effect only if set before triton is imported, and another test
(torch.compile) may have imported triton already, so the kernel runs in a child process: the
parent makes every case's tensors, the child runs the Triton path on them (directly, and
through ``SiteStats`` with ``RELU_DOCTOR_TRITON_INTERPRET=1``), and the parent compares the
windows with the eager path's and with tests/reference.py's numpy sums. A second child, side
by side, compiles the kernel's variants to a cubin for a GPU it does not have.
Counts (elements, active, saturated, nonfinite and the gradient counts) must be equal
exactly; sums agree to float32 rounding. Covered: an unbatched vector to 4-D, one unit and
hundreds of units, odd sizes, float32/float16/bfloat16, contiguous, channels-last,
transposed, sliced and expanded layouts, every unit_dim, NaN/Inf, capped and leaky
families, gradients with and without dL/d(input) and with an AMP scale (float and tensor),
the rows split over several programs, and accumulation into a non-empty window.

The dispatch rules need no triton: the CPU path never imports it, and a failing Triton path
steps aside with one warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from relu_doctor import _kernels
from relu_doctor.stats import FIELDS, ROW, SiteStats
from tests import reference as ref
from tests.test_fused import LAYOUTS, _data

COUNTS = ["elements", "active", "saturated", "nonfinite", "grad_elements", "grad_in_elements",
          "grad_zero", "grad_nonfinite"]
SUMS = ["sum", "sum_abs", "sum_sq", "grad_sq"]
ROOT = Path(__file__).resolve().parent.parent
G0 = len(FIELDS) - 5  # the first gradient row


def _case(shape, unit_dim, dtype=torch.float32, *, layout=None, leaky=False, cap=None,
          inv=None, split=None, no_gi=False, repeat=1) -> dict[str, Any]:
    x, g, gi = _data(shape, dtype, leaky=leaky, cap=cap)
    if layout is not None:
        x, g, gi = (LAYOUTS[layout](t) for t in (x, g, gi))
    return {"x": x, "g": g, "gi": None if no_gi else gi, "unit_dim": unit_dim,
            "nonnegative": not leaky, "cap": cap, "inv": inv, "split": split, "repeat": repeat}


def _cases() -> dict[str, dict[str, Any]]:
    torch.manual_seed(0)
    cases: dict[str, dict[str, Any]] = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dt).removeprefix("torch.")
        cases[f"vector-{name}"] = _case((7,), 0, dt)
        cases[f"mlp-{name}"] = _case((9, 5), 1, dt)
        cases[f"conv-odd-{name}"] = _case((3, 5, 7, 9), 1, dt)
        cases[f"channels_last-{name}"] = _case((3, 6, 5, 5), 1, dt, layout="channels_last")
    cases["one-unit"] = _case((37, 1), 1)
    cases["one-element"] = _case((1, 1), 1)
    cases["many-units"] = _case((3, 300), 1)
    cases["many-units-short-positions"] = _case((2, 260, 3), 1)
    cases["sequence"] = _case((4, 6, 7), 2)
    cases["unit-dim-0"] = _case((5, 4, 6), 0)
    cases["unit-dim-last-4d"] = _case((2, 3, 4, 5), 3)
    for layout in ("transposed", "sliced", "expanded"):
        cases[layout] = _case((4, 6, 5, 5), 1, layout=layout)
    cases["leaky"] = _case((4, 6, 5, 5), 1, leaky=True)
    cases["relu6"] = _case((4, 6, 5, 5), 1, cap=6.0)
    cases["relu6-bf16"] = _case((4, 6, 5, 5), 1, torch.bfloat16, cap=6.0)
    cases["hardtanh-0.1"] = _case((6, 10), 1, leaky=True, cap=0.1)
    cases["split-conv"] = _case((16, 4, 6, 6), 1, split=3)
    cases["split-mlp"] = _case((300, 10), 1, split=4)
    cases["split-odd"] = _case((77, 3, 5), 1, split=7)
    cases["no-input-grad"] = _case((4, 6, 5, 5), 1, no_gi=True, inv=0.25)
    cases["scale-tensor"] = _case((4, 6, 5, 5), 1, inv=torch.tensor(0.5))
    cases["scale-tensor-f64"] = _case((9, 5), 1, inv=torch.tensor(0.125, dtype=torch.float64))
    cases["accumulates"] = _case((5, 8), 1, cap=6.0, repeat=3)
    cases["split-capped-scaled-bf16"] = _case((300, 10), 1, torch.bfloat16, cap=6.0,
                                              inv=torch.tensor(0.5), split=4)
    cases["no-input-grad-fp16"] = _case((3, 5, 7, 9), 1, torch.float16, no_gi=True, inv=0.25)
    # a GradScaler's scale past 2**32 (bfloat16 under a scaler): 1e-3 times 2**70, whose
    # squares' float32 sum overflows; split, and not
    for name, inv, split in (("huge-scale", 2.0**-70, None),
                             ("huge-scale-tensor-split", torch.tensor(2.0**-70), 3)):
        c = _case((3000, 4), 1, inv=inv, split=split)
        c["g"] = c["g"] * (1e-3 * 2.0**70)
        cases[name] = c
    for dt in (torch.float32, torch.bfloat16):  # subnormal outputs are active (no flush)
        c = _case((9, 5), 1, dt)
        c["x"][:4, 1] = 1e-40
        c["gi"][:3, 2] = 1e-40
        cases[f"subnormal-{str(dt).removeprefix('torch.')}"] = c
    c = _case((3, 6, 5, 5), 1, layout="channels_last")  # gradients in two layouts
    c["gi"] = c["gi"].contiguous()
    cases["mixed-grad-layouts"] = c
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        c = _case((20, 8, 5, 5), 1, dt, split=2 if dt == torch.float32 else None)
        c["x"][1, 2, 3, 3] = float("nan")
        c["x"][0, 5, 0, 0] = float("inf")
        c["g"][2, 3, 1, 1] = float("-inf")
        c["g"][3, 6, 0, 4] = float("nan")
        c["gi"][0, 1, 0, 0] = float("nan")  # a NaN dL/d(input) is not zero, and not a bad step
        cases[f"nonfinite-{str(dt).removeprefix('torch.')}"] = c
    return cases


CASES = _cases()
DISPATCHED = ["mlp-float32", "channels_last-bfloat16", "relu6", "nonfinite-float32"]


def _run_in_child(cases_path: str, out_path: str) -> None:
    """The child: the Triton path on every case, directly and through SiteStats."""
    assert "triton" not in sys.modules
    from relu_doctor import _kernels as k

    cases = torch.load(cases_path, weights_only=False)
    x = cases["mlp-float32"]["x"]
    st = SiteStats(x.shape[1], "cpu")
    st.record_forward(x, 1, nonnegative=True, cap=None)
    st.record_grad(cases["mlp-float32"]["g"], None, 1)
    cpu_imports_triton = "triton" in sys.modules

    from relu_doctor._kernels import triton_stats as ts

    results: dict[str, Any] = {"cpu_imports_triton": cpu_imports_triton,
                               "interpreted": ts._INTERPRETED,
                               "float64": ts.forward_into(torch.zeros(7, 3, dtype=torch.float64),
                                                          torch.ones(2, 3, dtype=torch.float64),
                                                          1, cap=None)}
    grids: list[tuple[int, int]] = []

    class Recording:  # the launch grids, to show that the split cases split
        def __getitem__(self, grid: tuple[int, int]) -> Any:
            grids.append(grid)
            return kernel[grid]

    kernel, ts._KERNEL = ts._KERNEL, Recording()
    for name, c in cases.items():
        window = SiteStats(c["x"].shape[c["unit_dim"]], "cpu").window
        grids.clear()
        for _ in range(c["repeat"]):
            assert ts.forward_into(window, c["x"], c["unit_dim"], cap=c["cap"], split=c["split"])
            assert ts.grad_into(window, c["g"], c["gi"], c["unit_dim"], c["inv"], G0,
                                split=c["split"])
        results[name], results[f"grids-{name}"] = window, list(grids)
    ts._KERNEL = kernel

    calls = []
    for fn in ("forward_into", "grad_into"):
        orig = getattr(ts, fn)
        setattr(ts, fn, lambda *a, _orig=orig, _fn=fn, **kw: calls.append(_fn) or _orig(*a, **kw))
    os.environ["RELU_DOCTOR_TRITON_INTERPRET"] = "1"
    import importlib

    importlib.reload(k)  # the switch is read at import
    for name in DISPATCHED:
        c = cases[name]
        st = SiteStats(c["x"].shape[c["unit_dim"]], "cpu")
        st.record_forward(c["x"], c["unit_dim"], nonnegative=c["nonnegative"], cap=c["cap"])
        st.record_grad(c["g"], c["gi"], c["unit_dim"], c["inv"])
        results[f"dispatched-{name}"] = st.window
    results["dispatched_calls"] = calls
    torch.save(results, out_path)


# Between them every compile-time flag both ways, both layouts and the three dtypes: eight
# variants (a cold compile costs about a second each; triton caches them in ~/.triton).
COMPILED = ["split-capped-scaled-bf16", "no-input-grad-fp16", "one-unit"]
TARGET = ("cuda", 90, 32)  # H100/H200 (sm_90), warp size 32


def _compile_in_child(cases_path: str, out_path: str) -> None:
    """The other child (no interpreter): compile, without a GPU, every kernel variant that
    the COMPILED cases would launch on CUDA, with the argument types and specialisations
    Triton itself derives from the arguments, down to a cubin for TARGET. Pinned to triton
    3.8's internals (create_function_from_signature, JITFunction._pack_args)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    from relu_doctor._kernels import triton_stats as ts

    kernel, target = ts._KERNEL, GPUTarget(*TARGET)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    launches: list[dict[str, Any]] = []

    class CompileOnly:
        def __getitem__(self, grid: tuple[int, int]) -> Any:
            def run(*args: Any, **kwargs: Any) -> None:
                bound, spec, opts = binder(*args, **kwargs)
                options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec,
                                                                    opts)
                out = compile(ASTSource(kernel, sig, constexprs, attrs), target=target,
                              options=options.__dict__)
                launches.append({**kwargs, "grid": grid, "cubin": len(out.asm["cubin"])})
            return run

    ts._KERNEL, ts._INTERPRETED = CompileOnly(), True  # CPU tensors stand in for CUDA ones
    cases = torch.load(cases_path, weights_only=False)
    for name in COMPILED:
        c = cases[name]
        window = SiteStats(c["x"].shape[c["unit_dim"]], "cpu").window
        assert ts.forward_into(window, c["x"], c["unit_dim"], cap=c["cap"], split=c["split"])
        assert ts.grad_into(window, c["g"], c["gi"], c["unit_dim"], c["inv"], G0,
                            split=c["split"])
    torch.save(launches, out_path)


def _child(fn: str, cases_path: Path, out_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    code = (f"import sys, torch; torch.set_num_threads(1); from tests.test_triton import {fn}; "
            f"{fn}(sys.argv[1], sys.argv[2])")
    return subprocess.Popen([sys.executable, "-c", code, str(cases_path), str(out_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait(proc: subprocess.Popen[str], out_path: Path) -> Any:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return torch.load(out_path, weights_only=False)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both children, run side by side: the interpreter's results and the compiled variants."""
    # triton 3.6's interpreter cannot take a loop bound from an argument under numpy 2
    # (the kernel itself compiles with 3.6): the interpreter runs need 3.8.
    pytest.importorskip("triton", minversion="3.8")
    tmp = tmp_path_factory.mktemp("triton")
    cases_path = tmp / "cases.pt"
    torch.save(CASES, cases_path)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "RELU_DOCTOR_TRITON_INTERPRET")}
    compiling = _child("_compile_in_child", cases_path, tmp / "compiled.pt", env)
    interpreting = _child("_run_in_child", cases_path, tmp / "interpreted.pt",
                          {**env, "TRITON_INTERPRET": "1"})
    results: dict[str, Any] = _wait(interpreting, tmp / "interpreted.pt")
    assert results["interpreted"]
    results["compiled"] = _wait(compiling, tmp / "compiled.pt")
    return results


def _eager(c: dict[str, Any]) -> torch.Tensor:
    st = SiteStats(c["x"].shape[c["unit_dim"]], c["x"].device)
    with _kernels.disabled():
        for _ in range(c["repeat"]):
            st.record_forward(c["x"], c["unit_dim"], nonnegative=c["nonnegative"], cap=c["cap"])
            st.record_grad(c["g"], c["gi"], c["unit_dim"], c["inv"])
    return st.window


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    for name in COUNTS:
        assert torch.equal(got[ROW[name]], want[ROW[name]]), name
    for name in SUMS:
        torch.testing.assert_close(got[ROW[name]], want[ROW[name]], rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_equals_eager(triton_results, name):
    _check(triton_results[name], _eager(CASES[name]))


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("nonfinite")
                                  and n != "hardtanh-0.1"])
def test_triton_equals_numpy_reference(triton_results, name):
    """The independent numpy sums (float64; a cap such as 0.1 that float32 cannot hold is
    compared in float32 by both relu_doctor paths, so that case is left out here)."""
    c, got = CASES[name], triton_results[name]
    want = ref.forward_reference([c["x"]] * c["repeat"], c["unit_dim"], c["cap"])
    gi = c["gi"] if c["gi"] is not None else c["g"]
    want.update(ref.grad_reference([c["g"]] * c["repeat"], [gi] * c["repeat"], c["unit_dim"]))
    inv = 1.0 if c["inv"] is None else float(c["inv"])
    want["grad_sq"] = want["grad_sq"] * inv * inv
    for name_, row in want.items():
        if name_ == "grad_zero" and c["gi"] is None:
            continue
        expect = torch.from_numpy(row)
        if name_ in COUNTS:
            assert torch.equal(got[ROW[name_]], expect), name_
        else:
            torch.testing.assert_close(got[ROW[name_]], expect, rtol=1e-4, atol=1e-5, msg=name_)


def test_split_cases_split_the_rows(triton_results):
    for name, c in CASES.items():
        rows_split = max(grid[1] for grid in triton_results[f"grids-{name}"])
        assert (rows_split > 1) == (c["split"] is not None and c["split"] > 1), name


def test_nonfinite_units_are_flagged(triton_results):
    got = triton_results["nonfinite-float32"]
    assert got[ROW["nonfinite"]].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]
    assert got[ROW["grad_nonfinite"]].tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    assert got[ROW["elements"], 2] == 0 and got[ROW["elements"], 0] == 500


def test_cases_exercise_what_they_name(triton_results):
    """The saturated and zero-gradient counts are not all zero, so they are tested."""
    assert triton_results["relu6"][ROW["saturated"]].sum() > 0
    assert triton_results["hardtanh-0.1"][ROW["saturated"]].sum() > 0
    assert triton_results["mlp-float32"][ROW["grad_zero"]].sum() > 0
    assert triton_results["no-input-grad"][ROW["grad_in_elements"]].sum() == 0
    for name in ("subnormal-float32", "subnormal-bfloat16"):
        assert triton_results[name][ROW["active"], 1] >= 4
        assert CASES[name]["x"][0, 1] != 0 and CASES[name]["gi"][0, 2] != 0


def test_float64_is_left_to_the_eager_path(triton_results):
    assert triton_results["float64"] is False


def test_cpu_path_never_imports_triton(triton_results):
    assert triton_results["cpu_imports_triton"] is False


def test_switch_sends_cpu_tensors_through_triton(triton_results):
    assert triton_results["dispatched_calls"] == ["forward_into", "grad_into"] * len(DISPATCHED)
    for name in DISPATCHED:
        _check(triton_results[f"dispatched-{name}"], _eager(CASES[name]))


def test_every_kernel_variant_compiles_for_a_gpu(triton_results):
    """Offline compilation to a cubin: what the interpreter cannot check (types of the
    compiled IR, constexpr branches, the specialisations Triton picks). Not a run."""
    launches = triton_results["compiled"]
    assert all(launch["cubin"] > 0 for launch in launches)
    seen = {(k, launch[k]) for launch in launches for k in
            ("GRAD", "HAS_CAP", "HAS_GI", "SCALE_PTR", "READ_PARTS", "WRITE_PARTS")}
    assert seen == {(k, v) for k in ("GRAD", "HAS_CAP", "HAS_GI", "SCALE_PTR", "READ_PARTS",
                                     "WRITE_PARTS") for v in (False, True)}
    assert {launch["BLOCK_U"] == 1 for launch in launches} == {False, True}  # both layouts
    assert {launch["BLOCK_B"] == 1 for launch in launches} == {False, True}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernel_equals_eager(name):
    """On a GPU: the compiled kernel against the eager path on the same device (never run
    where this was written: no GPU). ``.cuda()`` keeps channels-last and transposed layouts;
    sliced and expanded ones arrive contiguous."""
    pytest.importorskip("triton")
    from relu_doctor._kernels import triton_stats as ts

    if ts._INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel is not compiled")
    c = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in CASES[name].items()}
    window = SiteStats(c["x"].shape[c["unit_dim"]], "cuda").window
    for _ in range(c["repeat"]):
        assert ts.forward_into(window, c["x"], c["unit_dim"], cap=c["cap"], split=c["split"])
        assert ts.grad_into(window, c["g"], c["gi"], c["unit_dim"], c["inv"], G0,
                            split=c["split"])
    _check(window.cpu(), _eager(c).cpu())


def _broken_triton(monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
    monkeypatch.setattr(_kernels, "_TRITON_ON_CPU", True)
    monkeypatch.setattr(_kernels, "_triton_state", "ready" if module is not None else "unloaded")
    monkeypatch.setattr(_kernels, "_triton", module)


def _records_with_one_warning(match: str) -> None:
    c = CASES["mlp-float32"]
    st = SiteStats(5, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            st.record_forward(c["x"], 1, nonnegative=True, cap=None)
            st.record_grad(c["g"], c["gi"], 1)
    msgs = [str(w.message) for w in caught if "fused CUDA statistics" in str(w.message)]
    assert len(msgs) == 1 and match in msgs[0], msgs
    want = _eager({**c, "repeat": 3})
    assert torch.equal(st.window, want)


def test_a_failing_triton_path_steps_aside_with_one_warning(monkeypatch):
    class Failing:
        @staticmethod
        def forward_into(*args: Any, **kwargs: Any) -> bool:
            raise RuntimeError("no kernel image for this GPU")

        grad_into = forward_into

    _broken_triton(monkeypatch, Failing)
    _records_with_one_warning("no kernel image for this GPU")


def test_missing_triton_steps_aside_with_one_warning(monkeypatch):
    _broken_triton(monkeypatch, None)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.delitem(sys.modules, "relu_doctor._kernels.triton_stats", raising=False)
    monkeypatch.delattr(_kernels, "triton_stats", raising=False)  # bound by an earlier import
    _records_with_one_warning("triton could not be imported")
