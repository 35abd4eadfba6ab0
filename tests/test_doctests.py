"""The examples in the package's docstrings run as written (``doctest``), without a
warning of ours, so that what the API reference shows a user is what the code does."""

from __future__ import annotations

import doctest
import importlib
import warnings
from pathlib import Path

import pytest

import relu_doctor
from relu_doctor.errors import ReluDoctorWarning

PACKAGE = Path(relu_doctor.__file__).parent
#: the modules whose source holds an example, found without importing any (an import at
#: collection would change what other tests see: a submodule bound on its package)
MODULES = sorted(
    ".".join(("relu_doctor", *f.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
        ".__init__")
    for f in PACKAGE.rglob("*.py") if ">>> " in f.read_text(encoding="utf-8")
)


def _examples(name: str) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(importlib.import_module(name)) if t.examples]


def test_the_modules_with_examples_are_found() -> None:
    assert {"relu_doctor", "relu_doctor.doctor", "relu_doctor.scan"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_in_its_docstrings_run(name: str) -> None:
    assert _examples(name), f"{name}: no example found by doctest"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)  # an example that warns is wrong
        for test in _examples(name):
            runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)
