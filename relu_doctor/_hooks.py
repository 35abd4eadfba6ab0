"""Module hooks that can be parked between the steps that use them, and that a deep-copied
or pickled model carries harmlessly.

A module with any forward hook takes ``nn.Module._call_impl``'s slow path at every call, even
when the hook returns at once: on a step that collects nothing, five hook calls per activation
call cost a model with hundreds of activation sites about 4% of its step. Parking takes the
hooks out of torch's hook dicts, so those calls take the fast path again; unparking puts each
back under its handle's id and in its place among the other hooks of that dict (the user's,
another probe's), so the handles still remove them and the call order is what it was.

Each hook dict with parked hooks has one ledger, shared by every :class:`HookSet` that parked
hooks from it: the dict's order when its first hook was parked, and the hooks taken out. Sets
may unpark in any order; each puts its hooks back by that order. A set whose dicts hold its
hooks alone (a watched model's usual case) needs no ledger: it parks them whole, in one pass
(see :class:`HookSet`).

``torch.compile`` bakes into its graph the hooks a module has when Dynamo traces it, and by
default never looks at them again (``skip_nnmodule_hook_guards``): a model first traced while
the hooks were parked would never call them. So nothing is parked unless Dynamo can tell us
when it starts compiling (:func:`compile_watch`): then every parked set is put back first.

A module's hook dicts are part of the module: ``copy.deepcopy(model)`` copies them (a target
network, an EMA teacher) and ``torch.save(model)`` pickles them. Every hook relu_doctor puts
on a user's module is a bound method of a small :class:`Hooks` object, which deep-copies and
pickles as an :class:`Inert` placeholder (see there), never as the probe, model
and run directory behind it: a closure would make saving a watched model mid-run raise. The
probe itself (a :class:`HookOwner`) refuses to be pickled, with a message that says what to
do instead, and copies as itself.
"""

from __future__ import annotations

import functools
import itertools
import sys
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookOwner", "HookSet", "Hooks", "Inert", "compile_watch"]


class HookOwner:
    """The live monitor of one model's run (a Doctor, its probe and functional capture,
    ReDo's input tap). Pickling one raises a clear TypeError, instead of giving half of a
    run, whose model, files and step are not in it; ``copy.copy`` and ``copy.deepcopy`` give
    the object itself (a deep copy of a Trainer or a callback holding it shares the
    monitor; a deep copy of the model gets inert placeholders for its hooks). The hooks it
    puts on modules are those of a :class:`Hooks` object."""

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"relu_doctor's {type(self).__name__} (the monitor of a watched model's run) can't "
            "be pickled. torch.save(model) and copy.deepcopy(model) work while it watches "
            "and give the model unwatched (watch a copy with a Doctor of its own); the run's "
            "statistics are saved with doctor.save(...) or its run directory."
        )


class Hooks:
    """The hooks a :class:`HookOwner` puts in a user's module hook dicts: bound methods of
    this small object, each calling the owner's method of the same purpose.

    ``copy.deepcopy(model)`` and ``torch.save(model)`` (``pickle``) get an :class:`Inert`
    placeholder: the copy is not watched, holds nothing of the run (no probe, Doctor or run
    directory, which a copy kept alive as long as it lived: an EMA or target network), and
    its hooks take themselves out at their first call. (``copy.copy`` shares the hook dicts:
    the hooks leave alone modules not of the owner's model.)
    """

    __slots__ = ("owner",)

    def __init__(self, owner: HookOwner) -> None:
        self.owner = owner

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return Inert()

    def __reduce__(self) -> tuple[type[Inert], tuple[int]]:
        return (Inert, (RemovableHandle.next_id,))

    def own_flags(self, handle: RemovableHandle) -> RemovableHandle:
        """Make this object the value of ``handle``'s entries in the flag dicts beside its
        hook dict (``always_call``, ``with_kwargs``; torch reads only their keys). A module
        saved while the hook is parked (out of its dict) still holds the flag: its value
        pickles as a placeholder too, whose unpickling moves the handle ids on (see
        :class:`Inert`), so no hook registered on the loaded model takes the flag. Returns
        ``handle``."""
        for ref in handle.extra_dict_ref:
            flags = ref()
            if flags is not None and handle.id in flags:
                flags[handle.id] = self
        return handle


# The hook dicts of nn.Module a placeholder may be in, each with the flag dicts keyed like it.
_HOOK_DICTS = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_backward_pre_hooks": (),
    "_backward_hooks": (),
    "_state_dict_pre_hooks": (),
    "_state_dict_hooks": (),
    "_load_state_dict_pre_hooks": (),
    "_load_state_dict_post_hooks": (),
}


class Inert:
    """A :class:`Hooks` object unpickled: each of its hooks (pickled as
    ``getattr(hooks, name)``) is :meth:`_off`. Unpickling needs relu_doctor importable, as
    torch's own hooks need torch.

    A module pickles its hook dicts and their flag dicts (``with_kwargs``, ``always_call``)
    keyed by handle ids, which restart from 0 in a new process: a hook registered there on
    the loaded module could take a placeholder's id and, with it, the placeholder's flags
    (a plain pre-hook then called with kwargs). So unpickling one moves the process's next
    handle id past every id of the process that pickled it, as torch does when it unpickles
    a ``RemovableHandle``. Flags of hooks parked when the model was saved (see
    :meth:`Hooks.own_flags`) stay in the loaded model with no hook behind them: torch reads
    a flag only for a hook in the dict, and no new hook can take their ids.
    """

    def __init__(self, next_id: int = 0) -> None:
        self.next_id = next_id
        if RemovableHandle.next_id < next_id:
            RemovableHandle.next_id = next_id

    def __reduce__(self) -> tuple[type[Inert], tuple[int]]:
        # a loaded model saved again before its first call: the ids of both processes
        return (Inert, (max(self.next_id, RemovableHandle.next_id),))

    @property
    def owner(self) -> Inert:  # (a Hooks method bound to a placeholder: its owner's too)
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._off

    def _off(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing; called by a module, take every placeholder out of its hook dicts, so
        that it takes torch's fast path again (not while torch runs the always-called hooks
        of a forward that raised: torch iterates the dict itself then). Their flags stay in
        the flag dicts beside them: torch calls the hooks of this forward from a copy of the
        dict taken before, each as its flag says (a ``with_kwargs`` pre-hook of a deep copy,
        a method of its class bound to a placeholder, called without its kwargs raised), and
        reads a flag only for a hook in the dict, which no later hook can take (see
        :class:`Inert`)."""
        module = args[0] if args else None
        if isinstance(module, nn.Module) and sys.exc_info()[0] is None:
            state = module.__dict__
            for name in _HOOK_DICTS:
                d = state.get(name) or {}
                for key in [k for k, h in d.items() if _inert(h)]:
                    del d[key]


def _inert(hook: Any) -> bool:
    return isinstance(getattr(hook, "__self__", None), Inert)


class _Ledger:
    """One hook dict while hooks are parked from it."""

    __slots__ = ("__weakref__", "d", "known", "order", "taken")

    def __init__(self, d: dict[int, Any]) -> None:
        self.d = d
        self.order = list(d)  # every id it held, in order, from the first park on
        self.known = set(self.order)
        self.taken: dict[int, Any] = {}  # id -> hook, out of the dict now

    def merge_new(self) -> None:
        """Add the ids the dict gained since to :attr:`order`, where torch put them: first
        (``prepend=True``) or last. Handle ids only grow and torch puts an appended hook
        after every older one, so a new id with a smaller id after it was prepended. One with
        none after it may be either; it is taken as appended (the default), which is wrong
        only for a hook prepended while ours were out and no older hook was left in the dict
        (a watched activation's dicts, while parked, hold none): it then runs after ours.
        Ours never change an output, so only a hook that does sees a difference."""
        known, d = self.known, self.d
        if d.keys() <= known:
            return
        front: list[int] = []
        back: list[int] = []
        smallest_after: int | None = None
        for k in reversed(d):
            if k not in known:
                if smallest_after is not None and smallest_after < k:
                    front.append(k)
                else:
                    back.append(k)
            if smallest_after is None or k < smallest_after:
                smallest_after = k
        front.reverse()
        back.reverse()
        self.order = front + self.order + back
        known.update(front, back)

    def restore(self, ids: set[int]) -> None:
        """Put the hooks ``ids`` back, every hook of the dict in :attr:`order`."""
        d, taken = self.d, self.taken
        if not d and taken.keys() <= ids and list(taken) == self.order:
            d.update(taken)  # the common case: all of it returns, to an empty dict
            taken.clear()
            return
        self.merge_new()
        back = {k: taken.pop(k) for k in ids if k in taken}
        now = dict(d)
        d.clear()
        for k in self.order:
            if k in back:
                d[k] = back[k]
            elif k in now:
                d[k] = now[k]
        # forget ids gone for good (a ledger kept by another set's parked hooks must not grow)
        self.order = [k for k in self.order if k in d or k in taken]
        self.known = set(self.order)

    @classmethod
    def after(cls, d: dict[int, Any], ours: dict[int, Any]) -> _Ledger:
        """A ledger of ``d`` as if made when ``ours`` were all it held and were taken out
        (see :meth:`HookSet.park`): what it holds now came later."""
        ledger = cls({})
        ledger.d, ledger.order, ledger.known = d, list(ours), set(ours)
        ledger.taken.update(ours)
        return ledger


# id(hook dict) -> the set that parked it whole, weakly, while it is so parked (see HookSet)
_whole_dicts: dict[int, weakref.ref[HookSet]] = {}
# id(hook dict) -> its ledger, while a set keeps one. Held by the sets that park from it, not
# here: a Doctor dropped without detach() while parked must not keep its model alive.
# (Plain weak references, not a WeakValueDictionary: its Python-level get and set made a park
# half as costly again.)
_ledgers: dict[int, weakref.ref[_Ledger]] = {}


def _forget(ref: weakref.ref[_Ledger], key: int) -> None:
    if _ledgers.get(key) is ref:
        del _ledgers[key]


class HookSet:
    """The module hooks of one owner (a probe and its functional capture), parked together.

    Only the dicts ``nn.Module._call_impl`` tests for its fast path are emptied (forward and
    pre-forward hooks); the flag dicts beside them (``always_call``, ``with_kwargs``) are read
    only for hooks found in those, so they keep their entries.

    A watched model's usual case has a faster way: where every dict holds the set's hooks
    and nothing else and no other set has hooks parked from them, a park pops them all, and
    an unpark sets them back, each in one C loop (``map`` over the dicts' own methods, a
    list of ours kept from park to park): a seventh of the time of the ledgers' pass per
    dict on a 256-site model. The ledgers take any other case. A whole park turns into
    theirs (:meth:`_to_ledgers`) when a set, this one or another, parks or adds a hook in
    one of its dicts; at its unpark, hooks the user added meanwhile go where the ledgers
    would put them.
    """

    def __init__(self) -> None:
        self._handles: dict[int, RemovableHandle] = {}
        # {id(hook dict): (the dict, ids of our hooks in it)}, remade after add/remove
        self._dicts: dict[int, tuple[dict[int, Any], set[int]]] | None = None
        # id(dict) -> (its ledger, our ids taken out while parked), kept from one park to the
        # next (let go when hooks are removed): a park then makes no new objects. A
        # 256-site model's thousands of new ones a park lived across the steps that followed
        # into the cyclic GC's oldest generation, whose full collections of a torch process
        # take 100 ms and more.
        self._kept: dict[int, tuple[_Ledger, set[int]]] = {}
        self._parked: dict[int, tuple[_Ledger, set[int]]] | None = None  # _kept, while parked
        # The whole-set park (remade with _dicts): each of our hooks' dict and id, in the
        # dicts' order, the dicts' sizes and ids, their one type (else None: no whole park),
        # and the hooks popped (kept empty while unparked)
        self._all: list[dict[int, Any]] = []
        self._flat: tuple[list[dict[int, Any]], list[int]] = ([], [])
        self._sizes: list[int] = []
        self._ids: set[int] = set()
        self._kind: type[dict[int, Any]] | None = None
        self._popped: list[Any] = []
        self._whole = False  # parked that way
        self._gone: set[int] = set()  # removed while parked whole
        self._marks: dict[int, weakref.ref[HookSet]] = {}  # for _whole_dicts, while so

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def parked(self) -> bool:
        return self._parked is not None

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Own ``handle`` (parked at once while the set is parked); returns it."""
        self._handles[handle.id] = handle
        self._dicts = None
        d = handle.hooks_dict_ref()
        if self._parked is not None and d is not None and handle.id in d:
            if self._whole:
                self._to_ledgers()
            self._take(d, {handle.id})
        return handle

    def remove(self, handles: Iterable[RemovableHandle]) -> None:
        """Remove these hooks for good, parked or not."""
        for h in handles:
            h.remove()
            self._handles.pop(h.id, None)
            if self._whole:
                self._gone.add(h.id)
            for key, (ledger, ids) in (self._parked or {}).items():
                if h.id in ids:
                    ids.discard(h.id)
                    ledger.taken.pop(h.id, None)
                    _drop_if_empty(key, ledger)
        self._dicts = None
        if self._parked is None:
            self._kept = {}

    def park(self) -> None:
        """Take the hooks out of their modules (idempotent)."""
        if self._parked is not None:
            return
        if self._dicts is None:
            self._dicts = {}
            for h in self._handles.values():
                d = h.hooks_dict_ref()
                if d is not None and h.id in d:
                    self._dicts.setdefault(id(d), (d, set()))[1].add(h.id)
            self._plan_whole()
        self._parked = self._kept
        _parked_sets.add(self)
        kind, (dicts, ids) = self._kind, self._flat
        if (
            kind is not None
            and self._ids.isdisjoint(_ledgers)
            and self._ids.isdisjoint(_whole_dicts)
            and list(map(len, self._all)) == self._sizes
            and all(map(kind.__contains__, dicts, ids))
        ):
            self._popped.extend(map(kind.pop, dicts, ids))
            _whole_dicts.update(self._marks)
            self._whole = True
            return
        for d, ours in self._dicts.values():
            self._take(d, ours)

    def _plan_whole(self) -> None:
        """Lay out the whole-set park for the current :attr:`_dicts`."""
        assert self._dicts is not None
        self._all = [d for d, _ in self._dicts.values()]
        pairs = [(d, k) for d, ours in self._dicts.values() for k in d if k in ours]
        self._flat = ([d for d, _ in pairs], [k for _, k in pairs])
        self._sizes = [len(ours) for _, ours in self._dicts.values()]
        self._ids = set(self._dicts)
        self._marks = dict.fromkeys(self._ids, weakref.ref(self, _unmark))
        kinds = {type(d) for d in self._all}  # torch's are OrderedDicts: their own methods
        self._kind = kinds.pop() if len(kinds) == 1 else None  # keep the order they hold

    def _take(self, d: dict[int, Any], ours: set[int]) -> None:
        assert self._parked is not None
        key = id(d)
        owner = _whole_dicts.get(key)  # another set parked it whole: into ledgers first
        if owner is not None and (other := owner()) is not None:
            other._to_ledgers()
        ref = _ledgers.get(key)
        ledger = None if ref is None else ref()
        if ledger is None:
            ledger = _Ledger(d)
            _ledgers[key] = weakref.ref(ledger, functools.partial(_forget, key=key))
        else:
            ledger.merge_new()
        entry = self._parked.get(key)
        if entry is None or entry[0] is not ledger:  # (an emptied ledger is dropped)
            entry = self._parked[key] = (ledger, set())
        ids = entry[1]
        if ours.issuperset(d):  # the common case: the dict holds only ours
            ledger.taken.update(d)
            ids.update(d)
            d.clear()
            return
        for k in ours:
            if k in d:
                ledger.taken[k] = d.pop(k)
                ids.add(k)

    def unpark(self) -> None:
        """Put the hooks back where they were (idempotent); see :class:`_Ledger`."""
        parked, self._parked = self._parked, None
        _parked_sets.discard(self)
        if self._whole:
            self._whole = False
            deque(map(_whole_dicts.pop, self._ids, itertools.repeat(None)), maxlen=0)
            if self._gone or any(self._all):  # (the user added hooks, or we removed some)
                for d, ours in self._popped_by_dict().values():
                    _ledger_of(d, ours).restore(set(ours))
            else:
                assert self._kind is not None
                deque(map(self._kind.__setitem__, *self._flat, self._popped), maxlen=0)
            self._popped.clear()
        for ledger, ids in (parked or {}).values():
            ledger.restore(ids)
            ids.clear()
        if self._dicts is None:  # hooks added or removed while parked: let go at once
            self._kept = {}
        elif self._kept and all(len(d) == len(ours) for d, ours in self._dicts.values()):
            self._kept = {}  # the dicts hold only ours again: the next park can be whole

    def _popped_by_dict(self) -> dict[int, tuple[dict[int, Any], dict[int, Any]]]:
        """The hooks of a whole park, by dict (those removed since left out)."""
        out: dict[int, tuple[dict[int, Any], dict[int, Any]]] = {}
        for d, k, hook in zip(*self._flat, self._popped, strict=True):
            if k not in self._gone:
                out.setdefault(id(d), (d, {}))[1][k] = hook
        self._gone.clear()
        return out

    def _to_ledgers(self) -> None:
        """Hold this whole park in ledgers from now on: a set (this one or another) parks
        or adds hooks in one of its dicts, which the ledgers' order must then know."""
        assert self._whole and self._parked is not None
        self._whole = False
        deque(map(_whole_dicts.pop, self._ids, itertools.repeat(None)), maxlen=0)
        for key, (d, ours) in self._popped_by_dict().items():
            ledger = _ledger_of(d, ours)
            _ledgers[key] = weakref.ref(ledger, functools.partial(_forget, key=key))
            self._parked[key] = (ledger, set(ours))
        self._popped.clear()


def _unmark(ref: weakref.ref[HookSet]) -> None:
    """A set dropped while parked whole (a Doctor never detached): its marks go with it."""
    for key in [k for k, v in _whole_dicts.items() if v is ref]:
        del _whole_dicts[key]


def _ledger_of(d: dict[int, Any], ours: dict[int, Any]) -> _Ledger:
    """The ledger of ``d``, from which a whole park took ``ours``, all it held then: what it
    holds now came later, and goes before or after ours as :meth:`_Ledger.merge_new` tells;
    ours are in its :attr:`~_Ledger.taken`."""
    ref = _ledgers.get(id(d))
    ledger = None if ref is None else ref()
    if ledger is None:
        return _Ledger.after(d, ours)
    ledger.merge_new()  # (another set's, made since: not while our whole park is marked)
    ledger.order = [*ours, *(k for k in ledger.order if k not in ours)]
    ledger.known.update(ours)
    ledger.taken.update(ours)
    return ledger


def _drop_if_empty(key: int, ledger: _Ledger) -> None:
    if not ledger.taken:
        ref = _ledgers.get(key)
        if ref is not None and ref() is ledger:
            del _ledgers[key]


# ---------------------------------------------------------------------------- torch.compile
_parked_sets: weakref.WeakSet[HookSet] = weakref.WeakSet()
_handler: Any = None  # Dynamo's callback handler, once imported; False: this torch has none


def compile_watch() -> bool:
    """Have Dynamo put every parked set back when it starts compiling; False where this torch
    has no such callback (then nothing may be parked). ``torch._dynamo.reset()`` clears the
    callbacks: the handler's ``clear`` is wrapped to register ours again at once (a compile
    right after a reset, on a parked step, must still see the hooks), and every park checks
    it is there. The first call imports ``torch._dynamo`` (about a second; Lightning, Keras
    and transformers have imported it already)."""
    global _handler
    if _handler is None:
        try:
            from torch._dynamo.callback import callback_handler

            clear = callback_handler.clear

            def clear_and_watch() -> None:  # torch._dynamo.reset() clears every callback
                clear()
                callback_handler.register_start_callback(_compiling)

            callback_handler.clear = clear_and_watch  # type: ignore[method-assign]
            _handler = callback_handler
        except Exception:  # another torch: no callback, no parking
            _handler = False
    if _handler is False:
        return False
    if _compiling not in _handler.start_callbacks:
        _handler.register_start_callback(_compiling)
    return True


def _compiling(*args: Any) -> None:
    """Dynamo starts compiling a frame: the hooks must be in place while it traces (they then
    return at once on a step that collects nothing, and Dynamo guards on that flag)."""
    for hooks in list(_parked_sets):
        hooks.unpark()
