"""The examples in the package's docstrings run as written (``doctest``), without a
warning of ours, so that what the API reference shows a user is what the code does."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings

import pytest

import relu_doctor
from relu_doctor.errors import ReluDoctorWarning

MODULES = sorted(m.name for m in pkgutil.walk_packages(relu_doctor.__path__, "relu_doctor."))


def _examples(name: str) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(importlib.import_module(name)) if t.examples]


@pytest.mark.parametrize("name", [n for n in ["relu_doctor", *MODULES] if _examples(n)])
def test_the_examples_in_its_docstrings_run(name: str) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)  # an example that warns is wrong
        for test in _examples(name):
            runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)
