"""Reading one logging interval: the Doctor's on-device sums are summed across processes,
read back in one transfer, turned into metrics and diagnosed, giving an
:class:`~relu_doctor.history.IntervalRecord` (closed at a log, or a look at the open window
for ``current()``, ``findings()``, ``to_pandas()`` and ``unit_table()``).

:class:`IntervalReading` is a part of :class:`~relu_doctor.doctor.Doctor` (a mixin), kept in
its own module so that ``doctor.py`` holds the wiring of one step and one log.
"""

from __future__ import annotations

import collections
import functools
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from relu_doctor._silence import Silence
from relu_doctor.diagnosis import Finding, diagnose
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, user_stacklevel
from relu_doctor.events import FindingEvent
from relu_doctor.history import SEEN_FIELDS, IntervalRecord
from relu_doctor.metrics import UNIT_COLUMNS, layer_metrics, metrics_of_stacked
from relu_doctor.probes import transformed_text
from relu_doctor.sampling import model_device
from relu_doctor.sites import NO_GRADIENT, FrozenFeeds, Site, module_label
from relu_doctor.stats import ROW, SiteStats, read_back

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable, Sequence

    import torch.nn as nn

    from relu_doctor.diagnosis import DiagnosisConfig
    from relu_doctor.history import FindingTracker
    from relu_doctor.optimizer_tap import OptimizerTap
    from relu_doctor.probes import Probe
    from relu_doctor.sites import Site

__all__ = ["IntervalReading", "TableMemory"]

# The layers' gradient norms among the tensors summed across processes by name (no site's
# name: a site's is a module path, a checkpoint's a JSON array).
_GRAD_SQ = "\0grad_sq"
#: The keys every site row starts with, in order (its metrics follow: see :func:`site_columns`)
SITE_KEYS = ("step", "site", "op", "family", "leaky", "cap", "order", "unit_dim", "unit_rule",
             "frozen", "window_steps", "steps_collected", "steps_run")
# why recycling cannot treat a site whose input is a residual sum (Site.summed)
_SUMMED = ("its units come from a sum with another branch (a residual or skip connection, or "
           "an adapter such as LoRA's beside its layer), directly or through activations and "
           "norms: no one layer makes them")
_STEPS = "\0steps_collected"  # the window's collected steps, summed across processes
_FIRST = "\0first\0"  # + a site's name: its first reading (SiteStats.first), until logged


def _unrecyclable(sites: Sequence[Site]) -> dict[str, str]:
    """Why recycling cannot treat a site, where the site itself tells: its input a sum
    (Site.summed), a norm over units together (Site.mixed), or a layer feeding more than one
    site (run more than once a pass, as a tower called on two captions, or its output used
    twice, into two activations: the findings advised recycling, which then refused every
    call, a trial)."""
    # (the sites that take the layer's output first: a chain's second site, relu then a
    # LeakyReLU, is the first's consumer, and its first the recycler treats; where whether
    # a site is a chain's is not known, a checkpoint of before it was kept, the calls of
    # one activation, module or functional op)
    def feed(s: Site) -> tuple[str, ...]:
        assert s.producer is not None
        return (s.producer,) if s.chained is not None else (s.key.module_path,
                                                            str(s.key.op), s.producer)

    fed: dict[tuple[str, ...], list[str]] = {}
    for s in sites:
        if s.producer is not None and not s.chained:
            fed.setdefault(feed(s), []).append(s.name)
    out = {}
    for s in sites:
        if s.experts:
            out[s.name] = (f"each of its units is that unit of all {s.experts} experts of "
                           f"{module_label(s.producer or '')!r}, run in one grouped call: no "
                           "one layer's rows make it")
        elif s.summed or s.mixed:
            out[s.name] = _SUMMED if s.summed else _mixed(s.mixed)
        elif s.chained and s.producer is not None:  # (the recycler refuses it: a review)
            out[s.name] = ("its input comes through another watched activation (it is a "
                           "chain's later site), not from a layer: recycling treats a chain "
                           "at its first site, where it can")
        elif s.producer is not None and len(twins := fed[feed(s)]) > 1:
            others = ", ".join(repr(n) for n in twins if n != s.name)
            out[s.name] = (f"the layer feeding it, {module_label(s.producer)!r}, also feeds "
                           f"{others} (run more than once a pass, or its output used twice): "
                           "re-initialising its rows would change what they get as well")
    return out


def _mixed(norm: str) -> str:
    """Why recycling cannot treat a site whose input passed ``norm`` (Site.mixed)."""
    return f"its input passes a {norm}, which normalises the units together: a fresh unit " \
           "would shift the others"


# A unit table at least this large is kept out of the malloc heap (see _record_memory).
_OWN_MEMORY_BYTES = 1 << 20
# growth over time is measured from a site's first log with under this fraction of its units
# dead (see IntervalMixin._growth_base_now)
GROWTH_BASE_DEAD = 0.5


def _record_memory(nbytes: int) -> pa.Buffer | bytearray:
    """Writable memory for the arrays of a record's unit table.

    A record is kept for ``keep_records`` logs while each log makes and frees many large
    temporaries. From the malloc heap, its arrays sit between those temporaries and fragment
    the heap: glibc's mmap threshold rises once large blocks have been freed, so later
    blocks of a few MB come from the heap, and a 100k-unit layer logged at every step grew
    by ~100 MB in 200 logs. Arrow's allocator (mimalloc or jemalloc; the one the run
    directory's writer uses anyway) keeps it apart and reuses its pages. Small tables use
    the heap. Every byte is written by :func:`_unit_frame`. A Doctor's blocks are used again
    once free (:class:`TableMemory`).
    """
    if nbytes >= _OWN_MEMORY_BYTES:
        return pa.allocate_buffer(nbytes)
    return bytearray(nbytes)


class TableMemory:
    """The blocks of one stream's unit tables (:func:`_record_memory`), each used again
    once nothing refers to it any more: its table and every array or view of it gone (the
    record dropped from the Doctor's latest ``keep_records`` and held by no one else), as
    CPython's reference count says. A block fresh from the allocator has pages the system
    must fault in: a 256-site model's 2.2 MB table cost its log ~7 ms that way, ~1 ms in a
    block used before. At most ``keep`` blocks are held (the oldest let go: whoever still
    holds its table keeps it)."""

    def __init__(self, keep: int) -> None:
        self._blocks: deque[pa.Buffer | bytearray] = collections.deque(maxlen=max(1, keep))
        # what a block referred to by its slot alone counts, as counted in take() (the same
        # container, the same expression: whatever this Python's interpreter adds to it)
        probe: deque[object] = collections.deque([object()])
        self._free_refs = sys.getrefcount(probe[0])

    def take(self, nbytes: int) -> pa.Buffer | bytearray:
        """A block of ``nbytes`` that nothing else refers to: one held here, else a new one."""
        blocks = self._blocks
        for i in range(len(blocks)):
            if len(blocks[i]) == nbytes and sys.getrefcount(blocks[i]) <= self._free_refs:
                return blocks[i]
        block = _record_memory(nbytes)
        blocks.append(block)
        return block


@functools.cache
def site_columns() -> list[str]:
    """The columns of a site row (:meth:`IntervalReading.to_pandas`), in order: a site's
    description, its window's sampling, then its metrics (those of one unit seen once)."""
    one = torch.zeros(len(ROW), 1, dtype=torch.float64)
    one[ROW["elements"]] = 1.0
    _, rows = metrics_of_stacked(one, one.clone(), [1], 0.1)
    return [*SITE_KEYS, *rows[0]]


def _unit_frame(
    step: int, names: list[str], sizes: list[int], units: Mapping[str, torch.Tensor],
    memory: TableMemory | None = None,
) -> pd.DataFrame:
    """The unit table of one read: ``step``, ``site``, ``unit`` and :data:`UNIT_COLUMNS`, one
    row per (site, unit), from ``units``, every site's per-unit metrics side by side
    (:attr:`SiteUnits.stacked <relu_doctor.metrics.SiteUnits>`). Its numeric columns are
    written straight into one block (``memory``'s, else :func:`_record_memory`'s: one copy
    per column, no temporaries, no copy by pandas)."""
    total = sum(sizes)
    dtypes: dict[str, np.dtype[Any]] = {"step": np.dtype(np.int64), "unit": np.dtype(np.int64)}
    for c in UNIT_COLUMNS:
        dtypes[c] = np.dtype(torch.empty(0, dtype=units[c].dtype).numpy().dtype)
    order = sorted(dtypes, key=lambda c: -dtypes[c].itemsize)  # each column aligned
    nbytes = total * sum(d.itemsize for d in dtypes.values())
    block = _record_memory(nbytes) if memory is None else memory.take(nbytes)
    cols: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for c in order:
        cols[c] = np.frombuffer(block, dtype=dtypes[c], count=total, offset=offset)
        offset += total * dtypes[c].itemsize
    cols["step"].fill(step)
    which = np.repeat(np.arange(len(sizes)), sizes)  # each row's site
    np.subtract(np.arange(total), (np.cumsum(sizes) - sizes)[which], out=cols["unit"])
    for c in UNIT_COLUMNS:
        torch.from_numpy(cols[c]).copy_(units[c])
    return pd.DataFrame(
        {"step": cols["step"], "site": _site_column(names, sizes, which), "unit": cols["unit"],
         **{c: cols[c] for c in UNIT_COLUMNS}},
        copy=False,
    )


@functools.cache
def _strings_dtype() -> Any:
    """The dtype pandas gives a column of strings."""
    return pd.Series(["site"]).dtype


def _site_column(names: list[str], sizes: list[int], which: np.ndarray[Any, Any]) -> Any:
    """``names[which]`` (``which``: each row's site, ``sizes`` rows each) as pandas holds a
    column of strings. Where it holds them in Arrow (pandas 3), Arrow takes them: pandas'
    conversion of a Python string per row cost the unit table of a 256-site model 2 ms a
    log, and Arrow's own take ~1 ms, which :func:`_site_strings` keeps for the next log."""
    dtype = _strings_dtype()
    if isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow":
        return pd.array(_site_strings(tuple(names), tuple(sizes)), dtype=dtype)
    return np.array(names, dtype=object)[which]


@functools.lru_cache(maxsize=2)  # a training and an evaluation stream
def _site_strings(names: tuple[str, ...], sizes: tuple[int, ...]) -> pa.Array:
    """Each row's site name, ``sizes`` rows each, as one Arrow array: the same at every log
    while the sites are. Arrow arrays are immutable; each table wraps its own pandas array
    around it, so that one table's column changed changes no other's."""
    return pa.array(names, pa.large_string()).take(np.repeat(np.arange(len(sizes)), sizes))


_SEEN_ROWS = [ROW[name] for name in SEEN_FIELDS]  # the window rows that say it saw something


class IntervalReading:
    """The reading half of :class:`~relu_doctor.doctor.Doctor` (see the module)."""

    if TYPE_CHECKING:  # what it uses of the Doctor (set in Doctor.__init__)
        model: nn.Module
        probe: Probe
        tap: OptimizerTap | None
        config: DiagnosisConfig
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None
        global_step: int
        window_steps: int
        _window_scheduled: int
        steps_run: int
        _lifetime_steps: tuple[int, int] | None
        _lifetime_since: int | None
        _tracker: FindingTracker
        _grad_norm_history: deque[float]
        _first_rms: dict[str, float]
        _silence: Silence
        _growth_base: dict[str, float]
        _declined: dict[str, set[str]]
        _listeners: list[Callable[[IntervalRecord], Any]]
        _warned_empty: bool
        _step_calls: list[int]
        _unfolded: bool
        _last_judged: IntervalRecord | None
        _table_memory: TableMemory
        frozen_feed: Callable[[list[Site]], list[str | None]] | None
        _frozen_feeds: FrozenFeeds

        def _peek_skipped(self) -> int: ...

        def _take_skipped(self, close: bool) -> int: ...

        def sum_across(
            self, named: Mapping[str, torch.Tensor], device: torch.device | None
        ) -> tuple[dict[str, torch.Tensor], int | None]: ...

    def _frozen_layers(self, sites: list[Site],
                       grad_sq: torch.Tensor | None = None) -> list[str | None]:
        """The frozen layer feeding each of ``sites`` (see :attr:`Doctor.frozen_feed`), else
        (a torch model's) :data:`~relu_doctor.sites.NO_GRADIENT` where no gradient reached
        it in the open window and no producing layer was found or the optimizer read none
        for it, else None. ``grad_sq``: the optimizer tap's squared gradient norms of the
        window, read back (a layer with one above 0 trained in it)."""
        if self.frozen_feed is not None:  # (an integration's rule: Keras layers)
            return list(self.frozen_feed(sites))
        layers = self._frozen_feeds.layers(
            self.probe.model, [s.producer for s in sites], self.probe.generation)
        # A layer whose gradient the optimizer read in the window trained in it, frozen at
        # the log or not (a GAN's critic, requires_grad turned off for the generator's step:
        # the usual loop); without an optimizer, not known
        graded = self.tap.graded_layers(grad_sq) if self.tap is not None else None
        if graded is not None and any(layers):
            layers = [None if layer is not None and module_label(layer) in graded else layer
                      for layer in layers]
        # A call of an activation module, or of a module's functional op, another call of
        # which a gradient reached is no such site: its units may train through that call
        # (a consistency target under no_grad(), a block called twice, a second reentrant
        # checkpoint segment whose gradient is pooled into the first's), and a site said
        # frozen that trains would hide it. A producing layer that trains
        # (requires_grad) but got no gradient from the optimizer in the window does not make
        # such a site trainable: an EMA target
        # network left with requires_grad=True (swa_utils.AveragedModel leaves it so), run
        # under no_grad() beside the online one, was told to recycle and swap, and the
        # remedies did (a trial). Without an optimizer that is not known: only a site with
        # no producing layer is marked.
        reached = {(s.key.module_path, s.key.op) for s in sites if s.window_graded}
        return [NO_GRADIENT if layer is None and s.window_ungraded and not s.window_graded
                and (s.key.module_path, s.key.op) not in reached
                and (s.producer is None
                     or (graded is not None and module_label(s.producer) not in graded))
                else layer for s, layer in zip(sites, layers, strict=True)]

    def _read(self, close: bool, *, final: bool = False) -> IntervalRecord | None:
        """Sum, read back, derive, diagnose: the record of the open window (closing it when
        ``close``; ``final``: logged as closed, its site windows folded at the next attach)."""
        sites = self.probe.sites()
        logged = close or final
        grad_sq, layer_steps, ratio = (
            self.tap.read() if (logged and self.tap is not None) else (None, 0, None)
        )
        summed, world = self._sum_windows(sites, close=close, grad_sq=grad_sq)
        collected = self._steps_collected(summed, world)
        if logged and self.tap is not None:
            self._check_step_calls(self.tap)
        # What the read changes in the Doctor's state, done once its record is made (see
        # _fold): a read stopped midway (Ctrl-C, a bug) leaves the window whole for the next.
        later: list[Callable[[], object]] = []
        if not sites:
            record = self._read_nothing(logged=logged, collected=collected)
            self._fold(later, sites, summed, close=close, world=world, logged=logged)
            return record
        # Every site's window and lifetime side by side, on the device: one copy each (the
        # windows are cleared below), one transfer, and the metrics work on these matrices.
        window = torch.cat([summed[s.name] for s in sites], 1)
        lifetime = torch.cat([s.stats.lifetime for s in sites], 1)
        extra = [summed[_GRAD_SQ]] if _GRAD_SQ in summed else []
        firsts = [s for s in sites if _FIRST + s.name in summed]
        first_dead = (
            [torch.stack([SiteStats.first_dead_fraction(summed[_FIRST + s.name]) for s in firsts])]
            if firsts and world is not None else []
        )
        host = read_back(
            [window, lifetime, *first_dead, *extra,
             *([ratio] if ratio is not None and extra else [])]
        )
        host_first = host.pop(2) if first_dead else None
        # (one process's passes: with several, each ran its own batches)
        passes = self.probe.passes_seen(sites) if world == 1 else {}
        if self.steps_run == 0 and self.probe.stream == "eval":
            self._fold(later, sites, summed, close=close, world=world, logged=logged)
            return None  # no evaluation pass here: read only for the others' sum (log_eval)
        host_window, host_life = host[0], host[1]
        layer_rows: list[dict[str, Any]] = []
        saw = bool(host_window[_SEEN_ROWS].sum() > 0)
        # Judged on what every process saw: a window read by each process alone (they held
        # other sites) would have them decide apart (a remedy acting on one rank only).
        judged = saw and world is not None
        first_fractions: dict[str, float] = {}
        if judged and host_first is not None:  # stated once, summed (else kept for later)
            first_fractions = {s.name: float(v) for s, v in zip(firsts, host_first, strict=True)}

            def stated() -> None:  # (each site's fraction at its first pass, said once)
                for s in firsts:
                    s.stats.first = None

            later.append(stated)
        # the gradient-norm history with this window's, which the diagnosis reads
        norms = collections.deque(self._grad_norm_history, self._grad_norm_history.maxlen)
        norm_steps: int | None = None  # the collected steps this window's norm rests on
        if extra and self.tap is not None and layer_steps > 0 and judged:  # (else no rows)
            rows, total = layer_metrics(
                self.tap.layers, host[2], self.tap.window_layer_steps, world or 1,
                host[3] if ratio is not None else None,
                graded=self.tap.window_graded,
            )
            layer_rows = [{"step": self.global_step, **r} for r in rows]
            if logged:  # (bounded: the latest logs only)
                norms.append(total)
                norm_steps = layer_steps
                later.append(functools.partial(self._grad_norm_history.append, total))
        site_rows: list[dict[str, Any]] = []
        units: dict[str, Mapping[str, torch.Tensor]] = {}
        unsure = self._silent_units(later, sites, host_window, collected,
                                    logged=logged and judged)
        # Every site at once: one tensor op per metric, not a loop of them per site.
        unit_list, metric_rows = metrics_of_stacked(
            host_window, host_life, [s.units for s in sites], self.config.tau,
            lifetime_has_window=False,  # read before the fold
            inconclusive=unsure,
        )
        frozen = self._frozen_layers(sites, host[2] if extra else None)
        for s, u, sm, fz in zip(sites, unit_list, metric_rows, frozen, strict=True):
            site_rows.append(
                {
                    "step": self.global_step,
                    "site": s.name,
                    "op": s.key.op,  # a functional call's (None: a module's)
                    "family": s.family.name,
                    "leaky": s.family.leaky,
                    "cap": s.cap,
                    "order": s.order,
                    "unit_dim": s.unit_dim,
                    "unit_rule": s.unit_rule,
                    # the layer feeding it where it and its block do not train, else None
                    "frozen": fz,
                    "window_steps": collected,
                    "steps_collected": collected,
                    "steps_run": self.steps_run,
                    **sm,
                }
            )
            units[s.name] = u
        unit_table = _unit_frame(
            self.global_step, [s.name for s in sites], [s.units for s in sites],
            unit_list[0].stacked, self._table_memory,
        )
        if not judged:
            # The window saw nothing: no step of it collected (the last, partial window of a
            # sampled run, logged for its training metrics), or no pass of its stream ran;
            # or it holds this process's batches only. Nothing to judge, so the last judged
            # window's findings stand, neither ended nor begun again (the record is not
            # judged: see IntervalRecord.judged).
            if logged and self._window_scheduled > 0 and not saw:
                self._warn_saw_nothing()
            findings = self._tracker.open_findings()
            new: list[Finding] = []
            events: list[FindingEvent] = []
        else:
            first_now = self._first_rms_now(site_rows)  # (at a site's first log: its first)
            base_now = self._growth_base_now(site_rows)
            findings = diagnose(
                site_rows, units, self.config, step=self.global_step,
                param_grad_norms=norms, grad_norm_steps=norm_steps,
                first_rms={**first_now, **self._first_rms},
                growth_base={**base_now, **self._growth_base},
                declined=self._declined, site_passes=passes,
                parts=self.probe.parts(sites) if world == 1 else {},
                call_index={s.name: s.key.call_index for s in sites if s.key.call_index},
                unrecyclable=_unrecyclable(sites),
                norms={s.name: s.norm for s in sites if s.norm},
                normalised={s.name for s in sites if s.norm or s.mixed},
                positions={s.name: s.positions for s in sites},
                recycling=self._recycling(sites),
                swapping=self._bound_at(sites, lambda r: r.name == "leaky_relu_swap"),
                lifetime_steps=None if self._lifetime_steps is None else (
                    self._lifetime_steps[0] + collected, self._lifetime_steps[1] + self.steps_run),
                scaler_skipped=self._peek_skipped(),
                # (an evaluation stream's lifetime began at its first evaluation, after
                # training did: its units dead "since monitoring began" may have fired in
                # training, a trial's at lr 0.03 did, and were not the initialisation's)
                lifetime_restarted=self._lifetime_since is not None or self.probe.stream == "eval",
            )
            findings, new, events = self._tracker.update(findings, self.global_step, commit=False)
            if logged:
                later.append(functools.partial(self._tracker.commit, findings))
                later.append(functools.partial(self._first_rms.update, first_now))
                later.append(functools.partial(self._growth_base.update, base_now))
            later.append(functools.partial(self._take_skipped, close))
        record = IntervalRecord(
            step=self.global_step,
            site_rows=site_rows,
            unit_table=unit_table,
            layer_table=pd.DataFrame(layer_rows),
            findings=findings,
            new_findings=new,
            finding_events=events,
            keys={s.name: s.key for s in sites},
            judged=judged,
            steps_run=self.steps_run,
            steps_collected=collected,
            first_dead={k: v for k, v in first_fractions.items() if not math.isnan(v)},
        )
        self._fold(later, sites, summed, close=close, world=world, logged=logged)
        return record

    def _silent_units(self, later: list[Callable[[], object]], sites: Sequence[Site],
                      host_window: torch.Tensor, collected: int, *, logged: bool
                      ) -> torch.Tensor | None:
        """The silent units of a sampled window too briefly silent to call dead (None: a
        window of every step it ran, judged by the definition); ``logged``: a judged window
        closing, whose elements and activity the units' pasts then take (in ``later``: a
        read stopped midway changes nothing). See :mod:`relu_doctor._silence`."""
        elements = host_window[ROW["elements"]].numpy().copy()
        active = host_window[ROW["active"]].numpy().copy()
        layout = [(s.name, s.units) for s in sites]
        unsure = None
        if 0 < collected < self.steps_run:
            unsure = torch.from_numpy(self._silence.inconclusive(layout, elements, active))
        if logged:
            later.append(functools.partial(self._silence.update, layout, elements, active))
        return unsure

    def _first_rms_now(self, site_rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The activation RMS of the sites logged for the first time (with one: a site that
        saw nothing has none), 0 included (all dead then: see _growth_findings)."""
        return {str(r["site"]): rms for r in site_rows if str(r["site"]) not in self._first_rms
                and math.isfinite(rms := float(r.get("rms", math.nan)))}

    def _growth_base_now(self, site_rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The activation RMS of the sites with no growth baseline yet that have most of
        their units alive in this window: growth over time is measured from it. A site mostly
        dead at its first log has an RMS made of its few live units (0.007 at a U-Net's
        nearly dead site), which its revival, by recycling or by training, would read as a
        growth of 100x and more."""
        return {str(r["site"]): rms for r in site_rows if str(r["site"]) not in self._growth_base
                and float(r.get("dead_fraction", math.nan)) < GROWTH_BASE_DEAD
                and math.isfinite(rms := float(r.get("rms", math.nan))) and rms > 0}

    def _remedies_bound(self) -> list[tuple[Any, bool]]:
        """The listeners of this Doctor, and the remedies a treatment plan among them binds
        without listening (it decides when they act): each with whether a plan holds it."""
        out = [(fn, False) for fn in self._listeners]
        for fn in self._listeners:
            steps = getattr(fn, "_remedies", None)
            if isinstance(steps, dict):
                out += [(r, True) for r in steps.values()]
        return out

    def _recycling(self, sites: Sequence[Site]) -> dict[str, str]:
        """By site, the recycling remedy listening to this Doctor that may act there, or
        ``"treatment_plan"`` where a plan's recycle step may (its findings say so, and
        advise no other). A plan's Continual Backprop step goes by its own name: it acts by
        its own rule, not past the recycle step's threshold."""
        cbp = self._bound_at(sites, lambda r: r.name == "continual_backprop", held_as=None)
        return {**cbp, **self._bound_at(sites, lambda r: r.name == "dormant_reset")}

    def _bound_at(self, sites: Sequence[Site], which: Callable[[Any], bool], *,
                  held_as: str | None = "treatment_plan") -> dict[str, str]:
        """By site, the bound remedy (:meth:`_remedies_bound`, with a ``name`` and an
        ``acts_at``) for which ``which(remedy)`` holds that may act there, by its name, or
        ``held_as`` where a plan holds it (None: its own name); the first bound wins."""
        out: dict[str, str] = {}
        for fn, held in self._remedies_bound():
            if not isinstance(getattr(fn, "name", None), str) \
                    or not callable(acts_at := getattr(fn, "acts_at", None)) or not which(fn):
                continue
            out.update({s.name: held_as if held and held_as else fn.name for s in sites
                        if s.name not in out and acts_at(s.name)})
        return out

    def _fold(
        self, later: list[Callable[[], object]], sites: Sequence[Site],
        summed: Mapping[str, torch.Tensor], *, close: bool, world: int | None, logged: bool,
    ) -> None:
        """Once the record of the window just read is made: what the read changes in the
        Doctor's state (``later``: the findings committed, the first-dead fractions stated,
        the gradient-norm history, the first RMS, the loss scaler's skips taken), then the
        windows of ``sites`` closed (``summed``: see :meth:`_sum_windows`) when ``close``
        and the optimizer tap's when ``logged``. A read stopped midway (Ctrl-C, a bug)
        leaves all of it for the next read, where closing the sites' windows first lost
        their statistics and blamed the model for a window that recorded nothing."""
        for change in later:
            change()
        if close and world is not None:  # (see _sum_windows)
            for s in sites:
                s.stats.close_window(summed[s.name])
            self.probe.close_passes(sites)
        if logged:
            self.probe.say_unmasked()  # (at the last, partial window's log too)
        if logged and self.tap is not None:
            self.tap.reset()

    def _check_step_calls(self, tap: OptimizerTap) -> None:
        """Say once that ``doc.step()`` is called more often than the optimizers it watches
        step: a loop under gradient accumulation that calls it at every micro-batch (an
        accelerate trial's, whose ``optimizer.step()`` is a no-op at the steps that only
        accumulate) counts each call as a training step, and nothing said so. Judged on
        the collecting steps of the logged windows (at each, the tap sees whether an
        optimizer stepped), once at least 16 are seen: steps a loss scaler skipped count as
        steps (a GradScaler's first steps in fp16, given as ``grad_scaler=``; one not given
        skips a few at most, well under half of 16)."""
        seen = self._step_calls
        now = min(tap.most_steps + self._peek_skipped(), self.window_steps)
        seen[0] += now
        seen[1] += self.window_steps
        # (collecting steps since the optimizer last stepped, once it stepped at all)
        seen[2] = 0 if now else seen[2] + self.window_steps if seen[0] else 0
        stepped, calls, idle = seen[:3]
        if idle >= 16 and seen[3] == 0:
            seen[3] = 1
            warnings.warn(
                f"relu_doctor: the optimizer it watches ({tap.names()}) has not stepped in "
                f"the last {idle} collecting steps, though it did before: is another one "
                "training the model now? Give it with doc.set_optimizer(new_optimizer): "
                "until then no per-layer gradient norm or update ratio is measured, and the "
                "learning rates recorded are the old one's.",
                ReluDoctorWarning, stacklevel=user_stacklevel())
        # (judged where it stepped in this window: one that stopped is the warning above's)
        if calls < 16 or not 0 < 2 * stepped <= calls or seen[4] or not now:
            return
        seen[4] = 1
        warnings.warn(
            f"relu_doctor: doc.step() was called at {calls} collecting steps, and the "
            f"optimizer it watches stepped at {stepped} of them: each doc.step() counts as "
            "one training step (windows, the sampling and the lifetime counts are in "
            "calls, not updates), and windows without an update hold no per-layer "
            "gradient rows. Call it once per optimizer step that updates: under gradient "
            "accumulation, after the step at the end of each accumulation (with accelerate: "
            "`if accelerator.sync_gradients: doc.step()`). Where that optimizer is not the "
            "one training the watched model, pass that one as optimizer=; where an fp16 "
            "loss scaler skipped the steps, pass it as grad_scaler=.",
            ReluDoctorWarning, stacklevel=user_stacklevel())

    def _sum_windows(
        self, sites: Sequence[Site], *, close: bool, grad_sq: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], int | None]:
        """Every site's open window by name, summed across processes where they all hold the
        same sites (:meth:`~relu_doctor.doctor.Doctor.sum_across`; a process with none takes
        part too), with the layers' squared gradient norms ``grad_sq`` (when a site was
        seen: else they belong to no judged window) and, when ``close``, the windows a
        checkpoint restored for sites not run since, which are closed here: ``(sums,
        number of processes summed, or None where each process holds its own)``.

        Windows that each process read alone (None) are not closed: folded into the
        lifetime counts unsummed, they would make those differ between processes (a
        lifetime finding on one process only); they stay open, and the next log at which
        the processes hold the same sites sums them whole."""
        if sites:
            self.probe.place_restored(model_device(self.model))
        device = sites[0].stats.window.device if sites else model_device(self.model)
        named = {s.name: s.stats.window for s in sites}
        pending = self.probe.pending_windows() if close else {}
        named.update({t: w if device is None else w.to(device) for t, w in pending.items()})
        if grad_sq is not None and sites:
            named[_GRAD_SQ] = grad_sq
        if close:  # (the first readings not yet logged: see SiteStats.take_first)
            named.update(
                {_FIRST + s.name: s.stats.first for s in sites if s.stats.first is not None}
            )
        if self.all_reduce is not None:  # (see _steps_collected)
            named[_STEPS] = torch.tensor(
                [float(self.window_steps)], dtype=torch.float64, device=device
            )
        summed, world = self.sum_across(named, device)
        if pending and world is not None:
            self.probe.close_pending_windows({t: summed[t] for t in pending})
        return summed, world

    def _steps_collected(self, summed: Mapping[str, torch.Tensor], world: int | None) -> int:
        """The window's collected steps: this process's, or with several processes summed
        (with the windows), their mean, rounded down. A process whose model was in eval
        mode for a step collects one fewer, and its remedies, reading the steps as the
        evidence of a finding, would act at another log than the others'."""
        if world is None or _STEPS not in summed:
            return self.window_steps
        return int(summed[_STEPS].item()) // world

    def _read_nothing(
        self, *, logged: bool, collected: int
    ) -> IntervalRecord | None:
        """The record of a logged window before any site was seen (no pass of the stream ran
        yet: a model left in eval mode from the start): written for its steps and training
        metrics, it judges nothing. None for a look at the open window (``current()``)."""
        if not logged or self.steps_run == 0:
            return None
        if self._window_scheduled > 0 and self.window_steps == 0:  # (else passes ran: a
            self._warn_saw_nothing()  # site-less model, which its own warnings name)
        record = IntervalRecord(
            step=self.global_step,
            site_rows=[],
            unit_table=pd.DataFrame(columns=["step", "site", "unit", *UNIT_COLUMNS]),
            layer_table=pd.DataFrame(),
            findings=self._tracker.open_findings(),
            new_findings=[],
            keys={},
            judged=False,
            steps_run=self.steps_run,
            steps_collected=collected,
        )
        return record

    def _warn_saw_nothing(self) -> None:
        """Once: a window with collecting steps recorded no pass at all."""
        if self._warned_empty or self.probe.paused or self.probe.failed_sites():
            return  # (a failed site said so in its own warning)
        self._warned_empty = True
        # (a model in train() mode now was likely not called at all: a trial watched one
        # member of a vmap ensemble, which vmap never calls, and was told of eval mode)
        mode = ("It is in train() mode: was the watched module itself called (not a copy of "
                "it, another member of an ensemble, or only under torch.func's vmap)? "
                if self.probe.model.training else
                "Left in eval mode after an evaluation? Call .train() again on the "
                "model, or on the part of it each pass begins at (the mode of the module a "
                "pass begins at decides: an encoder in eval mode called through a method of "
                "a model in train mode makes no training pass). ")
        which = {
            "train": "no training pass of the model (in train() mode, gradients enabled) ran "
            f"in them. {mode}"
            "Called doc.step() on steps where the model does not train (a GAN's other "
            "model's steps)? Call it once per step of this model's optimizer. Watching a "
            "model that never trains (a frozen teacher, a target network)? Watch it with "
            "stream='eval', or 'all', and leave its mode as it is",
            "eval": "no evaluation pass (model.eval() or torch.no_grad()) ran in them",
        }.get(self.probe.stream, "no forward pass of the model ran in them")
        if self.window_steps > 0:  # passes of its stream ran, with no watched activation
            which = (f"{'training' if self.probe.stream == 'train' else 'its'} passes ran in "
                     f"{self.window_steps} of them, but no watched activation saw an element: "
                     "its batches were empty, or the model's activations were replaced (by "
                     "nn.Identity, say) or bypassed in its forward")
            if self.probe.padding_mask is not None:  # (a mask the wrong way round: all out)
                which += (", or the padding mask (padding_mask=) left every position out: it "
                          "must be nonzero at the real positions, zero at the padding")
        if said := transformed_text(self.probe.transformed_calls):
            which += ". " + said.rstrip(".")
        warnings.warn(
            f"relu_doctor: the window ending at step {self.global_step} recorded nothing in "
            f"its {self._window_scheduled} collecting step(s): {which}. Its statistics are empty "
            "and judge nothing (its findings are the last judged window's).",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def current(self) -> IntervalRecord | None:
        """The current window's record without closing it, or the last judged one (see
        ``IntervalRecord.judged``) when the current window is empty. Once training ended
        (the hooks removed), passes made after the last logged ``step()`` belong to no step
        and are not read as a window of their own: the last judged window is (passes with no
        window logged at all, ``step()`` never called, are still read). Reads device tensors
        (a host sync): call it off the hot path.

        With several processes (``all_reduce``), a window with steps run since the last log
        is read summed across them, a collective call that every process must make, as at a
        log; right after a log, or once training ended (a ``with`` block's exit,
        ``log_final``), it is the last judged record, read with no communication, so one
        process alone may call it then."""
        restore = self._count_open_window()
        try:
            if (self.steps_run > 0 and not self._unfolded) or (self.all_reduce is None and (
                    self.probe.attached or self._last_judged is None)):
                # Decided on the window summed across processes: every process makes the call.
                read = self._read(close=False)
                if read is not None and read.judged:
                    return read
            return self._last_judged
        finally:
            if restore is not None:
                restore()

    def _count_open_window(self) -> Callable[[], None] | None:
        """Hook: bring the open window's step counts up to date for :meth:`current` to read
        it (an evaluation stream's, whose steps are passes: see Doctor); returns what puts
        them back after the read, or None."""
        return None

    def findings(self) -> list[Finding]:
        """What is wrong now, most severe first (see :meth:`current`)."""
        rec = self.current()
        return [] if rec is None else rec.findings

    def to_pandas(self) -> pd.DataFrame:
        """One row per site: the site-level metrics of the current window (see :meth:`current`);
        none, with the same columns, before a window was read (a Doctor whose model has not
        run a training pass: a teacher run under ``no_grad``)."""
        rec = self.current()
        if rec is None:
            return pd.DataFrame(columns=site_columns())
        df = pd.DataFrame(rec.site_rows)
        for col in ("op", "frozen"):  # (None where not one, as in every row: not NaN beside
            if col in df:             # another row's string)
                df[col] = df[col].astype(object).where(df[col].notna(), None)
        return df

    def unit_table(self, site: str) -> pd.DataFrame:
        """One row per unit of ``site``: activation rate, mean |h|, dormant score, dead...
        (see :meth:`current`).

        The frame's ``attrs`` hold the unit dim and the rule that chose it.
        """
        s = self.probe.site(site)
        rec = self.current()
        if rec is None:
            raise ReluDoctorError(
                f"site: {site!r} has no statistics yet: run a forward pass (and call step()) "
                "before reading its units."
            )
        df = rec.unit_table[rec.unit_table["site"] == site].reset_index(drop=True)
        df.attrs.update({"unit_dim": s.unit_dim, "unit_rule": s.unit_rule, "family": s.family.name})
        return df

    units = unit_table  # the name before 0.2
