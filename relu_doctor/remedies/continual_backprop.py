"""Continual Backprop (Dohare et al., Nature 2024): keep recycling the least useful mature
units, a small share at a time, so that a network stays plastic on a changing task.

Each unit's *contribution utility* is a running average of its mean ``|h|`` times the
magnitude of its outgoing weights (the sum of ``|w|`` over the consumer layers' columns of
that unit). Units younger than ``maturity`` steps are protected; among the mature ones, a
``replacement_rate`` per step accumulates into whole units, and that many of the lowest
utility (bias-corrected for its age, as the paper's code ranks it) are recycled with
ReDo's surgery (:func:`~relu_doctor.remedies.recycle.recycle_units`:
fresh incoming weights, zero outgoing weights, the optimizer state of those slices reset),
their utility and age set to 0.

The running average is updated once per logging interval from the interval's per-unit mean
``|h|`` (``unit_table["mean_abs"]``), with the per-step decay ``decay`` raised to the number of
steps in the interval, so it matches the paper's per-step average for a steady unit.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from relu_doctor._validate import glob_patterns, number_in, positive_int
from relu_doctor._validate import optimizers as check_optimizers
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Intervention
from relu_doctor.remedies._fresh import drawn_by, model_init
from relu_doctor.remedies._link_cache import Later, LinkCache, skip_for_now
from relu_doctor.remedies.adam_step import AdamStepRestart
from relu_doctor.remedies.base import (
    Optimizers,
    RecordLike,
    check_model,
    refuse_sharded,
    sharding_of,
)
from relu_doctor.remedies.evidence import units_snapshot
from relu_doctor.remedies.recycle import WHOLE_ROWS, LinkedRemedy, recycle_units
from relu_doctor.remedies.unit_links import Consumer, UnitLinks

__all__ = ["ContinualBackprop", "outgoing_magnitude"]


def outgoing_magnitude(links: UnitLinks) -> torch.Tensor:
    """Per unit of a site, the sum of ``|w|`` over every consumer weight that reads it
    (``span`` columns per unit after a flatten, its own columns of a concatenation, grouped
    convolutions per group; a norm reading it, its scale), on the CPU in float64.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> from relu_doctor.remedies import find_unit_links
        >>> mag = outgoing_magnitude(find_unit_links(net, site="1", example_inputs=torch.randn(2, 2)))
        >>> bool(torch.allclose(mag, net[2].weight.detach().abs().sum(0).double()))
        True
    """
    total = torch.zeros(links.units, dtype=torch.float64)
    for c in links.consumers:
        w = getattr(c.module, c.param, None)
        if not isinstance(w, torch.Tensor):
            continue
        total += c.per_unit(_per_input(c, w.detach().abs().double().cpu()), links.units)
    return total


def _per_input(c: Consumer, a: torch.Tensor) -> torch.Tensor:
    """``|w|`` of consumer ``c`` (``a``) summed per input feature or channel: over the output
    features of a Linear (whatever its input is, after a concatenation or a flatten), per
    channel of a convolution (within its group), the channel's own scale for a norm."""
    if c.kind == "norm" or a.dim() == 1:
        return a.reshape(-1)
    if isinstance(c.module, nn.Linear) or a.dim() == 2:  # (out, in), or (in, out): in_dim 0
        return a.sum(1 - c.in_dim)
    if c.in_dim == 0:  # a transposed convolution's (in, out/groups, *kernel)
        return a.sum(dim=list(range(1, a.dim())))
    groups = int(getattr(c.module, "groups", 1))
    out_pg = a.shape[0] // groups
    others = [d for d in range(a.dim()) if d != 1]
    return torch.cat([a[g * out_pg : (g + 1) * out_pg].sum(dim=others) for g in range(groups)])


class ContinualBackprop(LinkedRemedy):
    """Continual Backprop: recycle the lowest-utility mature units at a steady rate.

    Args:
        model: the model.
        optimizers: optimizer(s) whose state slices are reset for recycled units (default:
            those of the Doctor it is bound to, ``watch(optimizer=...)``).
        replacement_rate: units replaced per mature unit per step (the paper: 1e-4 to 1e-5
            per step; larger for short runs).
        maturity: steps a unit must have lived since its last replacement to be eligible.
        decay: per-step decay of the running utility average (the paper: 0.99).
        include: glob patterns of site names to treat (default: all).
        exclude: glob patterns of site names to leave alone.
        seed: base seed of the re-initialisation (combined with step and site).
        example_inputs: input(s) of one forward pass to find each site's producer and
            consumers from (default: the model's latest training call).
        reset_adam_step: restart Adam's step count for the replaced units' slices, as the
            paper's ``AdamGnT`` does (:mod:`~relu_doctor.remedies.adam_step`);
            ``torch.optim.Adam``/``AdamW`` only, other optimizers raise
            :class:`~relu_doctor.errors.ReluDoctorError`.

    Attributes:
        utility: ``{site: per-unit running contribution utility}`` (CPU float64).
        age: ``{site: per-unit steps since the last replacement}``.
        replaced: ``{site: units replaced so far}``.
        adam_step: the ``reset_adam_step`` option and its checkpoint state.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> cbp = ContinualBackprop(net, replacement_rate=0.01, maturity=10)
        >>> cbp.replacement_rate
        0.01
    """

    name = "continual_backprop"
    on_shards = WHOLE_ROWS

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizers: Optimizers = None,
        replacement_rate: float = 1e-4,
        maturity: int = 100,
        decay: float = 0.99,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        seed: int = 0,
        example_inputs: Any = None,
        reset_adam_step: bool = False,
    ) -> None:
        super().__init__()
        self.model = check_model(model)
        refuse_sharded(type(self).__name__, self.on_shards, sharding_of(self.model))
        self.optimizers = check_optimizers("optimizers", optimizers)
        self.replacement_rate = number_in(
            "replacement_rate", replacement_rate, 0.0, 1.0, hint=" (the paper uses 1e-4)"
        )
        self.maturity = positive_int("maturity", maturity, minimum=0)
        self.decay = number_in("decay", decay, 0.0, 1.0, low_open=False, high_open=True)
        self.include = glob_patterns("include", include)
        self.exclude = glob_patterns("exclude", exclude)
        self.seed = positive_int("seed", seed, minimum=0)
        self.utility: dict[str, torch.Tensor] = {}
        self.age: dict[str, torch.Tensor] = {}
        self.replaced: dict[str, int] = {}
        self._owed: dict[str, float] = {}  # fractional replacements carried over
        self._last_step: dict[str, int] = {}
        self._finder = LinkCache(self.model, example_inputs=example_inputs)
        self._links_failed: set[str] = set()
        self._waiting: set[str] = set()  # skipped for now, said (see _link_cache.Later)
        self.adam_step = AdamStepRestart(reset_adam_step, self.optimizers)

    def _links_of(self, record: RecordLike, site: str) -> UnitLinks:
        return self._finder.links(record.key(site), site)

    def update(self, record: RecordLike, site: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Fold ``record``'s interval into ``site``'s utilities and ages; return
        ``(utility, age, steps in the interval)``."""
        links = self._links_of(record, site)
        units = record.unit_table
        u = units[units["site"] == site].sort_values("unit")
        mean_abs = torch.tensor(u["mean_abs"].to_numpy(dtype="float64", copy=True))
        mean_abs = torch.nan_to_num(mean_abs, nan=0.0)
        # (a site first read now, first seen late or looked for since: the window's steps)
        since = self._last_step.get(site, int(record.step) - int(getattr(record, "steps_run", 0)
                                                                or record.step))
        steps = max(0, int(record.step) - since)
        self._last_step[site] = int(record.step)
        contribution = mean_abs * outgoing_magnitude(links)
        keep = self.decay**steps
        util, age = self.utility.get(site), self.age.get(site)
        if util is None or age is None or len(util) != links.units:  # (new, or made anew)
            util = torch.zeros(links.units, dtype=torch.float64)
            age = torch.zeros(links.units, dtype=torch.long)
        self.utility[site] = keep * util + (1.0 - keep) * contribution
        self.age[site] = age + steps
        return self.utility[site], self.age[site], steps

    def corrected(self, site: str) -> torch.Tensor:
        """``site``'s utilities bias-corrected for their age, as the paper's code ranks them:
        ``utility / (1 - decay**age)``. A running average that started at 0 ``age`` steps
        ago (a replaced unit's) is otherwise ranked below an old unit of the same
        contribution, and the same units are replaced again at every maturity."""
        age = self.age[site].double()
        seen = 1.0 - torch.pow(torch.tensor(self.decay, dtype=torch.float64), age)
        util = self.utility[site]
        return torch.where(seen > 0, util / seen.clamp(min=1e-300), util)

    def choose(self, site: str, steps: int) -> list[int]:
        """The units of ``site`` to replace now: the accumulated share of the mature ones,
        lowest utility first (ties: lower index)."""
        mature = torch.nonzero(self.age[site] >= self.maturity).flatten()
        owed = self._owed.get(site, 0.0) + self.replacement_rate * int(mature.numel()) * steps
        n = min(math.floor(owed), int(mature.numel()))
        self._owed[site] = owed - n
        if n <= 0:
            return []
        util = self.corrected(site)[mature]
        order = sorted(range(len(mature)), key=lambda i: (float(util[i]), int(mature[i])))
        return sorted(int(mature[i]) for i in order[:n])

    def _generator(self, site: str, step: int) -> torch.Generator:
        s = (self.seed * 1_000_003 + zlib.crc32(f"cbp:{site}@{step}".encode())) % (2**63)
        return torch.Generator().manual_seed(s)

    def decide(self, record: RecordLike) -> list[Intervention]:
        units = record.unit_table
        if units is None or not len(units):
            return []
        rows = [row for row in record.site_rows
                if self.acts_at(str(row["site"])) and not row.get("frozen")
                and str(row["site"]) not in self._links_failed]
        # Every process decides on the same record: the links must be found on all of them.
        found = self._finder.links_everywhere(
            [(record.key(str(row["site"])), str(row["site"])) for row in rows],
            doctor=self.doctor,
        )
        events = []
        for row in rows:
            site = str(row["site"])
            if isinstance(later := found[site], Later):  # (a branch the pass did not take)
                skip_for_now(self._waiting, self.warn, "ContinualBackprop", site, later)
                continue
            try:
                if isinstance(found[site], str):
                    raise ReluDoctorError(found[site])
                _, _, steps = self.update(record, site)
                idx = self.choose(site, steps)
                if not idx:
                    continue
                links = self._links_of(record, site)
                self.adam_step.apply_pending(self.model, self.optimizers)
                what = recycle_units(links, units=idx, optimizers=self.optimizers,
                                     generator=self._generator(site, record.step),
                                     reset_adam_step=self.adam_step.enabled,
                                     init=model_init(self.model, links.producer))
            except ReluDoctorError as e:
                self._links_failed.add(site)
                self.decline(site, str(e), record.step, "ContinualBackprop")
                continue
            self.utility[site][idx] = 0.0
            self.age[site][idx] = 0
            self.replaced[site] = self.replaced.get(site, 0) + len(idx)
            events.append(
                self._intervention(
                    site=site, step=record.step, before=units_snapshot(record, row, idx),
                    what=f"continual backprop replaced {len(idx)} of {links.units} mature "
                    f"units with the lowest contribution utility in {what['producer']}"
                    f"{drawn_by(what)}",
                    units=what["units"], links=links.describe(),
                    optimizer_state=what["optimizer_state"], optimizers=what["optimizers"],
                )
            )
        return events

    def treat(self, record: RecordLike) -> list[Intervention]:
        """:meth:`decide` and record the interventions now (a plan calling it)."""
        return [self._record(e) for e in self.decide(record)]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "utility": {k: v.clone() for k, v in self.utility.items()},
            "age": {k: v.clone() for k, v in self.age.items()},
            "replaced": dict(self.replaced),
            "owed": dict(self._owed),
            "last_step": dict(self._last_step),
            "links_failed": sorted(self._links_failed),  # (declined once: said)
            "adam_step": self.adam_step.state_dict(self.model, self.optimizers),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.utility = {str(k): torch.as_tensor(v, dtype=torch.float64)
                        for k, v in state.get("utility", {}).items()}
        self.age = {str(k): torch.as_tensor(v, dtype=torch.long)
                    for k, v in state.get("age", {}).items()}
        self.replaced = {str(k): int(v) for k, v in state.get("replaced", {}).items()}
        self._owed = {str(k): float(v) for k, v in state.get("owed", {}).items()}
        self._last_step = {str(k): int(v) for k, v in state.get("last_step", {}).items()}
        self._links_failed = {str(s) for s in state.get("links_failed", [])}
        self.adam_step.load_state_dict(state.get("adam_step", []), self.model, self.optimizers)
