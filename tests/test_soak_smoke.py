"""Smoke test of the soak benchmark (benchmarks/soak.py) on tiny cases: the harness runs
and measures, and memory holds a bounded number of records whatever the run's length. No
timing is asserted."""

from __future__ import annotations

import math

import pytest

from benchmarks import soak

pytestmark = pytest.mark.benchmark


def test_the_harness_measures_a_run_directory(tmp_path):
    r = soak.soak(60, 2, 8, root=tmp_path, keep_records=4)
    assert r.records_in_memory == 4  # the bounded buffer, not the 60 logs
    assert r.history_rows == 60 * 2  # everything logged is read back from disk
    assert 0 < r.files <= 20 and r.mbytes > 0  # a handful of files, not one per log
    assert math.isfinite(r.load_s) and math.isfinite(r.report_s) and math.isfinite(r.step_s)
    assert r.ms_early > 0 and r.ms_late > 0 and r.rss_end_mb >= 0


def test_without_a_run_directory_only_keep_records_logs_stay(tmp_path):
    r = soak.soak(50, 1, 8, root=tmp_path, run_dir=False, keep_records=5)
    assert r.records_in_memory == 5 and r.history_rows == 5
    assert r.files == 0 and math.isnan(r.load_s)


def test_case_parsing():
    assert soak.parse_case("20000x2x64") == (20000, 2, 64)
    with pytest.raises(Exception, match="LOGSxSITESxUNITS"):
        soak.parse_case("20000x2")
