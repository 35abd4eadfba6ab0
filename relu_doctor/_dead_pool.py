"""Units of a sampled window, judged over enough collected steps.

A unit reads dead when it was never active on what its window saw, dormant when its mean
|activation| is a small part of its layer's (ReDo's score). Under the overhead budget's
sampling a window may collect one of its 50 steps: a unit active on 2% of inputs then reads
dead about half the time, and an online learner's single sample leaves half of any layer's
ReLUs off, dead or dormant. A trial's sparse autoencoder read 412 of 512 latents dead
(critical) where every step collected read 109; an online learner's 20 of 32 where none was.

So a sampled window's units are judged with the windows before it as well (their
:data:`~relu_doctor.metrics.JUDGED_ROWS`: elements, active elements, sum of |activation|,
added), as the remedies' :class:`~relu_doctor.remedies.evidence.DeadEvidence` pools them,
until those hold :data:`MIN_DEAD_STEPS` collected steps; the window's rates and means stay
its own. The pool keeps three float32 sums per unit and window, for at most
:data:`MIN_DEAD_STEPS` windows (O(units)); it restarts where a remedy changed the model
(what its units did before says nothing of them after), and is not kept in checkpoints (a
run resumed pools again from its first window). A window that collected every step it ran
is read alone (that is what "dead over the window" means), and pooled from by a sampled one
after it.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from relu_doctor.metrics import JUDGED_ROWS

__all__ = ["MIN_DEAD_STEPS", "DeadPool"]

#: the collected steps a sampled window's units are judged over, at least (the remedies'
#: MIN_EVIDENCE_STEPS): windows before it are pooled in until they are
MIN_DEAD_STEPS = 8


@dataclass(frozen=True)
class _Window:
    collected: int  # steps it collected
    run: int  # steps it ran
    sums: dict[str, np.ndarray]  # per site: its JUDGED_ROWS, (3, units) float32


class DeadPool:
    """The judged sums of a run's last sampled windows, per site and unit.

    Example:
        >>> pool = DeadPool(min_steps=4)
        >>> pool.push(2, 10, {"a": np.array([[8, 8, 8], [1, 0, 0], [0.5, 0, 0]])})
        >>> sums, collected, run = pool.before([("a", 3)], 1, 10)
        >>> sums[1].tolist(), collected, run
        ([1.0, 0.0, 0.0], 3, 20)
    """

    def __init__(self, min_steps: int = MIN_DEAD_STEPS) -> None:
        self.min_steps = min_steps
        self._windows: collections.deque[_Window] = collections.deque()

    def pooling(self, collected: int, run: int) -> bool:
        """Whether a window that collected ``collected`` of its ``run`` steps is read with
        the pool: it collected some but fewer than all of them and than :attr:`min_steps`."""
        return 0 < collected < min(run, self.min_steps)

    def before(self, sites: Sequence[tuple[str, int]], collected: int, run: int
               ) -> tuple[np.ndarray, int, int]:
        """The judged sums of ``sites`` ((name, units) in the order of their columns) over
        the windows a window of ``collected`` of ``run`` steps is read with: the latest,
        back until all hold :attr:`min_steps` collected steps (``(len(JUDGED_ROWS),
        units)`` float64; a site renewed since with another number of units takes nothing
        from them), and the steps collected and run that the reading then rests on."""
        out = np.zeros((len(JUDGED_ROWS), sum(n for _, n in sites)))
        for w in reversed(self._windows):
            if collected >= self.min_steps:
                break
            at = 0
            for name, n in sites:
                a = w.sums.get(name)
                if a is not None and a.shape == (len(JUDGED_ROWS), n):
                    out[:, at:at + n] += a
                at += n
            collected += w.collected
            run += w.run
        return out, collected, run

    def push(self, collected: int, run: int, sums: Mapping[str, np.ndarray]) -> None:
        """Add a logged window's judged sums (per site, ``(len(JUDGED_ROWS), units)``), and
        drop the oldest windows that the newer ones make unneeded (they hold
        :attr:`min_steps` collected steps without it)."""
        if collected <= 0:
            return
        self._windows.append(_Window(collected, run, {k: np.asarray(v, dtype=np.float32)
                                                      for k, v in sums.items()}))
        while len(self._windows) > 1 and sum(
                w.collected for w in list(self._windows)[1:]) >= self.min_steps:
            self._windows.popleft()

    def clear(self) -> None:
        """Forget the pooled windows (the model changed)."""
        self._windows.clear()
