"""The probe's sites: made at an activation's first call (its unit dim from the producing
layer, see :mod:`~relu_doctor.provenance`, or the shape rule), found by key or display name,
renamed as calls appear, and checkpointed with their accumulators.

:class:`SiteRegistry` is a part of :class:`~relu_doctor.probes.Probe` (a mixin), kept in its
own module so that ``probes.py`` holds the hooks.
"""

from __future__ import annotations

import fnmatch
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, user_stacklevel
from relu_doctor.families import FAMILIES, Family
from relu_doctor.provenance import registered_producer
from relu_doctor.sampling import model_device
from relu_doctor.sites import Site, SiteKey, display_names, module_label
from relu_doctor.stats import SiteStats, mask_for, resolve_unit_dim

if TYPE_CHECKING:
    from relu_doctor.provenance import ProvenanceTracker

__all__ = ["SiteRegistry"]


#: Tracked passes at most spent waiting: for a first site, and for a watched activation
#: module's first call.
_MAX_TRACKED = 8
# said of the units of a site first called in an untracked pass, until its next run's
# producer decides them (SiteRegistry._settle)
_PROVISIONAL = " (for now: its first call ran in a pass that did not trace layers)"


class SiteRegistry:
    """The sites half of :class:`~relu_doctor.probes.Probe` (see the module)."""

    if TYPE_CHECKING:  # what it uses of the Probe (set in Probe.__init__)
        model: nn.Module
        unit_dims: dict[str, int]
        unit_rules: dict[str, str]
        unit_norms: dict[str, str]
        unit_mixed: dict[str, str]
        _sites: dict[SiteKey, Site]
        _names: dict[str, Site]
        _listeners: list[Callable[[], None]]
        _renewal_listeners: list[Callable[[str], object]]
        _kept: dict[SiteKey, int]
        generation: int
        _pending: dict[str, Any]
        _provenance: ProvenanceTracker
        _unresolved: dict[SiteKey, int]
        _shape_rule: set[SiteKey]
        _provisional: set[SiteKey]
        _not_units: set[SiteKey]
        _want_provenance: bool
        _warned_units: set[SiteKey]
        _warned_experts: bool
        _warned_expert_calls: bool
        _tracked_passes: int
        _targets: dict[nn.Module, tuple[str, Family]]
        _failed: set[SiteKey]
        _pass_in_graph: bool
        _mask: torch.Tensor | None

        def targets(self) -> dict[nn.Module, tuple[str, Family]]: ...

        def selected(self, path: str) -> bool: ...

    def _by_mask(self, shape: tuple[int, ...], dim: int, rule: str) -> tuple[int, str]:
        """The shape rule's ``(dim, rule)`` for an output no layer is known to have made, or,
        where the pass's padding mask does not fit it with that dim left out and fits it
        with another left out, that one (the last of several: features last): the mask's
        dims are positions, not units. A sequence trial's ``F.relu`` on ``(N, C, T)``
        features with its ``(N, T)`` mask read the time steps as units, and, T varying,
        dropped every batch of another length."""
        mask = self._mask
        if mask is None or len(shape) < 3 or mask_for(shape, dim, mask) is not None:
            return dim, rule
        fits = [d for d in range(1, len(shape)) if mask_for(shape, d, mask) is not None]
        if not fits:
            return dim, rule
        return fits[-1], (f"dim {fits[-1]}, the padding mask {tuple(mask.shape)} fitting the "
                          "other dims")

    def _site(
        self,
        output: torch.Tensor,
        key: SiteKey,
        family: Family,
        module: nn.Module | None,
        *,
        traced: bool = False,
    ) -> Site | None:
        """The site of ``key``, made at its first call; None when this call is not counted
        (its unit count changed, or, for a 1-D call, its producer is to be found in the
        next pass).

        ``traced``: called while torch.compile traces (no producer tracking: shape rule).
        """
        site = self._sites.get(key)
        shape = tuple(output.shape)
        if not shape:  # one value (a learned gate, a clamped scale): no units to watch
            if key not in self._not_units:
                self._not_units.add(key)
                self._warn_scalar(key)
            return None
        if site is not None:
            if site.restored and site.stats.window.device != output.device:
                site.stats.to(output.device)  # made from a checkpoint on another device
            if key in self._provisional and self._provenance.tracking:
                self._settle(site, output)
            dim = site.dim_for(len(shape))
            if not 0 <= dim < len(shape) or shape[dim] != site.units:
                if site.restored:  # the hook's failure path warns, and the site steps aside
                    raise ReluDoctorError(
                        f"site {site.name!r}: the checkpoint has {site.units} units for this "
                        f"site, the model runs it on shape {shape}. The checkpoint was made on "
                        "a model of another shape; load it into the model it was saved from."
                    )
                if not (0 <= dim < len(shape) and self._replaced(site)):
                    self._kept[key] = self.generation  # (not again until modules change)
                    self._warn_units(site, shape)
                    return None
                self._renew(site, shape, output.device)
            site.restored = False
            if len(shape) != len(site.shape):
                site.other_ranks.add(len(shape))
            if site.family is not family:  # the module was replaced (see refresh())
                site.family = family
                site.cap = family.cap_of(module)
                for fn in self._listeners:
                    fn()
            return site
        if len(shape) == 1 and key in self._not_units:
            return None  # (said once; a later call of another rank may make the site)
        label = module_label(key.module_path)
        override, why, given_norm, given_mixed = None, None, "", ""
        for pat, dim in self.unit_dims.items():
            if fnmatch.fnmatchcase(label, pat):
                override, why = dim, self.unit_rules.get(pat)
                given_norm = self.unit_norms.get(pat, "")
                given_mixed = self.unit_mixed.get(pat, "")
        # A site first seen in an eager part of a compiled pass (after a graph break: the
        # pass began in the graph, where no producer tracking starts, so none ever would)
        # takes the shape rule, as one first seen while compiling does.
        follow = (override is None and not traced and key not in self._shape_rule
                  and not (self._pass_in_graph and not self._provenance.tracking))
        kin = None
        provisional = False
        if follow and not self._provenance.tracking:
            # First seen in an untracked pass. Another call of the same activation module (a
            # module run once more in a loop of varying length) takes the units of its call
            # before where its output is laid out alike. Any other call (a functional call
            # first made on a branch) is counted by the shape rule for now, and its producer
            # found at its next run, in a tracked pass (see _settle); a 1-D call, which may
            # have no units at all, waits for it.
            kin = self._kin(key, shape) if key.op is None else None
            if kin is None:
                self._unresolved.setdefault(key, 0)
                self._want_provenance = True
                if len(shape) == 1:
                    return None
                provisional = True
        try:
            unit_dim, rule = resolve_unit_dim(shape, override)
        except ValueError as e:
            raise ReluDoctorError(f"unit_dims for {label!r}: {e}.") from None
        if kin is not None:  # (its producer is not known: only the layout is shared)
            unit_dim = kin.dim_for(len(shape))
            where = "last dim" if unit_dim == len(shape) - 1 > 0 else f"dim {unit_dim}"
            rule = (f"{where}, as call #{kin.call_index} of the same activation, whose "
                    "output was laid out alike (this call's own layer was not traced)")
        origin = self._provenance.origin(output) if follow else None
        if origin is None and override is None and len(shape) == 1:
            # A 1-D output that no layer it knows made: mostly per-sample scalars (a hinge
            # or a margin, F.relu(1 - y * f)), whose "units" would be a batch's samples,
            # dead whenever a margin holds (and a dead surge would set off remedies); or
            # one sample through a layer it cannot follow. No site; said once.
            self._unresolved.pop(key, None)
            self._not_units.add(key)
            self._warn_not_units(key, traced)
            return None
        if origin is not None:
            unit_dim, rule = origin.dim, origin.rule(len(shape))
        elif why is not None:
            rule = f"{why} -> dim {unit_dim}"
        elif (not follow and override is None and kin is None and key.op is None
              and key.call_index == 0
              and (guess := registered_producer(self._provenance.model, key.module_path,
                                                shape)) is not None):
            unit_dim, rule = guess  # (no pass followed: the layer registered before it)
        elif provisional:
            unit_dim, rule = self._by_mask(shape, unit_dim, rule)
            rule += _PROVISIONAL
        elif follow and kin is None:
            unit_dim, rule = self._by_mask(shape, unit_dim, rule)
            rule += " (no producing layer found)"
        if not shape[unit_dim]:  # no units: an empty layer, or a dim torch.compile let vary
            return None
        if provisional:
            self._provisional.add(key)
        else:
            self._unresolved.pop(key, None)
        site = Site(
            key=key,
            family=family,
            unit_dim=unit_dim,
            unit_rule=rule,
            units=shape[unit_dim],
            order=max((s.order for s in self._sites.values()), default=-1) + 1,
            stats=SiteStats(shape[unit_dim], output.device),
            shape=shape,
            cap=family.cap_of(module),
            from_end=kin.from_end if kin is not None else override is None or override < 0,
            producer=(origin.layer if origin is not None
                      else kin.producer if kin is not None else None),
            summed=origin.summed if origin is not None else kin is not None and kin.summed,
            chained=(origin.after_site if origin is not None
                     else kin.chained if kin is not None else None),
            mixed=(origin.mixed if origin is not None else kin.mixed if kin is not None
                   else given_mixed),
            norm=(origin.norm if origin is not None else kin.norm if kin is not None
                  else given_norm),
            experts=origin.experts if origin is not None else kin.experts if kin is not None else 0,
        )
        site.made_by = self._made_by(site)
        self._sites[key] = site
        self._rename()
        if site.experts and not self._warned_experts:
            self._warned_experts = True
            self._warn_experts(site)
        elif key.call_index == 1 and not self._warned_expert_calls and self._experts_of(key):
            self._warned_expert_calls = True
            self._warn_expert_calls(key)
        pending = self._pending.pop(key.token(), None)
        if pending is not None:
            _restore(site, pending)
        for fn in self._listeners:
            fn()
        return site

    def _settle(self, site: Site, output: torch.Tensor) -> None:
        """The first call of ``site``'s key in a tracked pass since it was made by the shape
        rule (in an untracked pass): its producer decides its units now. Where they are the
        shape rule's, what was counted stands; else the site is made anew on them, quietly
        (its counts so far were of other units, its first call's alone)."""
        self._provisional.discard(site.key)
        self._unresolved.pop(site.key, None)
        shape = tuple(output.shape)
        origin = self._provenance.origin(output)
        if origin is None:
            site.unit_rule = site.unit_rule.removesuffix(_PROVISIONAL) + (
                " (no producing layer found)")
            return
        site.producer, site.summed, site.mixed = origin.layer, origin.summed, origin.mixed
        site.norm, site.chained, site.experts = origin.norm, origin.after_site, origin.experts
        site.made_by = self._made_by(site)
        site.unit_rule = origin.rule(len(shape))
        if origin.dim != site.dim_for(len(shape)) or shape[origin.dim] != site.units:
            self._anew(site, origin.dim, shape, output.device)

    def _anew(self, site: Site, dim: int, shape: tuple[int, ...], device: torch.device) -> None:
        """Make ``site`` anew on the units along ``dim`` of ``shape`` (its layer replaced, or
        its producer found to make other units than the shape rule took): accumulators and
        a count of the window's passes of its own from here, and what keeps readings of it
        told (:meth:`on_renewal`)."""
        site.unit_dim, site.units = dim, shape[dim]
        site.shape, site.other_ranks = shape, set()
        site.stats, site.window_passes = SiteStats(site.units, device), 0
        for fn in self._listeners:
            fn()
        for renewed in self._renewal_listeners:
            renewed(site.name)

    def _made_by(self, site: Site) -> weakref.ref[nn.Module] | None:
        """A weak reference to the module whose replacement makes ``site`` anew: the layer
        found feeding it, else the module at its path (an activation module, or the one
        whose forward makes the functional call); None where neither is in the model."""
        try:
            return weakref.ref(self.model.get_submodule(site.producer or site.module_path))
        except (AttributeError, TypeError):
            return None

    def _replaced(self, site: Site) -> bool:
        """Whether the module ``site`` was made with (:meth:`_made_by`) is no longer the
        one at its path: the user replaced a layer (a new head of another width). Asked
        once per hooking of the model (``generation``) for a site whose calls change width
        otherwise (a reused module), not at each of its calls."""
        if self._kept.get(site.key) == self.generation:
            return False
        ref = site.made_by
        now = self._made_by(site)
        return ref is not None and (now is None or now() is not ref())

    def _renew(self, site: Site, shape: tuple[int, ...], device: torch.device) -> None:
        """Make ``site`` anew where its layer was replaced by one of another width: the new
        layer's units get accumulators of their own, its window and lifetime start here
        (the old layer's statistics of the open window are dropped), said once per change."""
        old, dim = site.units, site.dim_for(len(shape))
        site.made_by = self._made_by(site)
        self._warned_units.discard(site.key)
        warnings.warn(
            f"relu_doctor: site {site.name!r} now runs on {shape[dim]} units (it had {old}): "
            f"{module_label(site.producer or site.module_path)!r} was replaced by a layer of "
            "another width. Its statistics start anew from this step (what its window had "
            "collected of the old layer is dropped; its lifetime counts are the new layer's, "
            "and findings and remedies judge the new layer from the next log).",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )
        self._anew(site, dim, shape, device)

    def on_renewal(self, fn: Callable[[str], object]) -> None:
        """Call ``fn(site name)`` when a site is made anew at another width (its layer
        replaced): what is kept of the old layer's readings goes."""
        self._renewal_listeners.append(fn)

    def _kin(self, key: SiteKey, shape: tuple[int, ...]) -> Site | None:
        """The site of the nearest earlier call of ``key``'s activation module whose output
        had the rank of ``shape`` and as many units along its unit dim, or None."""
        best: Site | None = None
        for site in self._sites.values():
            k = site.key
            if (k.module_path != key.module_path or k.op != key.op
                    or k.call_index >= key.call_index or len(site.shape) != len(shape)):
                continue
            if shape[site.unit_dim] == site.units and (
                    best is None or k.call_index > best.key.call_index):
                best = site
        return best

    def _warn_experts(self, site: Site) -> None:
        """Once a probe: a site pools the units of a mixture's experts (a Hugging Face
        trial: Mixtral's default ``grouped_mm`` experts, one expert made dead while tokens
        were routed to it, read "dead 0")."""
        warnings.warn(
            f"relu_doctor: {site.name!r} runs the {site.experts} experts of "
            f"{module_label(site.producer or '')!r} in one grouped call, and so may other "
            "sites: its unit j is unit j of every expert together, so the counts pool the "
            "experts (an expert whose units never fire reads alive where another's fire) and "
            "recycling cannot treat it. To watch each expert apart, run them one by one: a "
            "Hugging Face model loaded with experts_implementation=\"eager\" (each expert's "
            "call is then a site). Training goes on; the site is watched as it is.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _experts_of(self, key: SiteKey) -> bool:
        """Whether the activation module of ``key`` is a mixture's experts' ``act_fn``, run
        once an expert called: its parent holds ``num_experts`` and the experts' stacked
        weights (3-D parameters), as transformers' experts do (a review: a model merely
        holding ``num_experts`` and calling a ReLU twice was told so)."""
        if key.op is not None or not key.module_path:
            return False
        parent_path, _, name = key.module_path.rpartition(".")
        try:
            parent = self.model.get_submodule(parent_path)
        except AttributeError:
            return False
        return (name == "act_fn" and isinstance(getattr(parent, "num_experts", None), int)
                and any(p.dim() == 3 for p in parent.parameters(recurse=False)))

    def _warn_expert_calls(self, key: SiteKey) -> None:
        """Once a probe: a mixture's experts run one by one through one activation module (an
        MoE trial: a dead expert read under another's site, or recovered when the router
        skipped an expert before it)."""
        warnings.warn(
            f"relu_doctor: {module_label(key.module_path)!r} runs once for each expert that "
            "got tokens in a pass, and so may other layers' experts: its site #k is the k-th "
            "such expert in the pass, not expert k, and is another expert in a pass where an "
            "expert before it got no token (an expert never picked has no site). Read a dead "
            "#k with the router's choices in mind. Training goes on; the sites are watched as "
            "they are.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _warn_scalar(self, key: SiteKey) -> None:
        warnings.warn(
            f"relu_doctor: {key.name(key.call_index > 0)!r} runs on a 0-D tensor (one value, "
            "such as a learned gate or a clamped scale): it has no units, so its 0-D calls are "
            "not watched. Training goes on; the other sites are watched as usual.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _warn_not_units(self, key: SiteKey, traced: bool) -> None:
        name = key.name(key.call_index > 0)
        label = module_label(key.module_path)
        made = (
            "under torch.compile, which hides from relu_doctor the layer that made it: it may "
            "hold one value per sample (a hinge or a margin computed in forward) or one "
            "sample through a layer (a Linear run unbatched)"
            if traced
            else "that no layer relu_doctor follows made: one value per sample (a hinge or a "
            "margin computed in forward, a score per graph edge) or one sample through a "
            "layer it cannot follow (a GRUCell, a matmul with a parameter)"
        )
        warnings.warn(
            f"relu_doctor: {name!r} runs on a 1-D tensor {made}. Its entries are not taken "
            "for units, so its 1-D calls are not watched until the same call runs on "
            "batches. One value per sample: keep a unit dim of 1 (x.unsqueeze(-1), a "
            "(samples, 1) tensor) to watch it as one unit. One sample's features, the same "
            f"count at every call: pass unit_dims={{{label!r}: -1}} to take each entry as a "
            "unit (not where their count varies, as a batch's edges do: each count would be "
            "another site's).",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _warn_units(self, site: Site, shape: tuple[int, ...]) -> None:
        if site.key in self._warned_units:
            return
        self._warned_units.add(site.key)
        warnings.warn(
            f"relu_doctor: site {site.name!r} had {site.units} units along dim {site.unit_dim} "
            f"({site.unit_rule}) and now runs on shape {shape}; calls with another unit count "
            "are left out (is the module reused on another width?). Set "
            f"unit_dims={{{module_label(site.module_path)!r}: DIM}} to choose the unit dim.",
            ReluDoctorWarning,
            stacklevel=4,
        )

    def _provenance_done(self) -> bool:
        """After a tracked pass: whether every site has its producer (tracking can stop).
        A site not seen again in 3 tracked passes takes the shape rule; a model that showed
        no site in 8 tracked passes (nothing to watch, or only symbolic passes) stops too.
        While a watched activation module has not run yet (LayerDrop skips whole layers)
        tracking goes on, for 8 tracked passes at most, so that its first call, when it
        comes, is counted: a first call in an untracked pass is not."""
        self._tracked_passes += 1
        for key in list(self._unresolved):
            self._unresolved[key] += 1
            if self._unresolved[key] >= 3:
                del self._unresolved[key]
                self._shape_rule.add(key)
                if key in self._provisional:  # (not run again: the shape rule stays)
                    self._provisional.discard(key)
                    site = self._sites[key]
                    site.unit_rule = site.unit_rule.removesuffix(_PROVISIONAL) + (
                        " (its layer was not traced: it ran only in passes that were not)")
        if self._tracked_passes < _MAX_TRACKED:
            ran = {k.module_path for k in self._sites} | {k.module_path for k in self._failed}
            if any(path not in ran for path, _ in self._targets.values()):
                return False
        return not self._unresolved and (bool(self._sites) or self._tracked_passes >= _MAX_TRACKED)

    def _rename(self) -> None:
        names = display_names(self._sites)
        for key, site in self._sites.items():
            site.name = names[key]
            site.reused = site.name != module_label(key.module_path)
        self._names = {s.name: s for s in self._sites.values()}

    def on_new_site(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` whenever a new site is discovered."""
        self._listeners.append(fn)

    def sites(self) -> list[Site]:
        """Sites seen so far, in order of first execution."""
        return sorted(self._sites.values(), key=lambda s: s.order)

    def site(self, name: str) -> Site:
        """The site whose display name is ``name``; raises with the list of known names."""
        site = self._names.get(name)
        if site is None:
            raise ReluDoctorError(
                f"site: no site named {name!r}; known sites: {[s.name for s in self.sites()]}."
            )
        return site

    def site_by_key(self, key: SiteKey) -> Site | None:
        """The site of ``key``, or None when that call has not run yet."""
        return self._sites.get(key)

    def site_state(self) -> dict[str, Any]:
        """Every site's accumulators and description (``site``: what a resumed process needs
        to make the site before its first call), keyed by :meth:`SiteKey.token`
        (checkpoints)."""
        state = {
            k.token(): {**s.stats.state_dict(), "site": {
                **_description(s), **({"provisional": True} if k in self._provisional else {})}}
            for k, s in self._sites.items()
        }
        return {**self._pending, **state}

    def load_site_state(self, state: Mapping[str, Any], *, functional: bool = True) -> None:
        """Restore :meth:`site_state`. A site this process has not seen is made from its
        description at once, so its restored window is logged at the next log as in an
        uninterrupted run, whether or not it runs before then, if this probe would watch
        it: a module site whose module is a watched activation (``include``/``exclude``), a
        functional call's (with ``functional``) in a selected module. Any other entry (one
        without a description, from an older version) is restored when its site first
        runs. A site made by an earlier load and not run since goes when this state lacks
        it (the later checkpoint replaces the earlier one)."""
        dropped = [k for k, s in self._sites.items() if s.restored and k.token() not in state]
        for key in dropped:
            del self._sites[key]
        for key, site in self._sites.items():
            if key.token() in state:
                _restore(site, state[key.token()])
        known = {k.token() for k in self._sites}
        module_paths = {path for path, _ in self.targets().values()}
        call_paths = (  # where a functional call is watched
            {path for path, _ in self.model.named_modules() if self.selected(path)}
            if functional else set())
        device = model_device(self.model)
        self._pending = {}
        made = False
        for token, st in state.items():
            if token in known:
                continue
            made_site = _described(token, st, module_paths, call_paths, device)
            if made_site is None:
                self._pending[token] = st
                continue
            made_site.made_by = self._made_by(made_site)
            self._sites[made_site.key] = made_site
            _restore(made_site, st)
            if st["site"].get("provisional"):  # (its producer decides at its next run)
                self._provisional.add(made_site.key)
                self._unresolved.setdefault(made_site.key, 0)
                self._want_provenance = True
            made = True
        if made or dropped:
            self._rename()
            for fn in self._listeners:
                fn()

    def place_restored(self, device: torch.device | None) -> None:
        """Move the accumulators of sites made from a checkpoint and not run since onto the
        device of the sites that ran (else ``device``, the model's), where a log reads every
        site: a checkpoint loaded before the model was moved made them on the old one."""
        ran = next((s.stats.window.device for s in self._sites.values() if not s.restored),
                   device)
        for site in self._sites.values():
            if site.restored and ran is not None and site.stats.window.device != ran:
                site.stats.to(ran)

    def clear_windows(self) -> None:
        """Empty every site's open window, restored ones not seen since included (a
        checkpoint's open window that a log kept in the run directory already holds)."""
        for site in self._sites.values():
            site.stats.window.zero_()
        self._pending = {t: {**st, "window": torch.zeros_like(st["window"])}
                         for t, st in self._pending.items()}

    def pending_windows(self) -> dict[str, torch.Tensor]:
        """The open windows of the restored sites not seen since (:meth:`load_site_state`),
        by token (a name that means the same on every process)."""
        return {t: st["window"] for t, st in self._pending.items()}

    def close_pending_windows(self, totals: Mapping[str, torch.Tensor]) -> None:
        """Fold those windows (``totals``: by token, summed across processes) into their
        lifetimes, as a log closes a seen site's window. A window that a checkpoint kept
        open closes at its logging step even when its site has not run since: the site,
        restored later, starts the next window empty, not holding this one's steps."""
        for token, total in totals.items():
            state = self._pending[token]
            self._pending[token] = {
                **state,
                "window": torch.zeros_like(state["window"]),
                "lifetime": state["lifetime"] + total.to(state["lifetime"].device),
            }


def _description(site: Site) -> dict[str, Any]:
    """What :func:`_described` makes the site again from (plain values: a checkpoint)."""
    return {
        "family": site.family.name,
        "unit_dim": site.unit_dim,
        "unit_rule": site.unit_rule,
        "order": site.order,
        "shape": list(site.shape),
        "cap": site.cap,
        "from_end": site.from_end,
        "other_ranks": sorted(site.other_ranks),
        "producer": site.producer,
        **({"summed": True} if site.summed else {}),
        "chained": site.chained,
        **({"mixed": site.mixed} if site.mixed else {}),
        **({"norm": site.norm} if site.norm else {}),
        **({"experts": site.experts} if site.experts else {}),
    }


def _described(
    token: str, state: Mapping[str, Any], module_paths: set[str], call_paths: set[str],
    device: torch.device | None,
) -> Site | None:
    """The site of a checkpoint entry, made from its description on ``device`` (the
    model's; else the checkpoint's); None without one, with an unknown family, or where
    this probe would not watch it: a module site whose path is not in ``module_paths``
    (watched activation modules), a functional call's not in ``call_paths``."""
    d = state.get("site")
    if not isinstance(d, Mapping):
        return None
    try:
        key = SiteKey.from_token(token)
        family = FAMILIES[str(d["family"])]
        units = int(state["units"])
    except (KeyError, TypeError, ValueError):
        return None
    if key.module_path not in (module_paths if key.op is None else call_paths):
        return None
    return Site(
        key=key,
        family=family,
        unit_dim=int(d["unit_dim"]),
        unit_rule=str(d["unit_rule"]),
        units=units,
        order=int(d["order"]),
        stats=SiteStats(units, device or state["window"].device),
        shape=tuple(int(x) for x in d["shape"]),
        cap=None if d.get("cap") is None else float(d["cap"]),
        from_end=bool(d.get("from_end", True)),
        other_ranks={int(x) for x in d.get("other_ranks", [])},
        restored=True,
        producer=None if d.get("producer") is None else str(d["producer"]),
        summed=bool(d.get("summed", False)),
        chained=None if d.get("chained") is None else bool(d["chained"]),
        mixed=str(d.get("mixed") or ""),
        norm=str(d.get("norm") or ""),
        experts=int(d.get("experts") or 0),
    )


def _restore(site: Site, state: Mapping[str, Any]) -> None:
    """Load a site's checkpointed accumulators; a unit-count mismatch is a library error."""
    try:
        site.stats.load_state_dict(state)
    except ValueError as e:
        raise ReluDoctorError(
            f"site {site.name!r}: {e}. The checkpoint was made on a model of another shape; "
            "load it into the model it was saved from."
        ) from None
