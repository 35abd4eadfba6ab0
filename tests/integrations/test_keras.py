"""The Keras 3 callback on real ``model.fit`` runs (torch backend), checked against plain torch
hooks on the same layers counted in numpy (tests/integrations/brute.py)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

keras = pytest.importorskip("keras")

import relu_doctor  # noqa: E402
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning  # noqa: E402
from relu_doctor.integrations.keras import ReluDoctorCallback  # noqa: E402
from tests.integrations.brute import Outputs, windows  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::relu_doctor.errors.ReluDoctorWarning")


def _data(n: int = 64, d: int = 12, classes: int = 3, seed: int = 0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, classes, n), classes)
    return x, y


def _mlp(lr: float = 0.01) -> Any:
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.layers.Dense(6, activation="relu", name="d_in")], name="inner")
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(10, activation=keras.activations.relu, name="hidden"),
            inner,
            keras.layers.ReLU(name="act"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="categorical_crossentropy")
    return model


def _layers(model: Any) -> dict[str, Any]:
    return {"hidden": model.get_layer("hidden"), "inner/d_in": model.get_layer("inner").get_layer("d_in"),
            "act": model.get_layer("act")}


def test_sites_are_keras_layers_and_numbers_equal_the_reference(tmp_path: Path) -> None:
    model = _mlp()
    x, y = _data()
    layers = _layers(model)
    ref = Outputs(layers, {k: -1 for k in layers}, keep=lambda: torch.is_grad_enabled())
    val = Outputs(layers, {k: -1 for k in layers}, keep=lambda: not torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "run", monitor_validation=True)
    hist = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb],
                     validation_data=_data(24, seed=1))
    ref.remove()
    val.remove()
    doc = cb.doctor
    assert doc is not None
    assert [s.name for s in doc.sites] == ["hidden", "inner/d_in", "act"]
    assert [s.units for s in doc.sites] == [10, 6, 6]
    assert len(ref.passes) == 8  # 4 batches x 2 epochs; validation passes are not training
    expected = windows(ref.passes, 2)
    h = doc.history()
    assert sorted(h["step"].unique()) == [2, 4, 6, 8]
    for i, step in enumerate([2, 4, 6, 8]):
        for site, want in expected[i].items():
            row = h[(h["step"] == step) & (h["site"] == site)].iloc[0]
            assert row["elements"] == want["elements"]  # training rows only
            assert row["dead"] == want["dead"]
            assert row["activation_rate"] == pytest.approx(want["activation_rate"], rel=1e-9)
            assert row["mean_abs"] == pytest.approx(want["mean_abs"], rel=1e-5)
    # The evaluation stream holds exactly the validation passes (24 rows per epoch, 2 epochs).
    ev = relu_doctor.load_run(tmp_path / "run" / "validation").history
    assert int(ev[ev["site"] == "hidden"]["elements"].sum()) == sum(
        p["hidden"].size for p in val.passes
    )
    # Keras' own logs see the model-wide numbers.
    assert "relu_doctor/dead_fraction" in hist.history
    assert len(hist.history["relu_doctor/dead_fraction"]) == 2


def test_activation_layers_with_options_keep_their_cap_and_say_no_zero_gradient(
    tmp_path: Path,
) -> None:
    """A ``ReLU`` layer with options runs in several ops: ``relu`` then a clip (a
    ``max_value`` but 6), a difference (a ``negative_slope`` with a cap or threshold),
    ``PReLU`` a sum. Their cap was dropped (its saturation not counted, 34% of outputs at 3
    in the trial) and their zero-gradient fraction read the last op's (0.0 for a PReLU with
    half its inputs negative). The cap is now the layer's ``max_value``, saturation is
    counted against it, and the zero-gradient fraction is not measured (NaN), where a plain
    ReLU's is."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    d = [keras.layers.Dense(8, name=f"d{i}")(inp) for i in range(5)]
    acts = {
        "cap3": (keras.layers.ReLU(max_value=3.0, name="cap3")(d[0]), 3.0),
        "cap6_thr": (keras.layers.ReLU(max_value=6.0, threshold=0.5, name="cap6_thr")(d[1]), 6.0),
        "leaky_cap4": (keras.layers.ReLU(max_value=4.0, negative_slope=0.1,
                                         name="leaky_cap4")(d[2]), 4.0),
        "prelu": (keras.layers.PReLU(name="prelu")(d[3]), None),
        "plain": (keras.layers.ReLU(name="plain")(d[4]), None),
    }
    h = keras.layers.Concatenate()([a for a, _ in acts.values()])
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(h))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy")
    x, y = _data(64)
    x = x * 4  # outputs past the caps
    layers = {name: model.get_layer(name) for name in acts}
    ref = Outputs(layers, {k: -1 for k in layers}, keep=lambda: torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=4, overhead_budget=None, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    ref.remove()
    assert cb.doctor is not None
    rows = {r["site"]: r for r in cb.doctor.records[-1].site_rows}
    for name, (_, cap) in acts.items():
        row = rows[name]
        assert row["cap"] == cap, name
        out = np.concatenate([p[name] for p in ref.passes])
        assert row["elements"] == out.size
        if cap is not None:
            assert row["saturated_fraction"] == pytest.approx(float((out >= cap).mean()), rel=1e-9)
            assert (out >= cap).any(), name  # (the test reaches the cap)
        composite = name != "plain"
        assert math.isnan(row["grad_zero_fraction"]) == composite, name
        assert math.isfinite(row["grad_rms"]) and row["grad_rms"] > 0, name
    assert rows["plain"]["grad_zero_fraction"] == pytest.approx(
        1.0 - float((np.concatenate([p["plain"] for p in ref.passes]) > 0).mean()), abs=0.02)


@pytest.mark.parametrize("anonymous", ["lambda", "partial"])
def test_an_anonymous_activation_is_said_not_watched(tmp_path: Path, anonymous: str) -> None:
    """``Dense(activation=lambda t: relu(t))`` (or a ``functools.partial``) is a function
    relu_doctor cannot name: it was left out without a word."""
    import functools

    act = (functools.partial(keras.activations.relu, max_value=3.0) if anonymous == "partial"
           else lambda t: keras.activations.relu(t))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, activation=act, name="anon"),
                              keras.layers.Dense(8, activation="relu", name="named"),
                              keras.layers.Dense(8, name="pre"),
                              keras.layers.Activation(act, name="anon_layer"),
                              keras.layers.Dense(3, activation="softmax", name="out")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x, y = _data(32)
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "run",
                            warn=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a second fit says nothing new
            model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    said = [str(w.message) for w in caught if issubclass(w.category, relu_doctor.ReluDoctorWarning)]
    assert len(said) == 1 and said[0].startswith(
        "relu_doctor: Keras layers 'anon', 'anon_layer' have an anonymous activation"), said
    assert cb.doctor is not None and [s.name for s in cb.doctor.sites] == ["named"]


def test_a_relu_like_activation_of_no_family_is_said_not_watched(tmp_path: Path) -> None:
    """MobileNetV3's hard swishes (``Activation("hard_silu")``, a Conv2D's
    ``activation="hard_silu"``) beside its ReLUs were left out without a word (a trial):
    said once per model, the ReLU layers watched; sigmoid and softmax, no ReLU-like
    activation, are not named."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 3)),
                              keras.layers.Conv2D(4, 3, activation="hard_silu", name="hs_conv"),
                              keras.layers.Activation("relu", name="act"),
                              keras.layers.Activation("hard_silu", name="hs"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="sigmoid", name="gate")])
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "run",
                            warn=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a second fit says nothing new
            model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    said = [str(w.message) for w in caught if "ReLU-like" in str(w.message)]
    assert said == ["relu_doctor: Keras layers 'hs_conv', 'hs' run a ReLU-like activation "
                    "(hard swish, mish) of no family relu_doctor counts: not watched (the "
                    "ReLU-family layers are)."]
    assert cb.doctor is not None and [s.name for s in cb.doctor.sites] == ["act"]


def test_conv_channels_last_units_are_filters(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, (3, 3), activation="relu", name="conv"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(5, activation="relu", name="fc"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 2, 32), 2)
    layers = {"conv": model.get_layer("conv"), "fc": model.get_layer("fc")}
    ref = Outputs(layers, {"conv": -1, "fc": -1}, keep=lambda: torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    ref.remove()
    assert cb.doctor is not None
    conv = cb.doctor.probe.site("conv")
    assert (conv.units, conv.unit_dim) == (4, 3)  # channels_last: the filters are the last dim
    # the rule in words names the layer and its format, not a user's override (none given)
    assert conv.unit_rule == "Keras Conv2D `conv` (channels_last): its channels -> dim 3"
    fc = cb.doctor.probe.site("fc")
    assert fc.unit_rule == "Keras Dense `fc`: its features (last dim) -> dim 1"
    want = windows(ref.passes, 4)[0]
    h = cb.doctor.history()
    for site in ("conv", "fc"):
        row = h[h["site"] == site].iloc[-1]
        assert row["dead"] == want[site]["dead"]
        assert row["activation_rate"] == pytest.approx(want[site]["activation_rate"], rel=1e-9)


@pytest.mark.parametrize("norm", ["none", "BatchNormalization", "LayerNormalization",
                                  "GroupNormalization"])
def test_growth_over_depth_is_not_read_up_to_a_keras_site_behind_a_norm(
        tmp_path: Path, norm: str) -> None:
    """A Keras trial: growth over depth stopped at a site behind a BatchNormalization, but
    not behind a LayerNormalization, which Keras sites did not record (a transformer's
    false warning, as a PyTorch SegFormer's was). A small first site, a huge layer, then
    the norm (or none) before the deepest ReLU: its RMS, read by hand, is 100x the first's
    either way, and the finding comes without a norm alone."""
    keras.utils.set_random_seed(0)
    i = keras.Input((16,))
    h = keras.layers.Dense(32, activation="gelu", name="small",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=1e-4))(i)
    h = keras.layers.Dense(32, name="big",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=50.0))(h)
    if norm != "none":
        h = getattr(keras.layers, norm)(name="norm", **(
            {"groups": 4} if norm == "GroupNormalization" else {}))(h)
    deep = keras.layers.Activation("relu", name="deep")(h)
    model = keras.Model(i, keras.layers.Dense(1)(deep))
    model.compile(optimizer=keras.optimizers.SGD(1e-9), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16)).astype("float32")
    cb = ReluDoctorCallback(log_every_n_steps=1, every_n_steps=1, run_dir=tmp_path / "run")
    model.fit(x, rng.normal(size=(32, 1)).astype("float32"), epochs=1, batch_size=32,
              verbose=0, shuffle=False, callbacks=[cb])
    assert cb.doctor is not None
    record = cb.doctor.records[0]
    rms = {r["site"]: r["rms"] for r in record.site_rows}
    outs = keras.Model(i, [model.get_layer("small").output, deep])(x, training=True)
    by_hand = [float(np.sqrt(np.mean(np.square(keras.ops.convert_to_numpy(o))))) for o in outs]
    assert [rms["small"], rms["deep"]] == pytest.approx(by_hand, rel=1e-3)  # (float32 sums)
    assert rms["deep"] / rms["small"] >= 100
    depth = [f.site for f in record.findings
             if f.kind == "activation_growth" and f.evidence["over"] == "depth"]
    assert depth == (["deep"] if norm == "none" else [])


def test_dead_units_behind_a_batchnormalization_are_told_to_check_its_shift(tmp_path: Path) -> None:
    """A ReLU layer right after a BatchNormalization whose shift (beta) keeps units below 0
    was told to "add BatchNorm before the activation" (a trial: Keras sites had no norm,
    read only from torch's pass). Its advice names that BatchNormalization's shift and
    scale now, as a PyTorch Conv-BN-ReLU's does; a Dense's own activation has none."""
    keras.utils.set_random_seed(0)
    i = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(i)
    bn = keras.layers.BatchNormalization(name="bn")
    h = keras.layers.ReLU(name="act")(bn(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(4, activation="relu", name="fc")(h)
    model = keras.Model(i, keras.layers.Dense(2)(h))
    model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
    bn.beta.assign(np.array([-50.0, -50.0, 0.0, 0.0], dtype="float32"))  # units 0, 1 dead
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    cb = ReluDoctorCallback(log_every_n_steps=2, every_n_steps=1, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False, callbacks=[cb])
    assert cb.doctor is not None
    assert (cb.doctor.probe.site("act").norm, cb.doctor.probe.site("fc").norm) == (
        "BatchNormalization `bn`", "")
    [dead] = [f for f in cb.doctor.records[-1].findings if (f.kind, f.site) == ("dead", "act")]
    assert dead.evidence["dead"] == 2 and dead.evidence["norm"] == "BatchNormalization `bn`"
    assert "the shift (bias) and scale (weight) of the BatchNormalization `bn`" in dead.remedy
    assert "add BatchNorm" not in dead.remedy


def test_an_activation_layer_takes_the_units_of_the_layer_that_made_its_input(
        tmp_path: Path) -> None:
    """A ReLU layer after a channels_first Conv2D (through a BatchNormalization on axis 1)
    took its units from image_data_format() (channels_last by default): the image's width,
    6, not the 5 filters, with dead and dormant counts over those. It follows its producer;
    one after a Dense keeps the last dim."""
    keras.utils.set_random_seed(0)
    i = keras.Input((3, 6, 6))
    h = keras.layers.Conv2D(5, 3, padding="same", data_format="channels_first", name="conv")(i)
    h = keras.layers.BatchNormalization(axis=1, name="bn")(h)
    h = keras.layers.ReLU(name="act")(h)
    h = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(h)
    h = keras.layers.Dense(4, name="fc")(h)
    h = keras.layers.Activation("relu", name="fc_act")(h)
    model = keras.Model(i, keras.layers.Dense(2)(h))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3, 6, 6)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    ref = Outputs({"act": model.get_layer("act")}, {"act": 1}, keep=lambda: torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=2, every_n_steps=1, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False, callbacks=[cb])
    ref.remove()
    assert cb.doctor is not None
    act = cb.doctor.probe.site("act")
    assert (act.units, act.unit_dim) == (5, 1)
    assert act.unit_rule == ("Keras ReLU layer `act` (after BatchNormalization `bn`, axis 1) "
                             "-> dim 1")
    assert cb.doctor.probe.site("fc_act").units == 4
    # A layer that moves the axes is not walked through: after a Permute to channels-last
    # the fallback's last dim holds the 5 channels (walked through, it took dim 1).
    j = keras.Input((3, 6, 6))
    h = keras.layers.Conv2D(5, 3, data_format="channels_first", name="conv")(j)
    h = keras.layers.Permute((2, 3, 1))(h)
    permuted = keras.Model(j, keras.layers.ReLU(name="act")(h))
    from relu_doctor.integrations._keras_layers import find_sites

    (site,) = find_sites(permuted, lambda path: True)
    assert site.unit_dim == -1 and "image_data_format" in site.unit_rule
    # Padding, upsampling and a concatenation on the channel axis keep it where it was.
    k = keras.Input((3, 6, 6))
    c = keras.layers.Conv2D(5, 3, data_format="channels_first", name="conv")(k)
    h = keras.layers.ZeroPadding2D(1, data_format="channels_first")(c)
    h = keras.layers.UpSampling2D(2, data_format="channels_first")(h)
    h = keras.layers.Concatenate(axis=1)([h, h])
    (site,) = find_sites(keras.Model(k, keras.layers.ReLU(name="act")(h)), lambda path: True)
    assert site.unit_dim == 1 and "channels_first" in site.unit_rule
    want = windows(ref.passes, 2)[0]["act"]
    row = cb.doctor.history().query("site == 'act'").iloc[-1]
    assert row["units"] == want["units"] and row["dead"] == want["dead"]
    assert row["activation_rate"] == pytest.approx(want["activation_rate"], rel=1e-9)


@pytest.mark.parametrize("recurrent", ["lstm", "bidirectional", "convlstm", "time_dense",
                                       "time_conv", "time_conv_bn"])
def test_an_activation_layer_after_a_recurrent_layer_takes_its_features_whatever_the_image_format(
        tmp_path: Path, recurrent: str) -> None:
    """With image_data_format "channels_first" (a CNN user's keras.json), a ReLU layer after
    an LSTM took dim 1 of its (N, T, F) output: its 10 time steps as units, not its 8
    features (a trial). A recurrent layer's output has its features last; a ConvLSTM's where
    its own data_format puts them (after the time axis); a TimeDistributed layer's, its
    layer's after the time axis."""
    keras.utils.set_random_seed(0)
    keras.config.set_image_data_format("channels_first")
    try:
        _fit_a_relu_after_a_recurrent_layer(tmp_path, recurrent)
    finally:
        keras.config.set_image_data_format("channels_last")


def _fit_a_relu_after_a_recurrent_layer(tmp_path: Path, recurrent: str) -> None:
    if recurrent == "convlstm":
        i = keras.Input((10, 3, 6))  # (T, C, W): channels_first, taken from the config
        h = keras.layers.ConvLSTM1D(8, 3, return_sequences=True, name="rnn")(i)
        dim = 2
    elif recurrent.startswith("time_conv"):  # (a review: a TimeDistributed layer was not
        i = keras.Input((10, 3, 6))         # followed, nor a BatchNormalization in one)
        h = keras.layers.TimeDistributed(keras.layers.Conv1D(8, 3, name="conv"), name="td")(i)
        if recurrent == "time_conv_bn":
            h = keras.layers.TimeDistributed(keras.layers.BatchNormalization(axis=1))(h)
        dim = 2
    elif recurrent == "time_dense":
        i = keras.Input((10, 4))
        h = keras.layers.TimeDistributed(keras.layers.Dense(8, name="fc"), name="td")(i)
        dim = -1
    else:
        i = keras.Input((10, 4))
        rnn = keras.layers.LSTM(4 if recurrent == "bidirectional" else 8,
                                return_sequences=True, name="rnn")
        h = (keras.layers.Bidirectional(rnn, name="bi") if recurrent == "bidirectional"
             else rnn)(i)
        dim = -1
    h = keras.layers.ReLU(name="act")(h)
    model = keras.Model(i, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, *i.shape[1:])).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    ref = Outputs({"act": model.get_layer("act")}, {"act": dim}, keep=lambda: torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=2, every_n_steps=1, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False, callbacks=[cb])
    ref.remove()
    assert cb.doctor is not None
    act = cb.doctor.probe.site("act")
    assert (act.units, act.unit_dim) == (8, 2), act.unit_rule  # (N, T, F) and (N, T, C, W)
    want = windows(ref.passes, 2)[0]["act"]
    row = cb.doctor.history().query("site == 'act'").iloc[-1]
    assert row["units"] == want["units"] == 8 and row["dead"] == want["dead"]
    assert row["activation_rate"] == pytest.approx(want["activation_rate"], rel=1e-9)


def test_a_layer_run_by_time_distributed_is_recorded_from_its_wrapper(tmp_path: Path) -> None:
    """TimeDistributed calls its layer's ``call``, not the layer: the Dense's hook never
    fired, and its site was listed but never recorded, silently. It is recorded from the
    wrapper's output (the Dense's, stacked over time): its 5 units, not the time steps."""
    keras.utils.set_random_seed(0)
    i = keras.Input((4, 8))
    h = keras.layers.TimeDistributed(keras.layers.Dense(5, activation="relu", name="tdd"),
                                     name="td")(i)
    model = keras.Model(i, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4, 8)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    ref = Outputs({"td": model.get_layer("td")}, {"td": -1}, keep=lambda: torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=2, every_n_steps=1, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False, callbacks=[cb])
    ref.remove()
    assert cb.doctor is not None
    h = cb.doctor.history().query("site == 'td/tdd'")
    assert sorted(h["step"]) == [2, 4]
    for (_, row), want in zip(h.sort_values("step").iterrows(), windows(ref.passes, 2),
                              strict=True):
        assert (row["units"], row["dead"], row["elements"]) == (
            want["td"]["units"], want["td"]["dead"], want["td"]["elements"])
        assert row["activation_rate"] == pytest.approx(want["td"]["activation_rate"], rel=1e-9)


class _GuideStep(keras.Model):
    """The Keras guides' subclassed model with its own train_step: its prediction made as
    ``self(x, **predict)``, after an inference pass (``training=False``) where asked."""

    def __init__(self, predict: dict[str, Any], inference_pass: bool = False) -> None:
        super().__init__()
        self.d1, self.d2 = keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)
        self.predict_kwargs, self.inference_pass = predict, inference_pass

    def train_step(self, data: Any) -> Any:
        x, y = data
        self.zero_grad()
        if self.inference_pass:
            self(x, training=False)  # (an adversarial example's, a teacher's)
        loss = self.compute_loss(x=x, y=y, y_pred=self(x, **self.predict_kwargs))
        loss.backward()
        with torch.no_grad():
            self.optimizer.apply([v.value.grad for v in self.trainable_weights],
                                 self.trainable_weights)
        return {"loss": loss}


class _TrainingDefaultsToFalse(_GuideStep):
    def call(self, x: Any, training: bool = False) -> Any:
        return self.d2(self.d1(x))


class _TrainingDefaultsToNone(_GuideStep):
    def call(self, x: Any, training: Any = None) -> Any:
        return self.d2(self.d1(x))


def _fit_guide_step(model: _GuideStep, tmp_path: Path, fits: int, **watch: Any) -> list[list[str]]:
    """The warnings of each of ``fits`` fits (3 steps each) with one callback."""
    keras.utils.set_random_seed(0)
    x, y = _data(n=24, d=8)
    model(x[:2])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    cb = ReluDoctorCallback(run_dir=tmp_path / "run", **watch)
    out = []
    for _ in range(fits):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
        out.append([str(w.message) for w in seen if issubclass(w.category, ReluDoctorWarning)])
        model.relu_doctor_step = cb.doctor.global_step if cb.doctor is not None else None
    return out


def test_a_train_step_calling_a_model_whose_training_defaults_to_false_is_told_how_to_fix_it(
        tmp_path: Path) -> None:
    """``call(self, x, training=False)`` called as ``self(x)`` in a custom train_step gets
    training=False from Keras: an inference pass, not counted. The warning blamed
    ``functional=False``, which a Keras user cannot set; it now says what to do."""
    (said,) = _fit_guide_step(_TrainingDefaultsToFalse({}), tmp_path, 1,
                              log_every_n_steps=2, every_n_steps=1)
    assert len(said) == 1 and "self(x, training=True)" in said[0], said
    assert "functional=False" not in said[0]


def test_a_second_fit_whose_first_step_collects_nothing_goes_on_watching(tmp_path: Path) -> None:
    """With every_n_steps=2 a second fit's first step collects nothing: no pass recorded,
    no site made yet, and the callback stepped aside saying the model ran no ReLU-family
    activation; with an inference pass in its train_step beside the training one, it said
    the train_step called the model with training=False. It goes on watching."""
    model = _TrainingDefaultsToNone({"training": True}, inference_pass=True)
    for said in _fit_guide_step(model, tmp_path, 2, log_every_n_steps=4, every_n_steps=2):
        assert not [m for m in said if "steps aside" in m], said
    assert model.relu_doctor_step == 6


def test_a_dense_inside_a_custom_layer_is_a_site(tmp_path: Path) -> None:
    # Keras' guides build blocks as custom layers holding sublayers (a Transformer block's
    # ffn Sequential): their activations are sites, named by the layers holding them.
    class Block(keras.layers.Layer):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.ffn = keras.Sequential([keras.layers.Dense(8, activation="relu", name="up"),
                                         keras.layers.Dense(12, name="down")], name="ffn")
            self.act = keras.layers.ReLU(name="act")

        def call(self, x: Any) -> Any:
            return self.act(x + self.ffn(x))

    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    block = Block(name="block")
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(block(inp)))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x, y = _data(64)
    layers = {"block/ffn/up": block.ffn.get_layer("up"), "block/act": block.act}
    ref = Outputs(layers, {k: -1 for k in layers}, keep=lambda: torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    ref.remove()
    assert sorted(cb.sites) == ["block/act", "block/ffn/up"]
    h = relu_doctor.load_run(tmp_path / "run").history.set_index(["step", "site"])
    for i, want in enumerate(windows(ref.passes, 2)):
        for name, w in want.items():
            row = h.loc[(2 * (i + 1), name)]
            assert (row["dead"], row["elements"]) == (w["dead"], w["elements"]), name
            assert row["activation_rate"] == pytest.approx(w["activation_rate"]), name


def test_an_activation_a_layers_call_runs_as_a_function_is_said_not_watched(
        tmp_path: Path) -> None:
    """``keras.ops.relu(x)`` in a custom layer's ``call()`` (or a subclassed model's own) is
    not watched (functional capture is off for Keras): it was missed without a word, its
    units in no statistic. Said once per model and layer, naming the layers and the
    functions, found in the first recorded training pass; a Dense's own activation, a
    watched activation layer and the Keras internals are not named; the weights are those
    of a fit without the callback."""
    class Block(keras.layers.Layer):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.dense = keras.layers.Dense(8)
            self.act = keras.layers.ReLU(name="act")

        def call(self, x: Any) -> Any:
            return self.act(keras.ops.relu(self.dense(x)))

    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="net")
            self.first = keras.layers.Dense(8, activation="relu", name="first")
            self.block = Block(name="block")
            self.head = keras.layers.Dense(3)

        def call(self, x: Any) -> Any:
            return self.head(keras.ops.gelu(self.block(self.first(x))))

    x, y = _data(32)

    def fit(callbacks: list[Any]) -> Any:
        keras.utils.set_random_seed(0)
        model = Net()
        model(x[:1])
        model.compile(optimizer="sgd", loss="mse")
        for _ in range(2):  # (a second fit says nothing new)
            model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=callbacks)
        return model

    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = fit([cb])
    said = [str(w.message) for w in caught if "in a layer's call()" in str(w.message)]
    assert said == [
        "relu_doctor: ReLU-family functions called in a layer's call() (keras.ops.relu(x), "
        "keras.activations.gelu(x)) are not watched, and these ran: 'block': relu; the model "
        "'net' itself (its call(), or its graph): gelu. relu_doctor watches Keras layers, not "
        "the functions a layer's call() runs itself, so those units are in no statistic, "
        "finding or remedy. Make each a layer (keras.layers.ReLU(), LeakyReLU(), ELU(), "
        "Activation('gelu')) or a layer's activation= to watch it."]
    assert sorted(cb.sites) == ["block/act", "first"]
    plain = fit([])
    for a, b in zip(watched.weights, plain.weights, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    # every activation a layer's own, watched or left out (exclude=, a wrapper running its
    # layer's call(), a lambda said apart): not named here (a review: an excluded ReLU layer
    # was told to be made a layer)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4, 12)), keras.layers.Dense(8, name="d"), keras.layers.ReLU(name="r1"),
        keras.layers.PReLU(name="p"), keras.layers.Dense(8, activation="relu", name="keep"),
        keras.layers.TimeDistributed(keras.layers.Dense(6, activation="relu"), name="td"),
        keras.layers.TimeDistributed(keras.layers.Dense(6, activation=lambda t:
                                                        keras.ops.relu(t)), name="tdl"),
        keras.layers.Flatten(), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(np.random.default_rng(0).normal(size=(32, 4, 12)).astype("float32"), y,
                  epochs=1, batch_size=16, verbose=0, callbacks=[ReluDoctorCallback(
                      overhead_budget=None, run_dir=tmp_path / "r2", exclude=["r1", "p", "td/*"])])
    assert not [w for w in caught if "in a layer's call()" in str(w.message)]
    assert [w for w in caught if "anonymous activation" in str(w.message)]  # (said apart)


def test_its_own_unit_dims_raise_no_pattern_warning(tmp_path: Path) -> None:
    # The callback gives the Doctor one unit dim per Keras layer path; those paths are not
    # torch module paths, and a check of them against named_modules() warned on every fit.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="relu",
                              name="conv"), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "run", monitor_validation=True)
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 2)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, np.zeros((8, 2), "float32"), batch_size=4, verbose=0, callbacks=[cb],
                  validation_data=(x, np.zeros((8, 2), "float32")))
    assert not [w for w in caught if "unit_dims" in str(w.message)]
    assert cb.doctor is not None and cb.doctor.probe.site("conv").unit_dim == 3


def test_partial_window_flushed_and_report_written(tmp_path: Path) -> None:
    model = _mlp()
    x, y = _data(48)
    cb = ReluDoctorCallback(log_every_n_steps=50, run_dir=tmp_path / "run", report=True)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.doctor is not None
    h = cb.doctor.history()
    assert set(h["step"]) == {3} and set(h["window_steps"]) == {3}
    assert (tmp_path / "run" / "report.html").is_file()
    tb_files = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert tb_files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {f"relu_doctor/dead_fraction/{s}" for s in ("hidden", "inner/d_in", "act")} <= tags
    # After fit every hook is gone: a later predict changes nothing.
    before = cb.doctor.global_step
    model.predict(x, verbose=0)
    assert cb.doctor.global_step == before


@pytest.mark.parametrize("remedies", ["swap", "plan"])
def test_a_frozen_part_is_told_so_left_alone_and_treated_once_it_trains(
        tmp_path: Path, remedies: str) -> None:
    """Layers of a part the user froze (trainable=False) were swapped like any other: the
    swap changed what they compute. Then the swap refused them for good, so that after the
    user unfroze them (the transfer-learning tutorial's second phase, a second fit of the
    same callback) their dead units were never treated; and the README's frozen sites did
    not hold in Keras at all (no torch module paths): their findings advised a lower
    learning rate, critical. Now a site in a frozen nested model (a base model) is a frozen
    site, as in torch: info findings naming the layer, no remedy touches it while frozen;
    a frozen layer the model holds itself is none (its findings as usual), and the swap
    leaves it alone while frozen, said once; both are treated once they train."""
    model = _mlp(lr=0.5)  # far too high: units die
    model.get_layer("hidden").bias.assign(
        np.where(np.arange(10) < 5, -50.0, 0.0).astype("float32"))  # dead
    d_in = model.get_layer("inner").get_layer("d_in")
    d_in.bias.assign(np.where(np.arange(6) < 3, -50.0, 0.0).astype("float32"))
    for name in ("hidden", "inner"):
        model.get_layer(name).trainable = False
    model.compile(optimizer=keras.optimizers.Adam(0.5), loss="categorical_crossentropy")
    x, y = _data(64)
    kw: dict[str, Any] = (
        {"leaky_relu_swap": {"threshold": 0.0, "patience": 1, "slope": 0.1}}
        if remedies == "swap" else {"treatment": {"steps": ["swap"], "patience": 1}})
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "run", **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.doctor is not None
    rows = cb.doctor.to_pandas().set_index("site")
    assert rows.loc["inner/d_in", "frozen"] == "inner/d_in"
    assert pd.isna(rows.loc["hidden", "frozen"]) and pd.isna(rows.loc["act", "frozen"])
    on_frozen = [f for f in cb.doctor.findings() if f.site == "inner/d_in"]
    assert {"dead", "lifetime_dead"} <= {f.kind for f in on_frozen}
    assert all(f.severity == "info" and "'inner/d_in', does not train" in f.message
               and f.remedy.startswith("Nothing to do while it stays frozen") for f in on_frozen)
    assert any(f.severity != "info" for f in cb.doctor.findings() if f.site == "hidden")
    assert d_in.activation is keras.activations.relu
    assert model.get_layer("hidden").activation is keras.activations.relu
    said = [str(w.message) for w in caught if "trainable=False" in str(w.message)]
    assert len(said) <= 1 and all("'hidden'" in t for t in said)
    # unfrozen, a second fit of the same callback: treated
    for name in ("hidden", "inner"):
        model.get_layer(name).trainable = True
    model.compile(optimizer=keras.optimizers.Adam(0.5), loss="categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    acted = {e["site"] for e in relu_doctor.load_run(tmp_path / "run").interventions()}
    assert "inner/d_in" in acted and d_in.activation is not keras.activations.relu
    if remedies == "swap":  # (the plan's own refusal of 'hidden' stands: see the README)
        assert "hidden" in acted


@pytest.mark.parametrize("bn_trains", [False, True])
def test_frozen_keras_sites_follow_the_torch_rule(bn_trains: bool) -> None:
    """Which Keras sites are frozen: a ReLU layer after a BatchNormalization is fed by that
    BatchNormalization, and is frozen only where it does not train either (review: "train
    only BatchNorm" named it frozen, and its units were left untreated); a Dense's own
    activation is fed by the Dense, which is frozen only in a block that does not train; a
    frozen layer the model holds itself is no frozen site; names are full layer paths.
    What trains is what the model's optimizer updates (its trainable_weights)."""
    from relu_doctor.integrations._keras_layers import FrozenLayers, find_sites

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(6, name="c1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="r1")(h)
    h = keras.layers.Dense(5, activation="relu", name="d2")(h)
    base = keras.Model(inputs, h, name="base")
    top = keras.layers.Dense(4, activation="relu", name="top")
    model = keras.Sequential([keras.Input((8,)), base, top, keras.layers.Dense(2, name="out")])
    top.trainable = False
    if bn_trains:  # (the base trains, all of it frozen but its BatchNormalization)
        for name in ("c1", "d2"):
            base.get_layer(name).trainable = False
    else:
        base.trainable = False
    sites = {s.path: s for s in find_sites(model, lambda p: True)}
    assert list(sites) == ["base/r1", "base/d2", "top"]
    assert FrozenLayers(model, sites)(list(sites)) == (
        [None, None, None] if bn_trains else ["base/bn1", "base/d2", None])


def test_leaky_relu_swap_changes_the_activation_and_records_it(tmp_path: Path) -> None:
    model = _mlp(lr=0.5)  # far too high: units die
    x, y = _data(64)
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "run",
                            leaky_relu_swap={"threshold": 0.0, "patience": 1, "slope": 0.1})
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    swap = cb.remedies["leaky_relu_swap"]
    assert swap.swaps, "nothing died at lr=0.5"
    events = [e for e in relu_doctor.load_run(tmp_path / "run").events
              if e.get("remedy") == "leaky_relu_swap" and e.get("type") == "intervention"]
    assert sorted(e["site"] for e in events) == sorted(swap.swaps)
    probe = keras.ops.convert_to_tensor(np.array([[-2.0, 3.0]], dtype="float32"))
    for path in swap.swaps:
        layer = cb.sites[path].layer
        if path == "act":
            assert layer.negative_slope == pytest.approx(0.1)
            out = layer(probe)
        else:
            out = layer.activation(probe)
        assert keras.ops.convert_to_numpy(out)[0].tolist() == pytest.approx([-0.2, 3.0])
        assert cb.doctor is not None
        assert cb.doctor.probe.site(path).family.name == "leaky_relu"
    # Saved while swapped, the model loads with its slope (it was saved by name, as
    # leaky_relu with Keras' default slope 0.2: other predictions, silently).
    model.save(tmp_path / "swapped.keras")
    loaded = keras.models.load_model(tmp_path / "swapped.keras")
    np.testing.assert_array_equal(np.asarray(loaded.predict(x, verbose=0)),
                                  np.asarray(model.predict(x, verbose=0)))
    swap.restore()
    assert model.get_layer("hidden").activation is keras.activations.relu


def _dying_activation_layers() -> Any:
    """Two dying ReLUs as Keras' guides write them: a ReLU layer and an Activation layer."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    dead = keras.initializers.Constant(-5.0)
    a = keras.layers.ReLU(name="r1")(keras.layers.Dense(8, bias_initializer=dead, name="d1")(inp))
    b = keras.layers.Activation("relu", name="a2")(
        keras.layers.Dense(8, bias_initializer=dead, name="d2")(inp))
    h = keras.layers.Concatenate()([a, b])
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(h))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    return model


def test_leaky_relu_swap_treats_an_activation_layer(tmp_path: Path) -> None:
    model = _dying_activation_layers()
    x, y = _data(64)
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "run",
                            leaky_relu_swap={"threshold": 0.5, "patience": 1, "slope": 0.1})
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    swap = cb.remedies["leaky_relu_swap"]
    assert sorted(swap.swaps) == ["a2", "r1"]
    said = [e["what"] for e in relu_doctor.load_run(tmp_path / "run").interventions()]
    assert said and all(w.endswith(" > 0.5 for 1 reading)") for w in said), said
    layer = model.get_layer("a2")
    probe = keras.ops.convert_to_tensor(np.array([[-2.0, 3.0]], dtype="float32"))
    assert keras.ops.convert_to_numpy(layer(probe))[0].tolist() == pytest.approx([-0.2, 3.0])
    assert cb.doctor is not None and cb.doctor.probe.site("a2").family.name == "leaky_relu"
    swap.restore()
    assert keras.ops.convert_to_numpy(layer(probe))[0].tolist() == [0.0, 3.0]


def _fit_swapping(model: Any, tmp_path: Path) -> tuple[Any, list[str]]:
    """One epoch of ``model`` with the swap acting at the first dying reading: the callback
    and every warning's text."""
    x, y = _data(64)
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "run",
                            leaky_relu_swap={"threshold": 0.5, "patience": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    return cb, [str(w.message) for w in caught]


def test_a_layer_the_swap_cannot_treat_is_left_alone_and_the_rest_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A swap that fails on one layer warns once and leaves that layer alone; the other
    # layers are still swapped and every site is still watched to the end of fit (the
    # failure had made the callback step aside: no log after the first).
    from relu_doctor.integrations._keras_remedies import KerasActivationSwap

    real = KerasActivationSwap._swap

    def refuse_a2(self: Any, site: Any, path: str, *args: Any, **kw: Any) -> Any:
        if path == "a2":
            raise ReluDoctorError(f"site: {path!r} cannot be swapped here")
        return real(self, site, path, *args, **kw)

    monkeypatch.setattr(KerasActivationSwap, "_swap", refuse_a2)
    cb, texts = _fit_swapping(_dying_activation_layers(), tmp_path)
    assert sum("leaving Keras layer 'a2' alone" in t for t in texts) == 1, texts
    assert not any("steps aside" in t for t in texts)
    assert sorted(cb.remedies["leaky_relu_swap"].swaps) == ["r1"]
    run = relu_doctor.load_run(tmp_path / "run")
    assert sorted(run.history["step"].unique()) == [2, 4]
    assert set(run.history["site"]) == {"r1", "a2"}


def test_the_swap_leaves_a_relu_with_a_threshold_alone(tmp_path: Path) -> None:
    # ReLU(threshold=t) gives 0 for inputs in (0, t]: a negative slope would make them
    # negative (-0.03 for 0.2 at t=0.5), so the swap refuses the layer, once, with why.
    model = _dying_activation_layers()
    model.get_layer("r1").threshold = 0.5
    cb, texts = _fit_swapping(model, tmp_path)
    # A next fit with the callback (a fit per epoch) does not decline it again.
    x, y = _data(64)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    assert not [w for w in again if "leaving Keras layer" in str(w.message)]
    declined = [e for e in relu_doctor.load_run(tmp_path / "run").events
                if e.get("type") == "declined"]
    assert [(e["remedy"], e["site"]) for e in declined] == [("leaky_relu_swap", "r1")]
    assert sum("leaving Keras layer 'r1' alone" in t and "threshold=0.5" in t
               for t in texts) == 1, texts
    assert sorted(cb.remedies["leaky_relu_swap"].swaps) == ["a2"]
    r1 = model.get_layer("r1")
    probe = np.array([[-1.0, 0.2, 0.4, 0.6]], dtype="float32")
    assert np.array_equal(keras.ops.convert_to_numpy(r1(probe)), np.where(probe > 0.5, probe, 0))


def test_lr_rescue_state_holds_the_rescuer_that_decides() -> None:
    from relu_doctor.integrations._keras_remedies import KerasLRRescue
    from tests.remedies.test_evidence import _sampled

    first = KerasLRRescue(keras.optimizers.SGD(0.1))
    first.decide(_sampled(10, [0, 1]))  # a sampled window: pooled, not yet read
    state = first.state_dict()
    again = KerasLRRescue(keras.optimizers.SGD(0.1))
    again.load_state_dict(state)
    assert again.state_dict() == state and state["reasons"]["evidence"]["steps"] == 2


def test_lr_rescue_scales_a_float_and_a_schedule() -> None:
    from relu_doctor.integrations._keras_remedies import KerasLRRescue, ScaledSchedule

    opt = keras.optimizers.Adam(0.1)
    ev = KerasLRRescue(opt, factor=0.5).rescue(step=3, reason="manual")
    assert ev is not None and ev.details["changes"][0]["lr_after"] == pytest.approx(0.05)
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(0.05)
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    opt2 = keras.optimizers.SGD(sched)
    opt2.iterations.assign(2)
    KerasLRRescue(opt2, factor=0.5).rescue(step=1)
    assert float(keras.ops.convert_to_numpy(opt2.learning_rate)) == pytest.approx(0.1 * 0.25 * 0.5)
    cfg = opt2.get_config()["learning_rate"]
    assert isinstance(keras.optimizers.schedules.deserialize(cfg), ScaledSchedule)


def test_a_cut_that_something_else_sets_back_is_said_once() -> None:
    """Keras' LearningRateScheduler callback sets the rate each epoch from its function,
    undoing lr_rescue's cut without a word (the record said 0.3 -> 0.15). It is said once,
    at the next decision; a rate lowered further (ReduceLROnPlateau) is no undoing."""
    from relu_doctor.integrations._keras_remedies import KerasLRRescue
    from tests.remedies.test_evidence import _sampled

    for undo, said in ((0.3, 1), (0.1, 0)):
        opt = keras.optimizers.SGD(0.3)
        rescuer = KerasLRRescue(opt, factor=0.5, cooldown=0)
        assert rescuer.rescue(step=6) is not None
        opt.learning_rate = undo  # what the other callback does, between two logs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                rescuer.decide(_sampled(10, [0, 1]))
        texts = [str(w.message) for w in caught if "do not hold" in str(w.message)]
        assert len(texts) == said
        if said:
            assert "cut the Keras learning rate to 0.15 at step 6, and something set it back " \
                "to 0.3" in texts[0]


class _OwnSchedule(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
    """A user's schedule, not registered with Keras' serialization."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.calls = 0

    def __call__(self, step: Any) -> Any:
        self.calls += 1
        return self.lr / (1.0 + keras.ops.cast(step, "float32"))

    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr}


@pytest.mark.parametrize("loss_scale", [False, True], ids=["plain", "loss_scale"])
@pytest.mark.parametrize("kind", ["own_schedule", "callable"])
def test_lr_rescue_scales_the_users_own_schedule_the_live_object(kind: str, loss_scale: bool) -> None:
    """A schedule of the user's that Keras cannot deserialize was rebuilt from the
    optimizer's config: the rescue failed (TypeError) and switched itself off. The live
    schedule (or a callable of no argument) is scaled instead, twice over; under mixed
    precision, the LossScaleOptimizer's inner one's."""
    from relu_doctor.integrations._keras_remedies import KerasLRRescue, ScaledSchedule

    own = _OwnSchedule(0.1)
    opt = keras.optimizers.SGD(own if kind == "own_schedule" else (lambda: 0.1))
    opt.iterations.assign(3)
    rescuer = KerasLRRescue(keras.optimizers.LossScaleOptimizer(opt) if loss_scale else opt,
                            factor=0.5)
    for _ in range(2):
        assert rescuer.rescue(step=1) is not None
    base = 0.1 / 4 if kind == "own_schedule" else 0.1
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(base * 0.25)
    live = opt._learning_rate
    assert isinstance(live, ScaledSchedule) and live.factor == pytest.approx(0.25)
    if kind == "own_schedule":
        assert live.schedule is own and own.calls > 0  # the user's object, not a copy
    else:  # saved with the model as before the rescue (a ModelCheckpoint would have raised)
        config = keras.optimizers.schedules.serialize(live)
        assert config["config"]["schedule"]["class_name"] == "_Called"


def test_autoclip_clips_inside_the_keras_optimizer(tmp_path: Path) -> None:
    model = _mlp(lr=0.05)
    x, y = _data(64)
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "run", autoclip={"percentile": 10})
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    clip = cb.remedies["autoclip"]
    assert clip.norm_history.numel() == 8  # one norm per optimizer step
    events = [e for e in relu_doctor.load_run(tmp_path / "run").events
              if e.get("remedy") == "adaptive_grad_clip" and e.get("type") == "intervention"]
    assert events and all(e["details"]["clip"]["clipped"] > 0 for e in events)
    assert "_clip_gradients" not in vars(model.optimizer)  # unhooked at the end of fit


@pytest.mark.parametrize("how", ["accumulation", "loss_scale", "both"])
def test_autoclip_clips_the_gradient_the_keras_optimizer_applies(tmp_path: Path, how: str) -> None:
    """AutoClip learnt its threshold from, and clipped, each micro-batch under
    gradient_accumulation_steps (8 norms for 4 updates) and the scaled gradient of a
    LossScaleOptimizer. It now reads one norm per update, that of the gradient applied: the
    mean of the micro-batches' gradients, or the gradient divided by the loss scale. A step
    is an update, the accumulation read from a LossScaleOptimizer's inner optimizer too."""
    model = _mlp(lr=0.05)
    accumulate = 2 if how != "loss_scale" else None
    opt = keras.optimizers.SGD(0.05, gradient_accumulation_steps=accumulate)
    if how != "accumulation":
        opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=2.0**10)
    model.compile(optimizer=opt, loss="categorical_crossentropy")
    given: list[list[torch.Tensor]] = []  # each apply's gradients, unscaled
    apply = opt.apply

    def spy(grads: Any, trainable_variables: Any = None) -> Any:
        scale = float(keras.ops.convert_to_numpy(opt.dynamic_scale)) if how != "accumulation" else 1
        given.append([g.detach().clone() / scale for g in grads])
        return apply(grads, trainable_variables)

    opt.apply = spy
    x, y = _data(64)
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "run",
                            autoclip={"percentile": 50}, overhead_budget=None)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    assert len(given) == 8
    groups = [given[i:i + 2] for i in range(0, 8, 2)] if accumulate else [[g] for g in given]
    want = [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(sum(gs) / len(gs))
                                                  for gs in zip(*group, strict=True)]))
            for group in groups]
    got = cb.remedies["autoclip"].norm_history
    assert got.numel() == len(want)
    torch.testing.assert_close(got, torch.stack(want).float(), rtol=1e-5, atol=0)
    inner = opt.inner_optimizer if how != "accumulation" else opt
    assert "_clip_gradients" not in vars(inner)
    assert relu_doctor.load_run(tmp_path / "run").last_step == len(want)


@pytest.mark.skipif(not hasattr(keras.optimizers, "MultiOptimizer"), reason="this Keras has no MultiOptimizer")
def test_a_multi_optimizer_is_watched_and_the_remedies_that_cannot_act_through_it_refused(
    tmp_path: Path,
) -> None:
    """A MultiOptimizer (each variable to one of several optimizers) has no learning rate of
    its own: reading it for the report raised inside fit, stopping a run that was only
    watched. It is watched now (no rate recorded); lr_rescue and autoclip, which cannot act
    through it (it clips in none of its own steps), are refused before anything is hooked,
    and a plan leaves its rate and clip steps idle."""
    def compiled() -> Any:
        model = _mlp(lr=0.05)
        opt = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(0.05), {"hidden.*": keras.optimizers.SGD(0.01)}))
        model.compile(optimizer=opt, loss="categorical_crossentropy")
        return model

    x, y = _data(64)
    model = compiled()
    cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "run", overhead_budget=None)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    run = relu_doctor.load_run(tmp_path / "run")
    assert run.last_step == 8 and "lr" not in set(run.metrics["name"])
    for remedy in ("lr_rescue", "autoclip"):
        model = compiled()
        with pytest.raises(ReluDoctorError, match=rf"^{remedy}: the Keras optimizer is a "
                           "MultiOptimizer"):
            model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
                ReluDoctorCallback(run_dir=tmp_path / remedy, **{remedy: True})])
        assert _torch_hooks(model) == 0 and not (tmp_path / remedy).exists()
    model = compiled()
    cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "plan", treatment=True)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    assert cb.plan is not None and "_clip_gradients" not in vars(model.optimizer)


def test_a_learning_rate_that_cannot_be_read_is_said_once_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the optimizer's rate for the report ran unguarded inside fit: an optimizer of
    the user's whose rate raises stopped the run. Now one warning, no rate recorded."""
    from relu_doctor.integrations import keras as integration

    def broken(optimizer: Any) -> float:
        raise RuntimeError("no rate here")

    monkeypatch.setattr(integration, "lr_value", broken)
    model, (x, y) = _mlp(lr=0.05), _data(64)
    cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "run", overhead_budget=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    said = [str(w.message) for w in caught if "cannot be read" in str(w.message)]
    assert len(said) == 1 and "RuntimeError: no rate here" in said[0]
    run = relu_doctor.load_run(tmp_path / "run")
    assert run.last_step == 8 and "lr" not in set(run.metrics["name"])


def test_mixed_float16_gradient_statistics_are_the_unscaled_gradients(tmp_path: Path) -> None:
    """Under mixed_float16 Keras' LossScaleOptimizer multiplies the loss by its scale
    (32768 at first): the activation-gradient statistics held it (grad_rms 32768x the
    gradient's). Its scale is divided out now, as a torch GradScaler's is: grad_rms agrees
    with the float32 run's to fp16 rounding."""
    rms = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = _mlp(lr=0.01)
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy")
            x, y = _data(32)
            cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / policy,
                                    overhead_budget=None)
            model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
        finally:
            keras.mixed_precision.set_global_policy("float32")
        hist = relu_doctor.load_run(tmp_path / policy).history
        rms[policy] = hist.set_index("site")["grad_rms"]
    assert (rms["mixed_float16"] / rms["float32"]).between(0.97, 1.03).all(), rms


def _torch_hooks(model: Any) -> int:
    """The forward hooks on a Keras model's torch modules (its layers are modules)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_bad_input_gets_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = keras.Sequential([keras.layers.Dense(4, activation="relu")])  # no input shape
    cb = ReluDoctorCallback(run_dir=tmp_path / "a")
    cb.set_model(model)
    with pytest.raises(ReluDoctorError, match="not built"):
        cb.on_train_begin()
    model = _mlp()
    model.compile(optimizer=keras.optimizers.Adam(0.01, clipnorm=1.0), loss="categorical_crossentropy")
    x, y = _data(16)
    with pytest.raises(ReluDoctorError, match="clipnorm"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[ReluDoctorCallback(run_dir=tmp_path / "b", autoclip=True)])
    # refused before anything was hooked or written: a new callback on the same directory
    # goes on (the refusal had left its hooks on the model, the directory locked)
    assert _torch_hooks(model) == 0 and not (tmp_path / "b").exists()
    cb = ReluDoctorCallback(run_dir=tmp_path / "b", log_every_n_steps=1)
    model.fit(x, y, epochs=1, verbose=0, batch_size=8, callbacks=[cb])
    assert relu_doctor.load_run(tmp_path / "b").last_step == 2 and _torch_hooks(model) == 0
    # ... and where a part fails later (a remedy's binding), what was hooked is taken off
    # and the directory closed, its lock released
    from relu_doctor.integrations import keras as integration

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bind failed")

    monkeypatch.setattr(integration.KerasActivationSwap, "bind", fails)
    with pytest.raises(RuntimeError, match="bind failed"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[
            ReluDoctorCallback(run_dir=tmp_path / "c", leaky_relu_swap=True)])
    assert _torch_hooks(model) == 0 and not (tmp_path / "c" / ".lock").exists()
    # a second fit of the same callback that fails there: a third goes on from the first
    cb = ReluDoctorCallback(run_dir=tmp_path / "d", log_every_n_steps=1, leaky_relu_swap=True)
    monkeypatch.undo()
    model.fit(x, y, epochs=1, verbose=0, batch_size=8, callbacks=[cb])
    monkeypatch.setattr(integration.KerasActivationSwap, "bind", fails)
    with pytest.raises(RuntimeError, match="bind failed"):
        model.fit(x, y, epochs=1, verbose=0, batch_size=8, callbacks=[cb])
    monkeypatch.undo()
    model.fit(x, y, epochs=1, verbose=0, batch_size=8, callbacks=[cb])
    assert relu_doctor.load_run(tmp_path / "d").last_step == 4
    monkeypatch.undo()
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ReluDoctorError, match="KERAS_BACKEND=torch"):
        ReluDoctorCallback()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"leaky_relu_swap": {"kind": "prelu"}},  # a torch swapper's argument, not Keras's
         r"^leaky_relu_swap: 'kind' is not an argument of KerasActivationSwap; it takes "
         r"\['slope', 'threshold', 'patience'\]"),
        ({"lr_rescue": {"bogus": 1}}, r"^lr_rescue: 'bogus' is not an argument of KerasLRRescue"),
        ({"lr_rescue": {"optimizer": None}},
         r"^lr_rescue: leave 'optimizer' out of the dict: \['optimizer'\] come from the training"),
        ({"autoclip": {"pct": 10}}, r"^autoclip: 'pct' is not an argument of AutoClip"),
        # values too, by the remedy's own checks
        ({"leaky_relu_swap": {"patience": 0}}, r"^leaky_relu_swap: patience: "),
        ({"lr_rescue": {"factor": 1.5}}, r"^lr_rescue: factor: "),
        ({"autoclip": {"history": -3}}, r"^autoclip: history: "),
    ],
)
def test_remedy_dicts_are_checked_when_the_callback_is_made(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ReluDoctorError, match=match):
        ReluDoctorCallback(**kwargs)


def test_findings_are_warnings(tmp_path: Path) -> None:
    model = _mlp(lr=0.5)
    x, y = _data(64)
    with pytest.warns(ReluDoctorWarning, match="relu_doctor: dead at"):
        model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                  callbacks=[ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "r")])


def test_the_package_imports_without_keras_or_transformers() -> None:
    code = (
        "import sys; import relu_doctor, relu_doctor.integrations, relu_doctor.remedies; "
        "assert 'keras' not in sys.modules and 'transformers' not in sys.modules, "
        "[m for m in sys.modules if m.startswith(('keras', 'transformers'))]; "
        "sys.modules['keras'] = None\n"
        "try:\n import relu_doctor.integrations.keras\nexcept Exception as e:\n print(type(e).__name__, e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ReluDoctorError" in out.stdout and "'keras'" in out.stdout


@pytest.mark.parametrize("configured", ["env", "keras.json"])
def test_a_backend_that_is_not_installed_is_named_not_keras(tmp_path: Path, configured: str) -> None:
    """Keras installed, its backend (tensorflow, from KERAS_BACKEND or keras.json) not: the
    message says to set KERAS_BACKEND=torch, not to install keras."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    if configured == "env":
        env["KERAS_BACKEND"] = "tensorflow"
    else:
        (tmp_path / "keras.json").write_text('{"backend": "tensorflow"}')
        env["KERAS_HOME"] = str(tmp_path)
    code = ("import sys; sys.modules['tensorflow'] = None\n"  # not installed, even where it is
            "try:\n import relu_doctor.integrations.keras\nexcept Exception as e:\n"
            " print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert out.startswith("ReluDoctorError relu_doctor.integrations.keras: keras is installed, "
                          "but importing it failed on its backend"), out
    assert "set the environment variable KERAS_BACKEND=torch" in out and "pip install" not in out
    assert ("KERAS_BACKEND=tensorflow" if configured == "env" else "keras.json") in out


def test_the_training_curve_is_what_keras_reports_and_the_learning_rate(tmp_path: Path) -> None:
    """The run's metrics table (the report's training curve): each window's mean of what
    Keras hands the batch callbacks (loss, accuracy), and the learning rate the logging
    step used (a schedule's value)."""
    model = _mlp()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=3, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    seen: list[dict[str, float]] = []

    class Seen(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            seen.append(dict(logs))

    x, y = _data(96)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0,
              callbacks=[Seen(), ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "r")])
    run = relu_doctor.load_run(tmp_path / "r")
    assert run.meta["model"] == f"{model.name} ({type(model).__name__})"  # the user's name
    got = run.metrics.pivot(index="step", columns="name", values="value")
    assert list(got.index) == [4, 8, 12] and set(got.columns) == {"loss", "accuracy", "lr"}
    for step in got.index:
        window = seen[step - 4:step]
        for name in ("loss", "accuracy"):
            assert got.loc[step, name] == pytest.approx(np.mean([r[name] for r in window]),
                                                        rel=1e-6)
        # the rate the logging step used: the schedule at its iteration, step - 1
        assert got.loc[step, "lr"] == pytest.approx(0.01 * 0.5 ** ((step - 1) / 3), rel=1e-6)


@pytest.mark.parametrize("schedule", [False, True])
def test_reading_the_learning_rate_makes_no_deprecation_warning(tmp_path: Path, schedule: bool) -> None:
    # numpy 2 warns (DeprecationWarning) when asked for a Keras variable's array; a plain fit
    # makes none, so a watched one must not either (it raises under -W error, as in pytest).
    keras.utils.set_random_seed(0)
    lr = keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5) if schedule else 0.05
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="categorical_crossentropy")
    x, y = _data(32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0,
                  callbacks=[ReluDoctorCallback(log_every_n_steps=1, run_dir=tmp_path / "run")])
    got = relu_doctor.load_run(tmp_path / "run").metrics.query("name == 'lr'")["value"].tolist()
    want = [0.1 * 0.5 ** (i / 2) for i in range(2)] if schedule else [0.05, 0.05]
    assert got == pytest.approx(want, rel=1e-6)


def test_callback_numbers_equal_the_standalone_watch(tmp_path: Path) -> None:
    """Same seed and data: the callback's sites (named after layers) hold the numbers of the
    standalone ``watch`` (which names them after the calling Keras class), site by site."""
    x, y = _data()
    model = _mlp()
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "cb")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb],
              validation_data=_data(24, seed=1))

    model = _mlp()
    with relu_doctor.watch(model, log_every_n_steps=2) as doc:

        class Step(keras.callbacks.Callback):  # type: ignore[misc]
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                doc.step()

        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[Step()],
                  validation_data=_data(24, seed=1))
    assert cb.doctor is not None
    cols = ["step", "units", "elements", "dead", "activation_rate", "mean_abs", "grad_rms",
            "dormant"]
    a = cb.doctor.history().sort_values(["step", "order"])[cols].reset_index(drop=True)
    b = doc.history().sort_values(["step", "order"])[cols].reset_index(drop=True)
    assert len(a) == len(b) == 6
    for c in cols:
        assert a[c].to_numpy() == pytest.approx(b[c].to_numpy(), rel=1e-6), c


def test_a_second_fit_continues_the_counts(tmp_path: Path) -> None:
    model = _mlp()
    x, y = _data(32)
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.doctor is not None and cb.doctor.global_step == 4
    run = relu_doctor.load_run(tmp_path / "run")
    assert sorted(run.history["step"].unique()) == [2, 4]


def test_a_fit_after_one_that_raised_logs_its_last_window_and_goes_on(tmp_path: Path) -> None:
    # Keras calls no on_train_end when fit raises (an error, Ctrl-C in a notebook): the next
    # fit with the callback ends that one first (its partial window logged, its run directory
    # closed: it was refused as "being written by another writer", this process) and goes on.
    model = _mlp()
    x, y = _data(48)
    layers = _layers(model)
    ref = Outputs(layers, {k: -1 for k in layers}, keep=lambda: torch.is_grad_enabled())

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 2:
                raise RuntimeError("interrupted")

    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb, Interrupt()])
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    ref.remove()
    assert cb.doctor is not None and cb.doctor.global_step == 6
    run = relu_doctor.load_run(tmp_path / "run")
    assert sorted(run.history["step"].unique()) == [2, 3, 4, 6]  # 3: the first fit's last
    assert len(ref.passes) == 6
    h = run.history.set_index(["step", "site"])
    for step, passes in [(2, ref.passes[0:2]), (3, ref.passes[2:3]), (4, ref.passes[3:4]),
                         (6, ref.passes[4:6])]:
        for name in layers:
            want = windows(passes, len(passes))[0][name]
            assert h.loc[(step, name), "dead"] == want["dead"], (step, name)
            assert h.loc[(step, name), "activation_rate"] == pytest.approx(want["activation_rate"])


class _RaisesOnce(keras.layers.Layer):
    """Raises at its ``armed``-th call in training (a bug of the user's, a Ctrl-C)."""

    armed = 0

    def call(self, x: Any) -> Any:
        if _RaisesOnce.armed:
            _RaisesOnce.armed -= 1
            if _RaisesOnce.armed == 0:
                raise ValueError("a bug of the user's")
        return x


def test_a_fit_without_the_callback_after_one_that_raised_is_not_counted(tmp_path: Path) -> None:
    """A Keras trial: a fit that raised in its forward left the hooks on (Keras calls no
    callback then), and a fit without the callback ran its training=True passes into the
    open window: the next log read 30 passes as 2 steps. Passes count inside this
    callback's train batches only, and a pass that raised ends its batch: the run reads as
    one with no fit between (the reference)."""
    def run(between: bool, path: Path) -> pd.DataFrame:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, activation="relu",
                                  name="hidden"), _RaisesOnce(), keras.layers.Dense(3)])
        model.compile(optimizer="sgd", loss="mse")
        x, y = _data(48)
        cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=path)
        _RaisesOnce.armed = 3
        with pytest.raises(ValueError, match="a bug of the user's"):
            model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
        if between:
            model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
        h = relu_doctor.load_run(path).history
        return h[h["step"] <= 2][["step", "site", "window_steps", "elements"]]

    first = run(False, tmp_path / "a")
    got = run(True, tmp_path / "b")
    assert len(first) == 2  # (the steps before the raise, and the raised one's part)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), first.reset_index(drop=True))


class _NoTrainingArg(keras.Model):
    """A subclassed model whose call() takes no training argument (as many guides write it):
    Keras' train step then calls it without training=True."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.out = keras.layers.Dense(3, activation="softmax", name="out")

    def call(self, inputs: Any) -> Any:
        return self.out(self.hidden(inputs))


class _OwnTrainStep(keras.Sequential):
    """A custom train_step that calls self(x) without training=True (torch backend)."""

    def train_step(self, data: Any) -> Any:
        x, y = data
        y_pred = self(x)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        self.zero_grad()
        loss.backward()
        grads = [v.value.grad for v in self.trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(grads, self.trainable_weights)
        return self.compute_metrics(x, y, y_pred)


@pytest.mark.parametrize("kind", ["no training argument", "own train_step"])
def test_a_train_step_that_does_not_say_training_is_still_counted(tmp_path: Path, kind: str) -> None:
    # Where the train step's call says nothing of training, a pass with gradients inside a
    # train batch of fit is a training pass (these were watched not at all: the callback
    # stepped aside at the first step, "ran no ReLU-family activation").
    keras.utils.set_random_seed(0)
    if kind == "no training argument":
        model: Any = _NoTrainingArg()
        model.build((None, 12))
    else:
        model = _OwnTrainStep([keras.Input((12,)), keras.layers.Dense(8, activation="relu", name="hidden"),
                               keras.layers.Dense(3, activation="softmax", name="out")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x, y = _data(64)
    hidden = model.get_layer("hidden")
    ref = Outputs({"hidden": hidden}, {"hidden": -1}, keep=lambda: torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=2, overhead_budget=None, run_dir=tmp_path / "run")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    ref.remove()
    h = relu_doctor.load_run(tmp_path / "run").history.set_index(["step", "site"])
    want = windows(ref.passes, 2)
    assert len(want) == 2
    for i, w in enumerate(want):
        row = h.loc[(2 * (i + 1), "hidden")]
        assert (row["elements"], row["dead"]) == (w["hidden"]["elements"], w["hidden"]["dead"])
        assert row["activation_rate"] == pytest.approx(w["hidden"]["activation_rate"])


class _SideCalls(keras.callbacks.Callback):
    """What users' callbacks run during fit beside ours: ``predict`` (which leaves the torch
    module in eval mode until the next epoch, its train steps included), a feature model
    sharing the watched layers (the Keras way to read activations), its ``predict``."""

    def __init__(self, what: str, x: Any) -> None:
        super().__init__()
        self.what, self.x = what, x

    def on_train_begin(self, logs: Any = None) -> None:
        self.feat = keras.Model(self.model.inputs, self.model.get_layer("hidden").output)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.what == "predict":
            self.model.predict(self.x, verbose=0)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.what == "feature model":
            self.feat(self.x)
            with torch.no_grad():
                self.feat(self.x, training=False)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.what == "feature predict":
            self.feat.predict(self.x, verbose=0)


@pytest.mark.parametrize("what", ["predict", "feature model", "feature predict"])
def test_passes_outside_fits_own_steps_and_validation_are_not_counted(
    tmp_path: Path, what: str
) -> None:
    # Only fit's train steps make the training stream and only its validation runs the
    # validation stream: a run with other passes beside them reads as one without.
    x, y = _data(64)
    xv, yv = _data(24, seed=1)
    tables = []
    for side in (None, what):
        model = _mlp()
        cb = ReluDoctorCallback(log_every_n_steps=3, overhead_budget=None, monitor_validation=True,
                                run_dir=tmp_path / str(side))
        extra = [] if side is None else [_SideCalls(side, x[:8])]
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_data=(xv, yv),
                  shuffle=False, callbacks=[cb, *extra])  # (predict draws from Keras' RNG)
        tables.append([relu_doctor.load_run(tmp_path / str(side) / sub).history.sort_values(
            ["step", "site"]).reset_index(drop=True) for sub in ("", "validation")])
    for plain, beside in zip(tables[0], tables[1], strict=True):
        assert len(plain) > 0 and list(plain["site"]) == list(beside["site"])
        for c in ("step", "elements", "steps_collected", "dead", "activation_rate", "mean_abs"):
            assert plain[c].to_numpy() == pytest.approx(beside[c].to_numpy(), rel=1e-12), c


def test_a_failing_record_warns_once_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    x, y = _data(32)
    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / "run")
    from relu_doctor.probes import Probe

    def broken(self: Any, output: Any, **kw: Any) -> None:
        raise RuntimeError("forced")

    monkeypatch.setattr(Probe, "record", broken)
    with pytest.warns(ReluDoctorWarning) as caught:
        hist = model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    assert len(hist.history["loss"]) == 1  # training went on
    texts = [str(w.message) for w in caught]
    assert sum("stopped watching Keras layer 'hidden'" in t for t in texts) == 1
    assert any("steps aside" in t for t in texts)  # nothing left to watch: it stepped aside


@pytest.mark.slow
def test_jit_compile_gives_the_eager_forward_statistics(tmp_path: Path) -> None:
    """``jit_compile=True`` (torch.compile of the train step): the hooks are traced into the
    graph; forward statistics equal eager ones, gradient statistics are missing (NaN), as
    for torch.compile in plain PyTorch; validation, which a compiled step runs without a
    hook, is said not to be recorded."""
    out = {}
    for jit in (False, True):
        model = _mlp()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy",
                      jit_compile=jit)
        x, y = _data()
        cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / str(jit),
                                monitor_validation=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb],
                      validation_data=_data(16, seed=1))
        # a compiled validation step records nothing: said once (it was silent), not eager
        said = [w for w in caught if "the validation stream records nothing" in str(w.message)]
        assert len(said) == jit
        assert cb.doctor is not None
        out[jit] = cb.doctor.history().sort_values(["step", "order"]).reset_index(drop=True)
    for c in ("elements", "dead", "activation_rate", "mean_abs"):
        assert out[True][c].to_numpy() == pytest.approx(out[False][c].to_numpy(), rel=1e-6), c
    assert out[True]["grad_rms"].isna().all() and out[False]["grad_rms"].notna().all()


@pytest.mark.slow
def test_jit_compile_with_autoclip_that_clips_nothing_leaves_the_run_untouched(
    tmp_path: Path,
) -> None:
    """AutoClip ran inside the compiled train step, its Python counters traced into it: torch
    recompiled the step at every call until its limit (8), then ran it uncompiled, and a
    healthy run with treatment=True (nothing done) ended with other weights than an
    untreated one. The clip now runs outside the graph: a clipper that clips nothing leaves
    the weights bit-identical, and AutoClip reads one norm per step."""
    import torch._dynamo

    weights = {}
    for name, kw in (("plain", {}), ("autoclip", {"autoclip": {"percentile": 100}})):
        torch._dynamo.reset()
        model = _mlp()
        model.compile(optimizer=keras.optimizers.Adam(0.001), loss="categorical_crossentropy",
                      jit_compile=True)
        x, y = _data(96)
        cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / name,
                                overhead_budget=None, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
        weights[name] = [np.array(w) for w in model.get_weights()]
        if name == "autoclip":
            assert cb.remedies["autoclip"].norm_history.numel() == 12
    # (at the 100th percentile nothing is clipped: the threshold is the largest norm yet)
    assert all(np.array_equal(a, b) for a, b in zip(weights["plain"], weights["autoclip"],
                                                    strict=True))


def test_mixed_bfloat16_counts_equal_float32(tmp_path: Path) -> None:
    out = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = _mlp()
            x, y = _data()
            cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=tmp_path / policy)
            model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
        finally:
            keras.mixed_precision.set_global_policy("float32")
        assert cb.doctor is not None
        out[policy] = cb.doctor.history().sort_values(["step", "order"]).reset_index(drop=True)
    a, b = out["float32"], out["mixed_bfloat16"]
    assert (a["elements"] == b["elements"]).all()
    # bf16 rounds the activations: rates agree to the rounding of the few values near zero.
    assert b["activation_rate"].to_numpy() == pytest.approx(a["activation_rate"].to_numpy(), abs=0.02)
    assert b["grad_rms"].to_numpy() == pytest.approx(a["grad_rms"].to_numpy(), rel=0.05)


def test_default_run_directories_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = _mlp()
    x, y = _data(32)
    for _ in range(2):  # two callbacks, one model: two runs side by side
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[ReluDoctorCallback()])
    name = model.name
    assert (tmp_path / "relu_doctor_logs" / name / "meta.json").is_file()
    assert (tmp_path / "relu_doctor_logs" / f"{name}_1" / "meta.json").is_file()


def test_the_layer_hooks_are_parked_on_steps_that_collect_nothing(tmp_path: Path) -> None:
    """As the module hooks of ``watch``: on a step that collects nothing (every 3rd step
    collects here) no hook of relu_doctor's is in a watched Keras layer's hook dict, so the
    layer takes torch's hook-free path; on a collecting step and in the validation passes
    they are there. The numbers are those of exactly the collected steps, and the
    validation stream still holds every validation pass."""
    model = _mlp()
    x, y = _data(96)
    layers = _layers(model)
    seen: list[tuple[bool, int]] = []  # (a training pass, hooks of ours on "hidden")

    def ours(layer: Any, args: Any, out: Any) -> None:
        n = sum("integrations.keras" in getattr(h, "__module__", "") for h in layer._forward_hooks.values())
        seen.append((torch.is_grad_enabled(), n))

    spy = layers["hidden"].register_forward_hook(ours, prepend=True)
    ref = Outputs(layers, {k: -1 for k in layers}, keep=lambda: torch.is_grad_enabled())
    val = Outputs(layers, {k: -1 for k in layers}, keep=lambda: not torch.is_grad_enabled())
    cb = ReluDoctorCallback(log_every_n_steps=3, every_n_steps=3, overhead_budget=None,
                            run_dir=tmp_path / "run", monitor_validation=True)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb], validation_data=_data(24, seed=1))
    spy.remove()
    ref.remove()
    val.remove()
    train = [n for grad, n in seen if grad]
    assert len(train) == 12
    # step i collects when i % 3 == 0: our training hook and the validation stream's
    assert train == [2 if i % 3 == 0 else 1 for i in range(12)]
    first = next(i for i, (grad, _) in enumerate(seen) if grad)  # (Keras builds before fit)
    assert [n for grad, n in seen[first:] if not grad] == [2] * 4  # 2 validation batches x 2
    h = cb.doctor.history()
    collected = [p for i, p in enumerate(ref.passes) if i % 3 == 0]
    for site in layers:
        got = h[h["site"] == site]["elements"].sum()
        assert got == sum(p[site].size for p in collected)
    ev = relu_doctor.load_run(tmp_path / "run" / "validation").history
    assert int(ev[ev["site"] == "hidden"]["elements"].sum()) == sum(p["hidden"].size for p in val.passes)
    assert not any("integrations.keras" in getattr(h, "__module__", "")
                   for layer in layers.values() for h in layer._forward_hooks.values())


@pytest.mark.parametrize("cell", ["relu", "tanh"])
def test_a_model_whose_only_relu_is_in_a_recurrent_cell_trains_with_one_warning(
        tmp_path: Path, cell: str) -> None:
    """A model whose only ReLU runs inside an LSTM's cell (or that has none: a tanh LSTM, one
    callback list over several models) made fit fail before its first step, saying no layer
    runs a ReLU (a Keras trial). It now says so and steps aside: the fit trains as it would
    unwatched, its weights bit for bit; a ReLU cell beside watched layers is said too."""
    def model() -> Any:
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 5))
        x = keras.layers.LSTM(8, activation=cell, name="lstm")(inp)
        m = keras.Model(inp, keras.layers.Dense(1, name="out")(x))
        m.compile(optimizer="adam", loss="mse")
        return m

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6, 5)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    plain = model()
    plain.fit(x, y, epochs=2, batch_size=8, verbose=0)
    watched = model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched.fit(x, y, epochs=2, batch_size=8, verbose=0,
                    callbacks=[ReluDoctorCallback(run_dir=tmp_path / "run")])
    ours = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert any("no layer of" in m and "steps aside for this fit; training goes on" in m for m in ours)
    assert sum("'lstm' runs a ReLU-family activation inside its cell" in m for m in ours) == (cell == "relu")
    for a, b in zip(plain.get_weights(), watched.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "run").exists()  # nothing written for a fit it stepped aside from
    # beside a watched layer: the cell is said, the layer watched
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 5))
    h = keras.layers.SimpleRNN(8, activation="relu", name="rnn")(inp)
    both = keras.Model(inp, keras.layers.Dense(1, name="out")(keras.layers.Dense(4, activation="relu", name="head")(h)))
    both.compile(optimizer="adam", loss="mse")
    cb = ReluDoctorCallback(run_dir=tmp_path / "both", overhead_budget=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert sum("'rnn' runs a ReLU-family activation inside its cell" in m for m in said) == 1
    assert list(cb.sites) == ["head"]
    # stacked cells (keras.layers.RNN over several cells): said too
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 5))
    cells = [keras.layers.SimpleRNNCell(8, activation="relu"), keras.layers.SimpleRNNCell(8)]
    h = keras.layers.RNN(cells, name="stacked")(inp)
    stacked = keras.Model(inp, keras.layers.Dense(1, name="out")(keras.layers.Dense(4, activation="relu", name="head")(h)))
    stacked.compile(optimizer="adam", loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stacked.fit(x, y, epochs=1, batch_size=8, verbose=0,
                    callbacks=[ReluDoctorCallback(run_dir=tmp_path / "stacked")])
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert sum("'stacked' runs a ReLU-family activation inside its cell" in m for m in said) == 1


def test_a_relu_layer_on_one_value_per_sample_is_said_and_not_watched(tmp_path: Path) -> None:
    """A ReLU layer on a (N,) tensor counted a batch's samples as its units (16 "units"), and
    a last batch of 8 was then said to be another width, advising unit_dims=, which the Keras
    callback does not take (a Keras trial). It is said once and not watched; the others are."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(inp)
    v = keras.layers.ReLU(name="scalar_relu")(keras.layers.Reshape(())(keras.layers.Dense(1)(h)))
    model = keras.Model(inp, v)
    model.compile(optimizer="adam", loss="mse")
    x, _ = _data(n=120)
    cb = ReluDoctorCallback(run_dir=tmp_path / "run", overhead_budget=None, log_every_n_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, np.zeros(120, "float32"), epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)]
    assert sum("'scalar_relu' runs on one value per sample" in m for m in said) == 1, said
    assert not any("unit_dims" in m for m in said), said
    assert [s.name for s in cb.doctor.sites] == ["hidden"]


def test_a_fit_the_callback_steps_aside_from_gets_no_numbers_of_an_earlier_fit(tmp_path: Path) -> None:
    """After a fit of a ReLU model stopped mid-epoch (its last log not yet put in an epoch's
    logs), a fit of a tanh model with the same callback got that model's health keys in its
    History (review): EarlyStopping on them would act on another model's numbers."""
    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 2:
                raise RuntimeError("stopped")

    cb = ReluDoctorCallback(run_dir=tmp_path / "run", log_every_n_steps=2, overhead_budget=None)
    x, y = _data()
    with pytest.raises(RuntimeError, match="stopped"):
        _mlp().fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb, Stop()])
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    tanh = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8, activation="tanh")(inp)))
    tanh.compile(optimizer="adam", loss="categorical_crossentropy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReluDoctorWarning)
        hist = tanh.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    assert not [k for k in hist.history if k.startswith("relu_doctor")], hist.history


def test_a_report_that_cannot_be_written_at_the_fits_end_is_said_not_raised(tmp_path: Path) -> None:
    """The callback writes the report after training: a report.html there that is not ours
    (refused, never overwritten) raised out of fit after training had finished."""
    run_dir = tmp_path / "run"

    class Notes(keras.callbacks.Callback):  # a file of someone's, put there during the fit
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            (run_dir / "report.html").write_text("someone's notes")

    cb = ReluDoctorCallback(log_every_n_steps=2, run_dir=run_dir, report=True)
    x, y = _data(48)
    with pytest.warns(ReluDoctorWarning, match="could not be written .* its records are kept") as said:
        _mlp().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb, Notes()])
    assert (run_dir / "report.html").read_text() == "someone's notes"
    assert relu_doctor.load_run(run_dir).last_step == 3
    # the command it gives works (it named the same refused path: a review)
    import shlex

    from relu_doctor.cli import main

    (command,) = [c for w in said if "could not be written" in str(w.message)
                  for c in re.findall(r"`(relu-doctor report [^`]+)`", str(w.message))]
    argv = [a.replace("FILE.html", str(tmp_path / "mine.html")) for a in shlex.split(command)]
    assert main(argv[1:]) == 0 and (tmp_path / "mine.html").stat().st_size > 0


def test_beside_clipnorm_the_plans_clip_step_stays_idle_and_says_so_once(tmp_path: Path) -> None:
    """treatment=True beside an optimizer's clipnorm left the plan's clip step idle without a
    word (it went straight to the rate cut: a schedulers trial), where Lightning says so: one
    warning, once over several fits, and no clipping of the plan's."""
    x, y = _data(64)
    model = _mlp(lr=0.05)
    model.compile(optimizer=keras.optimizers.SGD(0.05, clipnorm=1.0),
                  loss="categorical_crossentropy")
    cb = ReluDoctorCallback(log_every_n_steps=4, run_dir=tmp_path / "run", treatment=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    said = [str(w.message) for w in caught if issubclass(w.category, ReluDoctorWarning)
            and "clip step stays idle" in str(w.message)]
    assert len(said) == 1 and "clipnorm=1.0" in said[0], said
    assert "_clip_gradients" not in vars(model.optimizer)  # (the plan's clipper would patch it)
    assert not any(e["remedy"] == "adaptive_grad_clip"
                   for e in relu_doctor.load_run(tmp_path / "run").interventions())


class _BatchLosses(keras.callbacks.Callback):  # type: ignore[misc]
    """Each training batch's loss, computed before its update (no dropout: the training
    pass computes the same), from the batch that fit takes unshuffled."""

    def __init__(self, x: Any, y: Any, size: int) -> None:
        super().__init__()
        self.x, self.y, self.size, self.losses = x, y, size, []

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        part = slice(batch * self.size, (batch + 1) * self.size)
        with torch.no_grad():
            p = self.model(self.x[part], training=False)
            loss = keras.losses.categorical_crossentropy(self.y[part], p)
        self.losses.append(float(torch.as_tensor(loss).mean()))


class _EvaluateMidEpoch(keras.callbacks.Callback):  # type: ignore[misc]
    """A user's callback that evaluates the model after the third batch of each epoch:
    Keras resets its loss tracker and fills it with the evaluation's losses."""

    def __init__(self, x: Any, y: Any) -> None:
        super().__init__()
        self.x, self.y = x, y

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if batch == 2:
            self.model.evaluate(self.x[:24], self.y[:24], verbose=0)


@pytest.mark.parametrize("evaluate", [False, True])
def test_each_record_holds_the_windows_mean_batch_loss_not_keras_running_mean(
    tmp_path: Path, evaluate: bool
) -> None:
    """Keras reports the loss's running mean since the epoch began: a window mean of it
    diluted a late jolt (a 10x jump at batch 28 of 40 read 1.86x in a review), so the
    remedies' loss guard missed it; differencing the running means made losses up where
    an ``evaluate`` mid-epoch reset Keras' tracker (a review). ``window_loss`` is the mean
    of the window's own batches' losses, an epoch's smaller last batch and windows across
    an epoch's end included, checked against each batch's loss computed here; the training
    curve keeps what Keras reports."""
    model = _mlp(lr=0.05)
    x, y = _data(72)
    ref = _BatchLosses(x, y, 16)  # 5 batches an epoch, the last of 8
    cb = ReluDoctorCallback(log_every_n_steps=3, overhead_budget=None, run_dir=tmp_path / "run")
    extra = [_EvaluateMidEpoch(x, y)] if evaluate else []
    model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0,
              callbacks=[ref, cb, *extra])
    assert cb.doctor is not None
    records = cb.doctor.records
    assert [r.step for r in records] == [3, 6, 9, 12, 15]
    for r in records:
        want = np.mean(ref.losses[r.step - 3:r.step])
        assert r.window_loss == pytest.approx(want, rel=1e-5)
    assert records[0].window_loss != pytest.approx(records[0].metrics["loss"], rel=1e-4)
