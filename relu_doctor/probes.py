"""Attaching and detaching hooks: sites, call counting, inplace-safe gradient taps.

A :class:`Probe` finds the ReLU-family modules of a model, registers a forward hook on each,
and records one :class:`Site` per call of a module within one forward pass (a module reused k
times gives sites ``path#0`` ... ``path#k-1``; their statistics are never mixed).

Gradient taps are registered inside the forward hook on the output's autograd node
(``out.grad_fn.register_hook``). The node hook receives both dL/d(output) and dL/d(input),
and unlike ``register_full_backward_hook`` it works with ``inplace=True`` activations
(pytorch#61519): nothing is wrapped and no tensor is kept.

Forward-pass boundaries are found by counting nesting depth with pre/post hooks on the
activation modules and their ancestors: the call that takes the depth from 0 to 1 starts a
new pass and resets the per-module call counters. This works whatever module the user's
code calls (a LightningModule's ``training_step`` calling ``self.net(x)``, a DDP wrapper).
Calls made by the autograd engine (activation-checkpoint recomputation) are skipped, so
recomputed forwards are never counted twice.

Streams: whether a pass is recorded is decided once, when it starts (:meth:`Probe.begin_pass`,
called by the probe's own hooks and by functional capture): a probe of the ``"train"`` stream
(the default) takes the passes that run with gradients enabled and begin at a module in
training mode (the model, or a part of it called on its own: its own mode decides), one of
the ``"eval"`` stream the others (``model.eval()``, ``torch.no_grad()``,
``torch.inference_mode()``), one of ``"all"`` every pass. ``paused`` leaves out every pass.
The decision reads two Python flags: no host synchronisation.

A module put into the watched model while it is watched (a remedy's swap, a ``setattr``) is
seen through torch's global module-registration hook: the probe is marked dirty and re-hooks
the model at the next pass start, so the new module is watched without a ``refresh()``.

Under ``torch.compile`` the hooks are traced into the graph (no graph break, so
``fullgraph=True`` works): a site is found or made in plain Python at trace time
(``_compiled_site``) and its forward statistics are computed by the compiled graph. Compiled
passes get no gradient tap (see :meth:`Probe.record`); the user is warned once.

On a step that collects nothing the hooks are parked (:mod:`relu_doctor._hooks`): taken out
of the modules' hook dicts, so every call takes ``nn.Module``'s hook-free path, and put back
in their places before the next collecting step. Dynamo puts them back before it traces
(``_hooks.compile_watch``), and a model ``torch.compile`` traced with them keeps them: its
graph holds them, and there they return at their first line.

Hooks never write: they read ``detach()``-ed outputs, keep no tensor, and return None.
They never raise into the user's forward or backward either: a failure in a hook (an
unexpected shape or dtype, a bug of ours) warns once (:class:`ReluDoctorWarning`) naming the
site and the cause, and that site is no longer monitored; a site whose unit count changes
(a module reused on another width) is warned about once and those calls are left out. Meta,
fake and traced tensors (Keras' symbolic build, ``FakeTensorMode``, ``torch.export``) are
not recorded, so a site's accumulators are made on the device of its first real tensor.

Units: a site's units are the features of the layer that made its input, found by
:class:`~relu_doctor.provenance.ProvenanceTracker` in the pass where the site first runs. The
tracker runs only in passes where some site is unresolved: the first recorded pass, and the
next ones while a watched activation module has not run yet (LayerDrop skips whole layers;
8 tracked passes at most), so that its first call is counted. A site first seen in an
untracked pass (a functional call, or a module later than that) is counted by the shape
rule of :func:`~relu_doctor.stats.resolve_unit_dim` until its next run, in a tracked pass,
finds its producer (its counts start anew where that says other units). Where no producer
is found the shape rule decides.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils._pytree import tree_flatten
from torch.utils.hooks import RemovableHandle

from relu_doctor._hooks import HookOwner, Hooks, HookSet, compile_watch
from relu_doctor._kernels import LARGEST_SCALE, Prepared
from relu_doctor._validate import glob_patterns, matches
from relu_doctor._validate import unit_dims as check_unit_dims
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, user_stacklevel
from relu_doctor.families import Family, family_of, held_instead
from relu_doctor.provenance import ProvenanceTracker
from relu_doctor.sampling import Stopwatch
from relu_doctor.site_registry import SiteRegistry
from relu_doctor.sites import Site, SiteKey, module_label
from relu_doctor.stats import SiteStats, mask_for

__all__ = ["STREAMS", "Probe", "Site", "in_backward"]

#: The forward passes a probe can record (see :meth:`Probe.takes_pass`).
STREAMS = ("train", "eval", "all")
#: While a pass of relu_doctor's own runs (see private_passes): the probe that records it
#: (None: none does). No other probe records it.
_PRIVATE: list[Probe | None] = []


@contextlib.contextmanager
def private_passes(owner: Probe | None = None) -> Iterator[None]:
    """Passes run inside the block are relu_doctor's own (:func:`~relu_doctor.check_init`,
    :func:`~relu_doctor.scan`, the dataflow pass that finds a site's producer and
    consumers), not the user's training or evaluation: no probe records them but ``owner``
    (a ``watch`` or a Lightning monitor on the same model leaves them out of both streams).
    Checked once per pass start, not per hook call."""
    _PRIVATE.append(owner)
    try:
        yield
    finally:
        _PRIVATE.pop()


_is_compiling = torch.compiler.is_compiling
_graph_task_id = torch._C._current_graph_task_id
_tracing_state = torch._C._get_tracing_state
# A tensor of torch.func's transforms (vmap, grad, jacrev...): a batch or a level of
# per-sample values with no storage of its own, not the model's training pass.
_transformed = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor",
                       lambda t: False)
# Whether such a transform runs now: a pass under it (jacrev of a functional_call, a
# vmap'd per-sample gradient) records no site, so it is not counted among the window's
# passes either (a site then read "ran in 4 of the window's 8 passes": a trial)
_transforming = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


_current_node = torch._C._current_autograd_node
_graph_task = torch._C._current_graph_task_id


class RecomputedCalls:
    """Call indices of the calls activation checkpointing recomputes during backward, from 0
    in each recomputed segment. The backward running and its autograd node tell the
    segments apart (a reentrant segment's own node; the node whose saved tensors a
    non-reentrant segment is recomputed for; a second backward through the same graph, as
    ``retain_graph=True`` or a gradient penalty makes, recomputes it again), so a segment
    that is a function calling modules one after another is one segment, whose module
    called twice is ``#0`` then ``#1``.

    A call recomputed in two reentrant segments of one backward (a module each of two
    checkpointed blocks calls) cannot be told apart from its forward calls: each segment
    numbers it ``#0``. :meth:`next_index` says so through :attr:`spread`.

    The nodes are held until :meth:`clear` (the step's end): one per segment."""

    __slots__ = ("_calls", "_node", "_segment_of", "spread")

    def __init__(self) -> None:
        self._calls: dict[Any, int] = {}
        self._node: tuple[int, Any] = (-1, None)
        self._segment_of: dict[Any, Any] = {}  # key -> the reentrant segment that ran it
        #: the key of the last call, where another reentrant segment of this backward ran it
        self.spread: Any = None

    def next_index(self, key: Any) -> int:
        node = (_graph_task(), _current_node())
        if node[0] != self._node[0] or node[1] is not self._node[1]:
            if node[0] != self._node[0]:
                self._segment_of.clear()
            self._node = node
            self._calls.clear()
        self.spread = None
        reentrant = type(node[1]).__name__ == "CheckpointFunctionBackward"
        if reentrant and self._segment_of.setdefault(key, node[1]) is not node[1]:
            self.spread = key
        idx = self._calls.get(key, 0)
        self._calls[key] = idx + 1
        return idx

    def clear(self) -> None:
        self._calls.clear()
        self._segment_of.clear()
        self._node = (-1, None)


def in_backward() -> bool:
    """True while the autograd engine is running a backward pass on this thread.

    False while ``torch.compile`` traces a forward (the engine never runs inside a trace).
    """
    return not _is_compiling() and _graph_task_id() != -1


# How a site name maps to an include/exclude/unit_dims pattern, for their messages.
_PATTERNS = (
    "Patterns are fnmatch globs over module paths: a site name without its '#k' or ':op#k' "
    "suffix ('layer1.0.relu' for 'layer1.0.relu#1', 'features.dense1' for the functional "
    "site 'features.dense1:relu#0')"
)


class _ProbeHooks(Hooks):
    """A probe's module hooks (see :class:`~relu_doctor._hooks.Hooks`)."""

    __slots__ = ()
    owner: Probe

    def enter(self, module: nn.Module, args: Any) -> None:
        self.owner._enter(module, args)

    def activation(self, module: nn.Module, args: Any, output: Any) -> None:
        self.owner._activation(module, args, output)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self.owner._exit(module, args, output)

    def mask(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.owner._read_mask(module, args, kwargs)

    def compiled_enter(self, module: nn.Module, args: Any) -> None:
        self.owner._compiled_enter()

    def compiled_exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self.owner._compiled_exit()


def uncompiled(model: Any) -> Any:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles, else ``model``:
    hooks on that module are traced into the compiled graph as when it is compiled after
    ``watch``, and its sites are named by its own paths (not ``_orig_mod.*``)."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig
    return model


def unwrapped(model: Any) -> Any:
    """The module that ``watch`` and the remedies watch and treat for ``model``: the module a
    ``torch.compile`` wrapper compiles (see :func:`uncompiled`), the one Lightning Fabric's
    ``fabric.setup`` wrapped (``_FabricModule``: its paths read ``_forward_module.*`` on one
    device and ``_forward_module.module.*`` under DDP, so one model's runs did not compare,
    and a plan given the model itself found none of the Doctor's sites: a trial), through
    wrappers of wrappers; else ``model``."""
    for _ in range(4):
        inner = uncompiled(model)
        if inner is model and type(model).__name__ == "_FabricModule":
            inner = getattr(model, "_original_module", model)
        if inner is model or not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def wrapper_scaler(model: Any) -> Any:
    """The loss scaler of the wrapper ``model`` is, where it has one in use: Lightning Fabric's
    ``_FabricModule`` under ``16-mixed`` (its precision plugin's ``GradScaler``; not found,
    a Fabric trial's gradient statistics read 65536 times the gradient's); else None."""
    if type(model).__name__ != "_FabricModule":
        return None
    scaler: Any = getattr(getattr(getattr(model, "_strategy", None), "precision", None),
                          "scaler", None)
    return scaler if callable(getattr(scaler, "is_enabled", None)) and scaler.is_enabled() else None


def is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return uncompiled(module) is not module


def _recurrent_relu(model: nn.Module) -> str:
    """Words on the model's ``nn.RNN``/``nn.RNNCell`` with ``nonlinearity='relu'``, whose
    ReLU no hook sees ("" where it has none)."""
    paths = [path for path, m in model.named_modules()
             if isinstance(m, nn.RNN | nn.RNNCell) and m.nonlinearity == "relu"]
    if not paths:
        return ""
    return (f"{module_label(paths[0])!r}"
            f"{f' (and {len(paths) - 1} more)' if len(paths) > 1 else ''} is an "
            f"{type(model.get_submodule(paths[0])).__name__} with nonlinearity='relu': its "
            "ReLU runs inside torch's recurrent kernel, where no hook sees it")


def transformed_text(calls: int) -> str:
    """A window's activation calls under torch.func transforms, in a sentence ("" for none):
    a vmap ensemble read as a model left in eval mode (a trial)."""
    return (f"Its activations ran under torch.func transforms (vmap, grad: {calls} calls in "
            "this window), which are not watched: only passes of the model called directly "
            "are (a vmap ensemble's stacked members are no module that passes run through: "
            "watching one of the modules they were stacked from watches nothing)." if calls
            else "")


def _unwatched(model: nn.Module) -> list[str]:
    """What of ``model`` no hook can watch, in words (kept in the run's meta.json: the report
    says it too)."""
    out = []
    if scripted := _scripted_roots(model):
        out.append(f"{module_label(scripted[0])!r}"
                   f"{f' (and {len(scripted) - 1} more)' if len(scripted) > 1 else ''} is a "
                   "TorchScript module inside the model: its forward runs outside Python, so "
                   "its activations are not watched. The rest of the model is.")
    if recurrent := _recurrent_relu(model):
        out.append(f"{recurrent}, so it is not watched. The rest of the model is.")
    return out


#: Models whose unwatched parts were said (once per model, whatever watches it again).
_SAID_UNWATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


#: the path parts that wrapping a module after ``watch`` puts above it: activation
#: checkpointing's wrapper, FSDP's, ``torch.compile``'s, DDP's and DataParallel's
_WRAPPER_PARTS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod",
                            "module"})


def _unwrapped_path(path: str) -> tuple[str, ...]:
    """``path`` without the parts a wrapper put in: a module wrapped where it is has not
    moved (``apply_activation_checkpointing`` after ``watch`` read as a renumbering)."""
    return tuple(part for part in path.split(".") if part not in _WRAPPER_PARTS)


class Probe(SiteRegistry, HookOwner):
    """Hooks on a model's ReLU-family activations, recording into per-site accumulators.

    Most users reach this through :func:`relu_doctor.watch`; use it directly to build your
    own loop around the raw accumulators.

    Args:
        model: the model to watch.
        include: glob patterns (fnmatch) of module paths to watch; None watches all.
        exclude: glob patterns of module paths to leave out.
        unit_dims: ``{pattern: dim}`` overriding the unit dim for matching sites.
        gradients: also collect gradient statistics through autograd node hooks.
        grad_scale: returns the current AMP loss scale (a tensor or float) or None; the
            gradient statistics are divided by it, so they are those of the true gradients.
        require_modules: raise in :meth:`attach` when the model has no activation module
            to hook. False when functional capture may find the only sites.
        stream: which forward passes are recorded: ``"train"`` (gradients enabled, begun at
            a module in training mode), ``"eval"`` (the others) or ``"all"``.
        stopwatch: gets the host seconds of every collecting hook (the overhead budget's
            measure); default: a new one.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> probe = Probe(net).attach()
        >>> _ = net(torch.randn(2, 3))
        >>> [s.name for s in probe.sites()]
        ['1']
        >>> probe.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        unit_dims: Mapping[str, int] | None = None,
        gradients: bool = True,
        grad_scale: Callable[[], torch.Tensor | float | None] | None = None,
        require_modules: bool = True,
        stream: str = "train",
        stopwatch: Stopwatch | None = None,
        padding_mask: str | Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None,
    ) -> None:
        if stream not in STREAMS:
            raise ReluDoctorError(f"stream: expected one of {list(STREAMS)}, got {stream!r}.")
        if not isinstance(model, nn.Module):
            raise ReluDoctorError(
                f"model: expected a torch.nn.Module, got {type(model).__name__}."
            )
        if isinstance(model, torch.jit.ScriptModule):
            raise ReluDoctorError(
                f"model: {type(model).__name__} is a TorchScript module (torch.jit.script or "
                "trace), whose forward runs outside Python, where no hook can watch it. Watch "
                "the eager model you scripted (relu_doctor.watch(model)), and script it for "
                "deployment after training."
            )
        self.model = model
        self.include = glob_patterns("include", include)
        self.exclude = glob_patterns("exclude", exclude)
        self.unit_dims = check_unit_dims("unit_dims", unit_dims)
        # Why an integration's unit_dims pattern chose its dim, for the site's unit_rule
        # (the Keras callback: each layer's data format); a user's override has none.
        self.unit_rules: dict[str, str] = {}
        # and the norm of each unit on its own before the activation, for the site's norm
        # (the Keras callback's BatchNormalization, which no pass of torch's is read for)
        self.unit_norms: dict[str, str] = {}
        # and the norm of its units together (a Keras LayerNormalization: the site's mixed)
        self.unit_mixed: dict[str, str] = {}
        self.gradients = gradients
        self.grad_scale = grad_scale
        self.require_modules = require_modules
        self.stream = stream
        #: where a pass's padding mask is read: the name of a keyword argument of the
        #: outermost module called, or a function of its (args, kwargs); None: no mask
        self.padding_mask = padding_mask
        self._mask: torch.Tensor | None = None  # the mask of the latest pass (True: real)
        # the masks of the passes since the last backward ended (a reentrant checkpoint's
        # recomputation, in backward, reads its own pass's: see tap_recomputed), the latest
        # mask on other devices, and the window's passes that had one
        self._pass_masks: list[torch.Tensor] = []
        self._mask_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masked_passes = 0
        self._clear_queued = False
        self._warned_mask: set[str] = set()  # what was said of the mask (once each)
        #: sites that ran with a padding mask that does not fit them, by name: their output
        #: shape and the mask's (counted unmasked); ``_masked``: sites a mask fitted; how
        #: many of the first were said (see say_unmasked)
        self.unmasked: dict[SiteKey, tuple[Site, tuple[int, ...], tuple[int, ...]]] = {}
        self._masked: set[SiteKey] = set()
        self._said_unmasked = 0
        #: what the collecting hooks' host seconds are added to (the Doctor's budget)
        self.stopwatch = stopwatch if stopwatch is not None else Stopwatch()
        self._collecting = True  # see the ``collecting`` property
        #: leave every pass out (``Doctor.paused()``)
        self.paused = False
        #: whether that pause began in a backward (a hook of yours that a reentrant
        #: checkpoint's recomputation runs again): then its recomputed calls are left out;
        #: a backward run inside a pause keeps the gradients of what its forward recorded
        self.paused_in_backward = False
        #: forward passes recorded so far (counted at their start; Python int, no sync)
        self.passes = 0
        # the passes when the open window began, and whether each site's count of the
        # window's passes that ran it holds since (not after a checkpoint resumed mid-window)
        self._window_from = 0
        #: the open window's recorded passes by the module each began at (its path): a site
        #: is judged against the passes of the modules holding it (a GAN's generator runs
        #: in its own passes, not in the discriminator's)
        self._entries: dict[str, int] = {}
        #: the window's (feeding, fed) parts: a pass whose input was made from another
        #: part's output (see parts; outputs are tagged on their autograd nodes), and
        #: whether any part's output was tagged in it
        self._part_edges: dict[tuple[str, str], None] = {}
        self._parts_tagged = False
        self._part_tag = f"relu_doctor_part:{id(self)}"  # (this probe's: two watches apart)
        self._pass_at: str | None = None  # where the latest recorded pass began
        #: every module a recorded pass began at since attach, by path (see pass_starts)
        self._starts: set[str] = set()
        self._path_of: dict[nn.Module, str] = {}  # the boundary modules' paths (hooked now)
        self.passes_known = True
        self._pass_open = False  # a pass has begun and not ended
        self._pass_in_graph = False  # the pass began while torch.compile traced
        self._pass_on = False  # ... and it is recorded
        self._pass_graded = False  # ... with gradients on (see Site.window_ungraded)
        self._dirty = False  # a module was registered into the model since the last hooking
        self._members: set[nn.Module] = set()
        #: what _compiled_enter paused, for each part compiled apart running now, and
        #: who else pauses there (on_compiled_part)
        self._set_aside: list[list[tuple[Callable[[], object], Callable[[Any], object],
                                         object]]] = []
        self._pausers: list[tuple[Callable[[], object], Callable[[Any], object]]] = []
        #: every module's path at the last hooking (a module found at another since moved:
        #: see _restart_moved), and the containers whose module dicts say when one moved
        self._paths: dict[nn.Module, str] = {}
        self._containers: list[nn.Module] = []
        self._layout: list[tuple[int, int]] = []
        self._registration: RemovableHandle | None = None
        self._compiled_slots = _CompiledSlots()
        self._warned_compiled = False
        self._compiled = False  # torch.compile traced the hooks: they are never parked
        #: every module hook of this probe and of its functional capture, parked together
        self.hooks = HookSet()
        self._on = _ProbeHooks(self)  # the callables in the model's hook dicts
        self._handles: list[RemovableHandle] = []  # the probe's own, of those
        self._sites: dict[SiteKey, Site] = {}
        self._names: dict[str, Site] = {}
        self._targets: dict[nn.Module, tuple[str, Family]] = {}
        self._calls: dict[Any, int] = {}
        # Calls per pass of each activation module called more than once in a pass (a shared
        # one): its sites are call indices, so a count that varies between passes (LayerDrop
        # skipping a block) puts different layers under one site: said once.
        self._shared: dict[Any, int] = {}
        self._warned_shared = False
        self._depth = 0
        self._raised_before: BaseException | None = None  # (see _exit)
        self._recomputed = RecomputedCalls()  # calls recomputed in backward (checkpoints)
        self._warned_spread = False
        self._warned_higher_order = False
        self._warned_part_eval = False
        self._bw_depth = 0
        self._attached = False
        #: what of the model no hook can watch, in words (said once per model at attach)
        self.unwatched: list[str] = []
        #: activation calls left out because torch.func transformed them (vmap, grad), in
        #: the logging window (the Doctor starts it again at each log; see transformed_text)
        self.transformed_calls = 0
        self._listeners: list[Callable[[], None]] = []
        self._detach_listeners: list[Callable[[], object]] = []  # see on_detach
        self._renewal_listeners: list[Callable[[str], object]] = []
        #: sites found not replaced at a width change, by the generation it was asked at
        self._kept: dict[SiteKey, int] = {}
        self._pending: dict[str, Any] = {}
        #: bumped at every attach: a module swapped in by a remedy is hooked from then on
        self.generation = 0
        self._provenance = ProvenanceTracker(model)
        self._want_provenance = True  # track the next recorded pass (some site unresolved)
        self._tracked_passes = 0
        self._unresolved: dict[SiteKey, int] = {}  # first seen untracked -> tracked passes since
        self._shape_rule: set[SiteKey] = set()  # given up on finding the producer
        self._provisional: set[SiteKey] = set()  # made by the shape rule until a tracked run
        self._keys: dict[tuple[str, int, str | None], SiteKey] = {}  # see record()
        self._not_units: set[SiteKey] = set()  # 1-D calls no layer made: no site (see _site)
        self._failed: set[SiteKey] = set()  # a hook failed: no longer monitored
        self._grad_hooks: dict[Site, Callable[..., None]] = {}  # made once per site
        # (path, call index, op) -> the family, prepared kernel call and site of its latest
        # call: the calls laid out as that one take _record_prepared
        self._prepared: dict[
            tuple[str, int, str | None], tuple[Family, Prepared, Site, SiteStats]] = {}
        self._warned_units: set[SiteKey] = set()
        self._warned_experts = False  # (a site of pooled experts: said once)
        self._warned_expert_calls = False  # (experts run one by one: said once)

    # ------------------------------------------------------------------ selection
    def selected(self, path: str) -> bool:
        """Whether the module at ``path`` is watched (``include``/``exclude`` patterns)."""
        return matches(module_label(path), self.include, self.exclude)

    def targets(self) -> dict[nn.Module, tuple[str, Family]]:
        """The activation modules this probe watches: ``{module: (path, family)}``."""
        found: dict[nn.Module, tuple[str, Family]] = {}
        for path, mod in self.model.named_modules(remove_duplicate=True):
            fam = family_of(mod)
            if fam is not None and self.selected(path):
                found[mod] = (path, fam)
        return found

    def _check_patterns(self) -> None:
        paths = [module_label(p) for p, _ in self.model.named_modules()]
        for p in self.unit_dims if self.stream != "eval" else ():  # said once, by training's
            if not any(fnmatch.fnmatchcase(x, p) for x in paths):
                # A warning, not an error: the pattern may name a module outside the model
                # that its forward calls (a site named by class, ``Teacher#0``).
                warnings.warn(
                    f"relu_doctor: unit_dims: pattern {p!r} matches no module of the model, so "
                    f"it changes no site. {_PATTERNS}.",
                    ReluDoctorWarning,
                    stacklevel=5,  # the user's watch() or with Doctor(...)
                )
        for arg, pats in (("include", self.include), ("exclude", self.exclude)):
            for p in pats:
                if not any(fnmatch.fnmatchcase(x, p) for x in paths):
                    acts = [
                        module_label(path)
                        for path, m in self.model.named_modules()
                        if family_of(m) is not None
                    ]
                    raise ReluDoctorError(
                        f"{arg}: pattern {p!r} matches no module of the model. {_PATTERNS}; "
                        f"the activation modules are {acts[:20]}"
                        f"{' ...' if len(acts) > 20 else ''}."
                    )

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> Probe:
        """Register the hooks. Raises :class:`ReluDoctorError` if there is nothing to watch."""
        if self._attached:
            return self
        self.unwatched = _unwatched(self.model) if self.stream != "eval" else []
        if self.unwatched and self.model not in _SAID_UNWATCHED:  # (once per model: an
            _SAID_UNWATCHED.add(self.model)  # init check's Doctor said it again: a trial)
            for text in self.unwatched:
                warnings.warn(f"relu_doctor: {text}", ReluDoctorWarning,
                              stacklevel=user_stacklevel())
        self._check_patterns()
        self._targets = self.targets()
        if not self._targets and self.require_modules:
            what = "after include/exclude" if (self.include or self.exclude) else "in the model"
            raise ReluDoctorError(
                f"model: no ReLU-family activation module found {what} "
                f"({type(self.model).__name__}). relu_doctor watches nn.ReLU, ReLU6, LeakyReLU, "
                "PReLU, RReLU, ELU, CELU, SELU, GELU, SiLU and Hardtanh modules; register your "
                "own class with relu_doctor.register_family(...). If the model's forward calls "
                "F.relu (or another functional activation) only, pass functional=True."
            )
        try:
            self._hook_modules()
            self._registration = register_module_module_registration_hook(
                _weak_method(self._on_register)
            )
        except BaseException:
            self.detach()
            raise
        self._attached = True
        self.park_hooks()
        return self

    def _hook_modules(self) -> None:
        self._path_of = self._boundary_modules()
        boundary = list(self._path_of)
        on = self._on
        handles = [mod.register_forward_pre_hook(on.enter) for mod in boundary]
        for mod in self._targets:
            # first among its forward hooks, those registered before ours included: the
            # activation's own output is read (a hook of yours that replaces it, as steering
            # and patching libraries do, must not change what is counted, nor move the
            # gradient tap off the activation's own autograd node)
            handles.append(mod.register_forward_hook(on.activation, prepend=True))
        for mod in boundary:
            handles.append(on.own_flags(mod.register_forward_hook(on.exit, always_call=True)))
        for mod in self.model.modules():  # (parts compiled apart: see _compiled_enter)
            if is_compile_wrapper(mod):
                handles += [mod.register_forward_pre_hook(on.compiled_enter),
                            on.own_flags(mod.register_forward_hook(on.compiled_exit,
                                                                   always_call=True))]
        if self.padding_mask is not None:  # (after the enter hooks: see _read_mask)
            handles += [on.own_flags(mod.register_forward_pre_hook(on.mask, with_kwargs=True))
                        for mod in (boundary or [self.model]) if mod not in self._targets]
        self._handles = handles
        for h in handles:
            self.hooks.add(h)
        paths = {m: p for p, m in self.model.named_modules()}
        self._restart_moved(self._paths, paths)
        self._paths = paths
        # (not a torch.compile wrapper of a part: Dynamo, tracing `module in members` in
        # the part's hooks, found its module twice, the wrapper standing for it, and
        # raised into the step, a trial; its hooks run eagerly, on the wrapper's call)
        self._members = {m for m in paths if not is_compile_wrapper(m)}
        self._containers = [m for m in boundary if m._modules] or [self.model]
        self._layout = self._layout_now()
        self._dirty = False
        self.generation += 1

    def _layout_now(self) -> list[tuple[int, int]]:
        """The containers' module dicts (identity and size): ``ModuleList.insert`` and
        ``del`` on a ``Sequential`` renumber modules without the registration hook torch
        calls for a ``setattr``, so a block put in the middle went unwatched and the sites
        after it kept names that were now other modules' (a growing-model trial)."""
        return [(id(m._modules), len(m._modules)) for m in self._containers]

    def _restart_moved(self, before: Mapping[nn.Module, str], after: Mapping[nn.Module, str]
                       ) -> None:
        """Make anew the sites at the paths a module left or came to since the last hooking
        (renumbered: a block inserted or deleted before it): a path's statistics are of the
        module now there, from this step; said once per change, naming them."""
        moved = {m for m, p in after.items()
                 if m in before and _unwrapped_path(before[m]) != _unwrapped_path(p)}
        if not moved:
            return
        paths = {before[m] for m in moved} | {after[m] for m in moved}
        renewed = [site for site in self._sites.values()
                   if site.key.module_path in paths and site.shape]  # (one that ran)
        for site in renewed:
            self._anew(site, site.unit_dim, site.shape, site.stats.window.device)
            site.made_by = self._made_by(site)
        if renewed:
            names = ", ".join(repr(s.name) for s in renewed[:6])
            more = f" and {len(renewed) - 6} more" if len(renewed) > 6 else ""
            warnings.warn(
                f"relu_doctor: modules of the model moved to other paths (a module inserted "
                "or deleted before them in a ModuleList or Sequential renumbers the ones "
                f"after it): the sites {names}{more} now name other modules, or none. Their "
                "statistics start anew from this step (what their windows had collected is "
                "dropped; their lifetime counts are the modules' now there), and a module "
                "that moved is watched under its new path.",
                ReluDoctorWarning, stacklevel=user_stacklevel())

    def _on_register(self, module: nn.Module, name: str, submodule: Any) -> None:
        # torch's global hook: called for every module of the process, so only a set lookup.
        if module in self._members:
            self._dirty = True

    def refresh_if_changed(self) -> bool:
        """Re-hook the model if a module was registered into it since it was last hooked
        (a remedy's swap, a ``setattr``); returns whether it did. Called at each pass start;
        a no-op inside a pass, while tracing, or while detached."""
        if not self._attached or self._depth or torch.compiler.is_compiling() or not (
                self._dirty or self._layout_now() != self._layout):
            return False
        self.hooks.remove(self._handles)
        self._targets = self.targets()
        self._hook_modules()
        # A site it brings finds its producer in this pass, not the next: its first pass is
        # counted, as the model's first pass is.
        self._want_provenance = True
        return True

    def _boundary_modules(self) -> dict[nn.Module, str]:
        """Activation modules and all their ancestors (where a forward pass can start), with
        their paths, in the model's order."""
        keep: set[str] = set()
        for path, _fam in self._targets.values():
            parts = path.split(".") if path else []
            for i in range(len(parts) + 1):
                keep.add(".".join(parts[:i]))
        # (not a torch.compile wrapper of a part: Dynamo, tracing the hooks of a part that
        # starts a pass itself, met its module twice in this map: see _members)
        return {m: p for p, m in self.model.named_modules()
                if p in keep and not is_compile_wrapper(m)}

    def detach(self) -> None:
        """Remove every hook (idempotent). The model is left exactly as it was."""
        self.hooks.remove(self._handles)
        self._handles = []
        if self._registration is not None:
            self._registration.remove()
            self._registration = None
        self._attached = False
        self._depth = 0
        self._bw_depth = 0
        self._pass_open = False
        self._provenance.stop()  # detached mid-pass: leave no mode behind
        for fn in self._detach_listeners:
            fn()

    def on_detach(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` at every detach (a refresh's too): what was kept for the watched
        run goes (a remedy's inputs kept to find a site's layers: see LinkCache)."""
        if fn not in self._detach_listeners:
            self._detach_listeners.append(fn)

    def refresh(self) -> None:
        """Re-register the hooks on the model's current activation modules.

        Hooks live on module objects, so a module put in place after :meth:`attach` (a remedy
        swapping ReLU for LeakyReLU) is not watched until this is called. Sites and their
        statistics are kept: they are keyed by module path and call index, and a site whose
        module changed family takes the new family at its next call. Call it between forward
        passes; a no-op while detached.
        """
        if not self._attached:
            return
        self.detach()
        self.attach()

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> Probe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ collecting
    @property
    def collecting(self) -> bool:
        """Whether this step collects (set between steps by the Doctor from its sampling).

        On a step that collects nothing no pass is recorded, and the hooks are parked (see
        :mod:`relu_doctor._hooks`): the model's modules run with no hook of ours, as if
        unwatched. Not once ``torch.compile`` traced them: its graph holds them, and they
        return at once there.
        """
        return self._collecting

    @collecting.setter
    def collecting(self, on: bool) -> None:
        self._collecting = bool(on)
        self.park_hooks()

    def park_hooks(self) -> None:
        """Park the hooks while the probe is attached, the step collects nothing, no pass
        is running and the model was never compiled; else put them back. Dynamo puts them
        back too when it starts compiling (:func:`relu_doctor._hooks.compile_watch`), and
        a step that collects nothing parks them again at its end."""
        t0 = time.perf_counter()
        park = (
            not self._collecting
            and self._attached
            and not self._compiled
            and self._depth == 0
            and self._bw_depth == 0
            and not torch.compiler.is_compiling()
            and compile_watch()  # a trace never sees the hooks parked (see _hooks)
        )
        if park:
            self.hooks.park()
        else:
            self.hooks.unpark()
        self.stopwatch.add(t0)

    # ------------------------------------------------------------------ passes
    def is_training_pass(self) -> bool:
        """Whether a pass starting at the model itself now is a training pass: the model in
        training mode and gradients enabled (two Python flags, no host synchronisation)."""
        return self.model.training and torch.is_grad_enabled()

    def takes_pass(self, training: bool | None = None) -> bool:
        """Whether a forward pass starting now belongs to this probe's stream (and the
        probe is collecting and not paused); ``training``: whether it is a training pass,
        where the caller knows (else :meth:`is_training_pass`)."""
        if not self.collecting or self.paused:
            return False
        if _PRIVATE and _PRIVATE[-1] is not self:  # relu_doctor's own pass (check_init...)
            return False
        if _tracing_state() is not None:  # torch.jit.trace: nothing real, and no mode in it
            return False
        if self.stream == "all":
            return True
        if training is None:
            training = self.is_training_pass()
        return training == (self.stream == "train")

    def begin_pass(self, training: bool | None = None, at: str = "",
                   module: nn.Module | None = None, args: Any = None) -> bool:
        """Mark a forward pass's start (idempotent within a pass: the probe's hooks and
        functional capture both call it) and return whether it is recorded.

        Args:
            training: whether the pass is a training pass, given by a loop that says so
                itself (Keras passes ``training=True`` to its train step's call, whatever
                the torch module's mode); None: the model's mode and grad mode decide
                (:meth:`is_training_pass`).

            at: the path of the module the pass begins at ("": not known), whose passes a
                site inside it is measured against (:meth:`passes_seen`).
            module: that module, whose mode decides whether the pass trains where
                ``training`` is None (the model's own, or a part of it called on its own: a
                GAN's generator sampled in eval mode, under a watch of both models, is not
                training, whatever the mode of the model holding both).
            args: its positional arguments, followed back to another part's output (see
                :meth:`parts`; keyword arguments are not: the hooks do not take them).

        A model changed since it was hooked is re-hooked first (:meth:`refresh_if_changed`).
        """
        if self._pass_open:
            return self._pass_on
        self.refresh_if_changed()
        self._pass_open = True
        if training is None and module is not None:
            training = module.training and torch.is_grad_enabled()
            if (not module.training and module is not self.model and self.model.training
                    and torch.is_grad_enabled() and self.stream == "train"
                    and not self._warned_part_eval and self.collecting and not self.paused
                    and any(p.requires_grad for p in module.parameters())):
                self._say_part_in_eval(at)  # (not a frozen loss network's: a perceptual loss)
        self._pass_on = on = self.takes_pass(training)
        self._pass_in_graph = _is_compiling()
        self._pass_graded = torch.is_grad_enabled()
        self._pass_at = None
        # (not while compiling: a guarded int would recompile; nor under a torch.func
        # transform, whose pass records no site: see _transforming)
        if on and not torch.compiler.is_compiling() and not _transforming():
            self.passes += 1
            self._entries[at] = self._entries.get(at, 0) + 1
            self._pass_at = at
            self._starts.add(at)
            if self._parts_tagged and at and args:
                self._link_part(at, args)
            if self._want_provenance:
                self._provenance.start()  # before functional capture enters its mode
        return on

    def end_pass(self) -> None:
        """Mark a forward pass's end (idempotent): calls after it, outside any pass of the
        model (its layers called by another model sharing them), are not recorded."""
        self._pass_open = False
        self._pass_on = False
        # (its mask is its own: a part called on its own after it, with none, took it and
        # laid it on its outputs, a review; the backward's are kept apart, _pass_masks)
        self._mask = None
        if not torch.compiler.is_compiling() and self._provenance.tracking:
            self._provenance.stop()
            # A pass that died half-way (called from an always_call hook while the exception
            # is handled) may not have run every site: track the next one too.
            died = sys.exc_info()[0] is not None
            self._want_provenance = died or not self._provenance_done()

    def missing_activations(self, *, functional: bool, outside_calls: int = 0) -> str | None:
        """The message to give when a recorded forward pass ran no watched activation
        (none seen, or nothing the probe could ever see), else None. Python only.

        Args:
            functional: whether functional calls (``F.relu``...) are captured too.
            outside_calls: submodules called on their own, outside any pass. In a model
                without activation modules whose own forward never ran (a LightningModule
                whose training_step calls ``self.net``) they are the forward passes: with
                none recorded, such a call is the evidence that nothing is watched.
        """
        ran = self.passes > 0 or (outside_calls > 0 and not self._targets)
        if (self._sites or self._failed or self._not_units
                or (not ran and (functional or self._targets))):
            return None  # a failed site ran an activation: its own warning said why
        what = " after include/exclude" if (self.include or self.exclude) else ""
        cause = (
            "functional=False leaves functional calls (F.relu, F.gelu ...) out: drop it to "
            "capture them"
            if not functional
            else "it watches nn.ReLU, ReLU6, LeakyReLU, PReLU, RReLU, ELU, CELU, SELU, GELU, "
            "SiLU and Hardtanh modules and their functional forms (F.relu, torch.relu, "
            "x.relu(), F.gelu ...); register another activation with "
            "relu_doctor.register_family(...)"
        )
        if recurrent := _recurrent_relu(self.model):
            cause = f"{recurrent}. Besides, {cause}"
        return (
            f"model: a forward pass of {type(self.model).__name__} ran no ReLU-family "
            f"activation a hook can see{what}, so relu_doctor has nothing to watch"
            f"{held_instead(self.model)}; {cause}."
        )

    @property
    def recording(self) -> bool:
        """Whether the pass running now is recorded (see :meth:`begin_pass`)."""
        return self._pass_on

    # ------------------------------------------------------------------ hooks
    def on_compiled_part(self, pause: Callable[[], object],
                         resume: Callable[[Any], object]) -> None:
        """Call ``pause()`` where a part of the model compiled apart starts, and
        ``resume(what pause returned)`` where it ends (functional capture's mode)."""
        self._pausers.append((pause, resume))

    def _compiled_enter(self) -> None:
        """A part of the model compiled apart (``model.part = torch.compile(model.part)``)
        starts, its wrapper's hook running eagerly: relu_doctor's torch-function modes
        (producer tracking, functional capture) are left while it runs, as Dynamo could not
        make its guards with them on the stack (a NameError raised into the step, a
        trial); the hooks inside it are traced into its graph (the shape rule, no gradient
        statistics: as in a model compiled after ``watch``)."""
        if not _is_compiling():
            pausers = [(self._provenance.pause, self._provenance.resume), *self._pausers]
            self._set_aside.append([(pause, resume, pause()) for pause, resume in pausers])

    def _compiled_exit(self) -> None:
        """The part ended: what it left on is left (functional capture's hooks traced in it
        enter its mode), then each mode is put back as it was, in the order they were on
        (producer tracking under functional capture: a review found functional sites after
        the part without their producer, the modes put back the other way round)."""
        if not _is_compiling() and self._set_aside:
            paused = self._set_aside.pop()
            for pause, _resume, _was in reversed(paused):
                pause()
            for _pause, resume, was in paused:
                resume(was)

    def _enter(self, module: nn.Module, args: Any) -> None:
        if not self._collecting or module not in self._members:
            # A step that collects nothing records no pass, so the hooks return at once (the
            # flag changes only between steps, so a pass's enter and exit agree on it). A
            # module not of the model is a copy's (copy.deepcopy copies the hook dicts, and
            # copy.copy shares them; see Hooks): not watched.
            return
        if in_backward():
            # A segment recomputed by activation checkpointing: its calls are counted apart,
            # from 0 in each segment (see RecomputedCalls, tap_recomputed).
            self._bw_depth += 1
            return
        if self._depth == 0:
            self._calls.clear()
            self._raised_before = sys.exc_info()[1]  # (a pass run while one is handled)
            gen = self.generation
            self.begin_pass(at=self._path_of.get(module, ""), module=module, args=args)
            if self.generation != gen and module not in self._path_of:
                return  # re-hooked: this module is no boundary now, no _exit will come
        self._depth += 1

    def _read_mask(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """At a pass's start (the outermost module called: its enter hook made the depth 1),
        read its padding mask (see :attr:`padding_mask`); never raises into the forward."""
        outermost = self._depth == 1 if self._targets else module is self.model
        if not self._collecting or not outermost or in_backward() or module not in self._members:
            return  # (a model of functional calls only: its root's call, before the pass opens)
        self._mask = None
        try:
            got = (self.padding_mask(args, kwargs) if callable(self.padding_mask)
                   else kwargs.get(self.padding_mask))
            if got is None:
                return
            if not isinstance(got, torch.Tensor) or got.dim() == 0:
                raise TypeError("expected a tensor of 0/1 or bool, one per position, got "
                                f"{type(got).__name__} {getattr(got, 'shape', '')}".rstrip())
            self._mask = got.detach() if got.dtype == torch.bool else got.detach() != 0
            self._masked_passes += 1
            if torch.is_grad_enabled():  # a backward may follow (bounded: see tap_recomputed)
                self._pass_masks = [*self._pass_masks[-15:], self._mask]
        except Exception as e:  # never raise into the user's forward: counted unmasked
            self._say_mask("read", f"the padding mask could not be read ({type(e).__name__}: "
                           f"{e}); the statistics count every position")

    def _say_mask(self, what: str, text: str) -> None:
        if what not in self._warned_mask:
            self._warned_mask.add(what)
            warnings.warn(f"relu_doctor: {text}.", ReluDoctorWarning, stacklevel=user_stacklevel())

    def _keep(self, output: torch.Tensor, dim: int, site: Site,
              mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The pass's padding mask (or ``mask``) shaped for ``output`` (see
        :func:`~relu_doctor.stats.mask_for`), None where it has none or it does not apply
        (said once)."""
        mask = self._mask if mask is None else mask
        if mask is None:
            return None
        if mask.device != output.device:  # (moved once per mask and device)
            source, moved = self._mask_on.get(output.device, (None, mask))
            if source is not mask:
                moved = mask.to(output.device)
                self._mask_on[output.device] = (mask, moved)
            mask = moved
        keep = mask_for(output.shape, dim, mask)
        if (keep is None and mask.dim() > 1 and output.dim() >= 2 and dim > 0
                and output.shape[0] == mask.shape[0]
                and all(n == 1 for i, n in enumerate(output.shape) if i not in (0, dim))):
            # one row a sample, (batch, units) or (batch, 1, units): a pooled head; a cached
            # decode step of generate(), whose one position is the newest token (an HF
            # trial's was named as counting padding, and the mask as of another rate)
            return None
        if keep is None:  # (said at the log, every such site named: say_unmasked)
            if site.key not in self.unmasked:  # (named when said: a site renamed meanwhile)
                self.unmasked[site.key] = (site, tuple(output.shape), tuple(mask.shape))
            return None
        self._masked.add(site.key)
        self._queue_mask_clear()
        return keep

    def unmasked_names(self) -> list[str]:
        """The sites that ran with a padding mask not fitting them, by their names now, in
        the order first seen (a site renamed since, ``act`` to ``act#0``, by its new one)."""
        return [site.name for site, _, _ in self.unmasked.values()]

    def say_unmasked(self) -> None:
        """At a log: the sites that ran with a padding mask not fitting them since the last
        said, all named (a Wav2Vec2's mask, one entry per audio sample, fits no activation,
        which all run at the frame rate: a trial read the one site named as the only one
        unmasked)."""
        if len(self.unmasked) <= self._said_unmasked:
            return
        names = self.unmasked_names()
        new = names[self._said_unmasked:]
        _, out, mask = list(self.unmasked.values())[self._said_unmasked]
        self._said_unmasked = len(names)
        listed = ", ".join(repr(n) for n in new[:8]) + (
            f" and {len(new) - 8} more" if len(new) > 8 else "")
        masked = len(self._masked - set(self.unmasked))
        partly = len(self._masked & set(self.unmasked))  # (masked where the mask fits)
        # (a mixture's routed rows fit no mask: said where the model runs one)
        routed = (" A mixture of experts' routed token rows fit no mask, nor do its tokens "
                  "flattened, (batch * seq, features): give padding_mask= a function returning "
                  "the mask flattened, kwargs['attention_mask'].reshape(-1), where the rows are "
                  "the tokens in order." if self._warned_experts or self._warned_expert_calls
                  else "")
        warnings.warn(
            f"relu_doctor: padding_mask: {len(new)} site(s) ran with a padding mask that does "
            f"not fit them, and count every position, padding included: {listed} (the "
            f"first's output {out}, its unit dim left out, does not begin with the mask's "
            f"shape {mask}). "
            + ("No site is masked: the mask is of other positions than the activations' (a "
               "Wav2Vec2's or Whisper's mask has one entry per audio sample or frame of the "
               "input, its activations run at a lower rate): give padding_mask= a function of "
               "(args, kwargs) that returns the mask at the activations' rate (see the "
               "README's \"Positions\")." if not masked and not partly else
               f"{masked} other site(s) are masked"
               + (f"; {partly} of those named are masked at the passes the mask fits."
                  if partly else "."))
            + routed + " A run directory's meta.json lists them (unmasked_sites).",
            ReluDoctorWarning, stacklevel=user_stacklevel())

    def _queue_mask_clear(self) -> None:
        """Forget the passes' masks when the backward now running (or the next one) ends:
        a reentrant checkpoint's recomputation reads the mask of its own pass among those
        since the last backward (see :meth:`tap_recomputed`)."""
        if self._clear_queued or not in_backward():
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._clear_masks)
            self._clear_queued = True
        except RuntimeError:  # (not inside a backward after all)
            pass

    def _clear_masks(self) -> None:
        self._pass_masks = []
        self._clear_queued = False

    def _recomputed_mask(self, output: torch.Tensor, dim: int, site: Site) -> torch.Tensor | None:
        """The mask of the pass a reentrant checkpoint recomputes now: that of the passes
        since the last backward which fits ``output``; where several passes with different
        masks ran before this backward (two micro-batches, a siamese pair), which one is not
        known: none, said once (its gradients then count every position)."""
        fits = {id(m): m for m in self._pass_masks if mask_for(output.shape, dim, m) is not None}
        if len(fits) > 1:
            self._say_mask("recomputed", f"site {site.name!r} is recomputed by reentrant "
                           "checkpointing in a backward through several passes with different "
                           "padding masks, which cannot be told apart there: its gradient "
                           "statistics count every position (its forward ones are masked; "
                           "use_reentrant=False reads each pass's own)")
            return None
        self._queue_mask_clear()
        return self._keep(output, dim, site, next(iter(fits.values()))) if fits else None

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._collecting or module not in self._members:
            return
        if in_backward():
            self._bw_depth = max(0, self._bw_depth - 1)
            return
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            # (not for a pass the forward's exception cut short, which torch ends by calling
            # the always-called hooks with no output: its calls stopped midway)
            raised = sys.exc_info()[1]
            cut = output is None and raised is not None and raised is not self._raised_before
            self._raised_before = None
            if not self._warned_shared and not cut and not torch.compiler.is_compiling():
                self._check_shared_calls()
            # Empty between passes, so torch.compile sees the same state at every pass start
            # (a guard on these counters would otherwise recompile after the first pass).
            self._calls.clear()
            self.note_output(self._path_of.get(module, ""), output)
            self.end_pass()

    def close_pass(self) -> None:
        """Between steps no forward pass is open. A pass whose end never came (torch's error
        path skips the always-called hooks after one of them raised) is closed here, so that
        the next pass counts its calls from 0 again instead of making new sites."""
        self._recomputed.clear()  # (the step's backward is over: its node let go)
        self._pass_masks = []
        if self._depth or self._pass_open:
            self._depth = 0
            self._calls.clear()
            self.end_pass()

    def _check_shared_calls(self) -> None:
        for key, n in self._calls.items():
            seen = self._shared.get(key)
            if seen is None:
                self._shared[key] = n
                continue
            if n != seen:
                self._warned_shared = True
                target = self._targets.get(key)
                what = module_label(target[0]) if target else type(key).__name__
                warnings.warn(
                    f"relu_doctor: {what!r} ran {_times(seen)} in one recorded pass and "
                    f"{n} in another. Its sites are its calls in order (#0, #1...): where a call in "
                    "the middle is skipped (LayerDrop, a branch), one site mixes different "
                    "layers; give each layer its own activation module to keep them apart. "
                    "(Calls missing at the end, as in a loop of varying length, only leave the "
                    "later sites fewer samples.)",
                    ReluDoctorWarning,
                    stacklevel=user_stacklevel(),
                )
                return

    def next_call_index(self, key: Any) -> int:
        """The call index of ``key`` within the current forward pass (and count it)."""
        idx = self._calls.get(key, 0)
        self._calls[key] = idx + 1
        return idx

    def _activation(self, module: nn.Module, args: Any, output: Any) -> None:
        """The forward hook of every watched activation module (through :class:`_ProbeHooks`,
        not a closure per module: see :class:`~relu_doctor._hooks.Hooks`)."""
        if not self._collecting:
            return
        target = self._targets.get(module)
        if target is None:  # a module not of the model (see _enter)
            return
        path, fam = target
        if in_backward():
            if self.stream == "eval" or (self.paused and self.paused_in_backward):
                return  # (the second: a hook of yours paused, run again by a checkpoint)
            key = SiteKey(path, self._recomputed.next_index(module))
            if self._recomputed.spread is not None:
                self.warn_spread(module_label(path))
            if key not in self._failed:
                try:
                    self.tap_recomputed(output, key)
                except Exception as e:
                    self._fail(key, "recomputed forward", e)
            return
        if not self._pass_on or self.paused:  # (paused inside a pass: a hook of yours)
            return
        idx = self.next_call_index(module)
        self.record(output, path=path, call_index=idx, family=fam, module=module)

    def warn_spread(self, what: str) -> None:
        """Once: ``what`` runs in two reentrant checkpoint segments (see RecomputedCalls)."""
        if self._warned_spread:
            return
        self._warned_spread = True
        warnings.warn(
            f"relu_doctor: {what!r} runs in more than one reentrant checkpoint segment "
            "(checkpoint(..., use_reentrant=True)); their recomputed calls cannot be told "
            "apart, so its gradient statistics (grad_rms, grad_zero_fraction) are pooled into "
            "one of its sites and missing from the others. Forward statistics are right. "
            "use_reentrant=False, or an activation module of its own in each segment, keeps "
            "them apart.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _say_part_in_eval(self, at: str) -> None:
        """Once: a pass begun at a part of the model in eval mode, gradients on, while the
        model trains, was left out of the training stream."""
        self._warned_part_eval = True
        warnings.warn(
            f"relu_doctor: a forward pass begun at {module_label(at)!r}, in eval mode with "
            "gradients enabled, was left out of the training stream, here and later without "
            "another warning: the mode of the module a pass begins at decides (a generator "
            "sampled with G.eval() is no training pass). If it trains in eval mode (BatchNorm "
            "frozen through .eval()), call the model as a whole, whose mode then decides, or "
            "watch with stream='all'; if it is a sample or an evaluation, make it under "
            "torch.no_grad(), which also spares the graph.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _say_higher_order(self) -> None:
        """Once: a backward made with ``create_graph=True`` reached a watched activation,
        and its gradients were left out."""
        if self._warned_higher_order:
            return
        self._warned_higher_order = True
        warnings.warn(
            "relu_doctor: a backward made with create_graph=True (a gradient penalty's "
            "torch.autograd.grad, as WGAN-GP's and R1's; MAML's inner step; a Hessian-vector "
            "product) reached watched activations: its gradients are of what it "
            "differentiates, not of the training loss, and are left out of the gradient "
            "statistics (grad_rms, grad_zero_fraction), here and later without another "
            "warning. Compute such a penalty under `with doc.paused():` to leave its pass out "
            "altogether (its forward statistics, and the zero gradients the loss's backward "
            "gives it through the penalty). A training loss itself backpropagated with "
            "create_graph=True (AdaHessian) gets no gradient statistics.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def tap_recomputed(self, output: Any, key: SiteKey) -> None:
        """A call recomputed during backward by activation checkpointing (module hooks and
        functional capture alike).

        Its forward statistics were taken in the original forward and are not counted again.
        Reentrant checkpointing ran that forward without autograd, so no gradient tap exists
        and this recomputed graph is the one backpropagated: tap it here. (Non-reentrant
        checkpointing never backpropagates the recomputed graph, so this tap never fires and
        the original forward's tap counts the gradient once.)
        """
        site = self._sites.get(key)
        if site is not None:
            keep = (self._recomputed_mask(output, site.dim_for(output.dim()), site)
                    if self._pass_masks and isinstance(output, torch.Tensor) else None)
            self._tap_gradient(output, site, keep)

    def _tap_gradient(self, output: Any, site: Site, keep: torch.Tensor | None = None) -> None:
        """Tap ``output``'s gradient for ``site`` (of the real positions only, with ``keep``:
        the mask of the pass that made it). Whether the call had a gradient to come is kept
        for the window (:attr:`Site.window_graded`, :attr:`Site.window_ungraded`)."""
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            if self._pass_graded:  # (one under torch.no_grad() in a pass with gradients)
                site.window_ungraded = True
            return
        site.window_graded = True
        if self.gradients:
            node = output.grad_fn
            if node is not None:
                hook = self._grad_hooks.get(site)
                if hook is None:
                    hook = self._grad_hooks[site] = self._make_grad_hook(site)
                if keep is not None:
                    hook = functools.partial(hook, keep=keep)
                if output._is_view() and type(node).__name__ == "AsStridedBackward0":
                    tap = _tap_in_base(output, node, hook)
                    if tap is not None:
                        node, hook = tap
                node.register_hook(hook)

    def record(
        self,
        output: Any,
        *,
        path: str,
        call_index: int,
        family: Family,
        module: nn.Module | None = None,
        op: str | None = None,
    ) -> None:
        """Record one activation call: forward statistics now, a gradient tap for later.

        Used by module hooks and by functional capture alike: a module's call has
        ``op=None``, a functional call the op's name (``"relu"``), ``path`` then being the
        module whose ``forward`` made the call.
        """
        prepared = None if self._mask is not None else self._prepared.get((path, call_index, op))
        if not (prepared is not None and prepared[0] is family
                and prepared[3] is prepared[2].stats
                and self._record_prepared(output, prepared[1], prepared[2])):
            self._record(output, path, call_index, family, module, op)
        if self._provenance.tracking:  # (after its own origin was read: see Site.chained)
            self._provenance.after_site(output)

    def _record(self, output: Any, path: str, call_index: int, family: Family,
                module: nn.Module | None, op: str | None) -> None:
        """:meth:`record` of a call the kernel call prepared at the previous one does not
        fit."""
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        if torch.compiler.is_compiling():
            if torch.compiler.is_exporting():
                return  # torch.export traces the model: nothing real to count
            # torch.compile is tracing this hook: the site is found or made in plain Python
            # at trace time and the statistics below become part of the compiled graph.
            # The output's shape reaches _compiled_site through comptime (see
            # _traced_shape): passed as an argument, a dim Dynamo made symbolic (a batch or
            # sequence length that varies: dynamic shapes) failed, at every call, in a
            # graph break, and under fullgraph=True in an exception.
            from torch._dynamo.comptime import comptime

            comptime(_traced_shape)
            slot = _compiled_site(
                self, output.device, path, call_index, family, op, module is not None,
                _cap_args(module),
            )
            if not slot:
                return
            site = getattr(self._compiled_slots, slot)
            if site is None:  # no site yet (a 1-D call): Dynamo guards on it being None
                return
            site.stats.record_forward(
                output.detach(), site.dim_for(output.dim()), nonnegative=family.nonnegative,
                cap=site.cap,
            )
            # Compiled forwards get no gradient tap: no autograd node exists while tracing,
            # and a Tensor.register_hook traced by Dynamo (torch 2.13) drops the later
            # attribute writes of objects already written in the same graph (this probe's
            # call counters).
            return
        t0 = time.perf_counter()
        if not _real(output):
            if type(output) is torch.Tensor and _transformed(output):
                self.transformed_calls += 1  # (said where a window saw nothing else)
            return
        key = self._keys.get((path, call_index, op))
        if key is None:  # a SiteKey costs 1 us to make and hash: made once per call
            key = self._keys[path, call_index, op] = SiteKey(path, call_index, op)
        if self._failed and key in self._failed:
            return
        try:
            site = self._site(output, key, family, module)
            if site is None:
                return
            dim = site.dim_for(output.dim())
            keep = self._keep(output, dim, site)
            site.stats.record_forward(
                output, dim, nonnegative=family.nonnegative, cap=site.cap, keep=keep
            )
            if site.stats.first_due:  # (the remedies' baseline: see SiteStats.take_first)
                site.stats.take_first()
            self._tap_gradient(output, site, keep)
            ready = site.stats.prepare_forward(
                output, dim, nonnegative=family.nonnegative, cap=site.cap
            )
            if site.seen_pass != self.passes:  # (the window's passes that ran it)
                site.seen_pass = self.passes
                site.window_passes += 1
            if ready is not None and key not in self._provisional:  # (its next call settles it)
                self._prepared[path, call_index, op] = (family, ready, site, site.stats)
            else:
                self._prepared.pop((path, call_index, op), None)
        except Exception as e:  # never raise into the user's forward
            self._fail(key, "forward", e)
        finally:
            self.stopwatch.add(t0)  # the budget's measure of what collecting costs

    def _record_prepared(self, output: Any, call: Prepared, site: Site) -> bool:
        """:meth:`record` for a call laid out as the site's previous one (nearly every call),
        through the kernel call prepared then: the same statistics and gradient tap, with
        only the checks that can change between calls. False (nothing done) where the
        prepared call does not apply; then :meth:`record` takes its general path."""
        if _is_compiling() or _tracing_state() is not None or (
            type(output) is torch.Tensor
            and (torch._is_functional_tensor(output) or _transformed(output))
        ):
            return False
        t0 = time.perf_counter()
        try:
            if not call(output):
                return False
            self._tap_gradient(output, site)
            if site.seen_pass != self.passes:
                site.seen_pass = self.passes
                site.window_passes += 1
        except Exception as e:  # never raise into the user's forward
            self._fail(site.key, "forward", e)
        self.stopwatch.add(t0)
        return True

    @property
    def latest_pass_at(self) -> str | None:
        """The path of the module the latest pass began at where it was recorded (``""``:
        the model, or not known), else None (the latest pass was not recorded)."""
        return self._pass_at

    def pass_starts(self) -> set[str]:
        """The paths of the modules recorded passes began at since attach: the model
        (``""``), or its parts called on their own (an encoder, then a projector)."""
        return set(self._starts)

    def ran_now(self, key: SiteKey) -> int | None:
        """The number of the latest recorded pass (:attr:`passes`) where it ran the site
        ``key``, else None."""
        site = self._sites.get(key)
        return self.passes if site is not None and site.seen_pass == self.passes else None

    def passes_seen(self, sites: Sequence[Site]) -> dict[str, tuple[int, int]]:
        """``{site name: (recorded passes of the open window that ran it, those it could have
        run in)}`` for the sites that ran in some of them only (a branch taken sometimes): a
        window judged on fewer batches says so. The passes it could have run in are those
        that began at a module holding it (or at no known module: functional capture's): a
        GAN's generator, called on its own, is not measured against the discriminator's
        passes. Empty where the counts are not known: compiled hooks count no passes, nor a
        window resumed from a checkpoint mid-way."""
        total = self.passes - self._window_from
        if self._compiled or not self.passes_known or total <= 0:
            return {}
        out = {}
        anywhere = total - sum(self._entries.values())  # begun by functional capture
        for s in sites:
            if s.window_passes <= 0:
                continue
            path = s.key.module_path
            could = anywhere + sum(n for at, n in self._entries.items()
                                   if not at or path == at or path.startswith(at + "."))
            if s.window_passes < could:
                out[s.name] = (s.window_passes, could)
        return out

    def parts(self, sites: Sequence[Site]) -> dict[str, tuple[str, int]]:
        """``{site name: (its flow, its part's rank in that flow)}`` where the open window's
        passes began at more than one module and none at the model itself: parts stepped
        apart under one watch (a GAN's generator and discriminator, each called on its
        own; a loop calling an encoder, then a decoder). A site's part is the outermost
        such module holding it (``""``: none, as a module outside the model). Parts one of
        whose passes was made from another's output are one flow, named after its first
        part, each ranked after those feeding it (the generator before the discriminator,
        whichever ran first); a part fed by none and feeding none is a flow of its own
        (two models trained apart). Empty otherwise."""
        starts = sorted(self._entries)
        if len(starts) < 2 or "" in starts:
            return {}
        edges = {(a, b) for a, b in self._part_edges if a in self._entries and b in self._entries}
        feeds: dict[str, set[str]] = {}
        fed: dict[str, set[str]] = {}
        for a, b in edges:
            feeds.setdefault(a, set()).add(b)
            fed.setdefault(b, set()).add(a)
        # Joined along simple chains only: a part feeding two (a generator judged by two
        # discriminators) or fed by two, or a cycle (CycleGAN), has no one output side, so
        # each of those parts is judged on its own
        nxt = {a: next(iter(bs)) for a, bs in feeds.items()
               if len(bs) == 1 and len(fed.get(next(iter(bs)), ())) == 1}
        # (a cycle's parts each have a feeder in nxt, so none heads a chain: each is its own)
        flow, rank = {at: at for at in starts}, dict.fromkeys(starts, 0)
        for head in starts:
            if head in fed and len(fed[head]) == 1 and next(iter(fed[head])) in nxt:
                continue  # (inside a chain or a cycle: not its head)
            at, k = head, 0
            while at in nxt and k < len(starts):
                at, k = nxt[at], k + 1
                flow[at], rank[at] = head, k
        out = {}
        for s in sites:
            path = s.key.module_path
            at = next((a for a in starts if path == a or path.startswith(a + ".")), "")
            out[s.name] = (flow[at], rank[at]) if at else ("", 0)
        return out

    def note_output(self, at: str, output: Any) -> None:
        """Tag the autograd nodes of the output of the recorded pass begun at part ``at``
        that just ended (every tensor gradients reach; the tags go with the graph): a later
        pass begun at another part from them is fed by this one (see :meth:`parts`)."""
        if self._pass_at != at or not at or torch.compiler.is_compiling():
            return
        try:
            with torch._C.DisableTorchFunction():  # (not seen by a mode that is on: .grad_fn)
                for t in tree_flatten(output)[0]:
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        # (a node already tagged is another part's output, passed through)
                        node: Any = t.grad_fn
                        node.metadata.setdefault(self._part_tag, at)
                        self._parts_tagged = True
        except Exception:  # (never into the user's forward: the link is only missed)
            pass

    def _link_part(self, at: str, inputs: Any) -> None:
        """Note which other parts' tagged outputs the pass beginning at ``at`` was made
        from, its inputs' autograd graphs followed back up to :data:`_PART_WALK` nodes, each
        path to the first tagged node (a GAN's D(G(z)), an augmentation between them, a
        loop calling a model's layers one by one)."""
        try:
            with torch._C.DisableTorchFunction():  # (see note_output)
                todo = [t.grad_fn for t in tree_flatten(inputs)[0]
                        if isinstance(t, torch.Tensor) and t.grad_fn is not None]
                seen: set[int] = set()
                while todo and len(seen) < _PART_WALK:
                    node = todo.pop()
                    if id(node) in seen:
                        continue
                    seen.add(id(node))
                    part = node.metadata.get(self._part_tag)  # type: ignore[attr-defined]
                    if part is not None:
                        if part != at:
                            self._part_edges[part, at] = None
                        continue
                    todo.extend(n for n, _ in node.next_functions if n is not None)
        except Exception:  # (never into the user's forward: the link is only missed)
            pass

    def close_passes(self, sites: Sequence[Site]) -> None:
        """The open window closed: its count of passes starts anew, every site's too."""
        if self.padding_mask is not None and self.passes > self._window_from:
            self._say_padding_unread()
        for s in sites:
            s.window_passes = 0
            s.window_graded = s.window_ungraded = False
        self._window_from = self.passes
        self._entries = {}
        self._part_edges = {}
        self._parts_tagged = False
        self._masked_passes = 0
        self.passes_known = True

    def _say_padding_unread(self) -> None:
        """Once: a window closed whose passes were counted whole though ``padding_mask`` was
        asked for (compiled, or no pass was given the mask)."""
        name = self.padding_mask if isinstance(self.padding_mask, str) else "a function"
        if self._compiled:
            self._say_mask("compiled", "padding_mask: under torch.compile the padding mask is "
                           "not applied; the statistics count every position")
        elif self._masked_passes == 0:
            self._say_mask("unread", f"padding_mask={name!r}: no recorded pass of the window "
                           "was given a mask (is it a keyword argument of the outermost module "
                           "called? a mask given by position needs a function of (args, "
                           "kwargs)); the statistics count every position")

    @property
    def compiled(self) -> bool:
        """Whether torch.compile traced the hooks (their passes are then not counted as
        they run: see :attr:`passes`)."""
        return self._compiled

    def failed_sites(self) -> set[SiteKey]:
        """The sites no longer monitored because a hook of theirs failed."""
        return set(self._failed)

    def _fail(self, key: SiteKey, where: str, exc: BaseException) -> None:
        """Stop monitoring ``key`` after its hook failed, and say so once."""
        if key in self._failed:
            return
        self._failed.add(key)
        self._prepared.pop((key.module_path, key.call_index, key.op), None)
        site = self._sites.get(key)
        name = site.name if site is not None else key.name(key.call_index > 0)
        warnings.warn(
            f"relu_doctor: stopped monitoring site {name!r}: its {where} hook failed "
            f"({type(exc).__name__}: {exc}). Training goes on; the other sites are still "
            "monitored.",
            ReluDoctorWarning,
            stacklevel=3,
        )

    def _warn_compiled(self) -> None:
        if self._warned_compiled or not self.gradients:
            return
        self._warned_compiled = True
        warnings.warn(
            "relu_doctor: torch.compile is tracing the activation hooks of "
            f"{type(self.model).__name__}. Forward statistics are computed inside the compiled "
            "graph; gradient statistics (grad_rms, grad_zero_fraction; per unit grad_zero_rate) "
            "are collected in eager mode only and are missing for compiled forward passes.",
            stacklevel=2,
        )

    def _make_grad_hook(self, site: Site) -> Callable[..., None]:
        # The kernel call prepared at the previous call, used by the calls laid out as it
        # (see _record_prepared). Not while compiled autograd traces this hook, nor with a
        # loss scale held in a tensor (AMP's GradScaler, read at each call): those take the
        # checked path.
        # (and the accumulators it writes: a site made anew has others, of another layout
        # where its units moved to another dim of the same shape: see SiteRegistry._settle)
        prepared: Prepared | None = None
        made_for: object = None

        def add_grad(grad_inputs: Sequence[Any], grad_outputs: Sequence[Any],
                     keep: torch.Tensor | None) -> None:
            nonlocal prepared, made_for
            g = grad_outputs[0] if grad_outputs else None
            if g is None:
                return
            # A backward made with create_graph=True runs its hooks with grad mode on (the
            # engine's), whether or not this gradient requires grad: a constant one does
            # not (a frozen head's input gradient, ReLU's double backward's zeros: a PINN
            # trial's second autograd.grad read as the loss's, grad_rms 56x off)
            if torch.is_grad_enabled() and not _is_compiling():
                self._say_higher_order()
                return
            gi = grad_inputs[0] if grad_inputs and site.family.input_grad else None
            if not isinstance(gi, torch.Tensor):
                gi = None
            scale = self.grad_scale() if self.grad_scale is not None else None
            inv = None if scale is None else 1.0 / scale
            if keep is not None:  # a padded pass: its real positions (the eager path)
                site.stats.record_grad(g, gi, site.dim_for(g.dim()), inv, keep)
                self._queue_mask_clear()
                return
            if isinstance(inv, torch.Tensor) or _is_compiling() or (
                    inv is not None and inv * LARGEST_SCALE < 1.0):  # (see _kernels.tamed)
                site.stats.record_grad(g, gi, site.dim_for(g.dim()), inv)
                return
            if prepared is not None and made_for is site.stats and prepared(g, gi, inv):
                return
            dim = site.dim_for(g.dim())
            site.stats.record_grad(g, gi, dim, inv)
            prepared, made_for = site.stats.prepare_grad(g, gi, dim), site.stats

        def grad_hook(grad_inputs: Sequence[Any], grad_outputs: Sequence[Any],
                      region: tuple[Any, ...] | None = None,
                      keep: torch.Tensor | None = None) -> None:
            if self._failed and site.key in self._failed:
                return
            t0 = time.perf_counter()
            try:
                if region is not None:  # an inplace call on a view: its part of the base's
                    grad_inputs, grad_outputs = _cut(grad_inputs, region), _cut(grad_outputs, region)
                add_grad(grad_inputs, grad_outputs, keep)
            except Exception as e:  # never raise into the user's backward
                self._fail(site.key, "backward", e)
            finally:
                self.stopwatch.add(t0)

        return grad_hook


#: autograd nodes followed back from a pass's inputs to another part's output (see
#: Probe._link_part): a few augmentations between two models, not a whole model's graph
_PART_WALK = 64


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _tap_in_base(
    output: torch.Tensor, node: Any, hook: Callable[..., None]
) -> tuple[Any, Callable[..., None]] | None:
    """Where to tap the gradient of an inplace call on a view (``h[:, 4:8].relu_()``): its
    own node (the view replayed on the changed base) runs only when the loss goes through
    the view, and a loss taken on the base skips it. The base's ``CopySlices`` node, which
    holds the call's backward, runs either way: its gradients are the base's, cut to the
    view's part (the view's size, strides and offset in a contiguous base). None when the
    base is not contiguous (the view's own node is tapped, as before)."""
    nxt = node.next_functions
    base = output._base
    if (not nxt or nxt[0][0] is None or type(nxt[0][0]).__name__ != "CopySlices"
            or base is None or not base.is_contiguous()):
        return None
    region = (tuple(output.size()), tuple(output.stride()),
              output.storage_offset() - base.storage_offset())
    return nxt[0][0], functools.partial(hook, region=region)


def _cut(grads: Sequence[Any], region: tuple[Any, ...]) -> tuple[Any, ...]:
    """The first of a node's gradients (the base's), cut to the view ``region`` describes."""
    if not grads or not isinstance(grads[0], torch.Tensor):
        return tuple(grads)
    size, stride, offset = region
    return (grads[0].contiguous().as_strided(size, stride, offset), *grads[1:])


def _scripted_roots(model: nn.Module) -> list[str]:
    """The paths of the outermost TorchScript modules inside ``model``."""
    roots: list[str] = []
    for path, mod in model.named_modules():
        if isinstance(mod, torch.jit.ScriptModule) and not _within(path, roots):
            roots.append(path)
    return roots


def _within(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(f"{r}.") for r in roots)


def eager_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` without TorchScript modules and what they hold (no hook can
    be put on them, torch refuses it, or see inside them), nor the wrappers of parts
    compiled apart (``torch.compile``: what they hold is kept; see Probe._compiled_enter)."""
    roots = _scripted_roots(model)
    return [(path, mod) for path, mod in model.named_modules()
            if not _within(path, roots) and not is_compile_wrapper(mod)]


def _weak_method(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` for torch's process-wide registration hook, holding its probe weakly: a
    Doctor dropped without ``detach()`` must not keep its model alive through it."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        if _is_compiling():
            # A module made while torch.compile traces (the ModuleList that slicing one
            # builds, as HF Llama's `self.layers[:n]`) is a temporary, never the model's
            # own; Dynamo cannot trace the weak reference (a graph break per call).
            return
        bound = ref()
        if bound is not None:
            bound(*args)

    return call


class _CompiledSlots:
    """Sites made while torch.compile traces, one attribute each (see ``_compiled_site``),
    or None for a call that is no site yet; ``names`` maps each key to its attribute."""

    def __init__(self) -> None:
        self.names: dict[SiteKey, str] = {}


def _cap_args(module: nn.Module | None) -> tuple[float, float] | None:
    """The bounds of a Hardtanh-like module (what ``Family.cap`` reads), as constants."""
    if module is None or not hasattr(module, "max_val"):
        return None
    return (float(getattr(module, "min_val", -1.0)), float(getattr(module, "max_val")))  # noqa: B009


#: the sizes of the output being traced, from :func:`_traced_shape` to :func:`_compiled_site`
_TRACED_SHAPES: list[tuple[Any, ...]] = []


def _traced_shape(ctx: Any) -> None:
    """Run by Dynamo's ``comptime`` as it traces :meth:`Probe.record`: the sizes of its
    ``output`` (ints, and symbols for the dims Dynamo lets vary: dynamic shapes), for the
    :func:`_compiled_site` call that follows, to which Dynamo passes only constants."""
    _TRACED_SHAPES.append(tuple(ctx.get_local("output").as_fake().shape))


def _plain_shape(sizes: tuple[Any, ...]) -> tuple[int, ...]:
    """``sizes`` as ints: a symbol's size in the example being traced (0 where it has
    none: a size that depends on data)."""
    return tuple(d if type(d) is int else d.node.maybe_as_int() or (
        d.node.hint if d.node.has_hint() else 0) for d in sizes)


def _compiled_site(
    probe: Probe,
    device: torch.device,
    path: str,
    call_index: int,
    family: Family,
    op: str | None,
    has_module: bool,
    cap_args: tuple[float, float] | None,
) -> str:
    """Find or make a site while torch.compile traces; returns the slot attribute name.

    Marked ``assume_constant_result`` below: Dynamo runs it in plain Python at trace time
    (so real accumulators are made once, with a graph of any size and ``fullgraph=True``)
    and bakes the returned name into the graph, which then reads the site through
    ``probe._compiled_slots.<name>``. The output's shape comes from :func:`_traced_shape`,
    a symbolic dim as its size in the example traced (0 where it has none: no site), and
    the graph guards a site's units' dim at its width (see below). A call that makes no
    site (a 1-D call the 1-D rule leaves out) gets its key's slot set to None: Dynamo
    guards on that, so when a later call of another rank makes the site, the graph traced
    on the 1-D call is traced again and counts it (one recompilation), as eager mode does.
    """
    module: nn.Module | None = None
    if has_module:
        if op is None:
            try:
                module = probe.model.get_submodule(path)
            except AttributeError:  # a site named apart from torch's paths (a Keras layer)
                module = None
        elif cap_args is not None:
            module = nn.Hardtanh(*cap_args)
    probe._compiled = True  # its hooks are in the graph: never park them (see Probe)
    if not _TRACED_SHAPES:  # (comptime did not run: no shape, no site)
        return ""
    sizes = _TRACED_SHAPES.pop()
    shape = _plain_shape(sizes)
    stand_in = torch.empty((), device=device).expand(shape)  # shape and device, no memory
    key = SiteKey(path, call_index, op)
    site = probe._site(stand_in, key, family, module, traced=True)
    slots = probe._compiled_slots
    known = probe._sites.get(key)
    if known is not None:
        # The units' dim made a fixed size in this graph (a guard: another size traces
        # anew), so that a graph counts calls of the site's width only, and one that leaves
        # out another width leaves out that width only; the other dims (a batch) stay
        # symbolic.
        dim = known.dim_for(len(sizes))
        if 0 <= dim < len(sizes) and type(sizes[dim]) is not int:
            sizes[dim].node.guard_int("", 0)
    if site is None and known is not None:
        return ""  # a call of another unit count: left out (the probe warned)
    slot = slots.names.setdefault(key, f"site{len(slots.names)}")
    setattr(slots, slot, site)
    if site is not None:
        probe._warn_compiled()
    return slot


def _real(t: torch.Tensor) -> bool:
    """False for meta, fake and traced tensors (Keras' symbolic build, FakeTensorMode,
    torch.export's non-strict tracing, torch.jit.trace) and torch.func's transformed ones
    (``vmap``, ``grad``): nothing real to count. About 1 us for a plain tensor (the full
    fake-tensor test costs 5 us: only for subclasses)."""
    if t.is_meta or torch._C._get_tracing_state() is not None:
        return False
    if type(t) is torch.Tensor:
        return not (torch._is_functional_tensor(t) or _transformed(t))
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


# torch._dynamo.assume_constant_result, without importing torch._dynamo here.
_compiled_site._dynamo_marked_constant = True  # type: ignore[attr-defined]
