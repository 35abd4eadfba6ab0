"""Unit links: which layer produces a site's units and which layers consume them.

Recycling a unit (ReDo) re-initialises its incoming weights and zeroes its outgoing ones, so
it needs both ends: the Linear/ConvNd producing the units (through an optional BatchNorm) and
the Linear/ConvNd layers reading them (through dropout, pooling, spatial means,
post-activation BatchNorm and a conv-to-linear flatten, which gives each unit ``span``
consecutive inputs). :func:`find_unit_links` reads them from a torch.fx graph of the module
holding the activation, or of an enclosing module when the flow leaves it; ``nn.Sequential``
containers that fx cannot trace are read in order. The site is a
:class:`~relu_doctor.sites.SiteKey`, so any module name works (``enc:act``, ``a#1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies.base import get_module, key_label, site_key_of
from relu_doctor.sites import SiteKey, module_label

__all__ = ["Consumer", "UnitLinks", "find_unit_links"]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
_PASS_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_PASS_METHODS = {"contiguous", "clone", "detach"}
_SHAPE_METHODS = {"size", "dim", "numel"}
_REDUCE = {"mean", "sum", "amax"}


@dataclass
class Consumer:
    """A layer that reads a site's output: ``span`` input features per unit (H*W after a
    conv-to-linear flatten, else 1)."""

    path: str
    module: nn.Module
    span: int = 1


@dataclass
class UnitLinks:
    """Where a site's units come from and go to.

    Attributes:
        site: the site name.
        units: number of units.
        producer_path, producer: the Linear/Conv whose output units feed the activation.
        norm_path, norm: the BatchNorm between them, or None.
        consumers: the layers reading the activation's output.
    """

    site: str
    units: int
    producer_path: str
    producer: nn.Module
    norm_path: str | None
    norm: nn.Module | None
    consumers: list[Consumer]

    def describe(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "units": self.units,
            "producer": self.producer_path,
            "norm": self.norm_path,
            "consumers": [{"path": c.path, "span": c.span} for c in self.consumers],
        }


class _Escape(Exception):
    """The flow leaves the traced module: try its parent."""


def _first_arg(node: torch.fx.Node) -> Any:
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def _describe_node(node: Any, root: nn.Module) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{type(root.get_submodule(str(node.target))).__name__} {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)!s}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target!s}"


def _owner(node: torch.fx.Node) -> str:
    """Path (relative to the traced module) of the module whose ``forward`` made ``node``'s
    call: the innermost entry of fx's ``nn_module_stack`` (empty: the traced module's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    inner = list(stack.values())[-1]
    return str(inner[0] if isinstance(inner, tuple) else inner)


def _act_nodes(
    graph: torch.fx.Graph, root: nn.Module, rel: str, op: str | None
) -> list[torch.fx.Node]:
    """The calls of the activation in the traced graph of ``root``, in execution order: of
    the module at ``rel``, or (``op`` given) of the functional ``op`` inside the ``forward``
    of the module at ``rel`` (``""``: ``root``'s own)."""
    if op is None:
        return [n for n in graph.nodes if n.op == "call_module" and n.target == rel]
    out = []
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method") or _owner(n) != rel:
            continue  # another module's call
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else str(n.target)
        if name.rstrip("_") == op:
            out.append(n)
    return out


def _analyse(
    graph: torch.fx.Graph, root: nn.Module, rel: str, call_index: int, op: str | None, site: str
) -> tuple[str, nn.Module, str | None, nn.Module | None, list[Consumer], int]:
    nodes = _act_nodes(graph, root, rel, op)
    if len(nodes) <= call_index:
        raise _Escape(
            f"{type(root).__name__}: call {call_index} of {rel or op!r} not found in its graph"
        )
    node = nodes[call_index]
    # ---------------------------------------------------------------- producer side
    x = _first_arg(node)
    norm_path: str | None = None
    norm: nn.Module | None = None
    while True:
        if not isinstance(x, torch.fx.Node):
            raise ReluDoctorError(
                f"site {site!r}: its input is not a tensor computed in the model ({x!r})."
            )
        if x.op == "placeholder":
            raise _Escape(f"{type(root).__name__}: the input comes from outside")
        if x.op == "call_module":
            m = root.get_submodule(str(x.target))
            if isinstance(m, _NORMS) and norm is None:
                norm_path, norm = str(x.target), m
                x = _first_arg(x)
                continue
            if isinstance(m, nn.Identity):
                x = _first_arg(x)
                continue
            if isinstance(m, _PRODUCERS):
                producer_path, producer = str(x.target), m
                break
        raise ReluDoctorError(
            f"site {site!r}: its input comes from {_describe_node(x, root)}, not from a Linear or "
            "Conv layer (optionally through one BatchNorm); recycling needs the layer that "
            "produces the units. Exclude this site."
        )
    units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if norm is not None and getattr(norm, "num_features", units) != units:
        raise ReluDoctorError(
            f"site {site!r}: {norm_path} has {norm.num_features} features, {producer_path} {units} outputs."
        )
    conv = not isinstance(producer, nn.Linear)
    ndim = (producer.weight.dim()) if conv else None  # N, C + spatial dims
    # ---------------------------------------------------------------- consumer side
    consumers: list[Consumer] = []
    frontier: list[tuple[torch.fx.Node, bool]] = [(node, False)]
    seen: set[torch.fx.Node] = set()
    while frontier:
        cur, flat = frontier.pop()
        for u in list(cur.users):
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output":
                raise _Escape(f"{type(root).__name__}: the output leaves it")
            through_first = _first_arg(u) is cur
            if u.op == "call_module":
                m = root.get_submodule(str(u.target))
                if isinstance(m, _PRODUCERS) and through_first:
                    span = _consumer_span(m, units, flat, conv, site, str(u.target))
                    consumers.append(Consumer(str(u.target), m, span))
                    continue
                if (
                    isinstance(m, nn.Flatten)
                    and through_first
                    and conv
                    and not flat
                    and m.start_dim == 1
                ):
                    frontier.append((u, True))
                    continue
                elementwise = isinstance(m, (nn.Dropout, nn.Identity, nn.AlphaDropout))
                if isinstance(m, _PASS_MODULES) and through_first and (not flat or elementwise):
                    frontier.append((u, flat))
                    continue
            elif u.op == "call_function":
                if u.target in _PASS_FUNCTIONS and through_first:
                    frontier.append((u, flat))
                    continue
                if u.target is torch.flatten and through_first and conv and not flat:
                    start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
                    if start == 1:
                        frontier.append((u, True))
                        continue
                reduce = u.target in (torch.mean, torch.sum, torch.amax)
                if (
                    reduce
                    and through_first
                    and conv
                    and not flat
                    and _reduces_spatial_only(u, ndim)
                ):
                    frontier.append((u, False))
                    continue
                if u.target is getattr:
                    continue  # x.shape
            elif u.op == "call_method" and through_first:
                name = str(u.target)
                if name in _SHAPE_METHODS:
                    continue
                if name in _PASS_METHODS:
                    frontier.append((u, flat))
                    continue
                if name == "flatten" and conv and not flat:
                    start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
                    if start == 1:
                        frontier.append((u, True))
                        continue
                if name in ("view", "reshape") and conv and not flat and len(u.args) == 3:
                    frontier.append((u, True))
                    continue
                if name in _REDUCE and conv and not flat and _reduces_spatial_only(u, ndim):
                    frontier.append((u, False))
                    continue
            raise ReluDoctorError(
                f"site {site!r}: its output goes to {_describe_node(u, root)}, which mixes units "
                "or is not a Linear/Conv layer (recycling zeroes the outgoing weights of the "
                "recycled units and follows only pooling, dropout and flattening to them). "
                "Exclude this site."
            )
    if not consumers:
        raise _Escape(f"{type(root).__name__}: no consumer found")
    return producer_path, producer, norm_path, norm, consumers, units


def _reduces_spatial_only(node: torch.fx.Node, ndim: int | None) -> bool:
    arg: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if arg is None or ndim is None:
        return False
    dims: tuple[Any, ...] = (arg,) if isinstance(arg, int) else tuple(arg)
    if not all(isinstance(d, int) for d in dims):
        return False
    norm = {int(d) % ndim for d in dims}
    return 0 not in norm and 1 not in norm


def _consumer_span(m: nn.Module, units: int, flat: bool, conv: bool, site: str, path: str) -> int:
    if isinstance(m, nn.Linear):
        if conv and not flat:
            raise ReluDoctorError(
                f"site {site!r}: Linear {path!r} reads a conv output without flattening it; "
                "cannot tell which inputs belong to which unit."
            )
        if m.in_features % units:
            raise ReluDoctorError(
                f"site {site!r}: Linear {path!r} has {m.in_features} inputs, not a multiple of "
                f"the site's {units} units."
            )
        return m.in_features // units
    if flat or not conv:
        raise ReluDoctorError(
            f"site {site!r}: conv {path!r} reads a {'flattened tensor' if flat else 'Linear output'}; "
            "cannot tell which input channels belong to which unit."
        )
    if m.in_channels != units:
        raise ReluDoctorError(
            f"site {site!r}: conv {path!r} has {m.in_channels} input channels, the site "
            f"{units} units."
        )
    return 1


def _sequential_graph(seq: nn.Sequential) -> torch.fx.Graph:
    g = torch.fx.Graph()
    x: Any = g.placeholder("x")
    for name, _ in seq.named_children():
        x = g.call_module(name, (x,))
    g.output(x)
    return g


def _trace(module: nn.Module, cache: dict[int, Any] | None) -> torch.fx.Graph:
    key = id(module)
    if cache is not None and key in cache:
        mod, cached = cache[key]
        if mod is module:
            if isinstance(cached, BaseException):
                raise cached
            found: torch.fx.Graph = cached
            return found
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception as e:  # any tracing failure: data-dependent control flow, etc.
        if isinstance(module, nn.Sequential):
            graph = _sequential_graph(module)
        else:
            err = RuntimeError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if cache is not None:
                cache[key] = (module, err)
            raise err from None
    if cache is not None:
        cache[key] = (module, graph)
    return graph


def find_unit_links(
    model: nn.Module,
    *,
    site: str | SiteKey,
    cache: dict[int, Any] | None = None,
    name: str | None = None,
) -> UnitLinks:
    """Find the layer producing ``site``'s units and the layers consuming them.

    Works on ``nn.Sequential`` models and on any model torch.fx can trace: starting from the
    module that holds the activation, each enclosing module is traced in turn until one shows
    both ends. The producer is a Linear or ConvNd, optionally followed by one BatchNorm; the
    path to the consumers (Linear or ConvNd) may pass through dropout, pooling, spatial means,
    post-activation BatchNorm and a conv-to-linear flatten.

    Args:
        model: the model (site paths are relative to it).
        site: the site's :class:`~relu_doctor.sites.SiteKey` (``doctor.site_key(name)``,
            ``record.key(name)``), or the module path of an activation module called once,
            exactly as registered (``"features.2"``, ``"enc:act"``).
        cache: a dict to keep traced graphs in between calls.
        name: the site's display name, for messages and :attr:`UnitLinks.site` (default:
            made from the key).

    Raises:
        ReluDoctorError: naming the site, when no producer/consumer can be found (a
            residual sum feeds or reads it, the model cannot be traced, ...).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> find_unit_links(net, site="1").describe()["producer"]
        '0'
        >>> find_unit_links(net, site=SiteKey("1")).consumers[0].path
        '2'
    """
    key = site_key_of(site)
    label = name if name is not None else (
        module_label(site) if isinstance(site, str) else key_label(key)
    )
    path, call_index, op = key.module_path, key.call_index, key.op
    get_module(model, path, "site")
    parts = path.split(".") if path else []
    if op is None:
        if not parts:
            raise ReluDoctorError(
                f"site {label!r}: the model itself is the activation; nothing feeds it."
            )
        start = len(parts) - 1
    else:
        start = len(parts)
    reasons: list[str] = []
    for depth in range(start, -1, -1):
        anc_path = ".".join(parts[:depth])
        anc = model.get_submodule(anc_path) if anc_path else model
        rel = ".".join(parts[depth:])
        try:
            graph = _trace(anc, cache)
        except RuntimeError as e:
            reasons.append(
                f"{module_label(anc_path)} ({type(anc).__name__}) cannot be traced by torch.fx: {e}"
            )
            continue
        try:
            pp, prod, np_, norm, cons, units = _analyse(graph, anc, rel, call_index, op, label)
        except _Escape as e:
            reasons.append(str(e))
            continue
        pre = f"{anc_path}." if anc_path else ""
        for c in cons:
            c.path = pre + c.path
        return UnitLinks(label, units, pre + pp, prod, (pre + np_) if np_ else None, norm, cons)
    raise ReluDoctorError(
        f"site {label!r}: cannot find the layers that produce and consume its units "
        f"({'; '.join(reasons)}). Recycling needs an nn.Sequential or a torch.fx-traceable "
        "model; exclude this site or make the enclosing module traceable."
    )
