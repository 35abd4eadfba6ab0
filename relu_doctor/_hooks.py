"""Module hooks that can be parked between the steps that use them.

A module with any forward hook takes ``nn.Module._call_impl``'s slow path at every call, even
when the hook returns at once: on a step that collects nothing, five hook calls per activation
call cost a model with hundreds of activation sites about 4% of its step. Parking takes the
hooks out of torch's hook dicts, so those calls take the fast path again; unparking puts each
back under its handle's id and in its place among the other hooks of that dict (the user's,
another probe's), so the handles still remove them and the call order is what it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet"]


class HookSet:
    """The module hooks of one owner (a probe, functional capture), parked together.

    Only the dicts ``nn.Module._call_impl`` tests for its fast path are emptied (forward and
    pre-forward hooks); the flag dicts beside them (``always_call``, ``with_kwargs``) are read
    only for hooks found in those, so they keep their entries. Parking works per dict: one
    holding only our hooks is cleared and refilled in one call each. Sets parked in one order
    stay on that path when unparked in the reverse order (any order is correct).
    """

    def __init__(self) -> None:
        self._handles: dict[int, RemovableHandle] = {}
        # {id(hook dict): (the dict, ids of our hooks in it)}, remade after add/remove
        self._dicts: dict[int, tuple[dict[int, Any], set[int]]] | None = None
        # While parked, {id(hook dict): (the dict, its items before, ids of ours taken out,
        # the other ids it then held in order, or None when it held only ours)}
        self._parked: dict[int, _Parked] | None = None

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
            rec = self._parked.get(id(d))
            if rec is None:
                self._parked[id(d)] = _take(d, {handle.id})
            else:  # as if it had been there, last, when the dict was parked
                rec[1].append((handle.id, d.pop(handle.id)))
                rec[2].add(handle.id)
        return handle

    def remove(self, handles: Iterable[RemovableHandle]) -> None:
        """Remove these hooks for good, parked or not."""
        gone = set()
        for h in handles:
            h.remove()
            self._handles.pop(h.id, None)
            gone.add(h.id)
        self._dicts = None
        for _d, items, ours, _rest in (self._parked or {}).values():
            if gone & ours:
                ours -= gone
                items[:] = [kv for kv in items if kv[0] not in gone]

    def clear(self) -> None:
        """Remove every hook of the set for good; the set is left unparked and empty."""
        self.remove(list(self._handles.values()))
        self._parked = None

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
        parked: dict[int, _Parked] = {}
        for k, (d, ours) in self._dicts.items():  # (the sets are remade after add/remove)
            if ours.issuperset(d):  # the common case, inline: ours only
                parked[k] = (d, list(d.items()), ours, None)
                d.clear()
            else:
                parked[k] = _take(d, ours)
        self._parked = parked

    def unpark(self) -> None:
        """Put the hooks back where they were (idempotent). A hook added meanwhile keeps its
        place among the others; one of ours goes back before the first hook that followed it
        and is still there."""
        parked, self._parked = self._parked, None
        for d, items, ours, rest in reversed((parked or {}).values()):
            if (not d) if rest is None else (list(d) == rest):  # as it was left
                d.clear()
                d.update(items)
                continue
            pos = {k: i for i, (k, _) in enumerate(items)}
            mine = [(k, v) for k, v in items if k in ours]
            now = list(d.items())
            d.clear()
            j = 0
            for k, v in now:
                if k in pos:
                    while j < len(mine) and pos[mine[j][0]] < pos[k]:
                        d[mine[j][0]] = mine[j][1]
                        j += 1
                d[k] = v
            d.update(mine[j:])


_Parked = tuple[dict[int, Any], list[tuple[int, Any]], set[int], list[int] | None]


def _take(d: dict[int, Any], ours: set[int]) -> _Parked:
    """Take the hooks ``ours`` out of the hook dict ``d``; what unparking needs."""
    items = list(d.items())
    if ours.issuperset(d):
        d.clear()
        return d, items, ours, None
    rest = [k for k, _ in items if k not in ours]
    for k in ours:
        d.pop(k, None)
    return d, items, ours, rest
