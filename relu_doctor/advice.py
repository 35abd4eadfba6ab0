"""What a site's unit findings advise: the remedy texts of its dead, never-active, dormant
and too-sparse findings, in the loop's names for the remedies.

A text depends on what the site is (its family, cap, a functional call's op), on what is
bound or was declined there, and on a few counts; not on the window's numbers. So the texts
of one site are made once and taken again at every log where none of that changed
(:func:`unit_remedies`, cached): a log of a 256-site model with ~700 findings spent about a
third of its diagnosis building the same sentences again.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from typing import NamedTuple

from relu_doctor.families import FAMILIES, Family

__all__ = ["RECYCLERS", "REMEDY_NAMES", "UnitRemedies", "can_swap", "unit_remedies"]

#: How each loop names the remedies a finding suggests: gradient clipping, a learning-rate
#: rescue, the LeakyReLU swap and ReDo recycling (None: not offered there), and the
#: treatment plan that coordinates them.
REMEDY_NAMES: dict[str, dict[str, str | None]] = {
    "watch": {"clip": "AutoClip", "lr": "LRRescuer", "swap": "ActivationSwapper",
              "recycle": "DormantRecycler", "plan": "TreatmentPlan"},
    "lightning": {"clip": "AdaptiveGradClip", "lr": "LRRescue", "swap": "LeakyReluSwap",
                  "recycle": "DormantReset", "plan": "ReluDoctorTreatment"},
    "keras": {"clip": "autoclip=True", "lr": "lr_rescue=True", "swap": "leaky_relu_swap=True",
              "recycle": None, "plan": "treatment=True"},
    "hf": {"clip": "autoclip=True", "lr": "lr_rescue=True", "swap": "leaky_relu_swap=True",
           "recycle": "dormant_reset=True", "plan": "treatment=True"},
}

#: the remedies that recycle units (ReDo and its successor), by their names in events
RECYCLERS = ("dormant_reset", "continual_backprop")


def can_swap(family: str, leaky: bool, cap: float | None, op: str | None = None) -> bool:
    """Whether the LeakyReLU swap can treat a site of ``family``: its rule, a plain ReLU
    module (not leaky, no cap, never negative: outputs for positive inputs unchanged), not a
    functional call (``op``, which it cannot replace). A ``cap`` of None is the family's."""
    return _can_swap(FAMILIES.get(family), leaky, cap, op)


def _can_swap(fam: Family | None, leaky: bool, cap: float | None, op: str | None) -> bool:
    if fam is None or leaky or op is not None or not fam.nonnegative:
        return False
    return (cap if cap is not None else fam.cap_of(None)) is None


def _why_not_swapped(family: str, registered: Family | None, leaky: bool, cap: float | None,
                     op: str | None, declined: Collection[str]) -> str:
    """Why a site that is not leaky is not advised the LeakyReLU swap (where
    :func:`can_swap` says no, or the swap left it alone), as sentences of their own: said
    inside another's clause, a trial read the swap's reasons as the feeding layer's."""
    if "leaky_relu_swap" in declined:
        return "The LeakyReLU swap left this site alone."
    if op is not None and _can_swap(registered, leaky, cap, None):
        return ("No LeakyReLU swap here: this is a functional call, and the swap replaces "
                "activation modules. In your own code, call F.leaky_relu there or make it an "
                "nn.ReLU module; in a library's layer, pass a leaky activation where the layer "
                "takes one (nn.TransformerEncoderLayer's activation=, a Hugging Face config's "
                "hidden_act).")
    capped = isinstance(cap, int | float) and family != "relu6"  # (relu6 says its cap)
    what = f"{family} capped at {cap:g}" if capped else family
    return f"No LeakyReLU swap here: {what} cannot become a LeakyReLU without changing its outputs."


def _recycle_source(names: Mapping[str, str | None], source: str = "ReDo") -> str:
    """ReDo recycling by the loop's name for it, in brackets (where the loop offers it)."""
    return f"({source}: {names['recycle']})"


def _bound_aside(above: int, planned: bool) -> str:
    who = "The treatment plan bound here recycles" if planned else "The recycler bound here takes"
    return (f" ({who} only the units scoring at most tau, and {above} of these score above "
            "it: recycling them would take their negative outputs from the network.)")


def recycle_dead(above_tau: tuple[int, int], names: Mapping[str, str | None],
                  them: str = "the units") -> str:
    """"recycle the units (ReDo: ...)" for units of which ``above_tau`` = (how many score
    above tau, how many there are). Units scoring above tau (a leaky family's stuck
    negative: their negative outputs count in the ReDo score) are recycled by no recycler:
    zeroing their outgoing weights would take those outputs from the network (a GNN trial:
    outputs moved by 10-13); "" where all of them do, else the others are advised."""
    above, flagged = above_tau
    if not above:
        return f"recycle {them} {_recycle_source(names)}"
    if above == flagged:
        return ""
    return (f"recycle those of {them} scoring at most tau {_recycle_source(names)}: {above} "
            "of them score above it, and recycling those would take their negative outputs "
            "from the network")


class UnitRemedies(NamedTuple):
    """The remedy texts of one site's unit findings, by finding kind."""

    dead: str
    lifetime_dead: str
    dormant: str
    too_sparse: str


def feeding(norm: str, it: str = "it") -> str:
    """What decides whether a site's units fire, to be checked, in words: behind a norm of
    each unit on its own (a Conv-BN-ReLU; ``norm`` in words as
    :attr:`relu_doctor.sites.Site.norm`), which takes the layer's bias away, the norm's shift
    against its scale (and "add BatchNorm" is advice already taken); else the
    initialisation and bias of the layer that feeds ``it``."""
    if norm.startswith("F."):  # (no module holds its weight: not named)
        return f"the normalisation before {it}"
    if norm:
        return (f"the shift (bias) and scale (weight) of the {norm} before {it}, which decide "
                "whether a unit fires")
    return f"the initialisation and bias of the layer that feeds {it}"


# (bounded; a site whose dead units score above tau takes an entry for each of their counts)
@functools.lru_cache(maxsize=4096)
def unit_remedies(
    loop: str,
    family: str,
    registered: Family | None,
    leaky: bool,
    cap: float | None,
    op: str | None,
    declined: frozenset[str],
    unrecyclable: str | None,
    recycler: str | None,
    module: str,
    other_calls: tuple[str, ...],
    swapper: str | None,
    born: bool,
    dead_above_tau: tuple[int, int],
    lifetime_above_tau: tuple[int, int],
    norm: str = "",
) -> UnitRemedies:
    """The remedy texts of a site's dead, lifetime-dead, dormant and too-sparse findings.

    Args:
        loop: whose names the texts give (:data:`REMEDY_NAMES`).
        family, leaky, cap, op: the site's family, whether it is leaky, its cap, and a
            functional call's op (None: a module's).
        registered: the family as registered (``FAMILIES[family]``), whose traits decide
            the swap: in the key, since ``register_family`` may replace it.
        declined: the remedies that left this site alone (``declined`` events).
        unrecyclable: why ReDo cannot recycle its units, or None.
        recycler: the recycling remedy bound to act there (``treatment_plan`` for a plan's
            recycle step), or None.
        module: the site's module (its name before ``#``).
        other_calls: the other sites of that module (its other calls in a pass), which a swap
            changes too.
        swapper: the LeakyReLU swap bound there (``leaky_relu_swap``, or
            ``treatment_plan``), or None.
        born: every unit dead in the window never fired since monitoring began.
        dead_above_tau, lifetime_above_tau: (units scoring above tau, units) of the dead
            units and of those never active (see :func:`recycle_dead`).
        norm: the norm of each unit on its own between the site and the layer that feeds
            it, in words (``""``: none): see :func:`feeding`.
    """
    names = REMEDY_NAMES[loop]
    swappable = _can_swap(registered, leaky, cap, op) and "leaky_relu_swap" not in declined
    unswappable = _why_not_swapped(family, registered, leaky, cap, op, declined)
    others = other_calls if swappable else ()
    also = (f" A swap replaces the module {module!r}, so it changes its other "
            f"call{'s' if len(others) > 1 else ''} too ({', '.join(others)})."
            if others else "")
    # ReDo where it can act; where it left the site alone, cannot act, or is not offered
    # (Keras), said instead
    refused = sorted(declined & set(RECYCLERS))
    recyclable = (not refused and unrecyclable is None and names["recycle"] is not None
                  and recycler is None)
    # (a plan recycles a site only once its dead fraction passes its step's threshold)
    plan = f"the treatment plan bound here ({names['plan']})"
    planned = recycler == "treatment_plan"
    # (dead units are recycled whatever their score only where they output 0: ReLU, ReLU6)
    which = ("dead and dormant units" if registered is not None and registered.nonnegative
             else "units scoring at most tau, dead or dormant,")
    aside = (f" ({', '.join(refused)} left this site alone: see its warning.)" if refused
             else f" ({plan[0].upper()}{plan[1:]} recycles this site's {which} once its "
             "dead fraction stays past its recycle step's threshold: see its "
             "interventions.)" if planned and unrecyclable is None
             else f" ({recycler} is bound to recycle this site's units: see its "
             "interventions.)" if recycler and unrecyclable is None
             else f" (Recycling cannot treat this site: {unrecyclable}.)" if unrecyclable
             else " (ReDo recycling is not offered for Keras layers.)"
             if names["recycle"] is None else "")
    # where a bound recycler leaves the dead units scoring above tau, that is said
    scored = recycler is not None and unrecyclable is None and not refused
    asides = {flag: _bound_aside(above_tau[0], planned) if scored and above_tau[0] else aside
              for flag, above_tau in (("dead", dead_above_tau),
                                      ("lifetime_dead", lifetime_above_tau))}

    # Dead units none of which fired since monitoring began (at its first log, every dead
    # unit: dead on its first step too) are what the initialisation or a bias made, not
    # training: a lower learning rate cannot revive them, so their advice leads with the
    # layer feeding them (a trial's units dead from a bias of -50, at SGD's lr 1e-4, were
    # told to lower the learning rate first)
    recycle = (recycle_dead(dead_above_tau, names, "them" if born else "the units")
               if recyclable else "")
    feeds = feeding(norm)
    normalise = f"check {feeds}" if norm else "add BatchNorm before the activation"
    lower = "Lower the learning rate (step or exponential decay)"
    and_recycle = f" and {recycle}" if recycle else ""
    since = ("these units have been stuck negative since monitoring began (from "
             "initialisation, where it began with the run), which a lower learning "
             "rate does not change" if leaky else
             "these units have not fired since monitoring began (from "
             "initialisation, where it began with the run), and a lower learning "
             "rate cannot revive them")
    swap = (f"{plan} swaps this site once its dead fraction passes its swap step's "
            "threshold" if swapper == "treatment_plan" else
            f"the LeakyReLU swap bound here ({names['swap']}) swaps this site once "
            "its dead fraction passes the swap's threshold" if swapper is not None else
            "swap ReLU for LeakyReLU with a negative slope of 0.01 to 0.3 "
            f"({names['swap']}) or PReLU to learn the slope")
    if leaky:
        check = feeds if norm else f"the normalisation before this activation and {feeds}"
        dead = (f"Check {check}: "
                f"{since}{'; ' + recycle if recycle else ''}." if born else
                f"{lower}{and_recycle}; check "
                f"{feeds if norm else 'the normalisation before this activation'}."
                ) + asides["dead"]
    elif swappable:
        dead = (f"Check {feeds}: {since}. In this run, "
                f"{recycle + '; where they stay dead, ' if recycle else ''}{swap}."
                + asides["dead"] if born else
                f"{lower} and check {feeds}; where the units stay dead, {swap}."
                ) + also
    else:
        dead = (f"Check {feeds}: {since}"
                f"{'. In this run, ' + recycle if recycle else ''}." if born else
                f"{lower}{and_recycle}; check {feeds}.") + f" {unswappable}{asides['dead']}"

    lifetime_dead = (
        ("Units stuck negative since monitoring began still pass a small "
         "gradient but add little: " if leaky else
         "Units that never fired are wasted capacity: ")
        + " or ".join([*([again] if recyclable and (
                           again := recycle_dead(lifetime_above_tau, names, "them"))
                         else []),
                       *([f"swap to LeakyReLU ({names['plan']}, bound here, "
                          "swaps past its swap step's threshold)"
                          if swapper == "treatment_plan" else
                          f"swap to LeakyReLU ({names['swap']}"
                          + (", bound here: it swaps past its threshold)"
                             if swapper is not None else ")")] if swappable
                         else [])]
                      or [f"check {feeding(norm, 'them')}"])
        + f".{asides['lifetime_dead']}{also}"
    )

    dormant = (
        f"Recycle dormant units {_recycle_source(names, 'ReDo, Sokar et al. 2023')}: "
        "re-initialise their incoming weights and zero their outgoing weights."
        if recyclable else "Lower the learning rate, or check the normalisation "
        "before this activation." + (
            f" ({plan[0].upper()}{plan[1:]} recycles a site's units once its dead "
            "fraction passes its recycle step's threshold, not for dormant units "
            "alone.)" if planned and unrecyclable is None and not refused else aside)
    )

    too_sparse = (
        "Some sparsity is ReLU's benefit; this much starves the next layer. "
        + ("Use LeakyReLU or ELU for smoother negative outputs, lower the learning "
           f"rate, or {normalise}.{also}" if swappable else
           f"Lower the learning rate, or {normalise}.")
    )
    return UnitRemedies(dead, lifetime_dead, dormant, too_sparse)
