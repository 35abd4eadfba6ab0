"""The Keras ReLU tutorial's two models, watched by relu_doctor in ``model.fit``.

1. The tutorial's MLP, ``Sequential([Dense(64, activation="relu"), Dense(10,
   activation="softmax")])`` with Adam and categorical cross-entropy, on synthetic
   MNIST-shaped data (784 pixel intensities in [0, 1], 10 classes: noisy copies of 10 random
   stroke patterns; nothing is downloaded). It trains at a learning rate of 0.015, about 15
   times Adam's default, which kills many hidden units in the first steps. The same seed trains
   twice: **untreated**, and **treated** by the remedies the tutorial names, applied by the
   callback as the units die: LeakyReLU in place of the dying layer's ReLU and a lower
   learning rate. It prints the dead units of the last window and the held-out accuracy per
   seed, then their mean and spread over the seeds.

2. The tutorial's image classifier (``Conv2D(32, (3, 3), activation="relu")``,
   ``MaxPooling2D``, ``Conv2D(64, ...)``, ``Flatten``, ``Dense(128, activation="relu")``,
   ``Dense(10, activation="softmax")`` on 64x64x3 images), watched with its channels as units
   (channels_last: the filters are the last dim).

Run it::

    KERAS_BACKEND=torch python examples/keras_dense_relu.py --out runs/keras
    KERAS_BACKEND=torch python examples/keras_dense_relu.py --quick   # one seed, smaller

Each run directory holds the report (``report.html``) and TensorBoard logs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np

from relu_doctor.integrations.keras import ReluDoctorCallback

#: What the treated run adds: the tutorial's cures, applied when a layer starts dying.
TREATMENT: dict[str, Any] = {
    "leaky_relu_swap": {"threshold": 0.2, "patience": 1, "slope": 0.2},
    "lr_rescue": {"factor": 0.5, "cooldown": 1, "dead_jump": 0.1},
}


def mnist_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 784-pixel images in [0, 1] of 10 classes (a fixed random stroke pattern per
    class, scaled, plus strong noise) and their one-hot labels."""
    rng = np.random.default_rng(seed)
    patterns = (np.random.default_rng(1234).random((10, 784)) < 0.15).astype("float32")
    y = rng.integers(0, 10, n)
    x = patterns[y] * rng.uniform(0.5, 1.0, (n, 1)) + rng.normal(0.0, 1.0, (n, 784))
    return np.clip(x, 0.0, 1.0).astype("float32"), keras.utils.to_categorical(y, 10)


def train_mlp(out: Path, *, seed: int, treated: bool, lr: float, epochs: int, n: int,
              report: bool) -> dict[str, Any]:
    """The tutorial's MLP, one seed, untreated or treated; returns what relu_doctor found."""
    keras.backend.clear_session()  # layer names start again at dense, dense_1
    keras.utils.set_random_seed(seed)
    x, y = mnist_like(n, seed)
    x_test, y_test = mnist_like(1024, seed + 100)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    if out.exists():
        shutil.rmtree(out)
    doctor = ReluDoctorCallback(log_every_n_steps=2, run_dir=out, report=report, warn=None,
                                **(TREATMENT if treated else {}))
    model.fit(x, y, epochs=epochs, batch_size=128, verbose=0, callbacks=[doctor])
    accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
    assert doctor.doctor is not None
    history = doctor.doctor.history()
    last = history[history["step"] == history["step"].max()].iloc[0]
    events = [e for e in doctor.doctor.to_run().events if e.get("type") == "intervention"]
    return {
        "site": str(last["site"]),
        "units": int(last["units"]),
        "dead": int(last["dead"]),
        "accuracy": accuracy,
        "interventions": [f"step {e['step']}: {e['what']}" for e in events],
    }


def image_classifier(out: Path, *, images: int, epochs: int) -> list[dict[str, Any]]:
    """The tutorial's convnet on 64x64x3 synthetic images; returns its sites."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, images)
    colours = rng.random((10, 1, 1, 3)).astype("float32")
    x = (colours[y] + rng.normal(0.0, 0.3, (images, 64, 64, 3))).clip(0, 1).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((64, 64, 3)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Conv2D(64, (3, 3), activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    if out.exists():
        shutil.rmtree(out)
    doctor = ReluDoctorCallback(log_every_n_steps=4, run_dir=out, warn=None)
    model.fit(x, keras.utils.to_categorical(y, 10), epochs=epochs, batch_size=16, verbose=0,
              callbacks=[doctor])
    assert doctor.doctor is not None
    rows = doctor.doctor.history()
    last = rows[rows["step"] == rows["step"].max()]
    return [
        {"site": s.name, "units": s.units, "unit_dim": s.unit_dim, "rule": s.unit_rule,
         "dead": int(last[last["site"] == s.name]["dead"].iloc[0])}
        for s in doctor.doctor.sites
    ]


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} +- {sd:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("relu_doctor_keras"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.015)
    parser.add_argument("--quick", action="store_true", help="one seed, smaller runs (tests)")
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    epochs, n, images = (2, 2048, 32) if args.quick else (3, 4096, 256)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    results: dict[str, Any] = {"mlp": []}
    print(f"1. Sequential([Dense(64, relu), Dense(10, softmax)]), Adam lr={args.lr:g}")
    print(f"{'seed':>4}  {'dead untreated':>14}  {'dead treated':>12}  "
          f"{'acc untreated':>13}  {'acc treated':>11}")
    for seed in range(seeds):
        pair = {
            kind: train_mlp(args.out / f"seed{seed}" / kind, seed=seed, treated=kind == "treated",
                            lr=args.lr, epochs=epochs, n=n, report=seed == 0)
            for kind in ("untreated", "treated")
        }
        results["mlp"].append(pair)
        u, t = pair["untreated"], pair["treated"]
        print(f"{seed:>4}  {u['dead']:>11}/{u['units']}  {t['dead']:>9}/{t['units']}  "
              f"{u['accuracy']:>13.3f}  {t['accuracy']:>11.3f}")
    for kind in ("untreated", "treated"):
        runs = [p[kind] for p in results["mlp"]]
        print(f"{kind:>9}: dead units {_spread([r['dead'] for r in runs])}, "
              f"accuracy {_spread([r['accuracy'] for r in runs])} over {seeds} seed(s)")
    print("Interventions in the treated run of seed 0:")
    for line in results["mlp"][0]["treated"]["interventions"]:
        print(f"  {line}")
    print(f"Reports: {args.out / 'seed0' / 'untreated' / 'report.html'}, "
          f"{args.out / 'seed0' / 'treated' / 'report.html'}")

    print("\n2. The image classifier on 64x64x3 inputs, channels as units:")
    results["convnet"] = image_classifier(args.out / "convnet", images=images, epochs=1)
    for s in results["convnet"]:
        print(f"  {s['site']:<10} {s['units']:>4} units on dim {s['unit_dim']} ({s['rule']}), "
              f"{s['dead']} dead in the last window")
    return results


if __name__ == "__main__":
    main()
