"""When and on what the forward pass behind the unit links is recorded.

A remedy that needs producers and consumers (:class:`~relu_doctor.remedies.recycle.
DormantRecycler`) holds a :class:`LinkCache`: until links are first needed it keeps a
reference to the arguments of the model's latest call (:class:`InputTap`); then it records
one extra pass without gradients on them (:func:`~relu_doctor.remedies.dataflow.
record_dataflow`, on two samples when batched, recorded by no probe), drops the reference,
and serves every site's :class:`~relu_doctor.remedies.unit_links.UnitLinks` from that pass.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from relu_doctor._hooks import HookOwner, Hooks
from relu_doctor.errors import ReluDoctorError
from relu_doctor.probes import is_compile_wrapper
from relu_doctor.remedies.dataflow import Dataflow, record_dataflow
from relu_doctor.remedies.unit_links import NotInPass, UnitLinks, find_unit_links
from relu_doctor.sampling import model_device
from relu_doctor.sites import SiteKey

__all__ = ["InputTap", "Later", "LinkCache", "record_latest", "skip_for_now"]


class Later(str):
    """Why a site's links were not found this time, where a later pass may find them (see
    :class:`~relu_doctor.remedies.unit_links.NotInPass`): a remedy skips the site, and
    does not leave it alone for good."""


def skip_for_now(said: set[str], warn: Any, what: str, site: str, why: str) -> None:
    """Say once per site (``said``) that ``what`` skips ``site`` this time for ``why`` (a
    :class:`Later`): no decline, it is tried again at the next decision."""
    if site not in said:
        said.add(site)
        warn(f"{what}: skipping site {site!r} for now: {why}")


def _shrink(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """The first two samples of batched inputs (every tensor's dim 0 the same, above 2)."""
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else -1 for t in leaves}
    if len(sizes) != 1 or next(iter(sizes)) <= 2:
        return None
    small: tuple[Any, Any] = tree_map(
        lambda t: t[:2] if isinstance(t, torch.Tensor) else t, (args, kwargs)
    )
    return small


def record_latest(
    model: nn.Module, call: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
    *, shrink: bool = True,
) -> tuple[Dataflow | None, str | None]:
    """Record one pass of ``call`` (the model or the submodule its caller calls), on two
    samples when the inputs are batched (``shrink``); or why it failed."""
    small = _shrink(args, kwargs) if shrink else None
    tries = ([small] if small is not None else []) + [(args, kwargs)]
    # In training mode where the model is not in it now (deciding after a validation pass):
    # what only training runs (a deep-supervision head) is part of the flow
    training = not call.training
    err: Exception | None = None
    for a, k in tries:
        try:
            return record_dataflow(model, a, kwargs=k, call=call, training=training), None
        except Exception as e:  # the user's forward on our inputs: anything
            err = e
    if training:  # (not in its own mode: a head only training runs would not be seen)
        raise NotInPass(
            "the forward pass that finds producers and consumers, made in training mode on "
            f"the inputs of the model's latest call (in eval mode), failed ({type(err).__name__}: "
            f"{err}); looked for again at the next decision")
    return (
        None,
        f"the forward pass that finds producers and consumers failed ({type(err).__name__}: {err})",
    )


class _TapHooks(Hooks):
    """An input tap's module hooks (see :class:`~relu_doctor._hooks.Hooks`)."""

    __slots__ = ()
    owner: InputTap

    def pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.owner._pre(module, args, kwargs)

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.owner._post(module, args, output)


class InputTap(HookOwner):
    """Keeps a reference to the arguments of the model's latest outermost call (the model,
    or the submodule a wrapper such as a LightningModule calls), until they are needed.

    Pre/post hooks on every module until the first call shows which module is outermost,
    then one pre-hook on that module alone."""

    def __init__(self, model: nn.Module) -> None:
        self.depth = 0
        self.args: tuple[nn.Module, tuple[Any, ...], dict[str, Any]] | None = None
        self.outermost: nn.Module | None = None  # found by the first call that returned
        self.handles = []
        self._on = _TapHooks(self)  # the callables in the modules' hook dicts
        # (a copy's modules carry these hooks too; not a torch.compile wrapper of a part:
        # Dynamo, tracing these hooks inside the part, met its module twice here and raised
        # into the step, a review, as it did in the probe's module set)
        hooked = [m for m in model.modules() if not is_compile_wrapper(m)]
        self.modules = set(hooked)
        on = self._on
        for m in hooked:
            self.handles.append(on.own_flags(m.register_forward_pre_hook(on.pre, with_kwargs=True)))
            self.handles.append(on.own_flags(m.register_forward_hook(on.post, always_call=True)))
        self.pruned = False

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if module not in self.modules:
            return
        if self.depth == 0 and self.outermost is not None and not self.pruned:
            self._prune()  # here, not in _post: see there
        if self.depth == 0 and (not self.pruned or (self.args and module is self.args[0])):
            self.args = (module, tuple(args), dict(kwargs))
        if not self.pruned:
            self.depth += 1

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if module not in self.modules:
            return
        self.depth = max(0, self.depth - 1)
        if self.depth == 0 and not self.pruned and self.args is not None:
            if sys.exc_info()[0] is not None:
                # The call raised (a LightningModule without forward, called by an init
                # check): its module is no model input, and torch is iterating this
                # module's hook dict to run the always-called hooks: change nothing now.
                self.args = None
                return
            self.outermost = self.args[0]  # pruned at the next call's start (removing hooks
            # here would change the dict torch may be iterating)

    def _prune(self) -> None:
        assert self.outermost is not None
        self.close()
        self.pruned = True
        self.handles = [self._on.own_flags(
            self.outermost.register_forward_pre_hook(self._on.pre, with_kwargs=True))]

    def latest(self) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]] | None:
        return self.args

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _Pins(HookOwner):
    """The owner of a link cache's hook on the model (see :meth:`LinkCache._look_again`)."""

    def __init__(self, cache: LinkCache) -> None:
        self.cache = cache


class _PinHooks(Hooks):
    """A link cache's hook on the model (see :class:`~relu_doctor._hooks.Hooks`)."""

    __slots__ = ()
    owner: _Pins

    def post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self.owner.cache._after(module, args, kwargs, output)


class LinkCache:
    """The unit links of a model's sites, from one pass recorded when first needed.

    Until then it keeps a reference to the arguments of the model's latest call
    (:class:`~relu_doctor.remedies.dataflow.InputTap`); the first :meth:`links` records one
    extra pass without gradients on them (two samples when batched), which no probe
    records, and drops the reference. What remedies that need producers and consumers
    (:class:`~relu_doctor.remedies.recycle.DormantRecycler`) hold.

    Args:
        model: the model.
        example_inputs: input(s) to record the pass on instead (a tensor or a tuple).
    """

    def __init__(self, model: nn.Module, *, example_inputs: Any = None) -> None:
        self.model = model
        self._links: dict[SiteKey, UnitLinks] = {}
        self._flow: Dataflow | None = None
        self._error: str | None = None
        self._tap: InputTap | None = None
        self._example: tuple[nn.Module, tuple[Any, ...], dict[str, Any]] | None = None
        #: the pass's inputs, two samples where batched: to record again where a module the
        #: links name left the model (a head replaced under the same path)
        self._again: tuple[nn.Module, tuple[Any, ...], dict[str, Any]] | None = None
        # Sites the recorded pass did not run (a branch it did not take), looked for again
        # (see _look_again): the inputs of the latest recorded pass that ran each (and the
        # pass's number), the pass recorded on them, and a hook on the module called then
        self._missing: set[SiteKey] = set()
        self._pinned: dict[SiteKey, tuple[int, tuple[nn.Module, tuple[Any, ...], Any]]] = {}
        self._retry: tuple[object, Dataflow | None] | None = None
        #: hooks on the modules recorded passes begin at, with their paths (_look_again)
        self._watches: dict[nn.Module, tuple[Any, str]] = {}
        self._recording = False
        self._probe: Any = None  # the bound Doctor's (see watch_with)
        if example_inputs is not None:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            self._example = (model, args, {})
        else:
            self._tap = InputTap(model)

    def dataflow(self, name: str) -> Dataflow:
        """The recorded pass (recorded on the first call)."""
        if self._flow is None and self._error is None:
            example = self._example or (self._tap.latest() if self._tap is not None else None)
            if example is None:
                raise ReluDoctorError(
                    f"site {name!r}: no forward pass of the model seen yet to read its "
                    "producer and consumers from; run one, or pass example_inputs=."
                )
            try:
                self._flow, self._error = record_latest(self.model, *example)
            except NotInPass as e:  # skipped for now: a later call's inputs tried next time
                raise NotInPass(f"site {name!r}: {e}") from None
            # Copies of two samples (a view would hold the batch); inputs that are not a batch
            # to cut down (a batch of two, a mask of another first dim) are not kept at all.
            small = _shrink(example[1], example[2])
            self._again = None if small is None else (example[0], *tree_map(
                lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, small))
            self.close()
        if self._flow is None:
            raise ReluDoctorError(f"site {name!r}: {self._error}")
        return self._flow

    def links(self, key: SiteKey, name: str) -> UnitLinks:
        """The (cached) links of the site ``key`` (display name ``name``); read again from a
        new pass where a module they name is no longer in the model."""
        cached = self._links.get(key)
        if cached is not None and not self._current(cached):
            if self._again is None:
                raise ReluDoctorError(
                    f"site {name!r}: a layer its producer and consumers were read from left "
                    "the model (replaced), and the inputs to read them again were not kept "
                    "(not a batch of more than two samples): left alone.")
            self._links.clear()  # (every site's: the pass is of a model that changed)
            self._flow, self._error, self._example = None, None, self._again
        if key not in self._links:
            flow = self.dataflow(name)
            try:
                self._links[key] = find_unit_links(self.model, site=key, dataflow=flow, name=name)
            except NotInPass:
                self._links[key] = self._look_again(key, name)
        return self._links[key]

    def _look_again(self, key: SiteKey, name: str) -> UnitLinks:
        """The links of a site the recorded pass did not run (a branch it did not take),
        from a pass recorded on the inputs of the latest training pass that ran it (whole:
        a branch the first two samples do not take is taken by others), kept from then on
        by hooks on the modules the bound Doctor's recorded passes begin at (the model, or
        each part a loop calls on its own: a projector called apart from its encoder ran
        in passes of its own, which a hook on the first pass's module never saw), where its
        probe says which sites a pass ran (:meth:`watch_with`). One pass per such inputs,
        shared by the sites they ran. Raises NotInPass while none was seen; a site found,
        or refused for good, is looked for no more, and once none is, nothing is kept."""
        self._missing.add(key)
        self._pin_where_passes_begin()
        pinned = self._pinned.get(key)
        if pinned is None:
            raise NotInPass(f"site {name!r}: the recorded forward pass did not run it (a "
                            "branch it did not take); looked for again once a pass runs it")
        call = pinned[1]
        if self._retry is None or self._retry[0] is not call:
            self._recording = True
            try:
                flow, _ = record_latest(self.model, call[0], call[1], call[2], shrink=False)
            except NotInPass:
                flow = None
            finally:
                self._recording = False
            self._retry = (call, flow)
        if self._retry[1] is None:
            self._pinned.pop(key, None)  # (not those inputs again)
            raise NotInPass(f"site {name!r}: the forward pass that finds its producer and "
                            "consumers failed on the inputs that ran it; tried again later")
        try:
            links = find_unit_links(self.model, site=key, dataflow=self._retry[1], name=name)
        except NotInPass:
            # Not run again on the inputs that ran it in training: the model's own state
            # chose the branch (a step counter, a flag), which replaying inputs cannot
            # reproduce. Refused for good, saying so.
            self._found(key)
            raise ReluDoctorError(
                f"site {name!r}: a pass recorded again on the inputs of a training pass that "
                "ran it did not run it: its branch is chosen by the model's state (a step "
                "counter, a flag), not by its inputs, so its producer and consumers cannot be "
                "read. Exclude this site.") from None
        except ReluDoctorError:
            self._found(key)  # refused for good: looked for no more
            raise
        self._found(key)
        return links

    def _pin_where_passes_begin(self) -> None:
        """A hook (see :meth:`_after`) on each module the bound Doctor's recorded passes
        began at so far and not hooked yet."""
        probe = self._probe
        if probe is None or not probe.attached:
            return
        for path in sorted(probe.pass_starts()):
            try:
                module = probe.model.get_submodule(path)
            except AttributeError:  # (no longer in the model)
                continue
            if module not in self._watches:
                hooks = _PinHooks(_Pins(self))
                self._watches[module] = (hooks.own_flags(
                    module.register_forward_hook(hooks.post, with_kwargs=True)), path)

    def _found(self, key: SiteKey) -> None:
        self._missing.discard(key)
        self._pinned.pop(key, None)
        if not self._missing:
            self.release()

    def watch_with(self, probe: Any) -> None:
        """Find missing sites through ``probe`` (a bound Doctor's: which sites its latest
        recorded pass ran), letting go of what is kept for them when it detaches."""
        self._probe = probe
        probe.on_detach(self.release)

    def release(self) -> None:
        """Keep nothing for the sites looked for again (the hook, their inputs, the pass
        recorded on them): training ended, or none is missing. A later decision that
        looks for one again starts anew."""
        for handle, _ in self._watches.values():
            handle.remove()
        self._watches = {}
        self._pinned.clear()
        self._retry = None

    def _after(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """After a call of a module passes begin at: keep its inputs for each missing site
        that this call, a recorded pass begun there, ran (one object for all of them). A
        call that was no recorded pass (the encoder alone under no_grad(), for an
        evaluation) is passed over: the latest recorded pass, which ran the site, was
        another module's, and its inputs replayed here would not run it (a trial's
        projector was then refused for good, its branch said to be chosen by a flag)."""
        probe = self._probe
        if probe is None or self._recording:
            return
        if not probe.attached:  # (the Doctor is gone: keep nothing)
            self.release()
            return
        hooked = self._watches.get(module)
        if hooked is None or probe.latest_pass_at != hooked[1]:
            return
        call = None
        for key in self._missing:
            n = probe.ran_now(key)
            if n is not None and (key not in self._pinned or self._pinned[key][0] != n):
                call = call or (module, tuple(args), dict(kwargs))
                self._pinned[key] = (n, call)

    def _current(self, links: UnitLinks) -> bool:
        """Whether every module ``links`` names is still in the model at its path (a lookup
        by path: this runs for every site at every decision)."""
        named = [(links.producer_path, links.producer), *((c.path, c.module) for c in
                 links.consumers), *((n.path, n.module) for n in links.norms)]
        for path, module in named:
            try:
                if self.model.get_submodule(path) is not module:
                    return False
            except AttributeError:  # (nothing there any more)
                return False
        return True

    def links_everywhere(
        self, sites: Sequence[tuple[SiteKey, str]], *, doctor: Any = None
    ) -> dict[str, UnitLinks | str]:
        """Each site's links (:meth:`links`), or why they were not found (an error
        message naming the site), by name.

        With several processes (``doctor``'s ``all_reduce``), a site's links count only
        where every process found them, in one cross-process sum of the sites' flags: each
        process reads them from a pass on its own inputs, and a branch or an expert its
        inputs did not run (an MoE router that sent them elsewhere) has no links there. A
        remedy acting where this process found them would change one replica and not the
        others. ``sites`` must be the same on every process (read from the same record), in
        any order (a record's rows follow each process's order of first runs)."""
        found: dict[str, UnitLinks | str] = {}
        for key, name in sorted(sites, key=lambda kn: kn[1]):  # (one order everywhere)
            try:
                found[name] = self.links(key, name)
            except NotInPass as e:
                found[name] = Later(e)
            except ReluDoctorError as e:
                found[name] = str(e)
        if not found or getattr(doctor, "all_reduce", None) is None:
            return found
        flags = [1.0, *(float(isinstance(v, UnitLinks)) for v in found.values())]
        summed = doctor.reduce_sum(
            [torch.tensor(flags, dtype=torch.float64, device=model_device(self.model))]
        )[0].tolist()
        world = summed[0]
        for (name, value), n in zip(found.items(), summed[1:], strict=True):
            if isinstance(value, UnitLinks) and n < world:  # (the others: NotInPass)
                found[name] = Later(
                    f"site {name!r}: its producer and consumers were found on {round(n)} of "
                    f"{round(world)} processes only (a branch or an expert that the others' "
                    "inputs did not run): left alone on every process for now, so that the "
                    "replicas stay the same, and looked for again at a later log"
                )
        return found

    def close(self) -> None:
        """Stop keeping the model's latest inputs."""
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        self._example = None
