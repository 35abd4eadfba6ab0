"""The CPU fused-statistics kernel: build at first use, cache, load, call.

``fused_stats.c`` is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``) into ``~/.cache/relu_doctor/kernels`` (``$RELU_DOCTOR_CACHE`` overrides) under a
name hashed from the source, the flags, the compiler and the machine, so a build is reused
across processes and never run on another CPU. It needs no torch headers and no ninja: it
compiles in a few seconds, once per machine (and Python version). Where the running Python's
headers are installed, ``fastcall.c`` (which includes ``fused_stats.c``) is compiled instead:
the same kernels plus a CPython front whose ``forward``/``grad`` a hook calls in about 0.2 us
(ctypes converts ten arguments in about 3 us); ctypes still loads that object for the
optimizer tap's kernel, and calls every kernel where the headers are missing. It links the
OpenMP runtime torch already loaded
(same soname), so the process keeps one thread pool; the kernel uses
``torch.get_num_threads()`` threads.

The kernel reads raw memory: it is called only on plain CPU tensors (no subclass, no fake
tensor, never while torch.compile traces) of float32/float64/float16/bfloat16 whose memory
can be read as ``(A, U, B)`` with the units in the middle (contiguous, or units-last such as
channels-last); anything else is copied to that layout first or left to the eager path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["Prepared", "available", "disabled", "forward_into", "grad_into", "prepare_forward",
           "prepare_grad", "sum_squares_into"]

_SOURCE = Path(__file__).with_name("fused_stats.c")
_FRONT = Path(__file__).with_name("fastcall.c")  # includes _SOURCE: one object, a CPython front
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_FLAG_CAP, _FLAG_NONNEG = 1, 2  # rd_forward's flags
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
    ["-O3", "-ffp-contract=off", "-fopenmp"],
    ["-O3", "-ffp-contract=off"],  # no OpenMP (e.g. Apple clang): one thread
)

_lib: ctypes.CDLL | None = None
_front: Any = None  # forward() and grad(): the CPython front, else ctypes (see _build)
_state = "unloaded"  # unloaded | ready | failed
_lock = threading.Lock()
_off = 0  # > 0 inside disabled()


def _cache_dir() -> Path:
    env = os.environ.get("RELU_DOCTOR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "relu_doctor" / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    return platform.machine() + flags


def _python_include() -> str | None:
    """The running Python's C headers, where installed (the CPython front needs them)."""
    include = sysconfig.get_paths().get("include")
    return include if include and Path(include, "Python.h").is_file() else None


def _compile(cc: str, flags: list[str], src: Path, out: Path) -> str | None:
    """Compile ``src`` into the shared object ``out`` unless a build is cached there;
    returns the compiler's error, or None."""
    if out.exists():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(src), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        os.unlink(tmp)
        return f"{' '.join(cmd)}: {res.stderr.strip()[-300:]}"
    os.replace(tmp, out)  # atomic: a concurrent build writes the same file
    return None


def _front_of(path: Path) -> Any:
    """The CPython front built into ``path`` (see ``fastcall.c``), imported."""
    spec = importlib.util.spec_from_file_location("_rd_fastcall", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> tuple[ctypes.CDLL, Any]:
    """Compile (or reuse the cached build of) the kernel and load it; raises on failure.

    Returns the library (ctypes) and the per-call front: the CPython front of
    ``fastcall.c`` where the Python headers are found, else the library's own functions."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc or clang)")
    source = _SOURCE.read_bytes()
    include = _python_include()
    # With the headers: the front and the kernel in one object (built for this Python); the
    # plain kernel otherwise, or where that build fails.
    builds: list[tuple[Path, list[str], bytes, str | None]] = []
    if include is not None:
        link = ["-undefined", "dynamic_lookup"] if platform.system() == "Darwin" else []
        python = sysconfig.get_config_var("EXT_SUFFIX") or sys.version
        builds.append((_FRONT, ["-I", include, *link], source + _FRONT.read_bytes(), python))
    builds.append((_SOURCE, [], source, None))
    errors = []
    for flags in _FLAG_SETS:
        for src, extra, text, python in builds:
            what = (flags, cc, _cpu_id(), platform.system(), python)
            key = hashlib.sha256(text + repr(what).encode()).hexdigest()[:16]
            out = _cache_dir() / f"fused_stats_{key}.so"
            err = _compile(cc, [*flags, *extra], src, out)
            if err is not None:
                errors.append(err)
                continue
            try:
                lib = ctypes.CDLL(str(out))
            except OSError as e:  # the front's Python symbols unresolved (an embedding host)
                errors.append(f"load {out.name}: {e}")
                continue
            i64, ptr, dbl, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
            lib.rd_forward.argtypes = [ptr, cint, i64, i64, i64, ptr, i64, cint, dbl, cint]
            lib.rd_forward.restype = cint
            lib.rd_grad.argtypes = [ptr, ptr, cint, i64, i64, i64, ptr, i64, dbl, cint]
            lib.rd_grad.restype = cint
            lib.rd_sumsq.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, cint]
            lib.rd_sumsq.restype = cint
            if python is not None:
                with contextlib.suppress(Exception):  # else ctypes, same numbers
                    return lib, _front_of(out)
            return lib, _CtypesFront(lib)
    raise RuntimeError("the build failed: " + " | ".join(errors))


class _CtypesFront:
    """The per-call kernels through ctypes, where the CPython front is not built."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.forward = lib.rd_forward
        self.grad = lib.rd_grad


def _load() -> ctypes.CDLL | None:
    global _lib, _front, _state
    with _lock:
        if _state == "unloaded":
            if os.environ.get("RELU_DOCTOR_FUSED", "1") == "0":
                _state = "failed"
                return None
            try:
                _lib, _front = _build()
                _state = "ready"
            except Exception as e:  # any failure means: use the eager path
                _state = "failed"
                warnings.warn(
                    f"relu_doctor: the fused CPU statistics kernel is unavailable ({e}); "
                    "statistics are computed by the eager path (slower, same numbers).",
                    stacklevel=3,
                )
    return _lib


def available() -> bool:
    """Whether the CPU kernel is (or can be) loaded; builds it if needed."""
    return _off == 0 and _load() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the eager path inside this block (the reference path, for tests and golden runs)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def _code(x: torch.Tensor) -> int | None:
    """The kernel's dtype code for a plain CPU tensor of a dtype it reads, with memory behind
    it (a ZeroTensor, the gradient of ``sgn`` and friends, has none: its data pointer is 0),
    else None."""
    if type(x) is not torch.Tensor or not x.is_cpu:
        return None
    code = _DTYPES.get(x.dtype)
    return None if code is None or x._is_zerotensor() else code


def _readable(x: torch.Tensor) -> bool:
    """See :func:`_code`."""
    return _code(x) is not None


def _usable(x: torch.Tensor) -> bool:
    """:func:`_readable`, and not while torch.compile traces."""
    return _readable(x) and not torch.compiler.is_compiling()


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly once, in some order (contiguous or
    channels-last): enough for a sum over all of them."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _layout(x: torch.Tensor, unit_dim: int) -> tuple[torch.Tensor, int, int, int]:
    """``(t, A, U, B)``: a tensor holding ``x``'s values whose memory reads as ``(A, U, B)``."""
    units = x.shape[unit_dim]
    if not x.is_contiguous():
        x = x.detach()  # an activation output may require grad: no autograd for these views
        y = x.movedim(unit_dim, -1)  # channels-last and other units-last layouts: no copy
        if y.is_contiguous():
            return y, x.numel() // units, units, 1
        x = x.contiguous()
    before = math.prod(x.shape[:unit_dim])
    return x, before, units, x.numel() // (before * units)


_MISS = object()
_dims_cache: dict[tuple[Any, ...], tuple[int, int, int] | None] = {}


def _dims(x: torch.Tensor, unit_dim: int) -> tuple[int, int, int] | None:
    """``(A, U, B)`` when ``x``'s own memory reads as ``(A, U, B)`` (contiguous, or units
    last such as channels-last), else None (:func:`_layout` copies it first). Cached by
    shape, strides and unit dim: a site's calls repeat a few layouts."""
    key = (x.shape, x.stride(), unit_dim)
    got = _dims_cache.get(key, _MISS)
    if got is _MISS:
        t, a, u, b = _layout(x, unit_dim)
        got = (a, u, b) if t.data_ptr() == x.data_ptr() else None  # else a copy
        if len(_dims_cache) >= 1024:  # shapes that never repeat: keep few
            _dims_cache.clear()
        _dims_cache[key] = got
    return got  # type: ignore[return-value]


def _read_as(x: torch.Tensor, unit_dim: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``(t, (A, U, B))``: ``x`` itself where its memory reads as ``(A, U, B)``, else a
    contiguous copy (see :func:`_layout`)."""
    dims = _dims(x, unit_dim)
    if dims is not None:
        return x, dims
    t, a, u, b = _layout(x, unit_dim)
    return t, (a, u, b)


def _plain(x: torch.Tensor) -> int | None:
    """:func:`_code` for a tensor with elements (the per-call paths), else None."""
    code = _code(x)
    return None if code is None or x.numel() == 0 else code


def _loaded_code(x: torch.Tensor) -> int | None:
    """:func:`_plain`'s dtype code of ``x`` where a per-call kernel may read it now (not
    inside :func:`disabled`, nor while torch.compile traces) and the kernel is loaded
    (built at the first such call), else None."""
    code = None if _off else _plain(x)
    if code is None or torch.compiler.is_compiling():
        return None
    if _state != "ready" and _load() is None:
        return None
    return code


def forward_into(
    window: torch.Tensor,
    out: torch.Tensor,
    unit_dim: int,
    *,
    cap: float | None,
    nonnegative: bool = False,
) -> bool:
    """Add the forward fields of ``out`` to rows 0-6 of ``window`` in one pass.

    ``nonnegative``: the family never outputs negatives, so ``sum |h|`` is ``sum h`` and is
    not summed apart (the eager path's rule).

    Returns False (nothing done) where the fused path does not apply; then the caller runs
    the eager path.
    """
    code = _loaded_code(out)
    if code is None:
        return False
    out, (a, u, b) = _read_as(out, unit_dim)
    flags, cap_value = _forward_flags(cap, nonnegative)
    rc = _front.forward(
        out.data_ptr(), code, a, u, b, window.data_ptr(), 0, flags, cap_value,
        torch.get_num_threads(),
    )
    return int(rc) == 0


def _forward_flags(cap: float | None, nonnegative: bool) -> tuple[int, float]:
    """rd_forward's ``flags`` and ``cap`` arguments."""
    flags = (_FLAG_CAP if cap is not None else 0) | (_FLAG_NONNEG if nonnegative else 0)
    return flags, 0.0 if cap is None else float(cap)


def host_scalar(x: torch.Tensor | float | None) -> float | None:
    """The value of a number, or of a CPU scalar tensor without a dispatched op (no
    ``item()``); None for None and any other tensor."""
    if x is None or isinstance(x, (int, float)):
        return x
    if type(x) is not torch.Tensor or x.device.type != "cpu" or x.numel() != 1:
        return None
    x = x.detach()
    if x.dtype == torch.float64:
        return ctypes.c_double.from_address(x.data_ptr()).value
    if x.dtype == torch.float32:
        return ctypes.c_float.from_address(x.data_ptr()).value
    return None


def grad_into(
    window: torch.Tensor,
    grad_out: torch.Tensor,
    grad_in: torch.Tensor | None,
    unit_dim: int,
    inv_scale: torch.Tensor | float | None,
    row0: int,
) -> bool:
    """Add the gradient fields to rows ``row0``.. ``row0 + 4`` of ``window`` in one pass.

    ``grad_in`` is dL/d(input) or None; ``inv_scale`` is 1 / the AMP loss scale. Returns
    False where the fused path does not apply.
    """
    inv = 1.0 if inv_scale is None else host_scalar(inv_scale)
    code = _loaded_code(grad_out)
    if inv is None or code is None:
        return False
    g, dims = _read_as(grad_out, unit_dim)
    gi_ptr = None
    if grad_in is not None:
        if grad_in.dtype != grad_out.dtype or _plain(grad_in) is None:
            return False
        if g is grad_out and grad_in.shape == g.shape and grad_in.stride() == g.stride():
            gi = grad_in  # laid out as grad_out (the usual case): read the same way
        else:
            gi, gi_dims = _read_as(grad_in, unit_dim)
            if gi_dims != dims:  # the two are laid out differently: read both contiguous
                g, dims = _read_as(grad_out.contiguous(), unit_dim)
                gi = grad_in.contiguous()
        gi_ptr = gi.data_ptr()
    a, u, b = dims
    rc = _front.grad(
        g.data_ptr(), gi_ptr, code, a, u, b, window.data_ptr(), row0,
        float(inv) * float(inv), torch.get_num_threads(),
    )
    return int(rc) == 0


class Prepared:
    """A kernel call worked out once for the repeated calls of one site: called with a
    tensor of the dtype, shape and strides it was made for (a plain CPU tensor read in
    place), it runs the kernel on it with the arguments found then and returns True; with
    any other tensor, or inside :func:`disabled`, it does nothing and returns False (the
    caller then takes :func:`forward_into` or :func:`grad_into`, which check everything).

    Nearly every call of a site repeats the layout of the one before. A hook's Python runs
    in a training step with caches the model's own work has just emptied, where each line
    of code and each object it touches costs a miss: the checks and layout work skipped
    here took about 40 us per call inside a step of the benchmark MLP, against 5 us in a
    tight loop (see ``benchmarks.percall``).

    Made by :func:`prepare_forward` and :func:`prepare_grad`.
    """

    __slots__ = ("args", "dtype", "grad", "shape", "stride", "tail", "window", "with_gi")

    def __init__(
        self, x: torch.Tensor, window: torch.Tensor, args: tuple[int, int, int, int],
        tail: tuple[Any, ...], *, grad: bool = False, with_gi: bool = False,
    ) -> None:
        self.dtype, self.shape, self.stride = x.dtype, x.shape, x.stride()
        # args: (dtype code, A, U, B); tail: rd_forward's (flags, cap), or rd_grad's (row0,)
        self.window, self.args, self.tail = window, args, tail
        self.grad, self.with_gi = grad, with_gi

    def _fits(self, x: Any) -> bool:
        return (
            type(x) is torch.Tensor and x.dtype is self.dtype and x.shape == self.shape
            and x.stride() == self.stride and x.is_cpu and not x._is_zerotensor()
        )

    def __call__(self, x: Any, gi: Any = None, inv_scale: float | None = None) -> bool:
        """Run on ``x`` (the activation output; for a gradient call dL/d(output), with
        ``gi`` dL/d(input) or None and ``inv_scale`` 1 / the loss scale as a number, or None)
        if it fits; see the class."""
        if _off or not self._fits(x):
            return False
        code, a, u, b = self.args
        if not self.grad:
            flags, cap = self.tail
            rc = _front.forward(
                x.data_ptr(), code, a, u, b, self.window.data_ptr(), 0, flags, cap,
                torch.get_num_threads(),
            )
            return int(rc) == 0
        if (gi is not None) != self.with_gi or (gi is not None and not self._fits(gi)):
            return False
        inv = 1.0 if inv_scale is None else float(inv_scale)
        rc = _front.grad(
            x.data_ptr(), None if gi is None else gi.data_ptr(), code, a, u, b,
            self.window.data_ptr(), self.tail[0], inv * inv, torch.get_num_threads(),
        )
        return int(rc) == 0


def _in_place(x: torch.Tensor, unit_dim: int) -> tuple[int, int, int, int] | None:
    """``(code, A, U, B)`` for a tensor the kernel reads in place, once it is loaded."""
    code = _loaded_code(x)
    if code is None:
        return None
    dims = _dims(x, unit_dim)
    return None if dims is None else (code, *dims)


def prepare_forward(
    window: torch.Tensor, out: torch.Tensor, unit_dim: int, *, cap: float | None,
    nonnegative: bool = False,
) -> Prepared | None:
    """:func:`forward_into`'s call (same arguments), prepared for the later outputs laid out
    as ``out`` (see :class:`Prepared`); None where ``out`` is not read in place."""
    args = _in_place(out, unit_dim)
    if args is None:
        return None
    return Prepared(out, window, args, _forward_flags(cap, nonnegative))


def prepare_grad(
    window: torch.Tensor, grad_out: torch.Tensor, grad_in: torch.Tensor | None, unit_dim: int,
    row0: int,
) -> Prepared | None:
    """:func:`grad_into`'s call, prepared for the later gradients laid out as these
    (``grad_in`` None, or laid out as ``grad_out``: the usual case; the loss scale is given
    at each call, as a number); None otherwise."""
    args = _in_place(grad_out, unit_dim)
    if args is None:
        return None
    if grad_in is not None and not (
        grad_in.dtype == grad_out.dtype and _plain(grad_in) is not None
        and grad_in.shape == grad_out.shape and grad_in.stride() == grad_out.stride()
    ):
        return None
    return Prepared(grad_out, window, args, (row0,), grad=True, with_gi=grad_in is not None)


_SQ_CHUNK = 65536  # fused_stats.c's SQ_CHUNK


class _SquaresPlan:
    """rd_sumsq's read-only arguments that depend only on the tensors' dtypes and sizes and
    on the target rows (ctypes arrays, the chunk numbering): made once per such signature,
    reused at every step (the chunk sums' scratch is made per call, so optimizers stepping in
    two threads never share it). The array types of the per-call arrays are made here too:
    ctypes caches ``c_void_p * k`` only weakly, and a type made per call is 15 us and a
    reference cycle for the garbage collector."""

    def __init__(self, sig: tuple[tuple[int, int], ...], index: tuple[int, ...]) -> None:
        k = len(sig)
        first = [0] * (k + 1)
        for i, (_, n) in enumerate(sig):
            first[i + 1] = first[i] + -(-n // _SQ_CHUNK)
        self.sizes = (ctypes.c_int64 * k)(*[n for _, n in sig])
        self.dtypes = (ctypes.c_int * k)(*[code for code, _ in sig])
        self.index = (ctypes.c_int64 * k)(*index)
        self.first = (ctypes.c_int64 * (k + 1))(*first)
        self.chunks = max(1, first[k])
        self.pointers = ctypes.c_void_p * k
        self.scratch = ctypes.c_double * self.chunks
        self.scratch2 = ctypes.c_double * (2 * self.chunks)


_plans: dict[tuple[Any, ...], _SquaresPlan] = {}


def sum_squares_into(
    out: torch.Tensor,
    tensors: list[torch.Tensor],
    index: list[int],
    *,
    minus: list[torch.Tensor] | None = None,
    out_minus: torch.Tensor | None = None,
) -> bool:
    """``out[index[i]] += (tensors[i] ** 2).sum()`` for every i, in one call and one pass
    over each tensor (the optimizer tap's per-layer squared gradient norms).

    With ``minus`` (a tensor per tensor, same dtype, shape and strides) it also adds
    ``((tensors[i] - minus[i]) ** 2).sum()`` to ``out_minus[index[i]]`` in the same pass
    (the tap's update and weight norms; the difference is taken in float32 or float64, not
    rounded to a 16-bit dtype).

    Returns False (nothing done) where the fused path does not apply: ``out`` (or
    ``out_minus``) is not a contiguous CPU float64 vector, or a tensor is not a plain dense
    (contiguous or channels-last) CPU tensor of a supported dtype with memory (no
    ZeroTensor), or a ``minus`` tensor is laid out unlike its pair; then the caller uses
    torch ops.
    """
    def accumulator(x: torch.Tensor | None) -> bool:
        return x is not None and _usable(x) and x.dtype == torch.float64 and x.is_contiguous()

    if _off or not accumulator(out):
        return False
    if minus is not None and not (accumulator(out_minus) and len(minus) == len(tensors)):
        return False
    ptrs, sig = [], []
    for t in tensors:  # the only per-tensor work of a step: checks and the data pointer
        if not (_readable(t) and _dense(t)):
            return False
        ptrs.append(t.data_ptr())
        sig.append((_DTYPES[t.dtype], t.numel()))
    sub: list[int] = []
    for t, m in zip(tensors, minus or (), strict=False):
        if not (_readable(m) and m.dtype == t.dtype and m.shape == t.shape
                and m.stride() == t.stride()):
            return False
        sub.append(m.data_ptr())
    lib = _lib if _state == "ready" else _load()
    if lib is None or not tensors:
        return lib is not None
    key = (tuple(sig), tuple(index))
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 8:  # a model whose parameters keep changing: keep few
            _plans.clear()
        plan = _plans[key] = _SquaresPlan(key[0], key[1])
    k = len(tensors)
    rc = lib.rd_sumsq(
        plan.pointers(*ptrs),
        plan.pointers(*sub) if minus is not None else None,
        plan.sizes, plan.dtypes, plan.index, plan.first, k, out.data_ptr(),
        out_minus.data_ptr() if out_minus is not None and minus is not None else None,
        (plan.scratch2 if minus is not None else plan.scratch)(),
        torch.get_num_threads(),
    )
    return int(rc) == 0
