"""A logging step against a plain step, paired.

Two copies of one benchmark model (:func:`benchmarks.overhead.model_specs`) train side by
side, stepping alternately on the same batches: one plain, one under ``relu_doctor.watch``
with its default settings (the overhead budget) and a log every ``--log-every`` steps. The
ratio is the median, over logging steps, of (the watched logging step / the plain step just
before it), with its interquartile range: pairing takes out the machine's slow drifts, which
a ratio of two separately timed medians keeps.

Run::

    .venv/bin/python -m benchmarks.logstep                 # the 256-site MLP, 30 logs
    .venv/bin/python -m benchmarks.logstep --model resnet50 --logs 20
    .venv/bin/python -m benchmarks.logstep --run-dir          # each log also written to disk
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

from benchmarks.overhead import Runner, _make_data, model_specs
from benchmarks.paired import own_clock


def paired_log_ratio(
    model: str, logs: int, log_every: int, threads: int, run_dir: str | None = None,
    before: list[float] | None = None,
) -> list[float]:
    """(watched logging step / the plain step before it) for ``logs`` logging steps, after
    two logs left out (the first makes the record's tables). The watched copy's budget is timed
on its own steps (:func:`benchmarks.paired.own_clock`). ``run_dir``: each log is also written
there (its tables, findings and TensorBoard events), as ``watch(run_dir=...)`` does.
``before``: given a list, the same ratio of each step before a logging step is appended
to it (that step reads the window's update ratio: a copy of the parameters)."""
    import relu_doctor

    torch.set_num_threads(threads)
    spec = model_specs()[model]
    cpu = torch.device("cpu")
    data = _make_data(spec, cpu)
    plain, watched = Runner(spec, data, cpu), Runner(spec, data, cpu)
    doc = watched.doc = relu_doctor.watch(  # type: ignore[attr-defined]
        watched.model, optimizer=watched.opt, log_every_n_steps=log_every, run_dir=run_dir
    )
    own = own_clock(watched)  # its budget times its own steps, not the plain copy's too

    def timed(r: Runner, watch: bool) -> float:
        if watch:
            own.begin()
            r.train_step()
            doc.step()
            return own.end()
        t0 = time.perf_counter()
        r.train_step()
        return time.perf_counter() - t0

    ratios = []
    try:
        for i in range(log_every * (logs + 2)):
            t_plain = timed(plain, False)
            t_watched = timed(watched, True)
            if (i + 1) % log_every == 0 and i >= 2 * log_every:
                ratios.append(t_watched / t_plain)
            elif before is not None and (i + 2) % log_every == 0 and i >= 2 * log_every:
                before.append(t_watched / t_plain)
    finally:
        doc.detach()
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp256", choices=sorted(model_specs()))
    p.add_argument("--logs", type=int, default=30, help="logging steps timed (default 30)")
    p.add_argument("--log-every", type=int, default=5, help="steps per log (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--run-dir", action="store_true",
                   help="write each log to a run directory (a temporary one), TensorBoard too")
    args = p.parse_args(argv)
    if args.logs < 2 or args.log_every < 2:
        p.error(f"--logs and --log-every: expected at least 2, got {args.logs} and {args.log_every}")
    before: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        r = paired_log_ratio(args.model, args.logs, args.log_every, args.threads,
                             f"{tmp}/run" if args.run_dir else None, before)
    q1, med, q3 = statistics.quantiles(r, n=4)
    b1, bmed, b3 = statistics.quantiles(before, n=4)
    where = ", written to a run directory" if args.run_dir else ""
    print(f"{args.model}: a logging step (default settings{where}) / a plain step: {med:.2f}x "
          f"[{q1:.2f}-{q3:.2f}], {len(r)} logging steps, {args.threads} threads; the step "
          f"before each: {bmed:.2f}x [{b1:.2f}-{b3:.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
