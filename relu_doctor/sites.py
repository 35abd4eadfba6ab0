"""Site identity: :class:`SiteKey` (which call of which module, or which functional op) and
:class:`Site` (what was found there: family, unit dim and the rule that chose it, units).

A site's identity travels as a :class:`SiteKey` value from the hooks to the remedies and the
run directory. Display names (``layer1.0.relu#1``, ``features.dense1:relu#0``) are made from
keys by :func:`display_names` for people and file columns; nothing parses a name back into a
key, so a module called ``enc:act`` or ``a#1`` is as good as any other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from relu_doctor.families import Family
from relu_doctor.stats import SiteStats

__all__ = ["NO_GRADIENT", "ROOT_LABEL", "FrozenFeeds", "Site", "SiteKey", "display_names", "frozen_feed", "module_label"]

ROOT_LABEL = "(root)"


#: a site's ``frozen`` (in place of the frozen layer feeding it) where no gradient reached
#: its calls in a window whose passes had gradients on, and no layer of the model was found
#: making its input: a frozen teacher held outside the model called under ``torch.no_grad()``
#: in its forward, a model of which nothing trains watched with ``stream="all"``
NO_GRADIENT = "(no gradient)"


def module_label(path: str) -> str:
    """A module path as shown to people: the root module (``""``) is ``(root)``."""
    return path if path else ROOT_LABEL


def _feed(model: nn.Module, producer: str | None) -> tuple[nn.Module, nn.Module] | None:
    """(the layer at ``producer``, the block holding it), or None: no producer, or a module
    gone since. A layer of the root is held by the whole model (frozen where nothing in it
    trains: a frozen teacher watched on its own)."""
    if producer is None:
        return None
    try:
        return model.get_submodule(producer), model.get_submodule(producer.rpartition(".")[0])
    except AttributeError:
        return None


def _frozen(
    feed: tuple[nn.Module, nn.Module] | None, trains: dict[nn.Module, bool] | None = None
) -> bool:
    """Whether ``feed`` (:func:`_feed`) is frozen; ``trains``: whether each block trains,
    as found so far in one pass over a model's sites (a block is walked once)."""
    if feed is None:
        return False
    own = [p for p in feed[0]._parameters.values() if p is not None]
    # (the layer's own first: where it trains, no walk over a block of hundreds of layers)
    if not own or any(p.requires_grad for p in own):
        return False
    trains = {} if trains is None else trains
    if feed[1] not in trains:
        trains[feed[1]] = any(p.requires_grad for p in feed[1].parameters())
    return not trains[feed[1]]


def frozen_feed(model: nn.Module, producer: str | None) -> bool:
    """Whether the layer at ``producer`` (a site's :attr:`Site.producer`) and the block
    holding it (its parent: a frozen backbone) have parameters and none trains
    (``requires_grad=False``): what feeds the site's units is frozen. A frozen base layer
    beside a trainable adapter, a frozen layer in a trainable block or a layer no longer in
    the model is not."""
    return _frozen(_feed(model, producer))


class FrozenFeeds:
    """:func:`frozen_feed` of a model's sites at each log, their modules looked up once per
    ``generation`` (:attr:`Probe.generation <relu_doctor.probes.Probe.generation>`: bumped
    whenever the model's modules are hooked anew, as after a module was replaced), each
    block walked once per log: 256 sites cost 2.5 ms a log looked up each time, and a
    frozen block of 256 layers walked once per site 142 ms."""

    def __init__(self) -> None:
        self._generation = -1
        self._feeds: dict[str, tuple[nn.Module, nn.Module] | None] = {}

    def layers(
        self, model: nn.Module, producers: Iterable[str | None], generation: int
    ) -> list[str | None]:
        """Each of ``producers`` where what it feeds is frozen, else None."""
        if generation != self._generation:
            self._generation, self._feeds = generation, {}
        trains: dict[nn.Module, bool] = {}
        out: list[str | None] = []
        for producer in producers:
            if producer and producer not in self._feeds:
                self._feeds[producer] = _feed(model, producer)
            out.append(producer if producer and _frozen(self._feeds[producer], trains)
                       else None)
        return out


@dataclass(frozen=True, order=True)
class SiteKey:
    """Which activation call a site is.

    Attributes:
        module_path: dotted path of the activation module, or of the module whose
            ``forward`` made the functional call (``""`` for the root module).
        call_index: which call (of that module, or of that op inside that module) within one
            forward pass, from 0.
        op: the functional op's name (``"relu"``, ``"gelu"``...) for a functional call, None
            for a call of an activation module.

    Example:
        >>> SiteKey("layer1.0.relu", 1).functional
        False
        >>> SiteKey.from_token(SiteKey("enc:act", 0, "relu").token())
        SiteKey(module_path='enc:act', call_index=0, op='relu')
    """

    module_path: str
    call_index: int = 0
    op: str | None = None

    @property
    def functional(self) -> bool:
        """Whether this is a functional call (``F.relu`` inside a ``forward``)."""
        return self.op is not None

    @property
    def kind(self) -> str:
        """``"functional"`` or ``"module"``."""
        return "functional" if self.functional else "module"

    def name(self, reused: bool) -> str:
        """The display name: ``path`` for a module called once per pass, ``path#k`` for one
        called several times (``reused``), ``path:op#k`` for a functional call."""
        label = module_label(self.module_path)
        if self.op is not None:
            return f"{label}:{self.op}#{self.call_index}"
        return f"{label}#{self.call_index}" if reused else label

    def to_dict(self) -> dict[str, Any]:
        return {"module_path": self.module_path, "call_index": self.call_index, "op": self.op}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteKey:
        op = data.get("op")
        return cls(str(data["module_path"]), int(data.get("call_index", 0)),
                   None if op is None else str(op))

    def token(self) -> str:
        """A string that stands for this key (checkpoint dict keys); a JSON array, so it can
        be read back exactly with :meth:`from_token` whatever characters the path holds."""
        return json.dumps([self.module_path, self.call_index, self.op])

    @classmethod
    def from_token(cls, token: str) -> SiteKey:
        path, idx, op = json.loads(token)
        return cls(str(path), int(idx), None if op is None else str(op))


def display_names(keys: Iterable[SiteKey]) -> dict[SiteKey, str]:
    """Display names of all the sites of one model, in the order the keys are given (the
    order sites were first seen).

    A module seen at more than one call index is ``path#k`` at every index (so names do not
    change meaning as calls appear). Names are unique: where two keys would show the same
    name (a module registered as ``"x:relu#0"`` beside the first ``F.relu`` call of module
    ``x``), the later one gets ``~2`` (``~3``...) appended.
    """
    keys = list(keys)
    reused: set[str] = {k.module_path for k in keys if k.op is None and k.call_index > 0}
    out: dict[SiteKey, str] = {}
    taken: set[str] = set()
    for k in keys:
        name = base = k.name(k.module_path in reused)
        n = 1
        while name in taken:
            n += 1
            name = f"{base}~{n}"
        taken.add(name)
        out[k] = name
    return out


@dataclass(eq=False)
class Site:
    """One place where an activation runs in the forward pass, and its accumulators.

    Attributes:
        key: the site's identity.
        family: the activation family.
        unit_dim: the dim holding units in the first call's output (non-negative);
            ``unit_rule`` says why. A call of another rank reads it by :meth:`dim_for`.
        units: number of units.
        order: order of first execution among all sites (0 = nearest the input).
        stats: the on-device accumulators.
        shape: the output shape first seen.
        cap: the upper saturation value (ReLU6, Hardtanh), else None.
        name: the display name (kept current by the probe as sites appear).
        from_end: whether a call of another rank than the first finds its units as far
            from the last dim as the first did (see :meth:`dim_for`); False for a unit dim
            the user gave as a non-negative ``unit_dims`` override.
        other_ranks: the ranks of counted calls other than the first's.
        restored: made from a checkpoint's description and not called since (a call of
            another unit count is then the checkpoint's mismatch, not a reused module).
    """

    key: SiteKey
    family: Family
    unit_dim: int
    unit_rule: str
    units: int
    order: int
    stats: SiteStats
    shape: tuple[int, ...] = ()
    cap: float | None = None
    name: str = ""
    reused: bool = field(default=False)
    from_end: bool = True
    other_ranks: set[int] = field(default_factory=set)
    restored: bool = False  # made from a checkpoint, not yet called since
    #: the module path of the layer found making its input in the pass that made it (see
    #: provenance.Origin.layer; ``""``: the model itself), or None
    producer: str | None = None
    #: its input is a sum with another branch (a residual add): see provenance.Origin.summed
    summed: bool = False
    #: its input came through another watched activation since its producer (the second
    #: site of a chain: see provenance.Origin.after_site); None where not known (no origin
    #: found, or a checkpoint written before it was kept)
    chained: bool | None = None
    #: the norm its input passed that normalises its units together (see
    #: provenance.Origin.mixed; ``""``: none)
    mixed: str = ""
    #: the last norm its input passed since its producer, in words (see
    #: provenance.Origin.norm; ``""``: none)
    norm: str = ""
    #: the number of experts its units pool (see provenance.Origin.experts; 0: none):
    #: unit ``j`` is unit ``j`` of each of a mixture's experts, run in one grouped call
    experts: int = 0
    #: the module whose replacement makes this site anew (its producer, else the module at
    #: its path), weakly: see SiteRegistry._replaced
    made_by: Any = field(default=None, repr=False)
    #: the recorded passes of the open window that ran it (see Probe.passes_seen), and the
    #: last of them (the probe's pass count then)
    window_passes: int = field(default=0, repr=False)
    seen_pass: int = field(default=-1, repr=False)
    #: whether a call of the open window made an output that gradients reach
    #: (``requires_grad``), and whether one in a pass begun with gradients on made one that
    #: none reaches (under ``torch.no_grad()``, or from nothing that trains): only the
    #: second, and no producing layer of the model found, is a site computed without
    #: gradient (:data:`NO_GRADIENT`)
    window_graded: bool = field(default=False, repr=False)
    window_ungraded: bool = field(default=False, repr=False)

    def dim_for(self, ndim: int) -> int:
        """The unit dim of a call whose output has ``ndim`` dims (negative: it has none).

        A module run both on one sample and on batches (an unbatched ``(F,)`` and a batched
        ``(N, F)``, a ``(C, H, W)`` and an ``(N, C, H, W)``) or on inputs with more leading
        dims (``(N, F)`` and ``(N, L, F)``) holds its units at the same place counted from
        the end: a Linear's last dim, a convolution's channels 3 from the end (NCHW) or last
        (channels-last), the shape rule's dims likewise. Counted from the front, a batch as
        long as the features would be read as the units.
        """
        first = len(self.shape)
        if ndim == first or not self.from_end:
            return self.unit_dim
        return self.unit_dim - first + ndim

    @property
    def positions(self) -> int:
        """The positions of a sample each unit has in the first call's output: a
        convolution's H*W, a sequence's tokens, 1 for a Linear's ``(N, F)``. The batch is
        taken as dim 0, unless the units are: a sequence-first ``(L, N, F)`` reads N (it is
        the gradient findings' correction alone, which can only take a finding away)."""
        n = math.prod(self.shape) // max(1, self.units)
        if len(self.shape) >= 2 and self.unit_dim != 0 and self.shape[0]:
            n //= self.shape[0]
        return max(1, n)

    @property
    def module_path(self) -> str:
        return self.key.module_path

    @property
    def call_index(self) -> int:
        return self.key.call_index

    @property
    def op(self) -> str | None:
        return self.key.op

    @property
    def kind(self) -> str:
        return self.key.kind

    def describe(self) -> dict[str, Any]:
        """Plain-data description (for meta.json and reports)."""
        return {
            "name": self.name,
            **self.key.to_dict(),
            "kind": self.kind,
            "family": self.family.name,
            "leaky": self.family.leaky,
            "cap": self.cap,
            "unit_dim": self.unit_dim,
            "unit_rule": self.unit_rule,
            "units": self.units,
            "shape": list(self.shape),
            "order": self.order,
        }
