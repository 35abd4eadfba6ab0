"""What a remedy must not change: the parts of a model the user froze.

A parameter with ``requires_grad=False`` (a frozen backbone, a base layer beside a trainable
adapter) is the user's to keep as it is. Recycling rewrites the layers linked to a site's
units, so it refuses a site where any of them is frozen (:func:`refuse_frozen`); the swap
changes what the part feeding a site computes, so it refuses a site whose producing layer
and the block holding it train nowhere (:func:`frozen_input`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies.unit_links import UnitLinks
from relu_doctor.sites import frozen_feed

__all__ = ["frozen_input", "refuse_frozen"]


def refuse_frozen(links: UnitLinks) -> None:
    """Raise :class:`ReluDoctorError`, changing nothing, where a layer recycling would change
    does not train (a parameter with ``requires_grad=False``: a frozen backbone): its new
    incoming weights would never train, its zeroed outgoing weights never grow back, and
    the user froze them."""
    touched = [("producer", links.producer_path, links.producer,
                [links.producer_param, "bias"])]
    touched += [("consumer", c.path, c.module,
                 [c.param] if c.kind != "norm" else ["weight", "bias"]) for c in links.consumers]
    touched += [("norm", nr.path, nr.module, ["weight", "bias"]) for nr in links.norms]
    frozen = sorted({f"{role} {path!r}" for role, path, module, names in touched
                     for name in names
                     if isinstance(t := getattr(module, name, None), nn.Parameter)
                     and not t.requires_grad})
    if frozen:
        raise ReluDoctorError(
            f"site {links.site!r}: the {', '.join(frozen)} it would change do"
            f"{'es' * (len(frozen) == 1)} not train (requires_grad=False): recycling would "
            "rewrite weights you froze (re-initialised incoming weights, a norm's reset "
            "channels, zeroed outgoing weights that would never grow back). Left alone; "
            "unfreeze them to recycle this site."
        )


def frozen_input(model: nn.Module, sites: Sequence[Any], name: str) -> str | None:
    """Why the swap leaves site ``name`` alone, or None: the layer found feeding one of
    ``sites`` (``Site.producer``) and the block holding it (its parent: a frozen backbone)
    have parameters and none trains, and a swap would change what that part computes. (A
    frozen base layer beside a trainable adapter, or a frozen layer in a trainable model,
    is no such part.)"""
    for site in sites:
        path = getattr(site, "producer", None)
        if frozen_feed(model, path):
            return (f"site {name!r}: {str(path)!r}, the layer feeding it, and the block "
                    "holding it do not train (requires_grad=False): a swap would change a "
                    "part you froze.")
    return None
