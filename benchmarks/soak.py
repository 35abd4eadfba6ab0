"""Soak benchmark: does a long run cost the same at its end as at its start?

For each case of a (logs x sites x units) grid, a ReLU MLP (``sites`` hidden layers of
``units`` units) is trained with SGD under :func:`relu_doctor.watch` logging at every step
(``optimizer=`` given, so the gradient-norm spike test runs too), with a run directory.
Reported per case:

* ``rss MB``: resident memory after warm-up (the first 10% of the logs, at least 20): the
  median, read after each log, over the next 10% ("warm") and over the last 10% ("late"); at
  the end (after the ``with`` block, which closes the run directory: its open segments are
  compacted to Parquet); the growth late - warm, and end - warm; the peak (``VmHWM``) over
  the run, exit included. (Medians: after a large log the heap may be trimmed, see
  :mod:`relu_doctor._heap`, so one reading can be a low point of a saw-tooth.)
* ``trims``: how often the C heap was trimmed after a large log, and the mean ms of a trim;
* ``ms/log``: the median time of one step + log over the first 10% after warm-up
  ("early") and over the last 10% ("late"), and late / early;
* ``files``, ``MB``: the run directory's size on disk;
* ``load s``: :func:`relu_doctor.history.load_run` of the finished directory (its unit
  table is read when asked);
* ``step s``: the unit rows of the last logged step (``Run.read_units(steps=[last])``, the
  filter pushed down to the Parquet row groups);
* ``report s``: ``relu-doctor report`` (HTML and summary) of it.

Measured on 2 CPU cores (``--threads 1`` for the MLP), before -> after issue 13's reader and
compaction work: ``--case 3000x2x64`` growth 103 -> 7 MB; ``--case 20000x2x64`` growth 9 MB
(296 MB before), load 0.06 s, report 4.1 s; ``--case 200x1x100000`` ``load_run`` 2.6 ->
0.01 s and report 34 -> 4.1 s on the same directory (36 s and 246 s when first measured),
its growth ~100 MB (751 -> 852 MB, one reading after warm-up and the end). The kept unit
tables then moved out of the malloc heap and the heap is trimmed after large logs
(``relu_doctor/interval.py``, ``relu_doctor/_heap.py``): late median 756 MB, end 758, peak
798 (18 trims of 8 ms in 200 logs) where the code before read 805 / 797 / 856 in the same
session; the medians' growth (49 vs -20 MB then) is noise-dominated: the resident size of
this case swings by +-40 MB from log to log and from run to run.

With ``--no-run-dir`` the records stay in the bounded in-memory buffer
(``keep_records``) instead. Timings are printed, never asserted (the issue's targets:
growth < 50 MB, late/early <= 1.1, about 50 files at most, load <= 3 s, report <= 10 s).

Run (CPU, 2 threads; the full soak takes about 15-20 minutes)::

    .venv/bin/python -m benchmarks.soak                    # 20,000 logs of a small MLP;
                                                           # 200 logs of a 100k-unit layer
    .venv/bin/python -m benchmarks.soak --case 2000x2x64   # LOGSxSITESxUNITS, repeatable
    .venv/bin/python -m benchmarks.soak --quick            # tiny: checks the harness only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import relu_doctor
from relu_doctor import _heap as heap
from relu_doctor.cli import main as cli_main
from relu_doctor.history import load_run

DEFAULT_CASES = ("20000x2x64", "200x1x100000")
QUICK_CASES = ("120x2x16", "40x1x2000")


@dataclass
class SoakResult:
    """The numbers of one case."""

    logs: int
    sites: int
    units: int
    rss_warm_mb: float
    rss_late_mb: float
    rss_end_mb: float
    rss_peak_mb: float
    ms_early: float
    ms_late: float
    files: int
    mbytes: float
    load_s: float
    report_s: float
    records_in_memory: int
    history_rows: int
    step_s: float = float("nan")
    trims: int = 0
    trim_ms: float = float("nan")

    @property
    def growth_mb(self) -> float:
        return self.rss_late_mb - self.rss_warm_mb

    @property
    def end_growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_warm_mb

    @property
    def late_over_early(self) -> float:
        return self.ms_late / self.ms_early if self.ms_early > 0 else float("nan")


def rss_mb(field: str = "VmRSS") -> float:
    """Resident set size of this process (``VmHWM``: its peak so far), from Linux ``/proc``;
    0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def parse_case(text: str) -> tuple[int, int, int]:
    """``"LOGSxSITESxUNITS"`` -> ``(logs, sites, units)``."""
    try:
        logs, sites, units = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--case: expected LOGSxSITESxUNITS like 2000x2x64, got {text!r}"
        ) from None
    if min(logs, sites, units) < 1:
        raise argparse.ArgumentTypeError(f"--case: every number must be >= 1, got {text!r}")
    return logs, sites, units


def model_for(sites: int, units: int, d_in: int = 16) -> nn.Module:
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(sites):
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def soak(
    logs: int, sites: int, units: int, *, root: Path, run_dir: bool = True,
    keep_records: int = 16, batch: int = 8, progress: bool = False,
) -> SoakResult:
    """Train ``logs`` steps, logging at each, and measure (see the module docstring)."""
    torch.manual_seed(0)
    model = model_for(sites, units)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 16), torch.randn(batch, 1)
    path = root / f"run_{logs}x{sites}x{units}"
    warm = max(20, logs // 10)
    span = max(10, logs // 10)
    times: list[float] = []
    rss: list[float] = []
    trims0, trim_s0 = heap.trims()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # findings of a random model are not the point
        with relu_doctor.watch(
            model, log_every_n_steps=1, every_n_steps=1, optimizer=opt,
            run_dir=path if run_dir else None, keep_records=keep_records,
        ) as doc:
            for i in range(logs):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
                opt.step()
                doc.step()
                times.append(time.perf_counter() - t0)
                if i + 1 == warm:
                    gc.collect()
                rss.append(rss_mb())
                if progress and (i + 1) % max(1, logs // 10) == 0:
                    print(f"  {i + 1}/{logs} logs, {1e3 * times[-1]:.1f} ms/log, "
                          f"rss {rss_mb():.0f} MB", file=sys.stderr, flush=True)
        gc.collect()
        rss_end, rss_peak = rss_mb(), rss_mb("VmHWM")
        trims1, trim_s1 = heap.trims()
        records = len(doc.records)
        rows = len(doc.history())
    early = times[warm : warm + span] or times
    late = times[-span:]
    rss_warm = statistics.median(rss[warm : warm + span] or rss)
    rss_late = statistics.median(rss[-span:])
    trims = trims1 - trims0
    files = sum(1 for p in path.rglob("*") if p.is_file()) if run_dir else 0
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if run_dir else 0
    load_s = report_s = step_s = float("nan")
    if run_dir:
        t0 = time.perf_counter()
        run = load_run(path)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run.read_units(steps=[run.last_step or 0])
        step_s = time.perf_counter() - t0
        del run
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            status = cli_main(["report", str(path), "-q"])
        report_s = time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"relu-doctor report {path} exited {status}")
    return SoakResult(
        logs, sites, units, rss_warm, rss_late, rss_end, rss_peak,
        1e3 * statistics.median(early), 1e3 * statistics.median(late), files, size / 2**20,
        load_s, report_s, records, rows, step_s, trims,
        1e3 * (trim_s1 - trim_s0) / trims if trims else float("nan"),
    )


def print_table(results: list[SoakResult]) -> None:
    head = (f"{'logs x sites x units':>22} {'rss warm':>9} {'late':>5} {'end':>5} "
            f"{'growth':>7} {'end-warm':>8} {'peak':>6} {'trims':>5} {'ms/trim':>7} "
            f"{'ms early':>9} {'ms late':>8} {'late/early':>10} {'files':>6} {'MB':>7} "
            f"{'load s':>7} {'step s':>7} {'report s':>8}")
    print(head)
    for r in results:
        print(f"{f'{r.logs} x {r.sites} x {r.units}':>22} {r.rss_warm_mb:>9.0f} "
              f"{r.rss_late_mb:>5.0f} {r.rss_end_mb:>5.0f} {r.growth_mb:>7.1f} "
              f"{r.end_growth_mb:>8.1f} {r.rss_peak_mb:>6.0f} {r.trims:>5} {r.trim_ms:>7.1f} "
              f"{r.ms_early:>9.2f} {r.ms_late:>8.2f} "
              f"{r.late_over_early:>10.2f} {r.files:>6} {r.mbytes:>7.1f} {r.load_s:>7.2f} "
              f"{r.step_s:>7.2f} {r.report_s:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", type=parse_case, metavar="LxSxU",
                        help=f"a case (repeatable); default {' and '.join(DEFAULT_CASES)}")
    parser.add_argument("--quick", action="store_true", help="tiny cases (harness check)")
    parser.add_argument("--no-run-dir", action="store_true",
                        help="keep records in the bounded in-memory buffer instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="where the run directories go (default: a temporary directory)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = args.case or [parse_case(c) for c in (QUICK_CASES if args.quick else DEFAULT_CASES)]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        results = []
        for logs, sites, units in cases:
            results.append(soak(logs, sites, units, root=root, run_dir=not args.no_run_dir,
                                progress=True))
            print_table(results[-1:])
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
