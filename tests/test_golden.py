"""Golden test: the numbers two fixed-seed runs write are those the fixture holds.

``tests/golden/golden.json`` was first made by ``tests/golden/make_golden.py`` on the code
before the redesign (issue 11), to show that the redesign moved code, not maths, and
remade in float64 on the code of commit 2a420f3, whose float32 runs the old fixture still
held in CI. Every history row, unit row, layer row, finding and intervention of
the embedded demo (untreated and treated) and of a plain loop with remedies must come out
the same. The runs are in float64, so that they do not depend on which vector instructions
the CPU has (see ``make_golden``): floats are compared to 1e-7 relative (another CPU's code
path moved them by 2.3e-9 at most), everything else exactly. The float32 path (the one
users run) is checked against reference computations by the other tests, not here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.golden import make_golden

pytestmark = pytest.mark.slow


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{where}: {a!r} != {b!r}"
        assert math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-300), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: length {len(a)} != {len(b) if isinstance(b, list) else b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {b!r}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def now() -> dict[str, Any]:
    return json.loads(json.dumps(make_golden.make()))  # the same plain-data form as the file


_GOLDEN = json.loads(make_golden.GOLDEN.read_text())


@pytest.mark.parametrize(
    ("run", "part"), [(run, part) for run, parts in _GOLDEN.items() for part in parts]
)
def test_numbers_unchanged(now: dict[str, Any], run: str, part: str) -> None:
    golden = _GOLDEN
    _same(now[run][part], golden[run][part], f"{run}/{part}")
    assert golden[run][part] or part in ("interventions", "findings"), "an empty golden part proves nothing"
