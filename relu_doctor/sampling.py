"""Which steps collect statistics: a fixed rate, or the rate that keeps an overhead budget.

By default every entry point (:func:`relu_doctor.watch`, :class:`~relu_doctor.Doctor`, the
Lightning, Keras and Hugging Face callbacks) keeps relu_doctor's own cost under
``overhead_budget=0.03`` (3% of a training step). It measures itself with no host
synchronisation, through a clock:

* :class:`HostClock` (the CPU): the host seconds its collecting hooks take (each hook times
  itself whole into its Doctor's :class:`Stopwatch`) and the host seconds of a whole step
  (between two ``Doctor.step()`` calls), known at once;
* :class:`CudaClock` (a model on a CUDA device): device time from CUDA events, one recorded
  at each step's end and a pair around each statistics call of one collecting step per
  logging interval; they are read at the logging step, after its read-back has synchronised.

With ``c`` the cost of a collecting step (the larger of its hooks' own seconds and the
whole-step difference, taken within each cycle of steps: see ``Sampler._on_diffs``) and
``p`` the step time without it, collecting every ``n``-th step costs ``c / (n p)`` of a
step, so it collects every ``n = ceil(c / (budget p))``-th step, never less often than
once per logging interval. On the host clock the logging steps count too: a log's own
seconds and what the Doctor does at every step, collecting or not (its ``step()``, the
optimizer tap's hooks: 0.3% of the 256-site benchmark MLP's step), spread over the steps
since the previous log (``l`` a step; before a log is counted, that work alone over the
steps since the last log), come out of the budget first, so it collects every
``n = ceil(c / ((budget - l / p) p))``-th step, and once per logging interval when they
alone spend the budget. (On CUDA a log's host time includes waiting for the step's queued
kernels, which is not its cost, and host work every step runs while the device works:
there only collecting is counted.)
A collecting step due at a logging step is taken one step early (at every 3rd step or less
often), so that no step pays for both.
``every_n_steps=N`` forces a fixed rate; ``overhead_budget=None`` collects every step. With
several processes (``all_reduce``) the rate is chosen at logging steps only, from the
measurements averaged across processes, so that every process collects the same steps.

The default is :data:`DEFAULT_BUDGET`, a float told apart from an explicit ``0.03`` by
identity. What it means is read when a :class:`Sampler` is made, from one place: the
environment variable ``RELU_DOCTOR_OVERHEAD_BUDGET`` (:data:`ENV`) when set (``none``: every
step; a number: that budget), else 0.03. A test suite that compares default runs with
every-step references pins it to ``none``; an environment variable reaches the processes
that DDP spawns and the subprocesses tests start. relu_doctor's own ``tests/conftest.py``
does so for every test not marked ``real_overhead_budget``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch
import torch.nn as nn

from relu_doctor._validate import number_in, positive_int
from relu_doctor.errors import ReluDoctorWarning, user_stacklevel

__all__ = [
    "DEFAULT_BUDGET",
    "ENV",
    "CudaClock",
    "HostClock",
    "Lap",
    "Sampler",
    "Stopwatch",
    "begin_call",
    "check_rate",
    "clock_for",
    "end_call",
    "model_device",
]


class _DefaultBudget(float):
    """The type of :data:`DEFAULT_BUDGET`: a float that copies and pickles as itself."""

    __slots__ = ()

    def __reduce__(self) -> str:
        return "DEFAULT_BUDGET"


#: The default ``overhead_budget`` of every entry point (0.03); see :func:`default_budget`.
DEFAULT_BUDGET: Final[float] = _DefaultBudget(0.03)
#: The environment variable that says what the default budget means (see the module).
ENV: Final = "RELU_DOCTOR_OVERHEAD_BUDGET"

_ALPHA = 0.2  # weight of the newest measurement in the running means
_MAX_EVERY = 1000
_RECHECK = 64  # collecting every step or every other one: a cycle stretched once per this many
_LAPS = 15  # whole-step laps kept per kind (collecting or not) for their medians
_LOGS = 5  # logs kept for the median of a log's cost per step
_DENSE = 3  # collecting at least this often, collecting laps are compared with the steps after
_MIN_DIFFS = 3  # cycles timed before their differences are used (one outlier is no median)
_DECIDE_EVERY = 8  # steps between choices of the rate, at most, where nothing else calls one
_MIN_EVERY_STEPS = 8  # steps timed before the work every step does is counted ahead of a log

Rate = int | Literal["auto"]


def _round_up(n: int) -> int:
    """``n`` rounded up to 1, 2 or 5 times a power of ten (a setting a person would type)."""
    step: int = 10 ** max(len(str(max(n, 1))) - 1, 0)
    return next(k * step for k in (1, 2, 5, 10) if k * step >= n)


def check_rate(every_n_steps: object, overhead_budget: object) -> tuple[Rate, float | None]:
    """The one check of ``every_n_steps`` (a positive integer or ``"auto"``) and
    ``overhead_budget`` (a number in (0, 1] or None) for every entry point; returns them,
    :data:`DEFAULT_BUDGET` kept as itself (a :class:`Sampler` resolves it)."""
    every: Rate = (
        "auto"
        if isinstance(every_n_steps, str) and every_n_steps == "auto"
        else positive_int("every_n_steps", every_n_steps)
    )
    if overhead_budget is None or overhead_budget is DEFAULT_BUDGET:
        return every, overhead_budget
    return every, number_in("overhead_budget", overhead_budget, 0.0, 1.0, hint=" or None")


def default_budget() -> float | None:
    """What :data:`DEFAULT_BUDGET` means now: ``$RELU_DOCTOR_OVERHEAD_BUDGET`` (``none``:
    None, every step; or a number in (0, 1]) when set, else 0.03.

    Raises:
        ReluDoctorError: the variable holds something else.
    """
    raw = os.environ.get(ENV)
    if raw is None:
        return float(DEFAULT_BUDGET)
    if raw.strip().lower() == "none":
        return None
    try:
        value: object = float(raw)
    except ValueError:
        value = raw
    return number_in(ENV, value, 0.0, 1.0, hint=" or 'none'")


@dataclass(frozen=True)
class Lap:
    """One measurement from a clock: ``steps`` consecutive steps.

    Attributes:
        seconds: how long the steps took.
        steps: how many steps.
        collected: how many of them collected statistics.
        stats_s: the seconds their statistics took, or None when not measured (the clock
            measured ``per_collect`` on one step only; the running mean stands in).
        per_collect: the statistics' seconds of one collecting step, or None (no sample).
    """

    seconds: float
    steps: int
    collected: int
    stats_s: float | None
    per_collect: float | None


class Stopwatch:
    """The host seconds one Doctor's hooks spent collecting: each collecting hook (the
    activation hooks, gradient taps and the optimizer tap of its probe) adds its whole run on
    its way out. One per Doctor, not one per process: a second Doctor in the process (a GAN's
    other model, the evaluation stream's own Doctor) must not count against this one's budget.

    Apart (``every_step``): the host seconds of what the Doctor does at every step, collecting
    or not (``Doctor.step``'s own work, the optimizer tap's hooks), which a comparison of
    collecting steps with the others cancels out.
    """

    __slots__ = ("every_step", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.every_step = 0.0

    def add(self, since: float) -> None:
        """Count the seconds from ``since`` (a ``time.perf_counter()`` reading) to now."""
        self.seconds += time.perf_counter() - since

    def add_every_step(self, since: float) -> None:
        """Count the seconds from ``since`` to now as every step's work."""
        self.every_step += time.perf_counter() - since

    def read(self) -> float:
        return self.seconds

    def read_every_step(self) -> float:
        return self.every_step


class HostClock:
    """The host clock: a step's seconds between two :meth:`lap` calls, and the seconds
    the collecting hooks took in it (``spent``), known at once.

    Args:
        spent: seconds spent collecting so far (a :class:`Stopwatch`'s ``read``).
        now: seconds now (default ``time.perf_counter``).
        every_step: seconds of the work every step does so far, collecting or not (a
            :class:`Stopwatch`'s ``read_every_step``); default: none.
    """

    device = torch.device("cpu")

    def __init__(
        self,
        spent: Callable[[], float],
        now: Callable[[], float] = time.perf_counter,
        every_step: Callable[[], float] | None = None,
    ) -> None:
        self.now, self.spent = now, spent
        self.every_step = every_step if every_step is not None else Stopwatch().read_every_step
        self._last: float | None = None
        self._mark = 0.0

    def start(self) -> None:
        """At attach: the next step is not measured (its first call makes the sites)."""
        self._last = None

    def lap(self, *, collected: bool) -> list[Lap]:
        """A step ended: its measurement."""
        now, spent = self.now(), self.spent()
        last, mark = self._last, self._mark
        self._last, self._mark = now, spent
        if last is None:
            return []
        stats = spent - mark
        return [Lap(now - last, 1, int(collected), stats, stats if collected else None)]

    def skip(self, seconds: float) -> None:
        """Leave ``seconds`` just spent (a log, charged apart) out of the step being timed."""
        if self._last is not None:
            self._last += seconds

    def arm(self, collects: bool) -> None:
        """Whether the next step collects (the host clock times every step alike)."""

    def read(self) -> list[Lap]:
        """Measurements known only at a logging step: none (see :meth:`lap`)."""
        return []


# The CudaClocks timing a collecting step now: each one's device and the list that gets the
# (start, end) CUDA events of every statistics call made on that device. Empty otherwise.
_timed: list[tuple[torch.device, list[tuple[Any, Any]]]] = []


def begin_call(t: torch.Tensor) -> tuple[torch.device, Any] | None:
    """Called by each statistics call before it runs (:mod:`relu_doctor.stats`): a CUDA
    event recorded on ``t``'s stream when a :class:`CudaClock` times this step on ``t``'s
    device, else None (one check of an empty list)."""
    if not _timed or not any(d == t.device for d, _ in _timed) or not _can_record():
        return None
    return t.device, _event(t.device)


def end_call(start: tuple[torch.device, Any] | None) -> None:
    """Called by each statistics call after it ran, with :func:`begin_call`'s result."""
    if start is None:
        return
    device, begin = start
    end = _event(device)
    for d, calls in _timed:
        if d == device:
            calls.append((begin, end))


def _event(device: torch.device) -> Any:
    """A timing CUDA event recorded now on ``device``'s current stream (no wait)."""
    ev = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    ev.record(torch.cuda.current_stream(device))
    return ev


def _can_record() -> bool:
    """No event while torch.compile traces or a CUDA graph is being captured."""
    return not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


class CudaClock:
    """Device time on a CUDA device, from CUDA events read at the logging step.

    An event is recorded at the end of every step (no synchronisation); the events of one
    collecting step per logging interval (never the run's first, which makes the sites)
    bracket each statistics call. :meth:`read` runs after the logging step's read-back has
    synchronised, so the events are complete and ``Event.elapsed_time`` does not wait; an
    event not yet complete is left for the next log.

    Args:
        device: the model's CUDA device.
    """

    def __init__(self, device: torch.device | str) -> None:
        dev = torch.device(device)
        self.device = torch.device("cuda", dev.index if dev.index is not None else 0)
        self._open: Any = None  # the event that started the interval being measured
        self._last: Any = None  # the event at the end of the latest step
        self._steps = 0
        self._collected = 0
        self._calls: list[tuple[Any, Any]] | None = None  # the timed step's calls, while it runs
        self._sample: list[tuple[Any, Any]] | None = None  # a timed step's calls, not yet read
        self._made_sites = False  # a collecting step ran (the first is never timed)

    def _record(self) -> Any:
        return _event(self.device) if _can_record() else None

    def start(self) -> None:
        """At attach: the interval being measured starts now."""
        self._open, self._last = self._record(), None
        self._steps = self._collected = 0

    def lap(self, *, collected: bool) -> list[Lap]:
        """A step ended: an event marks it; the measurement comes at :meth:`read`."""
        self._last = self._record()
        self._steps += 1
        self._collected += int(collected)
        if self._calls is not None:
            if collected:
                self._sample = self._calls
            self._disarm()
        self._made_sites = self._made_sites or collected
        return []

    def arm(self, collects: bool) -> None:
        """Time the next step's statistics calls if it collects and no sample is waiting."""
        want = collects and self._made_sites and self._sample is None
        if want and self._calls is None:
            self._calls = []
            _timed.append((self.device, self._calls))
        elif not want and self._calls is not None:
            self._disarm()

    def _disarm(self) -> None:
        calls, self._calls = self._calls, None
        _timed[:] = [t for t in _timed if t[1] is not calls]

    def read(self) -> list[Lap]:
        """The interval since the last read (steps, device seconds, the timed step's
        statistics seconds), or nothing while its events are not complete."""
        if self._open is None or self._last is None or self._steps == 0:
            return []
        if not self._last.query():  # not complete: no wait here, try at the next log
            return []
        seconds = self._open.elapsed_time(self._last) / 1e3
        per = None
        if self._sample is not None and all(end.query() for _s, end in self._sample):
            per = sum(s.elapsed_time(e) for s, e in self._sample) / 1e3
            self._sample = None
        lap = Lap(seconds, self._steps, self._collected, None, per)
        self._open, self._steps, self._collected = self._last, 0, 0
        return [lap]


def model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer (None if it has none)."""
    try:
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    except Exception:  # a wrapped model (Keras) that cannot list them: the host clock
        return None
    return None


def clock_for(
    device: torch.device | None,
    spent: Callable[[], float],
    every_step: Callable[[], float] | None = None,
) -> HostClock | CudaClock:
    """The clock for a model on ``device``: CUDA events on a CUDA device, else the host
    (``spent`` and ``every_step``: the host seconds collecting and every step's work took so
    far, a :class:`Stopwatch`'s ``read`` and ``read_every_step``)."""
    if device is not None and device.type == "cuda":
        return CudaClock(device)
    return HostClock(spent, every_step=every_step)


def _mean(old: float | None, new: float) -> float:
    return new if old is None else (1 - _ALPHA) * old + _ALPHA * new


class Sampler:
    """Decides whether the next step collects; fed by its clock at each step and log.

    Args:
        every_n_steps: a fixed rate (collect steps 0, n, 2n ...), or None.
        overhead_budget: the largest fraction of a step the statistics may cost, in (0, 1];
            None collects every step; :data:`DEFAULT_BUDGET` means :func:`default_budget`.
            Ignored when ``every_n_steps`` is given.
        max_every: the longest interval between collecting steps (the logging interval, so
            that every window holds collected steps).
        clock: what measures the cost (a :class:`HostClock` with a fake ``now`` in tests);
            default: :func:`clock_for` the device given to :meth:`start`.
        spent: the host seconds collecting took so far, for that default clock on the host
            (the Doctor's :class:`Stopwatch`; default: a stopwatch no hook adds to).
        every_step: the host seconds of the work every step did so far, collecting or not,
            for that default clock on the host (the Doctor's
            :meth:`Stopwatch.read_every_step`; default: none), counted with the logs.
        distributed: the rate is chosen at logging steps from the measurements summed across
            processes (:meth:`at_log`), so that every process collects the same steps.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None,
        overhead_budget: float | None,
        max_every: int,
        clock: HostClock | CudaClock | None = None,
        distributed: bool = False,
        spent: Callable[[], float] | None = None,
        every_step: Callable[[], float] | None = None,
    ) -> None:
        if overhead_budget is DEFAULT_BUDGET:
            overhead_budget = default_budget()
        every, budget = check_rate(
            "auto" if every_n_steps is None else every_n_steps, overhead_budget
        )
        self.every_n_steps = every if isinstance(every, int) else None
        self.overhead_budget = budget
        self.max_every = max(1, min(int(max_every), _MAX_EVERY))
        #: set by :meth:`need_per_window`: the collected steps per window that the bound
        #: remedies ask for (None: none asked), and whether its warning was given
        self.per_window: int | None = None
        self._window = 0  # the logging window per_window was asked for
        self._warned_cap = False
        self.clock = clock
        self._spent = spent if spent is not None else Stopwatch().read
        self._every_step = every_step
        self._every_step_mark = 0.0  # the host clock's every_step at the latest log
        self.distributed = bool(distributed)
        #: the current interval between collecting steps
        self.every = self.every_n_steps or 1
        self._since = 0  # steps since the last collecting step
        self._hook: float | None = None  # mean seconds of statistics per collecting step
        self._plain: float | None = None  # mean seconds of a step without them
        # Seconds of whole collecting / non-collecting steps (one-step laps), the latest of
        # each kind: the plain step is the median of the non-collecting ones (a median, not
        # a running mean: a lap that spans other work, an evaluation loop or a checkpoint,
        # must not move it). What collecting costs, the statistics calls and all around them
        # (hooks, gradient taps, the optimizer tap), which the stopwatch alone misses, comes
        # from the differences within cycles below.
        self._on_laps: deque[float] = deque(maxlen=_LAPS)
        # Plain steps: steps two or more after a collecting one, and the steps right after
        # one less what collecting left to them (once that was measured), so that the plain
        # step stays recent when few steps lie further on (collecting every other step).
        self._plain_laps: deque[float] = deque(maxlen=_LAPS)
        # Non-collecting steps right after a collecting one, apart: collecting leaves part of
        # its cost to the step after it (measured on the ResNet-like model at every 3rd step:
        # that step's forward took 4% longer than a plain one's, the next one's did not).
        self._after_laps: deque[float] = deque(maxlen=_LAPS)
        # What collecting adds, measured within each cycle (a collecting step, the step
        # after it, the first step further on), so that the machine's drifts cancel: at
        # every 20th step the latest collecting steps span hundreds of steps, and a median
        # of them against recent plain steps read a drift as cost. Differences of the
        # collecting step and of the step after it to the first step further on; collecting
        # every step or every other one, cycles are stretched now and then to hold such a
        # step (see _calibrating), and only a log every other step leaves the step after it
        # as the reference.
        self._on_diffs: deque[float] = deque(maxlen=_LAPS)
        self._after_diffs: deque[float] = deque(maxlen=_LAPS)
        self._cycle_on: float | None = None  # this cycle's collecting lap
        self._cycle_after: float | None = None  # ... and the lap of the step after it
        self._since_far = 0  # steps since a step two or more after a collecting one was timed
        self._undecided = 0  # steps since the rate was last chosen
        # Host seconds of the latest logs, with the work every step did since the log before,
        # each spread over those steps (the first log, which starts writers and makes tables,
        # is left out): the median is what logging and that work cost a step.
        self._log_laps: deque[float] = deque(maxlen=_LOGS)
        self._every_laps: deque[float] = deque(maxlen=_LOGS)  # the work at every step alone
        self._log_every = 1  # steps between the last two logs
        self._logs = 0
        self._since_log = 0
        self._warned_logs = False
        #: the logging interval the last warning advised: a later one advises no fewer steps
        #: (a run was told "log every 200" and then "every 500" as its measures moved)
        self._advised_every = 0

    def need_per_window(self, n: int, window: int) -> None:
        """Collect at least ``n`` of every ``window`` steps under the budget: the longest
        interval between collecting steps becomes ``window // n`` (a fixed
        ``every_n_steps`` is left as given)."""
        self.per_window = max(n, self.per_window or 0)
        self._window = window
        self.max_every = max(1, min(self.max_every, window // self.per_window))
        if self.adaptive:
            self.every = min(self.every, self.max_every)

    @property
    def adaptive(self) -> bool:
        return self.every_n_steps is None and self.overhead_budget is not None

    def collect(self, step: int, *, log_next: bool = False) -> bool:
        """Whether step ``step`` (0-based) collects: the same answer until :meth:`done`,
        which the clock is told (it times a collecting step's calls on CUDA), so the step's
        decision is made here only.

        ``log_next``: the step after this one logs. Under a budget, collecting every third
        step or less often, a collecting step due there comes one step early, so that a
        logging step does not pay for collecting too (on the 256-site benchmark MLP a log
        costs about a plain step and collecting a quarter of one).
        """
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        due = self._since + 1 >= self.every or (
            log_next and self.every >= 3 and self._since + 2 >= self.every
        )
        collects = due and not self._calibrating()
        if self.clock is not None:
            self.clock.arm(collects)
        return collects

    @property
    def _after(self) -> float | None:
        return statistics.median(self._after_laps) if self._after_laps else None

    def _calibrating(self) -> bool:
        """Collecting every step or every other step under a budget: no cycle holds a step
        two or more after its collecting step, the plain step that collecting and the step
        after it (which collecting leaves part of its cost to) are measured against. Until
        a few cycles were timed, and then once per ``_RECHECK`` steps, the collecting steps
        are left out until such a step was timed (stated in the records'
        ``steps_collected``)."""
        return (
            self.adaptive and not self.distributed and self.every <= 2 and self.max_every > 2
            and bool(self._on_laps) and self._since < 2
            and (len(self._after_diffs) < _MIN_DIFFS or self._since_far >= _RECHECK)
        )

    def stop(self) -> None:
        """At detach: time nothing more (a CUDA clock timing the next step lets go)."""
        if self.clock is not None:
            self.clock.arm(False)

    def start(self, device: torch.device | None = None) -> None:
        """At attach: choose the clock for ``device`` (unless one was given) and start it.
        A fixed rate or no budget needs no clock."""
        if not self.adaptive:
            return
        if self.clock is None:
            self.clock = clock_for(device, self._spent, self._every_step)
        self.clock.start()
        if isinstance(self.clock, HostClock):
            self._every_step_mark = self.clock.every_step()

    def done(self, *, collected: bool) -> None:
        """One step ended (``collected``: it collected statistics)."""
        self._since = 0 if collected else self._since + 1
        self._since_far += 1
        self._since_log += 1
        if not self.adaptive or self.clock is None:
            return
        laps = self.clock.lap(collected=collected)
        after = not collected and self._since == 1
        self._feed(laps, after=after)
        self._undecided += 1
        # The rate is chosen anew when a collecting step or the one after it was timed (what
        # moves the estimate), before a collection falls due, and every few steps: its
        # medians cost more than the rest of a step's bookkeeping.
        if not self.distributed and (
            collected or after or self._undecided >= _DECIDE_EVERY
            or self._since + 2 >= self.every
        ) and any(lap.per_collect is not None or not lap.collected for lap in laps):
            self._undecided = 0
            self._decide(*self._estimates(), self._log_s())

    def at_log(
        self, reduce: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] | None = None
    ) -> None:
        """At a logging step, after its read-back: read what the clock measured since the
        last log; with ``distributed``, choose the rate from the means averaged across
        processes (``reduce`` sums tensors across them: one small collective)."""
        if not self.adaptive or self.clock is None:
            return
        laps = self.clock.read()
        self._feed(laps)
        if self.distributed and reduce is not None:
            hook_s, plain_s = self._estimates()
            known = hook_s is not None and plain_s is not None
            log_s = self._log_s() or 0.0
            mine = [hook_s or 0.0, plain_s or 0.0, log_s, 1.0] if known else [0.0] * 4
            total = reduce([torch.tensor(mine, dtype=torch.float64, device=self.clock.device)])
            hook, plain, log, n = (float(x) for x in total[0].tolist())
            if n > 0:
                self._decide(hook / n, plain / n, log / n)
        elif any(lap.per_collect is not None for lap in laps):
            self._decide(*self._estimates(), self._log_s())

    @contextlib.contextmanager
    def log_lap(self) -> Iterator[None]:
        """Around a log: on the host clock, its seconds count against the budget (see the
        module), spread over the steps since the previous log."""
        clock = self.clock if self.adaptive and isinstance(self.clock, HostClock) else None
        t0 = clock.now() if clock is not None else 0.0
        try:
            yield
        finally:
            steps, self._since_log = self._since_log, 0
            self._logs += 1
            if clock is not None:
                mark, self._every_step_mark = self._every_step_mark, clock.every_step()
                every_step = self._every_step_mark - mark
                took = max(clock.now() - t0, 0.0)
                clock.skip(took)  # charged here, not again to the step it falls in
                if steps > 0 and self._logs > 1:
                    self._log_laps.append((took + every_step) / steps)
                    self._every_laps.append(every_step / steps)
                    self._log_every = steps
                    if not self.distributed:
                        self._decide(*self._estimates(), self._log_s())

    def _log_s(self) -> float | None:
        """Seconds a step pays for logging and the work every step does (the median over
        the latest logs); before a log was counted (the first is not: writers starting,
        tables made), the work every step did since the last log, so that a run that logs
        rarely, or not yet, has it counted from its first steps; or None."""
        if self._log_laps:
            return statistics.median(self._log_laps)
        clock = self.clock
        if isinstance(clock, HostClock) and self._since_log >= _MIN_EVERY_STEPS:
            return max(clock.every_step() - self._every_step_mark, 0.0) / self._since_log
        return None

    def _estimates(self) -> tuple[float | None, float | None]:
        """(seconds collecting adds to a step, seconds of a step without it): the larger of
        the statistics calls' own time and the whole-step difference (the median difference
        within cycles, plus what the step after a collecting one took beyond the steps
        further on), once both kinds of step were timed; the plain step is then the median
        of the latest plain laps (``_plain_laps``; the steps right after a collecting one,
        where none)."""
        hook, plain = self._hook, self._plain
        if (
            self.every <= _DENSE and len(self._on_laps) >= _MIN_DIFFS
            and len(self._after_laps) >= _MIN_DIFFS
        ):
            # Collecting every 2nd or 3rd step, the latest laps of each kind span the same
            # few dozen steps, so drifts cancel between their medians too, and they are
            # many where cycles with a step further on are few (one per _RECHECK steps at
            # every 2nd step, their differences noisy). The hooks' own clock misses what
            # collecting costs around them (torch's hook machinery, the model's ops meeting
            # colder caches: a third of it on the ResNet-like benchmark model).
            dense = statistics.median(self._on_laps) - statistics.median(self._after_laps)
            hook = max(hook or 0.0, dense)
        if len(self._on_diffs) >= _MIN_DIFFS:
            cost = statistics.median(self._on_diffs)
            if len(self._after_diffs) >= _MIN_DIFFS:
                cost += max(statistics.median(self._after_diffs), 0.0)
            hook = max(hook or 0.0, cost)
            base = statistics.median(self._plain_laps) if self._plain_laps else self._after
            if base is not None:
                plain = base
        return hook, plain

    def _feed(self, laps: Sequence[Lap], *, after: bool = False) -> None:
        """Take the clock's laps (``after``: a one-step lap of the step right after a
        collecting one)."""
        for lap in laps:
            if lap.steps == 1:
                self._pair(lap.seconds, collected=bool(lap.collected), after=after)
            if lap.per_collect is not None:
                self._hook = _mean(self._hook, lap.per_collect)
            stats = lap.stats_s
            if stats is None and self._hook is not None:
                stats = lap.collected * self._hook
            if stats is not None and lap.steps > 0:
                self._plain = _mean(self._plain, max((lap.seconds - stats) / lap.steps, 1e-9))

    def _pair(self, seconds: float, *, collected: bool, after: bool) -> None:
        """File a one-step lap, and the differences within its cycle (see ``_on_diffs``)."""
        if collected:
            self._on_laps.append(seconds)
            if self._cycle_on is not None and self._cycle_after is not None and (
                self.max_every <= 2
            ):  # no step further on, ever (a log every other step): the step after one
                self._on_diffs.append(self._cycle_on - self._cycle_after)
            self._cycle_on, self._cycle_after = seconds, None
        elif after:
            self._after_laps.append(seconds)
            if len(self._after_diffs) >= _MIN_DIFFS:
                self._plain_laps.append(seconds - max(statistics.median(self._after_diffs), 0.0))
            if self._cycle_on is not None:
                self._cycle_after = seconds
        else:
            self._plain_laps.append(seconds)
            if self._cycle_on is not None:
                self._on_diffs.append(self._cycle_on - seconds)
                if self._cycle_after is not None:
                    self._after_diffs.append(self._cycle_after - seconds)
                    self._since_far = 0
            self._cycle_on = self._cycle_after = None

    def _decide(self, hook: float | None, plain: float | None, log: float | None = None) -> None:
        if hook is None or plain is None or plain <= 0.0:
            return
        assert self.overhead_budget is not None
        left = self.overhead_budget - (log or 0.0) / plain  # what logging leaves
        if left <= 0.0:
            self.every = self.max_every
            if not self._warned_logs and len(self._log_laps) >= 3:
                self._warned_logs = True
                how = (
                    f"{_every(self.every)}, the least the bound remedies need "
                    f"({self.per_window} per logging interval)" if self.per_window
                    else "once per logging interval"
                )
                warnings.warn(
                    f"relu_doctor: {self._spent_text(plain)}, more than "
                    f"overhead_budget={self.overhead_budget:g}; statistics are now collected "
                    f"{how}. {self._advice(plain)}",
                    ReluDoctorWarning,
                    stacklevel=user_stacklevel(),
                )
            return
        # A ratio of exactly n must not round up to n + 1 through float error.
        need = math.ceil(hook / (left * plain) - 1e-9)
        self.every = max(1, min(need, self.max_every))
        # Past the least it collects (once per logging interval, or what the bound remedies
        # need per interval), over the budget all the same: said once (logs that alone
        # spend the budget, a later and other case, are said apart: above).
        if need > self.max_every and not self._warned_cap and (
                self.per_window or len(self._log_laps) >= 3):
            self._warned_cap = True
            collecting = hook / (self.every * plain)
            rest = (log or 0.0) / plain
            short = self.per_window is not None and self.per_window > self._window
            why = (
                f"the remedies bound to this Doctor judge dead units on at least "
                f"{self.per_window} collected steps"
                + (f" (a logging window of {self._window} steps holds fewer: they pool windows "
                   "until they have them)" if short else " per logging window")
                + ", so statistics are collected "
                + _every(self.every)
                if self.per_window
                else f"a collecting step costs {1 + hook / plain:.2g}x a plain one, and "
                f"collecting once per {self.every} steps is the least it does"
            )
            how = ("Log less often (a larger log_every_n_steps) to collect more sparsely "
                   "within the budget." if self.per_window else self._advice(plain, need))
            cost = (f"that costs about {collecting:.2%} of a step, and logging with the work "
                    f"at every step {rest:.2%}: {collecting + rest:.2%}" if self._log_laps else
                    f"that alone costs about {collecting:.2%} of a step (logging not timed yet)")
            warnings.warn(
                f"relu_doctor: {why}; {cost}, more than "
                f"overhead_budget={self.overhead_budget:g}. {how}",
                ReluDoctorWarning,
                stacklevel=user_stacklevel(),
            )

    def _split_log_s(self) -> tuple[float, float]:
        """(seconds a step pays for logging alone, for the Doctor's work at every step): the
        two parts of :meth:`_log_s`, apart."""
        every = statistics.median(self._every_laps) if self._every_laps else 0.0
        return max((self._log_s() or 0.0) - every, 0.0), every

    def _spent_text(self, plain: float) -> str:
        """What logging and the Doctor's work at every step cost, apart (a warning's words)."""
        logs, every = self._split_log_s()
        # (the times said apart: a T5 trial read one step's time as one log's)
        return (f"logging costs {logs / plain:.1%} of a training step (one log takes "
                f"{_seconds(logs * self._log_every)} every {self._log_every} steps; a step, "
                f"{_seconds(plain)}) and what the Doctor does at every step {every / plain:.1%} "
                f"({every * 1e6:.0f} us)")

    def _advice(self, plain: float, at_least: int = 0) -> str:
        """How to get within the budget: log less often (every how many steps, at least
        ``at_least``), or, where the work at every step alone spends it (a model whose step
        takes well under a millisecond), no rate can: a larger budget or none."""
        assert self.overhead_budget is not None
        logs, every = self._split_log_s()
        room = self.overhead_budget - every / plain
        if room <= self.overhead_budget / 4:
            return ("The work at every step alone spends most of the budget on a step this "
                    "short, so no sampling rate keeps it: pass a larger overhead_budget, or "
                    "overhead_budget=None to collect every step regardless.")
        per_log = logs * self._log_every
        # logs taking at most half of what the work at every step leaves
        want = math.ceil(per_log / (room / 2 * plain)) if per_log > 0 else self._log_every
        want = max(want, at_least)  # (and as sparse as collecting once a window needs)
        self._advised_every = max(self._advised_every, _round_up(want))
        return (f"Log every {self._advised_every} steps or more (log_every_n_steps) to stay "
                "within the budget, or pass overhead_budget=None to collect every step "
                "regardless.")

    def overhead(self) -> float | None:
        """The estimated cost of collecting at the current rate, and of logging on the host
        clock, as a fraction of a step (None before the first measurement of a collecting
        step)."""
        hook, plain = self._estimates()
        if hook is None or plain is None or plain <= 0.0:
            return None
        return hook / (self.every * plain) + (self._log_s() or 0.0) / plain


def _seconds(s: float) -> str:
    """A duration in words: ``17.7 ms``, ``1.2 s``."""
    return f"{s * 1e3:.3g} ms" if s < 1.0 else f"{s:.3g} s"


def _every(n: int) -> str:
    """How often statistics are collected, in words."""
    return "at every step" if n == 1 else f"every {n} steps"
