"""Fresh incoming weights for recycled units, drawn as the model would draw them at its start.

ReDo and Continual Backprop give a recycled unit "new weights from the initial distribution".
A Hugging Face model says what that is: its ``_init_weights(module)`` (normal with the
config's ``initializer_range``, 0.02 in BERT and GPT-2, zero bias). PyTorch's default of a
``Linear`` (Kaiming-uniform) draws them about five times larger there. Other models have no
such method, and PyTorch's default is what their layers began with, unless the user
initialised them otherwise (then pass ``init=`` to :func:`~relu_doctor.remedies.recycle_units`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn

#: The words for PyTorch's default initialisation (see :func:`fresh_rows`).
DEFAULT = "PyTorch's default"
#: What initialises one module in place (a Hugging Face model's ``_init_weights``).
Init = Callable[[nn.Module], None]


#: The largest block (in parameters, as a multiple of the producer's weight) whose scratch
#: copy a model's initialisation runs on; a larger one (a producer directly in a big model)
#: runs it on the producer alone.
_MAX_SCOPE = 16


class ModelInit:
    """A Hugging Face model's ``_init_weights``, run as the model runs it: over the block
    that holds the producer (``scope``), children first, so that the block's own branch has
    the last word (T5 sets its feed-forward ``wi`` in ``T5DenseActDense``'s, with a std of
    ``d_model ** -0.5``; a bare ``Linear`` would get the generic branch's)."""

    def __init__(self, fn: Init, scope: nn.Module | None, name: str) -> None:
        self.fn, self.scope, self.name = fn, scope, name

    def __call__(self, module: nn.Module) -> None:
        self.fn(module)


def model_init(model: nn.Module, producer: nn.Module) -> ModelInit | None:
    """The initialisation ``model`` gives ``producer`` itself: the ``_init_weights`` of the
    innermost Hugging Face model (a module with ``_init_weights`` and a ``config``) holding
    it, over the block that holds the producer; None where there is none (PyTorch's default
    then)."""
    found: nn.Module | None = None
    for m in model.modules():
        fn = getattr(m, "_init_weights", None)
        if callable(fn) and hasattr(m, "config") and any(x is producer for x in m.modules()):
            found = m  # (modules come outer first: the last found is the innermost)
    if found is None:
        return None
    parent = next((m for m in found.modules()
                   if any(c is producer for c in m.children())), None)
    weight = sum(p.numel() for p in producer.parameters(recurse=False))
    if parent is None or parent is found or (
            sum(p.numel() for p in parent.parameters()) > _MAX_SCOPE * max(weight, 1)):
        parent = None
    return ModelInit(getattr(found, "_init_weights"), parent, type(found).__name__)  # noqa: B009


def _scratch(module: nn.Module, made: dict[int, nn.Module]) -> nn.Module:
    """A copy of ``module`` and its submodules (shared ones shared) holding new float32 CPU
    parameters filled with NaN (what no initialisation set stays NaN) and copies of its
    buffers: what an initialisation run on it leaves the model's own untouched."""
    if id(module) in made:
        return made[id(module)]
    s = made[id(module)] = copy.copy(module)
    s.__dict__["_parameters"] = {
        k: None if v is None else nn.Parameter(
            torch.full(v.shape, math.nan, dtype=torch.float32), requires_grad=False)
        for k, v in module._parameters.items()
    }
    s.__dict__["_buffers"] = {
        k: None if v is None else v.detach().to("cpu", copy=True)
        for k, v in module._buffers.items()
    }
    s.__dict__["_modules"] = {
        k: None if c is None else _scratch(c, made) for k, c in module._modules.items()
    }
    return s


def _default(shape: torch.Size, units: int, bias: bool, gen: torch.Generator,
             fan_in: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch's default of a Linear/Conv: Kaiming-uniform with ``a=sqrt(5)`` (weights in
    ``U(+-1/sqrt(fan_in))``), bias ``U(+-1/sqrt(fan_in))``; ``units`` rows of ``shape[1:]``,
    their fan-in ``fan_in`` where given (a transposed convolution's), else theirs."""
    fresh = torch.empty((units, *shape[1:]), dtype=torch.float32)
    if fan_in is None:
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
        fan_in = math.prod(shape[1:])
    else:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        fresh.uniform_(-bound, bound, generator=gen)
    if not bias:
        return fresh, None
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return fresh, torch.empty(units, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


def fresh_rows(
    producer: nn.Module, param: str, dim: int, idx: torch.Tensor, gen: torch.Generator,
    init: Init | None,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """New incoming weights for units ``idx`` of ``producer`` (its ``param``, each unit
    along ``dim``), and its bias's, as float32 CPU rows (units first), with the words for
    which initialisation drew them.

    ``init``: run on a scratch copy of the producer holding new CPU tensors (the model's own
    untouched), its random draws seeded from ``gen`` with the global random state kept as it
    was; where it fails or leaves the weight unset, PyTorch's default is taken instead.
    """
    weight = getattr(producer, param)
    rows_shape = weight.movedim(dim, 0).shape
    has_bias = isinstance(getattr(producer, "bias", None), torch.Tensor)
    if init is not None and param in producer._parameters:
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        scope = getattr(init, "scope", None) or producer
        path = next(n for n, m in scope.named_modules(remove_duplicate=False) if m is producer)
        try:
            root = _scratch(scope, {})
            # The CPU's generator only (torch.manual_seed would reseed every GPU's too), and
            # the global state as it was after.
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.default_generator.manual_seed(seed)
                root.apply(init)  # children first, as the model's own initialisation runs
            made = root.get_submodule(path)
        except Exception:  # not the model's own layer kind, say: the default below
            pass
        else:
            w = made._parameters.get(param)
            b = made._parameters.get("bias") if has_bias else None
            if w is not None and bool(torch.isfinite(w).all()) and (
                    b is None or bool(torch.isfinite(b).all())):
                rows = w.detach().movedim(dim, 0)[idx]
                name = getattr(init, "name", None) or type(getattr(init, "__self__", init)).__name__
                return rows, (None if b is None else b.detach()[idx]), f"{name}'s own"
    # (a transposed convolution's default reads its fan-in from its weight as stored,
    # (in, out/groups, *kernel): its dim 1 and kernel, which PyTorch's init takes it to be)
    fan_in = (math.prod(weight.shape[1:])
              if isinstance(producer, nn.modules.conv._ConvTransposeNd) else None)
    w_rows, b_rows = _default(rows_shape, idx.numel(), has_bias, gen, fan_in)
    return w_rows, b_rows, DEFAULT


def drawn_by(what: dict[str, object]) -> str:
    """Words for an intervention: which initialisation drew the new weights, where it was
    the model's own (PyTorch's default goes unsaid)."""
    init = what.get("init")
    return f" (drawn by {init} initialisation)" if init and init != DEFAULT else ""
