"""Swap activation: replace a dying site's ReLU module by LeakyReLU or PReLU, undoably.

:func:`swap_activation` / :func:`restore_activation` do the surgery
(:mod:`~relu_doctor.remedies._activation_surgery`); :class:`ActivationSwapper` decides when:
a site dead above a threshold for ``patience`` readings. Loading a checkpoint's state undoes
the swaps in place that the checkpoint does not hold (:meth:`ActivationSwapper.undo_unsaved`).

Example (a plain loop):

    >>> import torch, torch.nn as nn, relu_doctor
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> with relu_doctor.watch(net, log_every_n_steps=1) as doc:
    ...     swapper = ActivationSwapper(net, threshold=0.5, patience=2).bind(doc)
    ...     net(torch.randn(16, 4)).sum().backward()
    ...     _ = doc.step()
    >>> swapper.swaps
    {}
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from relu_doctor._validate import finite_or_none, glob_patterns, number_in, positive_int
from relu_doctor._validate import optimizers as check_optimizers
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Intervention
from relu_doctor.probes import Probe
from relu_doctor.remedies._activation_surgery import (
    KIND_NAMES,
    PRELU_ALONE,
    SWAP_KINDS,
    SWAPPED,
    SwapRecord,
    _check_kind,
    _module_path,
    _paths_of,
    restore_activation,
    swap_activation,
)
from relu_doctor.remedies._frozen import frozen_input
from relu_doctor.remedies._optim_state import add_param_group, remove_param_group
from relu_doctor.remedies.base import (
    DoctorLike,
    Optimizers,
    RecordLike,
    Remedy,
    check_model,
    get_module,
    refuse_several,
    site_snapshot,
)
from relu_doctor.sites import SiteKey, module_label

__all__ = ["SWAP_KINDS", "ActivationSwapper", "SwapRecord", "restore_activation", "swap_activation"]

class ActivationSwapper(Remedy):
    """Swap ReLU for LeakyReLU (or PReLU) where a site stays dead.

    A site is swapped when its dead fraction (units never active over the logging window)
    exceeds ``threshold`` for ``patience`` consecutive readings (a logging interval, or sampled
    ones pooled: :class:`~relu_doctor.remedies.evidence.DeadEvidence`). Swaps are undoable
    (:meth:`restore`) and round-trip through :meth:`state_dict`.

    Args:
        model: the model (the module paths of the sites are relative to it).
        kind: ``"leaky_relu"`` or ``"prelu"``.
        slope: the negative slope (PReLU's initial value).
        per_unit: PReLU only: one slope per unit, for sites with their units on dim 1 of
            every call counted and no 1-D call (torch's PReLU takes one slope there; one that
            first comes after the swap raises). Other sites are refused with a warning.
        threshold: dead fraction above which a site counts as dying, in [0, 1).
        patience: consecutive readings above the threshold before swapping.
        include: glob patterns of site names to treat (default: all).
        exclude: glob patterns of site names to leave alone.
        optimizer: optimizer(s) that receive PReLU's slopes.
        schedulers: their LR schedulers (extended to the new param group).
        probe: the probe whose hooks follow the swaps (taken from the doctor on :meth:`bind`).

    Attributes:
        swaps: ``{module path: SwapRecord}`` of the swaps in place.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> sw = ActivationSwapper(net)
        >>> sw.swap("1").what
        'replaced ReLU at 1 with LeakyReLU(negative_slope=0.01)'
        >>> _ = sw.restore(); net[1]
        ReLU()
    """

    name = "leaky_relu_swap"
    guards_loss = True  # (surgery: judged on the training loss too)
    reads_dead = True

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str = "leaky_relu",
        slope: float = 0.01,
        per_unit: bool = False,
        threshold: float = 0.5,
        patience: int = 2,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        optimizer: Optimizers = None,
        schedulers: Sequence[Any] = (),
        probe: Probe | None = None,
    ) -> None:
        super().__init__()
        self.model = check_model(model)
        self.kind = _check_kind(kind, " 'leaky_relu' uses a fixed slope; 'prelu' learns it.")
        self.on_shards = PRELU_ALONE if self.kind == "prelu" else None
        refuse_several(self.model, self.on_shards, arg="kind")
        self.slope = number_in("slope", slope, 0.0, 1.0)
        self.per_unit = bool(per_unit)
        self.threshold = number_in(
            "threshold", threshold, 0.0, 1.0, low_open=False, high_open=True,
            hint=" (a dead fraction, e.g. 0.5)",
        )
        self.patience = positive_int("patience", patience)
        self.include = glob_patterns("include", include)
        self.exclude = glob_patterns("exclude", exclude)
        self.optimizers = check_optimizers("optimizer", optimizer)
        self.schedulers = list(schedulers)
        self.probe = probe
        self.swaps: dict[str, SwapRecord] = {}
        # module path -> (the site the swap's intervention named, every site it changed)
        self._named: dict[str, tuple[str, list[str]]] = {}
        self.streaks: dict[str, int] = {}
        self._skipped: set[str] = set()
        # Swaps made before it (another run's swapper, a new Trainer's callback): its own,
        # so that its checkpoints hold them and a checkpoint saved before them undoes them;
        # those of its kind at its sites only (another swapper's are not: a review)
        for path, m in self.model.named_modules():
            desc = m.__dict__.get(SWAPPED)
            if isinstance(desc, dict) and desc.get("path") == path and (
                    desc.get("kind") == self.kind and self.acts_at(module_label(path))):
                self.reapply(desc)
        if self.kind == "prelu" and self.swaps and self.optimizers:  # (their slopes trained)
            self.add_param_groups(self.optimizers, schedulers=self.schedulers)

    def _on_bind(self, doctor: DoctorLike) -> None:
        self.probe = doctor.probe
        self.refresh()

    def refresh(self) -> None:
        """Re-register the probe's hooks on the current modules (after swaps or restores)."""
        if self.probe is not None:
            self.probe.refresh()

    def _module_sites(self, path: str) -> list[Any]:
        sites = self.probe.sites() if self.probe is not None else []
        return [s for s in sites if s.key.op is None and s.key.module_path == path]

    def _sites_of(self, paths: Sequence[str]) -> list[str]:
        """The sites of the module at ``paths``, else its first path's label (none ran)."""
        names = {s.name for p in paths for s in self._module_sites(p)}
        return sorted(names) or [module_label(paths[0])]

    def _site_units(self, path: str) -> int | None:
        for s in self._module_sites(path):
            for n in sorted({len(s.shape), *s.other_ranks}):
                if n < 2 or s.dim_for(n) != 1:
                    why = ("runs on one sample at a time (1-D calls), where PReLU takes a "
                           "single slope" if n < 2 else f"holds its units on dim {s.dim_for(n)} "
                           f"of its {n}-D calls, but PReLU's per-channel slopes act on dim 1")
                    raise ReluDoctorError(f"per_unit: site {s.name!r} {why}; use per_unit=False.")
            return int(s.units)
        return None

    def swap(
        self,
        site: str | SiteKey,
        *,
        step: int = 0,
        before: Mapping[str, Any] | None = None,
        reason: str = "requested",
    ) -> Intervention:
        """Swap the module of ``site`` now; return the intervention.

        ``site`` is a SiteKey, a site name of the bound Doctor, or a module path exactly as
        registered (``"enc:act"``, ``"a#1"``).
        """
        key, name = self.resolve_site(site)
        return self._swap(key, name, step=step, before=before, reason=reason)

    def _swap(
        self,
        key: SiteKey,
        name: str,
        *,
        step: int,
        before: Mapping[str, Any] | None,
        reason: str,
    ) -> Intervention:
        path = _module_path(key, "site")
        if path in self.swaps:
            raise ReluDoctorError(
                f"site: {name!r} was already swapped at this path ({module_label(path)!r})."
            )
        if (why := frozen_input(self.model, self._module_sites(path), name)) is not None:
            raise ReluDoctorError(why)
        n = (self._site_units(path) or 1) if self.kind == "prelu" and self.per_unit else 1
        rec = swap_activation(
            self.model,
            path=key,
            kind=self.kind,
            slope=self.slope,
            num_parameters=n,
            optimizer=self.optimizers,
            schedulers=self.schedulers,
        )
        self.swaps[path] = rec
        self.refresh()
        sites = self._sites_of(rec.paths)
        where = ", ".join(map(module_label, rec.paths))
        what = f"replaced {type(rec.old).__name__} at {where} with {rec.new!r}"
        if len(sites) > 1:
            what += (
                f"; the module is shared by {len(sites)} sites ({', '.join(sites)}): all changed"
            )
        if rec.param_groups:
            n_slopes = sum(p.numel() for p in rec.new.parameters())
            what += f"; {n_slopes} slope parameter(s) added to the optimizer"
        site = name if name in sites else sites[0]
        self._named[path] = (site, sites)
        return self._record(
            self._intervention(
                site=site,
                step=step,
                what=what,
                before=before,
                sites=sites,
                shared=len(sites) > 1,
                reason=reason,
                swap=rec.describe(),
            )
        )

    def restore(
        self, site: str | SiteKey | None = None, *, step: int | None = None,
        keep: Collection[str] = (),
    ) -> list[Intervention]:
        """Undo the swap of ``site`` (a SiteKey, site name or module path), or of every swap
        but those at the module paths ``keep``; return the interventions.

        Each names the site(s) its swap named, at ``step`` (default: the bound Doctor's
        current step, else 0).
        """
        if step is None:
            step = int(getattr(self.doctor, "global_step", 0) or 0)
        if site is None:
            kept = {keep} if isinstance(keep, str) else {str(k) for k in keep}  # ("13" not "1")
            paths = [p for p in reversed(self.swaps) if p not in kept]
        else:
            key, name = self.resolve_site(site)
            if key.module_path not in self.swaps or key.op is not None:
                raise ReluDoctorError(
                    f"site: {name!r} was not swapped; swapped paths: {list(self.swaps)}."
                )
            paths = [key.module_path]
        events = []
        for path in paths:
            rec = self.swaps.pop(path)
            if (known := self._named.pop(path, None)) is None:  # swapped before a checkpoint
                sites = self._sites_of(rec.paths)  # (its names were not saved)
                known = (sites[0], sites)
            named, sites = known
            restore_activation(self.model, record=rec, schedulers=self.schedulers)
            where = ", ".join(map(module_label, rec.paths))
            events.append(
                self._intervention(
                    site=named,
                    step=step,
                    what=f"restored {type(rec.old).__name__} at {where}",
                    before=None,
                    id_suffix=":restore",
                    measure_after=False,
                    undo=True,
                    sites=sites,
                    shared=len(sites) > 1,
                )
            )
        self.refresh()
        for e in events:
            self._record(e)
        return events

    def decide(self, record: RecordLike) -> list[Intervention]:
        events: list[Intervention] = []
        if (dead := self.evidence.add(record)) is None:
            return events  # a sampled window: its dead reading waits for more steps
        swapped = {p for rec in self.swaps.values() for p in rec.paths}
        for row in record.site_rows:
            site = str(row["site"])
            key = record.key(site)
            if (key.op is None and key.module_path in swapped) or row.get("leaky"):
                self.streaks.pop(site, None)
                continue
            if not Remedy.acts_at(self, site) or site in self._skipped:  # (functional: declined)
                continue
            frac = finite_or_none(dead.get(site))
            if frac is not None and frac > self.threshold:
                self.streaks[site] = self.streaks.get(site, 0) + 1
            else:
                self.streaks[site] = 0
            if self.streaks[site] < self.patience:
                continue
            try:
                ev = self._swap(
                    key, site, step=record.step, before=site_snapshot(row),
                    reason=f"dead_fraction > {self.threshold:g} for {self.streaks[site]} "
                    f"consecutive reading{'s' * (self.streaks[site] != 1)}{self.evidence.basis()}",
                )
            except ReluDoctorError as e:
                self._skipped.add(site)
                self.decline(site, str(e), record.step, "LeakyReLU swap")
                continue
            for s in ev.details["sites"]:
                self.streaks.pop(s, None)
            swapped.update(self.swaps[key.module_path].paths)
            events.append(ev)
        return events

    def acts_at(self, site: str) -> bool:
        """By ``include``/``exclude``, at an activation module's call (a functional call has
        no module to swap), not at a site it already left alone."""
        if not super().acts_at(site) or site in self._skipped:
            return False
        with contextlib.suppress(ReluDoctorError):  # not a Doctor's site (yet): by patterns
            return self.doctor is None or self.doctor.site_key(site).op is None
        return True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "swaps": [rec.describe() for rec in self.swaps.values()],
            "swap_sites": {p: [n, list(ss)] for p, (n, ss) in self._named.items()},
            "streaks": dict(self.streaks),
            "skipped": sorted(self._skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` and re-apply its swaps to the model; swaps in place
        that it does not hold are undone first (:meth:`undo_unsaved`).

        Load this before the model's own state dict when PReLU was used (its slopes are
        model parameters); with an optimizer given, the PReLU param groups are re-added so
        the optimizer's state dict loads too.
        """
        self.undo_unsaved(state)
        super().load_state_dict(state)
        self.streaks = {str(k): int(v) for k, v in state.get("streaks", {}).items()}
        self._skipped = set(state.get("skipped", []))
        self._named = {
            str(p): (str(v[0]), [str(x) for x in v[1]])
            for p, v in state.get("swap_sites", {}).items()
        }
        for desc in state.get("swaps", []):
            self.reapply(desc)
        self.refresh()

    def undo_unsaved(self, state: Mapping[str, Any], *, loaded: str = "the checkpoint loaded",
                     step: int | None = None) -> list[Intervention]:
        """Undo the swaps in place that ``state`` (this swapper's :meth:`state_dict` in a
        checkpoint) does not hold, said once and recorded as restores: ``loaded`` was saved
        before them, and its weights were trained with the old activation there (a best
        checkpoint loaded into the model training left: logits off, silently). Swaps made
        before this swapper was (a new Trainer's callback testing the model trained) are its
        own from the start (their modules are marked)."""
        undone = self.restore(step=step, keep=[str(d.get("path")) for d in state.get("swaps", [])])
        if undone:
            self.warn(f"relu_doctor: {loaded} was saved before the {KIND_NAMES[self.kind]} swap of "
                      f"{', '.join(repr(e.site) for e in undone)}: its weights were trained with "
                      "the old activation there, so that swap is undone and the model is the "
                      "checkpoint's (recorded as a restore).")
        return undone

    def reapply(self, desc: Mapping[str, Any]) -> SwapRecord | None:
        """Re-apply one swap described by :meth:`SwapRecord.describe` (on resume). A module
        already of the swapped kind at that path is adopted as is."""
        path = str(desc["path"])
        current = get_module(self.model, path, "state_dict")
        held = self.swaps.get(path)
        if held is not None and current is held.new:
            return held
        if held is not None:  # its module replaced since: taken again as it is now
            del self.swaps[path]
            for opt, group in held.param_groups:
                remove_param_group(opt, group, schedulers=self.schedulers)
            if not isinstance(current, nn.ReLU | nn.LeakyReLU | nn.PReLU):  # (a review)
                self.warn(f"relu_doctor: the swap at {module_label(path)!r} is dropped: its "
                          f"module was replaced since by a {type(current).__name__}.")
                return None
        kind = str(desc["kind"])
        expected = nn.LeakyReLU if kind == "leaky_relu" else nn.PReLU
        if isinstance(current, expected):
            old = nn.ReLU(inplace=bool(desc.get("inplace", False)))
            rec = SwapRecord(
                path,
                _paths_of(self.model, current) or [path],
                old,
                current,
                kind,
                float(desc["slope"]),
                int(desc.get("num_parameters", 1)),
            )
            self.swaps[path] = rec
            return rec
        rec = swap_activation(
            self.model,
            path=path,
            kind=kind,
            slope=float(desc["slope"]),
            num_parameters=int(desc.get("num_parameters", 1)),
            optimizer=self.optimizers,
            schedulers=self.schedulers,
        )
        self.swaps[path] = rec
        return rec

    def add_param_groups(
        self, optimizers: Sequence[torch.optim.Optimizer], *, schedulers: Sequence[Any] = ()
    ) -> None:
        """Give the PReLU slopes of every swap their own param group in ``optimizers``.

        For optimizers made after the swaps were re-applied (on resume): then their state
        dicts, saved with that extra group, load. Slopes an optimizer already holds in another
        group (built from ``model.parameters()`` after the swap) are moved out of it.
        """
        self.optimizers = check_optimizers("optimizers", list(optimizers))
        self.schedulers = list(schedulers)
        for rec in self.swaps.values():
            params = list(rec.new.parameters())
            if not params:
                continue
            ids = {id(p) for p in params}
            for opt in self.optimizers:
                own = [
                    g
                    for g in opt.param_groups
                    if g["params"] and {id(q) for q in g["params"]} <= ids
                ]
                if own:
                    if all(o is not opt for o, _ in rec.param_groups):
                        rec.param_groups.append((opt, own[0]))
                    continue
                for g in opt.param_groups:
                    g["params"] = [q for q in g["params"] if id(q) not in ids]
                rec.param_groups.append(
                    (opt, add_param_group(opt, params, schedulers=self.schedulers))
                )
