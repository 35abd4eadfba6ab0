"""Per-layer parameter statistics read in optimizer step hooks: gradient norms (summed over
the window's steps, on the device) and update-to-weight ratios, at one step of each window
(the one before its logging step).

Gradients are read when the optimizer is about to step: after the backward, after DDP's
all-reduce and after AMP unscaling (``GradScaler.step`` and Lightning's precision plugins
unscale first), and right under gradient accumulation.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from relu_doctor import _kernels
from relu_doctor._validate import optimizers as optimizers_arg
from relu_doctor.errors import ReluDoctorWarning, user_stacklevel
from relu_doctor.sampling import Stopwatch
from relu_doctor.sites import module_label

__all__ = ["UPDATE_SAMPLE", "OptimizerTap"]

#: The update ratio's transient copy holds at most this many elements of a parameter tensor
#: (256 KiB in float32): a larger tensor's update and weight norms are estimated from a
#: strided sample of at most this many of its elements (see :func:`_sample_plan`), so a
#: logging step on a large model needs no second copy of its weights.
UPDATE_SAMPLE = 1 << 16

try:  # sharded parameters (FSDP2 ``fully_shard``, Lightning's FSDP with DTensors)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def _local(t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(this process's part of t, weight)``. A sharded DTensor gives its local shard, and
    the weight that makes the library's log-time cross-process sum (divided by the number of
    processes, right for replicated DDP gradients) come out as the sum of the shards'
    squares: the number of shards (the product of its mesh's sharded dims)."""
    if DTensor is None or not isinstance(t, DTensor):
        return t, 1.0
    k = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            k *= t.device_mesh.size(dim)
    return t.to_local(), float(k)


def _squared_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Each tensor's squared 2-norm, as one float64 vector on ``device``: the norms in one
    foreach op, in float32 at least (a bfloat16 norm keeps three significant digits) and in
    float64 when any tensor is float64."""
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(tensors, 2, dtype=wide)
    if all(n.device == device for n in norms):  # one op, not one conversion per tensor
        return torch.stack(norms).to(torch.float64).square()
    return torch.stack([n.to(device, torch.float64) for n in norms]).square()


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # the sample's offset moves by this part of s a log


def _memory_dims(t: torch.Tensor) -> list[int]:
    """``t``'s dims from the outermost in memory to the innermost."""
    return sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D view in the order they lie in memory (contiguous,
    channels-last, any permutation of dims), or a flattened copy when its memory is not one
    dense block (a parameter that is a slice of a larger tensor)."""
    q = t.permute(_memory_dims(t))
    return q.view(-1) if q.is_contiguous() else t.reshape(-1)


def _sample_plan(t: torch.Tensor, cap: int, turn: int) -> tuple[int, int]:
    """``(offset, s)``: the update ratio reads every s-th element of ``t`` in memory order,
    from ``offset`` (:func:`_take`); ``(0, 1)``, the whole of ``t``, when it has at most
    ``cap`` elements.

    s is the smallest stride that keeps the sample within ``cap`` and shares no factor with
    the size of a slice of the outermost dim (a weight matrix's row, a conv filter), so none
    with any trailing block within it: the sample reads every position within a slice alike,
    not the same few columns of every row. The offset moves at every turn (a logging step)
    by the golden ratio of s: each element is read at 1 in s of the logs, so the estimate
    (the sample's sums times s) is right on average over logs, and an update the sample
    meets unevenly at one log (a few rows of an embedding) is misread at that log, not the
    same way at every log.
    """
    n = t.numel()
    if n <= cap:
        return 0, 1
    row = n // max(t.shape[_memory_dims(t)[0]], 1)
    s = -(-n // cap)
    while math.gcd(s, row) != 1:
        s += 1
    return min(int((turn * _GOLDEN % 1.0) * s), n - 1), s


def _take(t: torch.Tensor, offset: int, s: int) -> torch.Tensor:
    """The elements :func:`_sample_plan` chose: ``t`` itself when ``s`` is 1."""
    return t if s == 1 else _memory_order(t)[offset::s]


def _dense_grad(g: torch.Tensor) -> torch.Tensor:
    """A gradient whose sum of squares is ``g``'s: ``g`` itself, or a sparse gradient's
    values (``nn.Embedding(sparse=True)``), coalesced first where an index can repeat (on a
    GPU that waits for the device: the indices' count depends on the data)."""
    if g.layout == torch.strided:
        return g
    if g.layout == torch.sparse_coo:
        return g.coalesce().values()
    return g.values()  # compressed layouts hold each index once


class OptimizerTap:
    """Per-layer parameter statistics read in optimizer step hooks.

    A pre-step hook adds each layer's squared gradient norm to an on-device accumulator (the
    optimizer sees gradients after AMP unscaling: ``GradScaler.step`` and Lightning's
    precision plugins unscale first). At the step whose update the next log reads (the one
    before it: see ``is_update_step``) it also keeps a transient copy of the
    parameters, so a post-step hook can measure the update-to-weight ratio
    ``||W_after - W_before|| / ||W_after||``; the copy is freed in that hook. It holds at
    most ``update_sample`` elements of each tensor: a larger tensor's norms are estimated
    from a strided sample of its elements (see :func:`_sample_plan`), scaled to the whole
    tensor, so the copy's memory is bounded whatever the model's size. The norms of every
    optimizer stepped at that step are summed per layer; a layer none of them
    stepped has no ratio (NaN).

    A hook that fails (an optimizer or a gradient of a kind it cannot read) warns once and
    the tap steps aside: its hooks do nothing from then on, the per-layer statistics stop,
    training goes on.

    Args:
        model: the model whose parameters are grouped into layers (the module owning them).
        optimizers: the optimizers to hook.
        is_update_step: returns True when the next log reads the update ratio of the step
            now being taken (the Doctor's: the step before a logging step).
        collecting: returns True when the step now being taken collects statistics.
        pre_hook: read the gradients in the optimizer's step pre-hook. Pass False when the
            backward runs inside ``optimizer.step(closure)`` (Lightning, LBFGS): the pre-hook
            then fires before the closure, on stale gradients; call :meth:`before_step` after
            the closure instead.
        stopwatch: gets the host seconds of each gradient read (the overhead budget's
            measure); default: a new one.
        update_sample: the most elements of one parameter tensor the update ratio's copy
            holds (default :data:`UPDATE_SAMPLE`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        is_update_step: Callable[[], bool],
        collecting: Callable[[], bool],
        pre_hook: bool = True,
        stopwatch: Stopwatch | None = None,
        update_sample: int = UPDATE_SAMPLE,
    ) -> None:
        self.optimizers: list[torch.optim.Optimizer] = optimizers_arg("optimizer", list(optimizers))
        self.is_update_step = is_update_step
        self.collecting = collecting
        self.pre_hook = pre_hook
        self.stopwatch = stopwatch if stopwatch is not None else Stopwatch()
        self.update_sample = int(update_sample)
        self._model = model
        #: the layers (module labels) by index: the model's at construction, in its order,
        #: then those put in later (see :meth:`_remap`) in the order they were found
        self.layers: list[str] = []
        self._layer_of: dict[int, int] = {}
        self._remap()
        self.grad_sq: torch.Tensor | None = None
        self.steps = 0
        #: per optimizer (by id), its steps whose gradients were read in the open window: a
        #: layer's norm is its RMS over the steps of the optimizer holding it (under manual
        #: optimization a GAN's generator and discriminator step apart)
        self._opt_steps: dict[int, int] = {}
        self._carried_steps: dict[int, int] = {}  # per layer, from a checkpoint's window
        #: per layer, the steps :meth:`read_and_reset` closed the window with
        self.window_layer_steps: list[int] = []
        self._graded: set[int] = set()  # layers a gradient was read for in the open window
        self._trained: set[int] = set()  # ... while they required grad (see graded_layers)
        #: the layers a gradient was read for in the window :meth:`read_and_reset` closed
        #: (the others, frozen or in no optimizer, have no gradient norm: NaN, not 0)
        self.window_graded: frozenset[int] = frozenset()
        #: the update step's parameters by optimizer, each with its (sampled) copy and the
        #: sample's (offset, stride)
        self._before: dict[int, list[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}
        #: per optimizer, the squared update and weight norms per layer at its latest update
        #: step, and the layers it read
        self._updates: dict[int, tuple[torch.Tensor, torch.Tensor, frozenset[int]]] = {}
        self._turn = 0  # update steps whose parameters were copied (the sample's offset)
        self._failed = False
        self._said_strangers = False  # an optimizer holding none of the model's parameters
        self._handles: list[RemovableHandle] = []
        self._on_device: dict[tuple[Any, ...], torch.Tensor] = {}
        #: each optimizer's learning rates (one per param group) as its last step taken used
        #: them, by ``id(optimizer)`` (a scheduler stepped since has set the next step's)
        self.used_lrs: dict[int, list[Any]] = {}
        self._watched_cache: dict[int, tuple[Any, list[torch.Tensor], list[int]]] = {}

    def attach(self) -> OptimizerTap:
        strangers = [type(o).__name__ for o in self.optimizers if not self._params(o)]
        if strangers and not self._said_strangers:
            self._said_strangers = True
            warnings.warn(
                f"relu_doctor: optimizer {strangers[0]} holds none of the model's parameters "
                "(trained through torch.func.functional_call with copies of them?): its "
                "per-layer gradient norms and update ratios are not measured. The activation "
                "statistics are.",
                ReluDoctorWarning,
                stacklevel=user_stacklevel(),
            )
        for opt in self.optimizers:
            if self.pre_hook:
                self._handles.append(opt.register_step_pre_hook(self._pre))
            self._handles.append(opt.register_step_post_hook(self._post))
        return self

    def before_step(self, opt: torch.optim.Optimizer) -> None:
        """Read ``opt``'s gradients now: after the backward (and AMP unscaling), before the
        parameters change. For use with ``pre_hook=False``; ignored while detached."""
        if self._handles and any(opt is o for o in self.optimizers):
            self._pre(opt, (), {})

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._before = {}

    def _params(self, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        return self._watched(opt)[0]

    def _remap(self) -> None:
        """Map the model's parameters as they are now to their layers: a layer put in since
        (a block appended, a head added) gets the next index, a parameter no longer in the
        model (the layer a wider one replaced, left in the optimizer) none. A growing model
        had its new layers never measured, and a replaced one measured on the old copy."""
        owner: dict[int, str] = {}
        for path, mod in self._model.named_modules():
            for p in mod.parameters(recurse=False):
                owner.setdefault(id(p), module_label(path))
        index = {name: i for i, name in enumerate(self.layers)}
        for name in owner.values():
            if name not in index:
                index[name] = len(self.layers)
                self.layers.append(name)
        self._layer_of = {pid: index[name] for pid, name in owner.items()}
        self._watched_cache = {}  # (each optimizer's remade at its next use)

    def _fit(self, t: torch.Tensor) -> torch.Tensor:
        """A per-layer vector made before layers were added, padded with zeros to them."""
        n = len(self.layers) - t.numel()
        return t if n <= 0 else torch.cat([t, t.new_zeros(n)])

    def _watched(self, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[int]]:
        """``opt``'s parameters of this model and their layers, remade only when its param
        groups change (a group added, a params list replaced or resized), with the model's
        layers mapped again then (:meth:`_remap`)."""
        key = [(id(g["params"]), len(g["params"])) for g in opt.param_groups]
        hit = self._watched_cache.get(id(opt))
        if hit is None or hit[0] != key:
            if hit is not None:  # (at the first use, mapped at construction)
                self._remap()
            params = [p for g in opt.param_groups for p in g["params"] if id(p) in self._layer_of]
            hit = self._watched_cache[id(opt)] = (key, params, [self._layer_of[id(p)] for p in params])
        return hit[1], hit[2]

    def _index(self, layers: Sequence[int], device: torch.device) -> torch.Tensor:
        """``layers`` (each parameter's layer, as :meth:`_watched` gives them) as an index
        tensor on ``device``, made once per layout."""
        return self._tensor(tuple(layers), torch.long, device)

    def _tensor(self, values: tuple[Any, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``values`` as a tensor on ``device``, made once (no host-to-device copy per step)."""
        key = (values, dtype)
        t = self._on_device.get(key)
        if t is None or t.device != device:
            if len(self._on_device) >= 64:  # layouts that keep changing: keep few
                self._on_device.clear()
            t = self._on_device[key] = torch.tensor(values, dtype=dtype, device=device)
        return t

    def _pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._failed:
            return
        t0 = time.perf_counter()
        try:
            if self.is_update_step():  # (the update ratio's step, collecting or not)
                self._copy_params(opt)
        except Exception as e:  # never raise into the user's optimizer step
            self._fail(e)
            return
        finally:
            self.stopwatch.add_every_step(t0)
        if not self.collecting():
            return
        t0 = time.perf_counter()
        try:
            self._read_grads(opt)
        except Exception as e:
            self._fail(e)
        finally:
            self.stopwatch.add(t0)  # the budget's measure of what collecting costs

    def _fail(self, exc: BaseException) -> None:
        """Step aside after a hook failed: warn once, drop the window, and leave the hooks
        doing nothing from now on (removing them here would change the optimizer's hook
        dict while its step iterates over it)."""
        self._before, self.grad_sq, self.steps, self._updates = {}, None, 0, {}
        self._graded, self._opt_steps, self._carried_steps = set(), {}, {}
        self._trained = set()
        if self._failed:
            return
        self._failed = True
        warnings.warn(
            "relu_doctor: the optimizer hooks that read per-layer gradient norms and update "
            f"ratios failed ({type(exc).__name__}: {exc}); they step aside and those "
            "statistics stop. Training goes on; the activation statistics are unaffected.",
            ReluDoctorWarning,
            stacklevel=3,
        )

    def _copy_params(self, opt: torch.optim.Optimizer) -> None:
        """Copy ``opt``'s parameters (this process's shards; a sample of those over
        ``update_sample`` elements) before its step, for :meth:`_read_update`."""
        self._turn += 1
        before = []
        for p in self._params(opt):
            t = _local(p.detach())[0]
            offset, s = _sample_plan(t, self.update_sample, self._turn)
            before.append((p, _take(t, offset, s).clone(), offset, s))
        self._before[id(opt)] = before

    def _read_grads(self, opt: torch.optim.Optimizer) -> None:
        params, layers = self._watched(opt)
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            keep = [i for i, g in enumerate(grads) if g is not None]
            params, layers = [params[i] for i in keep], [layers[i] for i in keep]
            grads = [grads[i] for i in keep]
        if any(g.layout != torch.strided for g in grads):  # type: ignore[union-attr]
            grads = [_dense_grad(g) for g in grads]  # type: ignore[arg-type]
        if not params:
            return
        if len(self._graded) < len(self.layers):
            self._graded.update(layers)
        if len(self._trained) < len(self.layers):  # (not a stale zero .grad of a frozen one)
            self._trained.update(i for p, i in zip(params, layers, strict=True)
                                 if p.requires_grad)
        device = grads[0].device  # type: ignore[union-attr]
        if self.grad_sq is None:
            self.grad_sq = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.grad_sq = self._fit(self.grad_sq)
        self._opt_steps[id(opt)] = self._opt_steps.get(id(opt), 0) + 1
        if _kernels.sum_squares_into(self.grad_sq, grads, layers):  # type: ignore[arg-type]
            # CPU, plain tensors (never a sharded DTensor): one pass over each gradient
            self.steps += 1
            return
        local = [_local(g) for g in grads]  # type: ignore[arg-type]
        sq = _squared_norms([g for g, _ in local], device)
        if any(k != 1.0 for _, k in local):  # sharded: see _local
            sq = sq * torch.tensor([k for _, k in local], dtype=torch.float64, device=device)
        self.grad_sq.index_add_(0, self._index(layers, device), sq)
        self.steps += 1

    def _post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        try:
            # The rates this step used, at every step (a few list items), also after a
            # failure: any step can be the last logged one (the end of training, a fit that
            # fails), after its scheduler moved.
            self.used_lrs[id(opt)] = [g["lr"] for g in opt.param_groups]
            if not self._failed:
                self._read_update(opt)
        except Exception as e:  # never raise into the user's optimizer step
            self._fail(e)
        finally:
            self.stopwatch.add_every_step(t0)  # every step's work, the budget counts it

    def _read_update(self, opt: torch.optim.Optimizer) -> None:
        before = self._before.pop(id(opt), None)
        if not before:
            return
        # Sharded parameters give this process's shards only (the ratio is not summed
        # across processes, so under FSDP it is the ratio of the local shards).
        now = [_take(_local(p.detach())[0], o, s) for p, _, o, s in before]
        old = [x for _, x, _, _ in before]
        if any(a.shape != b.shape for a, b in zip(now, old, strict=True)):
            return  # a parameter resized within the step: no ratio for this log
        # a sample: made dense (it is small), so that the C pass reads it
        now = [x if s == 1 else x.contiguous() for x, (_, _, _, s) in zip(now, before, strict=True)]
        device = now[0].device
        k = len(now)
        d = torch.zeros(k, dtype=torch.float64, device=device)
        w = torch.zeros_like(d)
        # CPU, plain tensors: one pass over both copies, nothing allocated.
        if not _kernels.sum_squares_into(w, now, list(range(k)), minus=old, out_minus=d):
            torch._foreach_sub_(old, now)  # in the transient copy: no new memory
            d, w = _squared_norms(old, device), _squared_norms(now, device)
        strides = tuple(float(s) for _, _, _, s in before)
        if any(s != 1.0 for s in strides):  # each element was read with chance 1 in s
            scale = self._tensor(strides, torch.float64, device)
            d, w = d * scale, w * scale
        layers = [self._layer_of[id(p)] for p, _, _, _ in before]
        idx = self._index(layers, device)
        d = torch.zeros(len(self.layers), dtype=torch.float64, device=device).index_add_(0, idx, d)
        w = torch.zeros_like(d).index_add_(0, idx, w)
        self._updates[id(opt)] = (d, w, frozenset(layers))

    @property
    def update_ratio(self) -> torch.Tensor | None:
        """``||W_after - W_before|| / ||W_after||`` per layer at the latest update step, the
        norms summed over the optimizers stepped there; NaN for a layer none of them
        stepped; None before any."""
        if not self._updates:
            return None
        parts = list(self._updates.values())
        d, w = self._fit(parts[0][0]), self._fit(parts[0][1])
        read = set(parts[0][2])
        for d2, w2, r2 in parts[1:]:
            d, w = d + self._fit(d2), w + self._fit(w2)
            read |= r2
        ratio = d.sqrt() / w.sqrt().clamp(min=1e-30)
        unread = tuple(i for i in range(len(self.layers)) if i not in read)
        if unread:
            ratio = ratio.index_fill(0, self._index(unread, ratio.device), float("nan"))
        return ratio

    def forget_update(self) -> None:
        """Drop the update ratio measured (a step said to be training's last, after which
        training went on): the next log's is NaN unless an update step measures one."""
        self._updates = {}

    def layer_steps(self) -> list[int]:
        """Per layer, the optimizer steps summed into its window: those of the optimizer
        holding it (the most stepped of those holding its parameters, for a layer split
        across optimizers), with what a checkpoint carried."""
        out = [0] * len(self.layers)
        for opt in self.optimizers:
            n = self._opt_steps.get(id(opt), 0)
            if n:
                for i in set(self._watched(opt)[1]):
                    out[i] = max(out[i], n)
        for i, n in self._carried_steps.items():
            out[i] += n
        return out

    def state_dict(self) -> dict[str, Any]:
        """The open window (per-layer squared gradient norms summed so far, and the steps
        summed), for a checkpoint: a resume then equals an uninterrupted run."""
        return {
            "layers": list(self.layers),
            "grad_sq": None if self.grad_sq is None else self.grad_sq.detach().cpu().clone(),
            "steps": self.steps,
            "layer_steps": self.layer_steps(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, layer by layer (by name): a layer the checkpoint does
        not know (a PReLU a remedy added and restored before the weights load) starts its
        window at zero; a checkpointed layer this model lacks is dropped with a warning."""
        layers = [str(x) for x in state.get("layers", [])]
        grad_sq = state.get("grad_sq")
        params = [p for opt in self.optimizers for p in self._params(opt)]
        device = params[0].device if params else torch.device("cpu")
        self.steps = int(state.get("steps", 0))
        self._opt_steps = {}
        counts = state.get("layer_steps") or [self.steps] * len(layers)  # (older: one count)
        self._carried_steps = {}
        if grad_sq is None:
            self.grad_sq = None
            return
        old = grad_sq.to(device, torch.float64)
        index = {name: i for i, name in enumerate(self.layers)}
        missing = [name for name in layers if name not in index]
        if missing:
            warnings.warn(
                f"relu_doctor: the checkpoint's gradient-norm window has layers this model "
                f"lacks ({missing[:5]}); their partial window is dropped.",
                ReluDoctorWarning,
                stacklevel=2,
            )
        new = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        for i, name in enumerate(layers):
            if name in index:
                new[index[name]] = old[i]
                self._carried_steps[index[name]] = int(counts[i])
                if float(old[i]) > 0:
                    self._graded.add(index[name])
                    self._trained.add(index[name])
        self.grad_sq = new

    @property
    def unread(self) -> bool:
        """Whether no update ratio was read since the last log."""
        return not self._updates

    def names(self) -> str:
        """The optimizers' class names, for a message."""
        return ", ".join(type(o).__name__ for o in self.optimizers)

    @property
    def most_steps(self) -> int:
        """The collecting steps of the open window at which the most stepped of the
        optimizers stepped, with those a checkpoint carried (a window resumed midway)."""
        return (max(self._opt_steps.values(), default=0)
                + max(self._carried_steps.values(), default=0))

    def read(self) -> tuple[torch.Tensor | None, int, torch.Tensor | None]:
        """``(grad_sq per layer, steps, update_ratio per layer)`` of the window (its steps
        per layer in :attr:`window_layer_steps`, its layers read in :attr:`window_graded`);
        it goes on until :meth:`reset` (a log stopped midway reads it again)."""
        self.window_layer_steps = self.layer_steps()
        self.window_graded = frozenset(self._graded)
        if self.grad_sq is not None:
            self.grad_sq = self._fit(self.grad_sq)
        return (self.grad_sq, self.steps, self.update_ratio)

    def graded_layers(self, grad_sq: torch.Tensor | None = None) -> set[str]:
        """The layers (module labels) that trained in the open window: a gradient was read
        for them at a step where they required grad (a frozen layer's stale ``.grad``,
        zeroed with ``set_to_none=False``, is not one), or their squared gradient norm in
        ``grad_sq`` (the window's, read back) is above 0 (``requires_grad`` turned off
        before its step)."""
        trained = set(self._trained)
        if grad_sq is not None:
            trained.update(torch.nonzero(grad_sq > 0).flatten().tolist())
        return {self.layers[i] for i in trained}

    def reset(self) -> None:
        """Start a new window (after :meth:`read`; the tensors it gave are kept)."""
        self._opt_steps, self._carried_steps = {}, {}
        self.grad_sq = None if self.grad_sq is None else torch.zeros_like(self.grad_sq)
        self._graded, self._trained = set(), set()
        self.steps = 0
        self._updates = {}

    def read_and_reset(self) -> tuple[torch.Tensor | None, int, torch.Tensor | None]:
        """:meth:`read`, then :meth:`reset`."""
        out = self.read()
        self.reset()
        return out
