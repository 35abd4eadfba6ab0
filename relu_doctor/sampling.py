"""Which steps collect statistics: a fixed rate, or the rate that keeps an overhead budget.

By default :func:`relu_doctor.watch` keeps its own cost under ``overhead_budget`` (3% of a
training step). It measures itself on the host clock, with no host synchronisation: the
seconds its statistics calls take on a collecting step (``hook_s``, timed by the probe) and
the seconds of a whole step (between two ``Doctor.step()`` calls). With ``c`` the mean cost
of a collecting step and ``p`` the mean step time without it, collecting every ``n``-th step
costs ``c / (n p)`` of a step, so it collects every ``n = ceil(c / (budget p))``-th step,
never less often than once per logging interval. ``every_n_steps`` forces a fixed rate;
``overhead_budget=None`` collects every step.

What is measured is CPU time spent in the hooks' statistics calls. On a CUDA device that is
the launch cost, not the kernels' device time (CUDA-event timing is not implemented), so
there the budget bounds the host-side cost only.
"""

from __future__ import annotations

import math
import time

from relu_doctor._validate import number_in, positive_int

__all__ = ["DEFAULT_BUDGET", "Sampler"]

DEFAULT_BUDGET = 0.03
_ALPHA = 0.2  # weight of the newest measurement in the running means
_MAX_EVERY = 1000


class Sampler:
    """Decides whether the next step collects; fed one measurement per step.

    Args:
        every_n_steps: a fixed rate (collect steps 0, n, 2n ...), or None.
        overhead_budget: the largest fraction of a step the statistics may cost, in (0, 1];
            None collects every step. Ignored when ``every_n_steps`` is given.
        max_every: the longest interval between collecting steps (the logging interval, so
            that every window holds collected steps).
    """

    def __init__(
        self, *, every_n_steps: int | None, overhead_budget: float | None, max_every: int
    ) -> None:
        self.every_n_steps = (
            None if every_n_steps is None else positive_int("every_n_steps", every_n_steps)
        )
        self.overhead_budget = (
            None
            if overhead_budget is None
            else number_in("overhead_budget", overhead_budget, 0.0, 1.0, hint=" or None")
        )
        self.max_every = max(1, min(int(max_every), _MAX_EVERY))
        #: the current interval between collecting steps
        self.every = self.every_n_steps or 1
        self._since = 0  # steps since the last collecting step
        self._hook = 0.0  # mean seconds of statistics per collecting step
        self._plain = 0.0  # mean seconds of a step without them
        self._seen = 0  # collecting steps measured
        self._last: float | None = None

    @property
    def adaptive(self) -> bool:
        return self.every_n_steps is None and self.overhead_budget is not None

    def collect(self, step: int) -> bool:
        """Whether step ``step`` (0-based) collects. Pure: the same answer until :meth:`done`."""
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return self._since + 1 >= self.every

    def start(self) -> None:
        """Start the clock (at attach): the first step is timed from here."""
        self._last = time.perf_counter()

    def done(self, *, collected: bool, hook_s: float) -> None:
        """One step ended; ``hook_s`` is what its statistics calls cost (0 if it collected
        nothing)."""
        now = time.perf_counter()
        step_s = None if self._last is None else now - self._last
        self._last = now
        self._since = 0 if collected else self._since + 1
        if not self.adaptive or step_s is None:
            return
        plain = max(step_s - hook_s, 1e-9)
        self._plain = plain if self._plain == 0.0 else (1 - _ALPHA) * self._plain + _ALPHA * plain
        if not collected:
            return
        self._seen += 1
        if self._seen == 1:  # the first collecting step makes sites (and may build a kernel)
            return
        self._hook = hook_s if self._seen == 2 else (1 - _ALPHA) * self._hook + _ALPHA * hook_s
        assert self.overhead_budget is not None
        need = math.ceil(self._hook / (self.overhead_budget * self._plain))
        self.every = max(1, min(need, self.max_every))

    def overhead(self) -> float | None:
        """The estimated cost of the statistics as a fraction of a step at the current rate
        (None before two collecting steps were measured)."""
        if self._seen < 2 or self._plain <= 0.0:
            return None
        return self._hook / (self.every * self._plain)
