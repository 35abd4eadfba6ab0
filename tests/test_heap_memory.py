"""Memory of large logs (issue 13): the unit table a record keeps is built outside the malloc
heap (equal to the plain pandas construction), and the C heap is trimmed after a large log only
when resident memory grew past the slack (relu_doctor._heap)."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

import relu_doctor._heap as heap
import relu_doctor.interval as interval
from relu_doctor.metrics import UNIT_COLUMNS

_FLAGS = ("dead", "dormant", "below_tau", "lifetime_dead")


def _units(sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {c: (torch.rand(n, generator=g) > 0.5) if c in _FLAGS
         else torch.randn(n, generator=g, dtype=torch.float64) for c in UNIT_COLUMNS}
        for n in sizes
    ]


def _owner(a: np.ndarray) -> object:
    base: object = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


@pytest.mark.parametrize("own_bytes", [0, 1 << 40])  # Arrow's allocator / the heap
def test_unit_frame_equals_the_plain_pandas_construction(
    monkeypatch: pytest.MonkeyPatch, own_bytes: int
) -> None:
    monkeypatch.setattr(interval, "_OWN_MEMORY_BYTES", own_bytes)
    names, sizes = ["a", "b", "c.d", "e"], [5, 0, 3000, 7]
    units = _units(sizes)
    expected = pd.DataFrame({
        "step": 7,
        "site": np.repeat(np.array(names, dtype=object), sizes),
        "unit": np.concatenate([np.arange(n) for n in sizes]),
        **{c: torch.cat([u[c] for u in units]).numpy() for c in UNIT_COLUMNS},
    })
    got = interval._unit_frame(7, names, sizes, {c: torch.cat([u[c] for u in units]) for c in UNIT_COLUMNS})
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    arrow = isinstance(_owner(got["mean_abs"].to_numpy()), pa.Buffer)
    assert arrow == (own_bytes == 0)
    copy = got.copy()
    copy.loc[0, "mean_abs"] = 1e9  # the frame behaves as any other (copy on write)
    assert got.loc[0, "mean_abs"] == expected.loc[0, "mean_abs"]


def test_unit_frames_of_later_logs_have_their_own_site_column() -> None:
    """The site column of a later log's table (its strings kept from the last log where
    the sites are the same) equals the plain construction, and a change to one table's
    column changes no other's; other sites or sizes make their own."""
    def frame(names: list[str], sizes: list[int]) -> pd.DataFrame:
        units = _units(sizes)
        return interval._unit_frame(
            3, names, sizes, {c: torch.cat([u[c] for u in units]) for c in UNIT_COLUMNS})

    cases = [(["a", "b"], [2, 3]), (["a", "b"], [2, 3]), (["a", "b"], [3, 2]),
             (["b", "a"], [2, 3]), (["a", "b"], [2, 3])]
    frames = [frame(names, sizes) for names, sizes in cases]
    for f, (names, sizes) in zip(frames, cases, strict=True):
        assert f["site"].tolist() == np.repeat(names, sizes).tolist()
    frames[0].loc[0, "site"] = "changed"
    assert frames[0]["site"].tolist()[:2] == ["changed", "a"]
    for f in frames[1:]:
        assert "changed" not in f["site"].tolist()


class _Fake:
    def __init__(self, rss: list[int]) -> None:
        self.rss, self.calls = list(rss), 0

    def resident(self) -> int:
        return self.rss.pop(0)

    def trim(self, pad: int) -> int:
        self.calls += 1
        return 1


def test_the_heap_is_trimmed_only_after_large_logs_that_grew_past_the_slack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mb = 2**20
    fake = _Fake([700 * mb, 720 * mb, 733 * mb, 640 * mb, 650 * mb, 683 * mb])
    monkeypatch.setattr(heap, "_loaded", True)
    monkeypatch.setattr(heap, "_trim", fake.trim)
    monkeypatch.setattr(heap, "_level", None)
    monkeypatch.setattr(heap, "_resident_bytes", fake.resident)
    small = heap.LARGE_LOG_UNITS - 1
    assert not heap.after_log(small) and len(fake.rss) == 6  # a small log reads nothing
    before = heap.trims()[0]
    got = [heap.after_log(heap.LARGE_LOG_UNITS) for _ in range(6)]
    # 700 MB sets the level; +20: within the slack (32 MB); +33: past it, trimmed; the next
    # large log (640) sets the level again; +10; +43: trimmed.
    assert got == [False, False, True, False, False, True]
    assert fake.calls == 2 and heap.trims()[0] - before == 2


def test_a_trim_that_fails_stops_trimming_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(pad: int) -> int:
        raise OSError("no")

    rss = iter([100 * 2**20, 200 * 2**20, 300 * 2**20])
    monkeypatch.setattr(heap, "_loaded", True)
    monkeypatch.setattr(heap, "_trim", broken)
    monkeypatch.setattr(heap, "_level", None)
    monkeypatch.setattr(heap, "_resident_bytes", lambda: next(rss))
    assert [heap.after_log(10**6) for _ in range(3)] == [False, False, False]
    assert heap._trim is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_glibc_malloc_trim_is_found_and_runs() -> None:
    import os

    trim = heap._load_trim()
    if not os.confstr("CS_GNU_LIBC_VERSION"):
        assert trim is None
        return
    assert trim is not None and trim(0) in (0, 1)
    rss = heap._resident_bytes()
    assert rss is not None and rss > 0
