"""Keras layers as relu_doctor sites: which layers run a ReLU-family activation, what their
sites are called, which dim holds their units, and recording their outputs.

Keras 3 on the torch backend runs every layer through ``torch.nn.Module.__call__``, but a
layer's sublayers are not registered as torch submodules, and an activation given as
``activation="relu"`` is a plain function, not a module. So the sites are found from the
Keras model's own layer tree and recorded by a torch forward hook on each layer, through the
probe's public :meth:`~relu_doctor.probes.Probe.record` under a
:class:`~relu_doctor.sites.SiteKey` built from the layer's name:

* a layer whose output is its ``activation`` applied last (``Dense``, ``EinsumDense``, the
  convolutions) is a site when that activation is ReLU-family (``activation="relu"``,
  ``keras.activations.relu``...);
* an activation layer (``Activation``, ``ReLU``, ``LeakyReLU``, ``ELU``, ``PReLU``) is a site
  by its own name.

Names are the layer's ``name``, prefixed by the nested models and custom layers holding it
(``sequential/dense_1``, ``block/ffn/dense``). Units: a Dense's ``units`` (the last dim), a
convolution's ``filters`` where its ``data_format`` puts them (the last dim for
``channels_last``, dim 1 for ``channels_first``); an activation layer's are those of the
layer that made its input (a convolution's ``data_format``, a BatchNormalization's axis, a
Dense's last dim), else on the channel axis of Keras' ``image_data_format()``.
"""

from __future__ import annotations

import glob
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import keras

from relu_doctor.errors import ReluDoctorWarning, user_stacklevel
from relu_doctor.families import FAMILIES, RELU_LIKE, Family

__all__ = ["KerasSite", "UnseenCalls", "activation_family", "find_sites", "say_unseen",
           "walk_layers"]

#: Keras activation function names -> relu_doctor family names.
_ACTIVATIONS = {
    "relu": "relu",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "elu": "elu",
    "selu": "selu",
    "celu": "celu",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "hard_tanh": "hardtanh",
}

#: Layers whose output is ``activation(...)`` applied last.
_ACTIVATED = tuple(
    getattr(keras.layers, n)
    for n in (
        "Dense",
        "EinsumDense",
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
    )
    if hasattr(keras.layers, n)
)
_CONVS = tuple(t for t in _ACTIVATED if t.__name__ not in ("Dense", "EinsumDense"))


def activation_family(fn: Any) -> Family | None:
    """The family of a Keras activation function (``keras.activations.relu`` ...), else None."""
    if fn is None:
        return None
    name = getattr(fn, "__name__", None)
    fam = _ACTIVATIONS.get(str(name)) if name is not None else None
    return FAMILIES.get(fam) if fam is not None else None


def _max_value(layer: Any) -> float | None:
    """A Keras ``ReLU`` layer's ``max_value`` (its cap), else None."""
    cap = getattr(layer, "max_value", None)
    return None if cap is None else float(cap)


def _composite(name: str, *, capped: bool = False) -> Family:
    """``name``'s statistics for a Keras layer that computes it in several ops ending in a
    sum or a clip (see ``Family.input_grad``), with the layer's ``max_value`` as its cap."""
    return replace(FAMILIES[name], module_types=(), functionals=(), input_grad=False,
                   cap=_max_value if capped else FAMILIES[name].cap)


#: Keras activation layers whose last op is not the activation itself
_RELU_CAPPED = _composite("relu", capped=True)  # ReLU(max_value=m) but relu6: relu, then clip
_LEAKY_CAPPED = _composite("leaky_relu", capped=True)  # with a negative_slope
_LEAKY_SHIFTED = _composite("leaky_relu")  # a negative_slope and a threshold: a difference
_PRELU = _composite("prelu")  # relu(x) - alpha * relu(-x): a sum


def _layer_family(layer: Any) -> Family | None:
    """The family of an activation layer, else None (the layer itself is given to the probe,
    which reads a capped ``ReLU``'s cap from it)."""
    L = keras.layers
    if isinstance(layer, L.ReLU):
        slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        cap = _max_value(layer)
        shifted = float(getattr(layer, "threshold", 0.0) or 0.0) != 0.0
        if slope > 0:
            if cap is not None:
                return _LEAKY_CAPPED
            return _LEAKY_SHIFTED if shifted else FAMILIES.get("leaky_relu")
        if cap == 6.0 and not shifted:
            return FAMILIES.get("relu6")
        return _RELU_CAPPED if cap is not None else FAMILIES.get("relu")
    if isinstance(layer, L.LeakyReLU):
        return FAMILIES.get("leaky_relu")
    if isinstance(layer, L.PReLU):
        return _PRELU
    if isinstance(layer, L.ELU):
        return FAMILIES.get("elu")
    if isinstance(layer, L.Activation):
        return activation_family(getattr(layer, "activation", None))
    return None


@dataclass
class KerasSite:
    """One Keras layer watched as a site.

    Attributes:
        layer: the Keras layer.
        path: the site's module path (the layer's name, nested models first, ``/`` between).
        unit_dim: the dim holding the units (negative: from the end).
        by_activation: True when the site is the layer's ``activation`` attribute (Dense,
            Conv); False for an activation layer.
        wrapper: the ``TimeDistributed`` that runs the layer (calling its ``call``, not the
            layer, so no hook of the layer fires): its output, the layer's stacked over
            time, is recorded; None for a layer called itself.
    """

    layer: Any
    path: str
    unit_dim: int
    by_activation: bool
    wrapper: Any = None

    @property
    def hooked(self) -> tuple[Any, ...]:
        """The layers whose forward hooks record the site: the layer, and the wrapper that
        runs it (where the layer is also called itself, its own hook fires)."""
        return (self.layer,) if self.wrapper is None else (self.wrapper, self.layer)

    def family(self) -> Family | None:
        """The family the layer runs now (a swap changes it)."""
        if self.by_activation:
            return activation_family(getattr(self.layer, "activation", None))
        return _layer_family(self.layer)

    @property
    def unit_rule(self) -> str:
        """Why :attr:`unit_dim` holds the units, in words (the site's ``unit_rule``)."""
        kind = type(self.layer).__name__
        if isinstance(self.layer, _CONVS):
            fmt = getattr(self.layer, "data_format", "channels_last")
            return f"Keras {kind} `{self.path}` ({fmt}): its channels"
        if self.by_activation:
            return f"Keras {kind} `{self.path}`: its features (last dim)"
        return f"Keras {kind} layer `{self.path}` ({_producer_dim(self.layer)[1]})"

    @property
    def norm(self) -> str:
        """The BatchNormalization that normalises each of its units on its own just before
        it, in words (``""``: none; as :attr:`relu_doctor.sites.Site.norm`: the advice names
        its shift and scale, not "add BatchNorm"). A Dense's or Conv's own activation has
        none between the layer and it."""
        return "" if self.by_activation else _producer_dim(self.layer)[2]

    @property
    def mixed(self) -> str:
        """The norm of its units together its input passed since the layer that made it, in
        words (a LayerNormalization, a GroupNormalization; ``""``: none; as
        :attr:`relu_doctor.sites.Site.mixed`): its scale is that norm's."""
        return "" if self.by_activation else _producer_dim(self.layer)[3]

    @property
    def pattern(self) -> str:
        """A glob pattern matching exactly this site's path (for ``unit_dims``)."""
        return glob.escape(self.path)


class FrozenLayers:
    """The frozen layer feeding each of a Keras model's sites (their rows' ``frozen``; see
    :attr:`Doctor.frozen_feed <relu_doctor.doctor.Doctor.frozen_feed>`), by the rule of
    torch models: the layer that makes the site's input (the site's own Dense/Conv for its
    activation; else the first layer with weights its input comes from, through dropout and
    other layers that keep the axes) and the layer holding it (a base model) have weights
    and none trains: none is among the model's ``trainable_weights``, what its optimizer
    updates (``trainable=False`` on a base model freezes all it holds, whatever its layers
    say). A frozen layer held by the model itself, or in a part that trains, is not one."""

    def __init__(self, model: Any, sites: Mapping[str, KerasSite]) -> None:
        self.model, self.sites = model, sites
        self.layers = dict(walk_layers(model))
        self.paths = {id(layer): path for path, layer in self.layers.items()}

    def __call__(self, paths: Sequence[str]) -> list[str | None]:
        """The frozen layer feeding each site of ``paths`` (Keras layer paths), or None."""
        trains = {id(w) for w in self.model.trainable_weights}
        return [self._frozen(self.sites.get(p), trains) for p in paths]

    def _frozen(self, site: KerasSite | None, trains: set[int]) -> str | None:
        if site is None:
            return None
        layer = site.layer if site.by_activation else self._producer(site.layer)
        path = None if layer is None else self.paths.get(id(layer))
        if path is None or "/" not in path:
            return None  # (no producer found, or one held by the model itself)
        holder = self.layers.get(path.rpartition("/")[0])
        if holder is None or not layer.weights or any(
                id(w) in trains for w in (*layer.weights, *holder.weights)):
            return None
        return path

    @staticmethod
    def _producer(layer: Any, hops: int = 4) -> Any:
        """The first layer with weights ``layer``'s input comes from, through up to
        ``hops`` layers that keep the axes and hold none; None where there is none."""
        op = layer
        for _ in range(hops):
            op = _input_op(op)
            if op is None:
                return None
            if getattr(op, "weights", None):
                return op
            if not isinstance(op, _SAME_AXES):
                return None
        return None


def _sublayers(layer: Any) -> list[Any]:
    """The layers ``layer`` holds: a model's ``layers``; those a custom layer tracks as its
    attributes (a block's ``self.ffn = keras.Sequential(...)``, as Keras' guides write it)."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    flatten = getattr(layer, "_flatten_layers", None)  # Keras 3's own walk, one level
    return list(flatten(include_self=False, recursive=False)) if flatten is not None else []


def walk_layers(
    model: Any, prefix: str = "", seen: set[int] | None = None
) -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` for every layer of ``model``, the layers of nested models and
    custom layers included, each once (a layer held at two places is named by the first)."""
    seen = set() if seen is None else seen
    for layer in _sublayers(model):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        path = f"{prefix}{layer.name}"
        yield path, layer
        yield from walk_layers(layer, prefix=f"{path}/", seen=seen)


def _unit_dim(layer: Any) -> int:
    if isinstance(layer, _CONVS):
        return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1
    if isinstance(layer, _ACTIVATED):
        return -1
    return _producer_dim(layer)[0]


#: Layers whose output keeps their input's axes, walked through back to a producer: dropout
#: and noise, activations, elementwise merges, per-feature normalisation.
_SAME_AXES = tuple(
    getattr(keras.layers, n) for n in (
        "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
        "GaussianNoise", "GaussianDropout", "AlphaDropout", "Activation", "ReLU", "LeakyReLU",
        "ELU", "PReLU", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum",
        "Concatenate", "LayerNormalization", "GroupNormalization", "UnitNormalization",
        "Rescaling", "Identity",
    ) if hasattr(keras.layers, n)
)
#: Layers whose output has its features in the last dim whatever the image data format:
#: recurrent layers (a ConvLSTM's data_format says otherwise), embeddings, attention.
_FEATURES_LAST = tuple(
    getattr(keras.layers, n) for n in (
        "RNN", "Embedding", "MultiHeadAttention", "GroupQueryAttention", "Attention",
        "AdditiveAttention",
    ) if hasattr(keras.layers, n)
)
#: Spatial layers that keep the channel axis where their data_format puts it.
_POOLS = tuple(
    getattr(keras.layers, n) for n in (
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
        "AveragePooling2D", "AveragePooling3D", "ZeroPadding1D", "ZeroPadding2D",
        "ZeroPadding3D", "UpSampling1D", "UpSampling2D", "UpSampling3D", "Cropping1D",
        "Cropping2D", "Cropping3D",
    ) if hasattr(keras.layers, n)
)


def _input_op(layer: Any) -> Any:
    """The layer that made ``layer``'s (first) input in the model's graph, or None."""
    nodes = getattr(layer, "_inbound_nodes", None) or []
    parents = getattr(nodes[0], "parent_nodes", None) if nodes else None
    return getattr(parents[0], "operation", None) if parents else None


def _producer_dim(layer: Any, hops: int = 4) -> tuple[int, str, str, str]:
    """An activation layer's unit dim, why, the norm of each unit on its own its input
    passed last, and the norm of its units together (:data:`_MIXING_NORMS`) it passed last
    since (``""``: none): the dim of the layer that made its input in the model's graph
    (a convolution's ``data_format``, a BatchNormalization's ``axis``, a Dense's, a recurrent
    layer's, an embedding's or attention's last dim; a TimeDistributed layer's, after the
    time axis), followed back through up to ``hops`` layers that keep the axes (dropout, an
    activation, an elementwise merge: not a Permute or a Reshape); else the channel axis of
    Keras' ``image_data_format()``."""
    op, mixed = layer, ""
    for _ in range(hops):
        op = _input_op(op)
        if op is None:
            break
        name = f"{type(op).__name__} `{op.name}`"
        if isinstance(op, _MIXING_NORMS) and not mixed:
            mixed = name
        inner = op.layer if isinstance(op, keras.layers.TimeDistributed) else op
        own = _own_dim(inner, name)
        if own is not None:  # (a TimeDistributed layer's output has the time axis at 1)
            dim, why, norm = own
            if inner is not op:
                dim, why = (dim + 1 if dim >= 0 else dim), f"{why}, after its time axis"
            return dim, why, norm, mixed
        if not isinstance(inner, _SAME_AXES):  # a Permute, a Reshape: not followed
            break
    fmt = keras.config.image_data_format()
    return (1 if fmt == "channels_first" else -1), f"image_data_format {fmt}", "", mixed


#: Norms of a layer's units together (in _SAME_AXES: walked through back to a producer).
_MIXING_NORMS = tuple(
    getattr(keras.layers, n) for n in (
        "LayerNormalization", "GroupNormalization", "UnitNormalization",
    ) if hasattr(keras.layers, n)
)


def _own_dim(op: Any, name: str) -> tuple[int, str, str] | None:
    """The dim holding the features of ``op``'s output by its own kind (see
    :func:`_producer_dim`), or None where it has none of its own."""
    if isinstance(op, keras.layers.Bidirectional):
        op = op.forward_layer  # (its two directions' features concatenated, or merged)
    fmt = getattr(op, "data_format", None)
    if isinstance(op, (*_CONVS, *_POOLS)) and fmt in ("channels_first", "channels_last"):
        return (1 if fmt == "channels_first" else -1), f"after {name}, {fmt}", ""
    if isinstance(op, keras.layers.BatchNormalization) and isinstance(op.axis, int):
        return op.axis, f"after {name}, axis {op.axis}", name
    if isinstance(op, _ACTIVATED):
        return -1, f"after {name}: its features (last dim)", ""
    if isinstance(op, keras.layers.RNN) and fmt == "channels_first":  # (a ConvLSTM's)
        return (2 if op.return_sequences else 1), f"after {name}, channels_first", ""
    if isinstance(op, _FEATURES_LAST):
        # (an LSTM's output is (N, T, F) whatever image_data_format says: a ReLU after it
        # read its time steps as units, a trial's)
        return -1, f"after {name}: its features (last dim)", ""
    return None


#: The layers with an anonymous activation already said, by model (each ``fit`` looks again)
_SAID_ANONYMOUS: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
#: per model, the layers of a ReLU-like activation of no family already said (once)
_SAID_RELU_LIKE: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
#: per model, the recurrent layers whose ReLU-family cell activation was said (once)
_SAID_RECURRENT: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
#: per model, the ``"layer:function"`` pairs said to run in a layer's own call() (once)
_SAID_UNSEEN: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def find_sites(model: Any, selected: Callable[[str], bool]) -> list[KerasSite]:
    """The ReLU-family sites of a built Keras model, in layer order (``selected(path)``
    applies include/exclude). A Dense/Conv or an ``Activation`` layer whose activation is an
    anonymous function (a lambda, a ``functools.partial``), which may be a ReLU that cannot
    be told apart, is said once per model, not watched."""
    out, anonymous, recurrent, relu_like = [], [], [], []
    wrappers: dict[int, Any] = {}  # the layer a TimeDistributed runs -> the wrapper
    for path, layer in walk_layers(model):
        if isinstance(layer, keras.layers.TimeDistributed):
            wrappers[id(layer.layer)] = layer
        cells = getattr(layer.cell, "cells", [layer.cell]) if isinstance(layer, keras.layers.RNN) else []
        if selected(path) and any(activation_family(getattr(c, a, None)) is not None
                                  for c in cells for a in ("activation", "recurrent_activation")):
            recurrent.append(path)  # (its activation runs inside the cell, at each time step)
        by_act = isinstance(layer, _ACTIVATED)
        fn = (getattr(layer, "activation", None)
              if by_act or isinstance(layer, keras.layers.Activation) else None)
        fam = activation_family(fn) if by_act else _layer_family(layer)
        if fam is None and callable(fn) and not isinstance(fn, keras.layers.Layer) and (
                getattr(fn, "__name__", "<lambda>") == "<lambda>") and selected(path):
            anonymous.append(path)
        if fam is None and getattr(fn, "__name__", None) in RELU_LIKE and selected(path):
            relu_like.append(path)  # (MobileNetV3's hard swish: said, not watched)
        if fam is None or not selected(path):
            continue
        wrapper = wrappers.get(id(layer))
        dim = _unit_dim(layer)
        out.append(KerasSite(layer, path, dim + 1 if wrapper is not None and dim >= 0 else dim,
                             by_act, wrapper))
    _say_once(_SAID_RECURRENT, model, recurrent, lambda names, many: (
        f"the recurrent layer{'s' * many} {names} run{'s' * (not many)} a ReLU-family "
        f"activation inside {'their cells' if many else 'its cell'}, at each time step: not "
        "watched (the layers around it are). A SimpleRNN's output is that activation's at the "
        "steps it returns, but the gradient reaching it there is not its units' (the steps "
        "after each pass theirs back through the cell)."))
    _say_once(_SAID_RELU_LIKE, model, relu_like, lambda names, many: (
        f"Keras layer{'s' * many} {names} run{'s' * (not many)} a ReLU-like activation (hard "
        "swish, mish) of no family relu_doctor counts: not watched (the ReLU-family layers "
        "are)."))
    _say_once(_SAID_ANONYMOUS, model, anonymous, lambda names, many: (
        f"Keras layer{'s' * many} {names} {'have' if many else 'has'} an anonymous activation "
        "(a lambda or a functools.partial), which relu_doctor cannot tell from any other "
        "function: it is not watched. Where it is a ReLU-family activation, pass it by name "
        "(activation='relu', keras.activations.gelu, Activation('relu')) or as a layer "
        "(keras.layers.ReLU())."))
    return out


def _say_once(said_by_model: weakref.WeakKeyDictionary[Any, set[str]], model: Any,
              paths: list[str], text: Callable[[str, bool], str]) -> None:
    """Warn once per model of the layers at ``paths`` not said before: ``text(names, many)``
    (the first four named, how many more)."""
    said = said_by_model.setdefault(model, set())
    paths = [p for p in paths if p not in said]
    said.update(paths)
    if paths:
        names = (", ".join(map(repr, paths[:4]))
                 + (f" (and {len(paths) - 4} more)" if len(paths) > 4 else ""))
        warnings.warn(f"relu_doctor: {text(names, len(paths) > 1)}", ReluDoctorWarning,
                      stacklevel=user_stacklevel())


def _runs_its_activation(layer: Any) -> bool:
    """Whether a ReLU-family function ``layer`` runs is its activation, a site or said
    apart (left out by include/exclude, anonymous, in a recurrent cell): an activation
    layer, a layer with an ``activation`` (Dense, Conv, an RNN's), a wrapper running its
    layer's ``call()`` (``TimeDistributed``, ``Bidirectional``: no hook of the inner layer
    fires, so its calls are the wrapper's)."""
    return (_layer_family(layer) is not None or hasattr(layer, "activation")
            or isinstance(layer, keras.layers.Wrapper))


class UnseenCalls:
    """The ReLU-family functions a layer's ``call()`` runs itself where no site holds them
    (``keras.ops.relu(x)`` in a custom layer, or in a subclassed model's own ``call()``),
    found in one training pass: a torch-function mode sees each torch call, and a stack of
    the layers running says whose ``call()`` made it (a layer watched as a site, or one
    with an ``activation`` of its own, runs its own: not counted here). Such calls are not
    watched (functional capture is off for Keras: see the README), and were missed without
    a word; :meth:`stop` returns them by the layer that made them (``""``: the model's own
    ``call()``), and never raises into the forward (a failure finds nothing)."""

    def __init__(self, model: Any, sites: Mapping[str, KerasSite]) -> None:
        self.model = model
        self._own = {id(layer) for s in sites.values() for layer in s.hooked}
        self.found: dict[str, list[str]] = {}
        self._stack: list[str | None] = []
        self._handles: list[Any] = []
        self._mode: Any = None

    def start(self) -> None:
        from relu_doctor._observing_mode import ObservingMode
        from relu_doctor.functional import functional_ops

        ops = functional_ops()
        def enter(label: str | None) -> Callable[[Any, Any], None]:
            def hook(layer: Any, args: Any) -> None:  # (a hook's value would replace args)
                self._stack.append(label)
            return hook

        def leave(layer: Any, args: Any, output: Any) -> None:  # (None: the output stays)
            if self._stack:
                self._stack.pop()

        try:
            for path, layer in walk_layers(self.model):
                mine = id(layer) in self._own or _runs_its_activation(layer)
                self._handles.append(layer.register_forward_pre_hook(
                    enter(None if mine else path)))
                self._handles.append(layer.register_forward_hook(leave, always_call=True))

            def observe(func: Any, args: Any, kwargs: Any, out: Any) -> None:
                spec = ops.get(func)
                where = self._stack[-1] if self._stack else ""
                if spec is not None and where is not None:
                    calls = self.found.setdefault(where, [])
                    if spec[1] not in calls:
                        calls.append(spec[1])

            self._mode = ObservingMode(observe)
            self._mode.__enter__()
        except Exception:  # (nothing found rather than a forward broken)
            self.stop()

    @property
    def searching(self) -> bool:
        """Whether the search runs (started, not stopped)."""
        return self._mode is not None

    def stop(self) -> dict[str, list[str]]:
        """Ends the search (the mode left, the hooks removed); what it found."""
        mode, self._mode = self._mode, None
        if mode is not None:
            try:
                mode.__exit__(None, None, None)
            except Exception:  # (another mode entered meanwhile and not left: found nothing)
                self.found = {}
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        return self.found


def say_unseen(model: Any, found: Mapping[str, Sequence[str]]) -> None:
    """Once per model, layer and function: the ReLU-family functions :class:`UnseenCalls`
    found run in a layer's ``call()``, which nothing watches, each layer with its own (a
    Keras trial read one list of functions beside one of layers, and could not tell which
    ran where)."""
    said = _SAID_UNSEEN.setdefault(model, set())
    new = {path: [op for op in ops if f"{path}:{op}" not in said] for path, ops in found.items()}
    new = {path: ops for path, ops in new.items() if ops}
    if not new:
        return
    said.update(f"{path}:{op}" for path, ops in new.items() for op in ops)
    where = "; ".join(
        f"{path!r}: {', '.join(ops)}" if path else
        f"the model {model.name!r} itself (its call(), or its graph): {', '.join(ops)}"
        for path, ops in new.items())
    warnings.warn(
        f"relu_doctor: ReLU-family functions called in a layer's call() (keras.ops.relu(x), "
        f"keras.activations.gelu(x)) are not watched, and these ran: {where}. relu_doctor "
        "watches Keras layers, not the functions a layer's call() runs itself, so those units "
        "are in no statistic, finding or remedy. Make each a layer (keras.layers.ReLU(), "
        "LeakyReLU(), ELU(), Activation('gelu')) or a layer's activation= to watch it.",
        ReluDoctorWarning, stacklevel=user_stacklevel())
