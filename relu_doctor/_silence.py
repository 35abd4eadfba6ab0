"""Dead units of a sampled window: silent for longer than chance allows a live unit.

A unit reads dead when it was never active on what its window saw. Where a window
collected every step it ran, that is the definition. Under the overhead budget's sampling a
window may collect one of its 50 steps, and silence on so few outputs is weak evidence: an
online learner's single sample leaves half of any layer's ReLUs silent (a trial read 20 of
32 units dead, critical, where none was), and a unit active on 2% of inputs is silent on a
batch of 32 half the time.

Pooling the windows before (a unit active in any is not dead) undercounts instead where it
matters most, a run dying: a trial's layer read 0 dead for seven logs while 27-38 of its 64
units were, the pool reaching back to the healthy first window. So each unit is judged on
its own evidence: in a sampled window, a silent unit is dead where the chance that a live
unit with its past would be silent on every output it has had since it last fired (this
window's and the silent windows' before) is under :data:`ALPHA`. The chance is the
beta-binomial one: its firing rate uncertain, Beta(1 + active, 1 + silent) over the
outputs it had up to the last window it fired in, so that a rate read on a few outputs
weighs little (one output, fired: two thirds, not a certainty; a review's batch-1 layer
read 30 of 64 dead where none was). A unit never seen to fire has no rate of its own: its
layer's mean rate in the window stands for it (a layer silent on the window whole: dead),
so that a unit dead from its initialisation beside live ones is dead at once. The past is
a moving one (each window's weight halves with every
:data:`HALF_LIFE` outputs after it), so that it follows a code growing sparser, and it is
frozen when the unit falls silent, so that a long silence is judged against the unit
alive. A layer that dies at a rate of 30% on 256 outputs is dead at its first silent
window of 32 outputs.

Outputs of one sample are counted as independent (a convolution's pixels, a sequence's
tokens), though they move together: at batch 1 a channel silent on one image reads dead (a
review: 2-6 of 32 where none was). Sampled runs at batch 1 should collect every step.

The state is five numbers per unit (the moving sums of its outputs and active outputs, the
two as they were when it last fired, its outputs since), made from every logged window
(one vectorised update where the sites are those of the last log), kept in checkpoints and
forgotten for a site made anew (another module under its name); a remedy's change keeps it
(forgetting every unit at each change made a recycler recycle at every log: a review).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ALPHA", "HALF_LIFE", "Silence"]

#: The chance of its silence, for a live unit at its last rate, under which a silent unit of
#: a sampled window is dead.
ALPHA = 0.01
#: The outputs after which a window's weight in a unit's moving rate has halved.
HALF_LIFE = 1024.0
_FIELDS = ("ema_elements", "ema_active", "fired_elements", "fired_active", "silent")


class Silence:
    """Per site and unit: the moving sums of its outputs and active outputs, those sums as
    they were when it last fired, and the outputs it has had since, all silent. Kept flat
    (``state``, one row per field of :data:`_FIELDS`), in the order of the sites of the last
    update (``layout``), so that a log of the same sites reads and updates it in a few array
    operations.

    Example:
        >>> s = Silence()
        >>> s.update([("a", 2)], np.array([100.0, 100.0]), np.array([30.0, 0.0]))
        >>> s.inconclusive([("a", 2)], np.array([32.0, 32.0]), np.array([0.0, 0.0])).tolist()
        [False, False]
        >>> s.inconclusive([("a", 2)], np.array([2.0, 2.0]), np.array([0.0, 0.0])).tolist()
        [True, False]
    """

    def __init__(self) -> None:
        self.layout: tuple[tuple[str, int], ...] = ()
        self.state: np.ndarray = np.zeros((len(_FIELDS), 0))

    def _aligned(self, sites: Sequence[tuple[str, int]]) -> np.ndarray:
        """The state laid out as ``sites`` (a unit not known: no past)."""
        sites = tuple(sites)
        if sites == self.layout:
            return self.state
        out = np.zeros((len(_FIELDS), sum(n for _, n in sites)))
        known, at = {}, 0
        for name, n in self.layout:
            known[name] = (at, n)
            at += n
        at = 0
        for name, n in sites:
            was = known.get(name)
            if was is not None and was[1] == n:
                out[:, at:at + n] = self.state[:, was[0]:was[0] + n]
            at += n
        return out

    def inconclusive(self, sites: Sequence[tuple[str, int]], elements: np.ndarray,
                     active: np.ndarray) -> np.ndarray:
        """Of the units of ``sites`` ((name, units), their columns in order), those silent in
        a sampled window (``elements`` seen, ``active`` of them, per unit) that cannot be
        called dead: a live unit with its past would be silent on its outputs since it last
        fired with a chance of :data:`ALPHA` or more (beta-binomial: see the module)."""
        out: np.ndarray = np.zeros(len(elements), dtype=bool)
        idx = np.flatnonzero((elements > 0) & (active == 0))  # the silent ones (a log's few)
        if not idx.size:
            return out
        state = self._aligned(sites)[:, idx]
        m = state[4] + elements[idx]
        log_chance = np.empty(len(idx))
        seen = state[3] > 0  # fired before: Beta(1 + active, 1 + silent) at its last firing
        if seen.any():
            a = torch.from_numpy(1.0 + state[3][seen])
            b = torch.from_numpy(1.0 + np.maximum(state[2][seen] - state[3][seen], 0.0))
            mt = torch.from_numpy(m[seen])
            log_chance[seen] = (torch.lgamma(b + mt) - torch.lgamma(b)
                                + torch.lgamma(a + b) - torch.lgamma(a + b + mt)).numpy()
        # A unit never seen to fire has no rate of its own: its layer's in this window is
        # taken (silent at that rate so long, or its whole layer silent: dead)
        sizes = np.asarray([n for _, n in sites])
        starts = (np.cumsum(sizes) - sizes)[sizes > 0]
        site_rate = np.zeros(len(sizes))
        with np.errstate(invalid="ignore", divide="ignore"):
            site_rate[sizes > 0] = (np.add.reduceat(active, starts)
                                    / np.add.reduceat(elements, starts))
        rate = np.nan_to_num(np.repeat(site_rate, sizes)[idx])
        with np.errstate(divide="ignore"):
            never = np.where(rate > 0, m * np.log1p(-np.minimum(rate, 1.0)), -np.inf)
        log_chance = np.where(seen, log_chance, never)
        out[idx] = log_chance >= math.log(ALPHA)
        return out

    def update(self, sites: Sequence[tuple[str, int]], elements: np.ndarray,
               active: np.ndarray) -> None:
        """Take a logged window's elements and active elements per unit of ``sites`` (in
        place where the sites are the last update's: a few array operations a log)."""
        st = self._aligned(sites)
        keep = np.exp2(elements * (-1.0 / HALF_LIFE))  # (the window's outputs age the past)
        st[0] *= keep
        st[0] += elements
        st[1] *= keep
        st[1] += active
        fired = active > 0
        np.copyto(st[2], st[0], where=fired)
        np.copyto(st[3], st[1], where=fired)
        st[4] += elements
        st[4][fired] = 0.0
        self.state, self.layout = st, tuple(sites)

    def forget(self, site: str) -> None:
        """Forget one site's units (made anew: another module under its name)."""
        at = 0
        for name, n in self.layout:
            if name == site:
                self.state[:, at:at + n] = 0.0
            at += n

    def clear(self) -> None:
        """Forget every unit's past."""
        self.layout, self.state = (), np.zeros((len(_FIELDS), 0))

    def state_dict(self) -> dict[str, Any]:
        return {"layout": [list(x) for x in self.layout],
                **{f: self.state[i].tolist() for i, f in enumerate(_FIELDS)}}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (None, empty, or of another form: a checkpoint from
        before it was kept, and the units' pasts are learned again from the next log)."""
        self.clear()
        if not state:
            return
        layout = tuple((str(name), int(n)) for name, n in state.get("layout", []))
        rows = [np.asarray(state.get(f, []), dtype=np.float64) for f in _FIELDS]
        total = sum(n for _, n in layout)
        if all(len(r) == total for r in rows):
            self.layout, self.state = layout, np.stack(rows)
