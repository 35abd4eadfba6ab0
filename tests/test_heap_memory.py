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


def _frame(step: int, sizes: list[int], memory: interval.TableMemory, seed: int = 0) -> pd.DataFrame:
    g = torch.Generator().manual_seed(seed)
    units = {c: (torch.rand(sum(sizes), generator=g) > 0.5) if c in _FLAGS
             else torch.randn(sum(sizes), generator=g, dtype=torch.float64) for c in UNIT_COLUMNS}
    return interval._unit_frame(step, [f"s{i}" for i in range(len(sizes))], sizes, units, memory)


@pytest.mark.parametrize("own_bytes", [0, 1 << 40])  # Arrow's blocks / the heap's
def test_a_tables_block_is_used_again_only_once_nothing_refers_to_it(
    monkeypatch: pytest.MonkeyPatch, own_bytes: int
) -> None:
    """A table held (or a column, or a view of one) keeps its block: the next table gets
    another, and what was held still reads as written. Once every reference is gone the
    block is taken again; a block of another size is not; at most ``keep`` are held."""
    monkeypatch.setattr(interval, "_OWN_MEMORY_BYTES", own_bytes)
    memory = interval.TableMemory(keep=3)
    a = _frame(1, [40, 60], memory, seed=1)
    block_a = id(_owner(a["mean_abs"].to_numpy()))  # (the id: holding it would keep it)
    want_a = a.copy(deep=True)
    b = _frame(2, [40, 60], memory, seed=2)  # a is held: a block of its own
    assert id(_owner(b["mean_abs"].to_numpy())) != block_a
    view = a["grad_rms"].to_numpy()[10:20]  # a view of a's block outlives a
    want_view = view.copy()
    del a
    c = _frame(3, [40, 60], memory, seed=3)
    assert id(_owner(c["mean_abs"].to_numpy())) != block_a
    np.testing.assert_array_equal(view, want_view)
    del view
    d = _frame(4, [40, 60], memory, seed=4)  # nothing refers to a's block now
    assert id(_owner(d["mean_abs"].to_numpy())) == block_a
    assert not d.equals(want_a) and d["step"].eq(4).all()
    e = _frame(5, [30, 60], memory, seed=5)  # another size: a block of its own
    assert id(_owner(e["mean_abs"].to_numpy())) not in {
        id(_owner(t["mean_abs"].to_numpy())) for t in (b, c, d)}
    assert len(memory._blocks) == 3  # the oldest let go
    # each table reads as the plain construction of its own step
    made = [(2, [40, 60], 2), (3, [40, 60], 3), (4, [40, 60], 4), (5, [30, 60], 5)]
    for t, (step, sizes, seed) in zip((b, c, d, e), made, strict=True):
        pd.testing.assert_frame_equal(t, _frame(step, sizes, interval.TableMemory(1), seed))


def test_the_records_a_doctor_keeps_and_a_user_holds_read_as_they_were_logged() -> None:
    """Blocks used again under a Doctor never change a table someone holds: a listener
    copies each record's unit table when it is logged; at the end, every record the user
    kept, and a column a user kept of another, still equal those copies; and the Doctor's
    tables came from fewer blocks than logs."""
    import relu_doctor

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    copies: dict[int, pd.DataFrame] = {}
    held: list = []
    columns: dict[int, np.ndarray] = {}
    owners = set()
    with relu_doctor.watch(net, log_every_n_steps=1, overhead_budget=None, keep_records=2) as doc:
        doc.add_listener(lambda r: copies.__setitem__(r.step, r.unit_table.copy(deep=True)))
        for step in range(1, 31):
            net(torch.randn(16, 8)).sum().backward()
            doc.step()
            table = doc.records[-1].unit_table
            owners.add(id(_owner(table["mean_abs"].to_numpy())))
            if step % 7 == 0:
                held.append(doc.records[-1])
            if step % 5 == 0:
                columns[step] = table["activation_rate"].to_numpy()
        kept = list(doc.records)
    for rec in [*held, *kept]:
        pd.testing.assert_frame_equal(rec.unit_table, copies[rec.step])
    for step, col in columns.items():
        np.testing.assert_array_equal(col, copies[step]["activation_rate"].to_numpy())
    assert len(owners) < 30
