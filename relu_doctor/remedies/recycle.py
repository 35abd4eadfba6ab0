"""Recycle dormant units (ReDo, Sokar et al. 2023): fresh incoming weights, zero outgoing
weights, optimizer state of exactly those slices reset.

:func:`recycle_units` does the surgery on the layers :func:`~relu_doctor.remedies.unit_links.
find_unit_links` found; :class:`DormantRecycler` does it, every ``every`` logging intervals,
for the units a record marks dormant. Re-initialisation draws from a CPU generator seeded by
(seed, step, site), so every device and every rank draws the same numbers.
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
from relu_doctor.diagnosis import check_tau
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Intervention, InterventionResult
from relu_doctor.remedies._fresh import Init, drawn_by, fresh_rows, model_init
from relu_doctor.remedies._frozen import refuse_frozen
from relu_doctor.remedies._link_cache import Later, LinkCache, skip_for_now
from relu_doctor.remedies._optim_state import SliceFn, reset_state_slices
from relu_doctor.remedies._plan_reading import dead_give_zero
from relu_doctor.remedies.adam_step import (
    AdamStepRestart,
    check_adam_step_optimizers,
    restart_adam_step,
)
from relu_doctor.remedies.base import (
    Optimizers,
    RecordLike,
    Remedy,
    check_model,
    refuse_sharded,
    sharding_of,
)
from relu_doctor.remedies.evidence import MIN_EVIDENCE_STEPS, units_snapshot
from relu_doctor.remedies.unit_links import NotInPass, UnitLinks
from relu_doctor.sites import SiteKey

__all__ = ["DormantRecycler", "recycle_units"]

#: Why ReDo's surgery cannot act on sharded parameters.
WHOLE_ROWS = (
    "it re-initialises whole rows and columns of weight matrices and the optimizer state of "
    "those slices, which a process holding a shard does not have"
)


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


def _zero_rows(idx: torch.Tensor, dim: int = 0) -> SliceFn:
    def fn(t: torch.Tensor) -> None:
        t.index_fill_(dim, idx.to(t.device), 0)

    return fn


def _zero_inputs(
    m: nn.Module, weight: torch.Tensor, cols: torch.Tensor, in_dim: int = 1
) -> SliceFn:
    """Zero the input columns (Linear; rows of a weight stored ``(in, out)``: ``in_dim`` 0)
    or channels (conv, grouped or not; a transposed conv's, ``in_dim`` 0, all on its dim 0
    whatever its groups) ``cols``."""
    if isinstance(m, nn.Linear) or weight.dim() == 2 or in_dim == 0:
        return _zero_rows(cols, in_dim)
    groups = int(getattr(m, "groups", 1))
    in_pg = int(weight.shape[1])
    if groups == 1:

        def conv(t: torch.Tensor) -> None:
            t.index_fill_(1, cols.to(t.device), 0)

        return conv
    out_pg = int(weight.shape[0]) // groups
    parts = []
    for g in range(groups):
        local = cols[(cols // in_pg) == g] % in_pg
        if local.numel():
            parts.append((g, local))

    def grouped(t: torch.Tensor) -> None:
        for g, local in parts:
            t[g * out_pg : (g + 1) * out_pg].index_fill_(1, local.to(t.device), 0)

    return grouped


def _cut_norm(
    norm: nn.Module, ch: torch.Tensor, targets: list[tuple[torch.Tensor, SliceFn]]
) -> None:
    """A per-channel norm reading the units: scale 0, and the shift it gave a dead unit (0 in)
    kept, in training mode (batch statistics: its bias) as in eval mode (running ones)."""
    w, b = _tensor(norm, "weight"), _tensor(norm, "bias")
    rm, rv = _tensor(norm, "running_mean"), _tensor(norm, "running_var")
    assert w is not None
    dev = ch.to(w.device)
    if b is not None and rm is not None and rv is not None and not norm.training:
        eps = float(getattr(norm, "eps", 1e-5))
        shift = rm[dev] * w[dev] / torch.sqrt(rv[dev] + eps)
        b.index_copy_(0, dev, b[dev] - shift.to(b.dtype))
    w.index_fill_(0, dev, 0.0)
    targets.append((w, _zero_rows(ch)))
    if b is not None:
        targets.append((b, _zero_rows(ch)))
    for t, value in ((rm, 0.0), (rv, 1.0)):
        if t is not None:
            t.index_fill_(0, dev, value)


def recycle_units(
    links: UnitLinks,
    *,
    units: Sequence[int] | torch.Tensor,
    optimizers: Optimizers = None,
    generator: torch.Generator | None = None,
    reset_adam_step: bool = False,
    init: Init | None = None,
) -> dict[str, Any]:
    """Recycle ``units`` of a site (ReDo): re-initialise their incoming weights, zero their
    outgoing weights, reset the optimizer state of exactly those slices.

    * the producer's rows (weight and bias) get fresh values from ``init``, what initialises
      such a module in place (a Hugging Face model's ``_init_weights``: the remedies find
      it), run on a scratch copy of the producer; without it (or where it fails), from the
      layer's default initialisation (Kaiming-uniform with ``a=sqrt(5)``, bias
      ``U(+-1/sqrt(fan_in))``); drawn from ``generator`` on the CPU (so every device and
      every rank draws the same), the global random state left as it was;
    * a BatchNorm between producer and activation gets weight 1, bias 0, running mean 0 and
      running variance 1 for those units;
    * each consumer's input columns of those units are zeroed (``span`` columns per unit
      after a conv-to-linear flatten; grouped convs handled);
    * in every optimizer, each state tensor shaped like one of those parameters (Adam/AdamW
      ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``...) is zeroed
      on exactly those slices. Scalars such as Adam's ``step`` are left alone, unless
      ``reset_adam_step``: then those slices take their next Adam/AdamW steps as if their
      step count had restarted at 0 (:mod:`~relu_doctor.remedies.adam_step`; other
      optimizers are refused before anything changes).

    Everything else stays bit-identical.

    Returns:
        What changed: ``units``, ``producer``, ``norm``, ``consumers``, ``optimizer_state``
        (and ``optimizers``, their classes' names)
        (the state keys reset), ``init`` (which initialisation drew the new weights).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> from relu_doctor.remedies import find_unit_links
        >>> links = find_unit_links(net, site="1", example_inputs=torch.randn(3, 2))
        >>> out = recycle_units(links, units=[0, 2])
        >>> net[2].weight[0, [0, 2]].tolist()
        [0.0, 0.0]
    """
    idx = torch.as_tensor(
        list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long
    ).flatten()
    idx = torch.unique(idx)
    if idx.numel() == 0:
        return {
            "units": [],
            "producer": links.producer_path,
            "norm": links.norm_path,
            "consumers": [c.path for c in links.consumers],
            "optimizer_state": [],
            "optimizers": [],
            "init": "",
        }
    if int(idx.min()) < 0 or int(idx.max()) >= links.units:
        raise ReluDoctorError(
            f"units: indices must be in [0, {links.units}) for site {links.site!r}, got {idx.tolist()[:10]}."
        )
    opts = check_optimizers("optimizers", optimizers)
    if reset_adam_step:
        check_adam_step_optimizers("reset_adam_step", opts)
    prod = links.producer
    refuse_sharded("recycle_units", WHOLE_ROWS, sharding_of(prod), arg="links")
    refuse_frozen(links)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    targets: list[tuple[torch.Tensor, SliceFn]] = []
    with torch.no_grad():
        w = _tensor(prod, links.producer_param)
        assert w is not None
        d = links.producer_dim  # 1: a weight stored (in, out), each unit a column
        fresh, fb, drew = fresh_rows(prod, links.producer_param, d, idx, gen, init)
        w.index_copy_(d, idx.to(w.device), fresh.to(w.device, w.dtype).movedim(0, d))
        targets.append((w, _zero_rows(idx, d)))
        b = _tensor(prod, "bias")
        if b is not None and fb is not None:
            b.index_copy_(0, idx.to(b.device), fb.to(b.device, b.dtype))
            targets.append((b, _zero_rows(idx)))
        for nr in links.norms:
            ch = torch.nonzero(torch.isin(nr.channels, idx)).flatten()
            for name, value, is_param in (
                ("weight", 1.0, True),
                ("bias", 0.0, True),
                ("running_mean", 0.0, False),
                ("running_var", 1.0, False),
            ):
                t = _tensor(nr.module, name)
                if t is not None:
                    t.index_fill_(0, ch.to(t.device), value)
                    if is_param:
                        targets.append((t, _zero_rows(ch)))
        for c in links.consumers:
            cols = c.columns(idx)
            if c.kind == "norm":
                _cut_norm(c.module, cols, targets)
                continue
            cw = _tensor(c.module, c.param)
            assert cw is not None
            fn = _zero_inputs(c.module, cw, cols, c.in_dim)
            fn(cw)
            targets.append((cw, fn))
        state_keys = reset_state_slices(opts, targets)
        if reset_adam_step and restart_adam_step(opts, targets):
            state_keys = sorted([*state_keys, "step"])
    return {
        "units": idx.tolist(),
        "producer": links.producer_path,
        "norm": links.norm_path,
        "consumers": [c.path for c in links.consumers],
        "optimizer_state": state_keys,
        "optimizers": [type(o).__name__ for o in opts],
        "init": drew,
    }


def adopt_optimizers(remedy: Any, doctor: Any) -> None:
    """A recycler given no optimizers takes the Doctor's (``watch(optimizer=...)``): the
    recycled units' optimizer state (Adam's moments, momentum) is reset then, not left to
    push the fresh weights with their old units' history. Bound to another Doctor, it takes
    that one's; ``reset_adam_step`` checks them as it checks its own (raises: not bound)."""
    if remedy.optimizers and not getattr(remedy, "_adopted", False):
        return  # its own
    adopted = list(getattr(doctor, "optimizers", None) or [])
    remedy.adam_step.check(adopted)
    remedy.optimizers, remedy._adopted = adopted, True


class LinkedRemedy(Remedy):
    """A remedy that rewrites units through their producer and consumers (ReDo, Continual
    Backprop): the bound Doctor's optimizers adopted, a pending Adam step restart applied,
    and its links' cache watching the Doctor's probe for sites a pass did not run, letting
    go of what it kept for them at training's last log (see :class:`LinkCache`)."""

    guards_loss = True  # (surgery: judged on the training loss too)
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    adam_step: AdamStepRestart
    _finder: LinkCache

    def _before_bind(self, doctor: Any) -> None:
        adopt_optimizers(self, doctor)

    def _on_bind(self, doctor: Any) -> None:
        self.adam_step.apply_pending(self.model, self.optimizers)
        if getattr(doctor, "probe", None) is not None:  # (a branch its pass did not take)
            self._finder.watch_with(doctor.probe)

    def observe(self, record: RecordLike) -> list[InterventionResult]:
        if getattr(record, "final", False):  # training ended: no inputs kept for later
            self._finder.release()
        return super().observe(record)


class DormantRecycler(LinkedRemedy):
    """Recycle dormant units (ReDo, Sokar et al. 2023) every ``every`` logging intervals.

    The units are those the record marks below tau (ReDo score <= the doctor's tau: dormant
    units and the dead units whose score is that low), or those with ``dormant_score <= tau``
    when ``tau`` is given, and the dead ones of a family whose dead units output 0 (ReLU,
    ReLU6: recycling them changes no output).

    Args:
        model: the model (site paths are relative to it).
        optimizers: optimizer(s) whose state slices are reset (default: those of the Doctor
            it is bound to, ``watch(optimizer=...)``).
        tau: own dormant threshold in (0, 1), or None to use the record's ``below_tau`` flag.
        every: act on every n-th logging interval.
        max_fraction: recycle at most this fraction of a site's units at once (the most
            dormant first).
        include: glob patterns of site names to treat (default: all).
        exclude: glob patterns of site names to leave alone.
        on_unlinkable: ``"warn"`` (skip the site, once) or ``"raise"`` when a site's producer
            or consumers cannot be found.
        seed: base seed of the re-initialisation (combined with step and site), >= 0.
        example_inputs: input(s) of one forward pass (a tensor or a tuple of arguments) to
            read the producers and consumers from. By default the arguments of the model's
            latest call are kept (a reference, first two samples when batched) until the
            links are first needed, then one extra pass without gradients runs on them.
        reset_adam_step: restart Adam's step count for the recycled slices (their first
            updates bias-corrected as a fresh Adam's, not the tensor's: see
            :mod:`~relu_doctor.remedies.adam_step`); ``torch.optim.Adam``/``AdamW`` only,
            other optimizers raise :class:`~relu_doctor.errors.ReluDoctorError`.

    Attributes:
        recycled: ``{site name: units recycled so far}``.
        adam_step: the ``reset_adam_step`` option and its checkpoint state.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> rec = DormantRecycler(net, example_inputs=torch.randn(3, 2))
        >>> rec.recycle("1", units=[1], step=0).details["units"]
        [1]
    """

    name = "dormant_reset"
    on_shards = WHOLE_ROWS

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizers: Optimizers = None,
        tau: float | None = None,
        every: int = 1,
        max_fraction: float = 1.0,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        on_unlinkable: str = "warn",
        seed: int = 0,
        example_inputs: Any = None,
        reset_adam_step: bool = False,
    ) -> None:
        super().__init__()
        self.model = check_model(model)
        refuse_sharded(type(self).__name__, self.on_shards, sharding_of(self.model))
        self.optimizers = check_optimizers("optimizers", optimizers)
        self.tau = (
            None
            if tau is None
            else check_tau("tau", tau)
        )
        self.every = positive_int("every", every)
        self.max_fraction = number_in("max_fraction", max_fraction, 0.0, 1.0)
        self.include = glob_patterns("include", include)
        self.exclude = glob_patterns("exclude", exclude)
        if on_unlinkable not in ("warn", "raise"):
            raise ReluDoctorError(
                f"on_unlinkable: expected 'warn' or 'raise', got {on_unlinkable!r}."
            )
        self.on_unlinkable = on_unlinkable
        self.seed = positive_int("seed", seed, minimum=0)
        self.intervals = 0
        self.recycled: dict[str, int] = {}
        self._unlinkable: dict[str, str] = {}
        self._waiting: set[str] = set()  # skipped for now, said (see _link_cache.Later)
        self._finder = LinkCache(self.model, example_inputs=example_inputs)
        self.adam_step = AdamStepRestart(reset_adam_step, self.optimizers)

    def _on_bind(self, doctor: Any) -> None:
        super()._on_bind(doctor)
        # the units below tau on a few collected batches are as noisy as dead ones: the
        # Doctor collects as many steps per window for it as for the remedies reading those
        if doctor is not None:
            doctor.need_collected_per_window(MIN_EVIDENCE_STEPS)

    def links(self, site: str | SiteKey) -> UnitLinks:
        """The (cached) :class:`~relu_doctor.remedies.unit_links.UnitLinks` of ``site`` (a
        SiteKey, a site name of the bound Doctor, or a module path exactly as registered)."""
        return self._links_of(*self.resolve_site(site))

    def _links_of(self, key: SiteKey, name: str) -> UnitLinks:
        return self._finder.links(key, name)

    def _generator(self, site: str, step: int) -> torch.Generator:
        s = (self.seed * 1_000_003 + zlib.crc32(f"{site}@{step}".encode())) % (2**63)
        return torch.Generator().manual_seed(s)

    def recycle(
        self,
        site: str | SiteKey,
        *,
        units: Sequence[int],
        step: int = 0,
        before: Mapping[str, Any] | None = None,
    ) -> Intervention:
        """Recycle ``units`` of ``site`` (a SiteKey, a site name of the bound Doctor, or a
        module path exactly as registered) now; return the intervention.

        With several processes (the bound Doctor's ``all_reduce``) every process calls it,
        for the same sites in the same order (a treatment plan: in the order of their
        names, since a record's rows follow each process's order of first runs): the site's
        producer and consumers must be found on all of them
        (:meth:`LinkCache.links_everywhere
        <relu_doctor.remedies._link_cache.LinkCache.links_everywhere>`), else
        :class:`~relu_doctor.errors.ReluDoctorError` on all of them."""
        key, name = self.resolve_site(site)
        linked = self._finder.links_everywhere([(key, name)], doctor=self.doctor)[name]
        if isinstance(linked, str):
            raise (NotInPass if isinstance(linked, Later) else ReluDoctorError)(linked)
        if before is None or "changed_units_quiet" not in before:
            before = self._quiet_before(name, units, before)
        return self._recycle(key, name, units, step=step, before=before)

    def _quiet_before(self, site: str, units: Sequence[int],
                      before: Mapping[str, Any] | None) -> dict[str, Any]:
        """``before`` with the share of ``units`` dead or below tau, which the change is
        judged against: from the bound Doctor's last record (with its site's metrics, where
        ``before`` was not given), else all of them, the units a caller chose being its quiet
        ones (a review: a direct call was judged no more, and the report read 100% before)."""
        records = getattr(self.doctor, "records", None) or []
        row = records[-1].site_row(site) if records else None
        snap = units_snapshot(records[-1], row, units) if row is not None else {}
        share = snap.get("changed_units_quiet")
        return {**(snap if before is None else before),
                "changed_units_quiet": 1.0 if share is None else share}

    def _recycle(
        self,
        key: SiteKey,
        site: str,
        units: Sequence[int],
        *,
        step: int,
        before: Mapping[str, Any] | None,
    ) -> Intervention:
        links = self._links_of(key, site)
        self.adam_step.apply_pending(self.model, self.optimizers)
        what = recycle_units(
            links, units=units, optimizers=self.optimizers, generator=self._generator(site, step),
            reset_adam_step=self.adam_step.enabled, init=model_init(self.model, links.producer),
        )
        self.recycled[site] = self.recycled.get(site, 0) + len(what["units"])
        desc = (
            f"recycled {len(what['units'])} of {links.units} units: re-initialised their "
            f"incoming weights in {what['producer']}{drawn_by(what)}"
            + (f" (and reset {what['norm']})" if what["norm"] else "")
            + f", zeroed their outgoing weights in {', '.join(what['consumers'])}"
            + (
                f", reset optimizer state {', '.join(what['optimizer_state'])} of those slices"
                if what["optimizer_state"]
                else ""
            )
        )
        return self._record(
            self._intervention(
                site=site,
                step=step,
                what=desc,
                before=before,
                units=what["units"],
                links=links.describe(),
                optimizer_state=what["optimizer_state"],
                optimizers=what["optimizers"],
            )
        )

    def decide(self, record: RecordLike) -> list[Intervention]:
        self.intervals += 1
        if self.intervals % self.every:
            return []
        units = record.unit_table
        if units is None or not len(units):
            return []
        chosen_units: dict[str, tuple[list[int], Mapping[str, Any]]] = {}
        for row in record.site_rows:
            site = str(row["site"])
            if site in self._unlinkable or row.get("frozen") or not self.acts_at(site):
                continue  # (a frozen feed: taken up again where it trains)
            u = units[units["site"] == site]
            if self.tau is None:
                mask = u["below_tau"].astype(bool)
            else:
                mask = u["dormant_score"] <= self.tau
                if dead_give_zero(row):  # (elsewhere a dead unit gives the network a value)
                    mask = mask | u["dead"].astype(bool)
            chosen = u[mask.to_numpy()]
            if not len(chosen):
                continue
            limit = max(1, math.floor(self.max_fraction * int(row["units"])))
            chosen = chosen.sort_values(
                ["dormant_score", "unit"], na_position="first", kind="stable"
            ).head(limit)
            chosen_units[site] = (sorted(int(i) for i in chosen["unit"]), row)
        # Every process decides on the same record: the links must be found on all of them.
        links = self._finder.links_everywhere(
            [(record.key(site), site) for site in chosen_units], doctor=self.doctor
        )
        events = []
        for site, (idx, site_row) in chosen_units.items():
            if isinstance(found := links[site], Later):  # (a branch the pass did not take)
                skip_for_now(self._waiting, self.warn, "ReDo recycling", site, found)
                continue
            try:
                if isinstance(links[site], str):
                    raise ReluDoctorError(links[site])
                events.append(
                    self._recycle(
                        record.key(site), site, idx, step=record.step,
                        before=units_snapshot(record, site_row, idx),
                    )
                )
            except ReluDoctorError as e:
                if self.on_unlinkable == "raise":
                    raise
                self._unlinkable[site] = str(e)
                self.decline(site, str(e), record.step, "ReDo recycling")
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "intervals": self.intervals,
            "recycled": dict(self.recycled),
            "unlinkable": dict(self._unlinkable),
            "adam_step": self.adam_step.state_dict(self.model, self.optimizers),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.intervals = int(state.get("intervals", 0))
        self.recycled = {str(k): int(v) for k, v in state.get("recycled", {}).items()}
        self._unlinkable = {str(k): str(v) for k, v in state.get("unlinkable", {}).items()}
        self.adam_step.load_state_dict(state.get("adam_step", []), self.model, self.optimizers)
