"""Handing the C heap's free memory back to the system after a large log (glibc only).

A log of a large layer (100k units) makes and frees tens of MB of host temporaries: the
statistics read back as float64, the metric tensors, the unit table's conversions. Once
glibc has freed large blocks its mmap threshold rises, so later blocks of that size come
from the heap; the few allocations that live on between logs then pin its freed pages, and
resident memory creeps up log after log although nothing is leaked. After a log of at least
:data:`LARGE_LOG_UNITS` units, :func:`after_log` reads the resident size (``/proc``, a few
microseconds); when it grew more than :data:`SLACK_BYTES` over its level at the first large
log after the last trim, ``malloc_trim(0)`` returns the heap's free pages to the system
(a few ms; the pages reused by the next log are faulted in again). At most once per log,
only at a log; the process's allocator settings (``mallopt``) are left alone. Elsewhere
(another C library, no ``/proc``) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable

__all__ = ["LARGE_LOG_UNITS", "SLACK_BYTES", "after_log", "trims"]

LARGE_LOG_UNITS = 16_384  # a unit table of about 1 MB and more
SLACK_BYTES = 32 * 2**20

_loaded = False
_trim: Callable[[int], int] | None = None
_level: int | None = None  # resident bytes at the first large log after the last trim
_trims = [0, 0.0]  # calls of malloc_trim, seconds in them


def trims() -> tuple[int, float]:
    """How many times this process's heap was trimmed, and the seconds it took."""
    return int(_trims[0]), float(_trims[1])


def _load_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # musl and others: no malloc_trim
            return None
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, ValueError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def after_log(units: int) -> bool:
    """Call after each log with its number of units; returns whether the heap was trimmed.
    Never raises."""
    global _loaded, _trim, _level
    if units < LARGE_LOG_UNITS:
        return False
    if not _loaded:
        _trim, _loaded = _load_trim(), True
    trim = _trim
    if trim is None:
        return False
    rss = _resident_bytes()
    if rss is None:
        return False
    if _level is None:
        _level = rss
        return False
    if rss - _level <= SLACK_BYTES:
        return False
    t0 = time.perf_counter()
    try:
        trim(0)
    except Exception:  # a C library that lied about itself: stop trying
        _trim = None
        return False
    _trims[0] += 1
    _trims[1] += time.perf_counter() - t0
    _level = None  # the next large log, its temporaries faulted in again, sets the level
    return True
