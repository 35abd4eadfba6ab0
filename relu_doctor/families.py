"""The ReLU family: which modules and functional ops relu_doctor watches, and what they mean.

Every member shares one definition of **active**: output > 0 (for every member this equals
pre-activation > 0). Members differ in two traits that change the statistics:

* ``leaky``: a unit stuck in the negative regime still passes gradient (LeakyReLU, PReLU,
  RReLU, ELU, CELU, SELU, GELU, SiLU). Its "dead" finding means "stuck negative", not "no
  gradient"; the finding records the family.
* ``cap``: an upper saturation value (ReLU6: 6, Hardtanh: ``max_val``). Output at the cap is
  counted as saturated.

Users add their own classes with :func:`register_family`:

    >>> import torch.nn as nn
    >>> class MyReLU(nn.ReLU): ...
    >>> _ = register_family("myrelu", MyReLU, leaky=False)
    >>> family_of(MyReLU()).name
    'myrelu'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FAMILIES",
    "Family",
    "family_by_name",
    "family_of",
    "register_family",
]


def _no_cap(module: nn.Module | None) -> float | None:
    return None


def _hardtanh_cap(module: nn.Module | None) -> float | None:
    if module is None:
        return 1.0
    return float(getattr(module, "max_val", 1.0))


def _relu6_cap(module: nn.Module | None) -> float | None:
    return 6.0


@dataclass(frozen=True)
class Family:
    """One member of the ReLU family.

    Attributes:
        name: short lowercase name used in reports (``"relu"``, ``"leaky_relu"``).
        module_types: ``nn.Module`` classes of this member.
        functionals: functional ops of this member (``F.relu``, ``torch.relu_``...), used by
            functional capture.
        leaky: True when the negative regime passes gradient, so "dead" means "stuck in the
            negative regime" rather than "no gradient at all".
        nonnegative: True when the output is never negative (ReLU, ReLU6); lets the
            statistics derive ``|h| = h`` and count actives with a cheap ``sign()``.
        cap: returns the upper saturation value for a module instance (None: no cap).
        negative_regime: plain-words description of the negative regime, for reports.
        input_grad: whether the gradient the output's autograd node passes back is the
            activation's own dL/d(input). False for a layer that computes the activation in
            several ops and ends in a sum or a clip (Keras' ``PReLU``, a capped Keras
            ``ReLU``): its zero-gradient fraction is then not measured (NaN), not misread.
    """

    name: str
    module_types: tuple[type[nn.Module], ...]
    functionals: tuple[Callable[..., torch.Tensor], ...] = ()
    leaky: bool = False
    nonnegative: bool = False
    cap: Callable[[nn.Module | None], float | None] = field(default=_no_cap)
    negative_regime: str = "output is 0 and no gradient flows"
    input_grad: bool = True

    def cap_of(self, module: nn.Module | None) -> float | None:
        """The upper saturation value for ``module`` (None when this member has no cap)."""
        return self.cap(module)


_LEAKY = "output is negative or small; gradient still flows, but the unit carries little signal"

FAMILIES: dict[str, Family] = {}


def register_family(
    name: str,
    module_types: type[nn.Module] | tuple[type[nn.Module], ...],
    *,
    functionals: tuple[Callable[..., torch.Tensor], ...] = (),
    leaky: bool,
    nonnegative: bool = False,
    cap: Callable[[nn.Module | None], float | None] | None = None,
    negative_regime: str | None = None,
) -> Family:
    """Register a ReLU-family member so that :func:`relu_doctor.watch` watches it.

    Args:
        name: short lowercase name; an existing name is replaced.
        module_types: one ``nn.Module`` class or a tuple of them.
        functionals: functional ops of this member, for functional capture.
        leaky: whether the negative regime passes gradient.
        nonnegative: whether the output is never negative (enables the cheap counting path;
            wrong answers follow if this is set for a member with negative outputs).
        cap: callable returning the upper saturation value of a module, or None.
        negative_regime: description of the negative regime for reports.

    Returns:
        The registered :class:`Family`.

    Example:
        >>> import torch.nn as nn
        >>> class Clipped(nn.Module):
        ...     def forward(self, x): return x.clamp(0, 3)
        >>> fam = register_family("clipped", Clipped, leaky=False, nonnegative=True,
        ...                       cap=lambda m: 3.0)
        >>> fam.cap_of(Clipped())
        3.0
    """
    types = module_types if isinstance(module_types, tuple) else (module_types,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            from relu_doctor.errors import ReluDoctorError

            raise ReluDoctorError(
                f"register_family(module_types=...) expects nn.Module subclasses; got {t!r}."
            )
    fam = Family(
        name=name,
        module_types=types,
        functionals=functionals,
        leaky=leaky,
        nonnegative=nonnegative,
        cap=cap if cap is not None else _no_cap,
        negative_regime=negative_regime or (_LEAKY if leaky else Family.negative_regime),
    )
    FAMILIES[name] = fam
    return fam


register_family(
    "relu", nn.ReLU, functionals=(F.relu, F.relu_, torch.relu, torch.relu_), leaky=False,
    nonnegative=True,
)
register_family(
    "relu6", nn.ReLU6, functionals=(F.relu6,), leaky=False, nonnegative=True, cap=_relu6_cap
)
register_family("leaky_relu", nn.LeakyReLU, functionals=(F.leaky_relu, F.leaky_relu_), leaky=True)
register_family("prelu", nn.PReLU, functionals=(F.prelu,), leaky=True)
register_family("rrelu", nn.RReLU, functionals=(F.rrelu, F.rrelu_), leaky=True)
register_family("elu", nn.ELU, functionals=(F.elu, F.elu_), leaky=True)
register_family("celu", nn.CELU, functionals=(F.celu, F.celu_), leaky=True)
register_family("selu", nn.SELU, functionals=(F.selu, F.selu_, torch.selu, torch.selu_), leaky=True)
register_family("gelu", nn.GELU, functionals=(F.gelu,), leaky=True)
register_family("silu", nn.SiLU, functionals=(F.silu,), leaky=True)
register_family(
    "hardtanh",
    nn.Hardtanh,
    functionals=(F.hardtanh, F.hardtanh_),
    leaky=False,
    cap=_hardtanh_cap,
    negative_regime="output is at the lower cap and no gradient flows",
)


# Activation classes of other packages, known by their dotted names so that relu_doctor
# imports none of them: each is watched as a module of the family named. Hugging Face's GELU
# approximations compute their formula with tanh, sigmoid or erf (gelu_new is GPT-2's and
# flan-T5's default, quick_gelu CLIP's, gelu_python BERT's with use_gelu_python), so no
# functional op of theirs is one capture could see; the others are listed with them so
# that every GELU and SiLU of ACT2FN is one module site, named after its module. Each is
# positive exactly where its input is, as the family's definition of active asks.
KNOWN_CLASSES: dict[str, str] = {
    **{
        f"transformers.activations.{cls}": "gelu"
        for cls in (
            "GELUActivation", "GELUTanh", "PytorchGELUTanh", "NewGELUActivation",
            "FastGELUActivation", "QuickGELUActivation", "AccurateGELUActivation",
            "ClippedGELUActivation",  # gelu_10: calls a GELUActivation held outside the model
        )
    },
    "transformers.activations.SiLUActivation": "silu",
}


def family_of(module: nn.Module) -> Family | None:
    """The family of ``module``, or None when it is not a ReLU-family activation.

    The most specific class wins, registered (``nn.ReLU6`` is a subclass of ``nn.Hardtanh``
    and is reported as ``relu6``) or known by name (:data:`KNOWN_CLASSES`).
    """
    best: Family | None = None
    best_depth = -1
    mro = type(module).__mro__
    for fam in FAMILIES.values():
        for t in fam.module_types:
            if isinstance(module, t):
                depth = len(mro) - mro.index(t)
                if depth > best_depth:
                    best, best_depth = fam, depth
    for cls in mro[: len(mro) - best_depth]:  # classes more specific than a registered one
        name = KNOWN_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")
        if name is not None and name in FAMILIES:
            return FAMILIES[name]  # the first in the MRO is the most specific
    return best


#: Classes of ``torch.nn.modules.activation`` that are no elementwise activation.
_NOT_ELEMENTWISE = frozenset({"Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention",
                              "GLU", "LinearActivation"})  # (Hugging Face's: the identity)


def other_activations(model: nn.Module) -> dict[str, int]:
    """The model's elementwise activation modules of no family, by class (``nn.Hardswish``,
    ``nn.Mish``, ``nn.Sigmoid``, and Hugging Face's ``...Activation`` classes): what a user
    whose model runs none of the ReLU family should be told it holds instead."""
    found: dict[str, int] = {}
    for mod in model.modules():
        cls = type(mod)
        torch_act = cls.__module__ == "torch.nn.modules.activation"
        hf_act = cls.__module__.startswith("transformers.") and cls.__name__.endswith("Activation")
        if (torch_act or hf_act) and cls.__name__ not in _NOT_ELEMENTWISE and family_of(mod) is None:
            name = f"nn.{cls.__name__}" if torch_act else cls.__name__
            found[name] = found.get(name, 0) + 1
    return found


#: Activations of no family that are ReLU-like (zero, or near it, for inputs below a point,
#: the identity above: MobileNetV3's and LeViT's hard swish, YOLO's Mish), by module class
#: and by Keras activation name: a model that runs them beside watched sites is told once
#: that they are not watched.
RELU_LIKE = frozenset({"Hardswish", "Mish", "HardSwish", "hard_silu", "hard_swish", "mish"})


def relu_like_unwatched(model: nn.Module) -> dict[str, int]:
    """The model's ReLU-like activation modules of no family (:data:`RELU_LIKE`), by class,
    as :func:`other_activations` names them."""
    return {name: n for name, n in other_activations(model).items()
            if name.removeprefix("nn.") in RELU_LIKE}


def held_instead(model: nn.Module) -> str:
    """Words for a message that nothing was watched: the activations ``model`` holds of no
    family (``" (it holds nn.Hardswish x12, nn.Mish x1: of no ReLU family)"``), or ``""``."""
    found = other_activations(model)
    if not found:
        return ""
    listed = ", ".join(f"{k} x{n}" for k, n in sorted(found.items(), key=lambda kv: -kv[1])[:4])
    more = ", ..." if len(found) > 4 else ""
    return f" (it holds {listed}{more}: of no ReLU family)"


def family_by_name(name: str) -> Family:
    """Look a family up by name; raises :class:`ReluDoctorError` listing the known names."""
    try:
        return FAMILIES[name]
    except KeyError:
        from relu_doctor.errors import ReluDoctorError

        raise ReluDoctorError(
            f"Unknown activation family {name!r}; known families: {sorted(FAMILIES)}."
        ) from None
