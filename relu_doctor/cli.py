"""The ``relu-doctor`` command.

``relu-doctor demo`` trains the embedded synthetic task (untreated and treated) and writes
TensorBoard logs, run directories and HTML reports; ``relu-doctor report RUN_DIR`` turns a
run directory into a self-contained HTML report and prints a short summary.

Bad arguments and unusable paths end with one line on stderr and exit status 2; a
successful command exits 0. ``--help`` and ``--version`` import neither torch nor pandas:
everything heavy is imported inside the command that needs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from relu_doctor._version import __version__

__all__ = ["main"]

EXIT_USAGE = 2
#: a reader of stdout that left (128 + SIGPIPE, as the shell reports a tool it killed)
EXIT_PIPE = 141


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``relu-doctor`` (subcommands ``demo`` and ``report``)."""
    parser = _Parser(
        prog="relu-doctor",
        description="Diagnose and treat the ReLU pathologies of PyTorch training: dead and "
        "dormant units, over-sparse layers, vanishing or exploding gradients.",
        epilog="Run 'relu-doctor COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"relu-doctor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="train the embedded synthetic task untreated and treated; write reports",
        description="Train a small ReLU MLP on an embedded synthetic task (no download) with "
        "a learning rate high enough to kill most of its units, once untreated and once "
        "treated with relu_doctor's remedies (LeakyReLU swap, adaptive gradient clipping, "
        "learning-rate rescue, dormant-unit recycling). Writes a run directory with "
        "TensorBoard logs and an HTML report for each run.",
    )
    demo.add_argument("--out", metavar="DIR", default="relu_doctor_demo",
                      help="output directory (default: ./relu_doctor_demo); a previous demo "
                      "output there is replaced, any other non-empty directory is refused")
    demo.add_argument("--steps", metavar="N", type=int, default=None,
                      help="optimizer steps per run (default: 600; 200 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="smaller data and model, fewer steps (a first look in seconds)")
    demo.add_argument("--seed", metavar="N", type=int, default=0,
                      help="seed shared by both runs (default: 0)")
    demo.add_argument("--lr", metavar="LR", type=float, default=None,
                      help="Adam's learning rate (default: 0.05, too high on purpose; 0.001 "
                      "trains this task without dead units)")
    demo.add_argument("--threads", metavar="N", type=int, default=1,
                      help="CPU threads for PyTorch (default: 1, fastest for this small model)")
    demo.set_defaults(func=_cmd_demo, check=_check_demo, parser=demo)

    report = sub.add_parser(
        "report",
        help="build the HTML report of a run directory and print a summary",
        description="Build a self-contained HTML report (verdict, findings with remedies, "
        "per-site table, dead fraction over time, per-unit heatmaps, gradient flow, "
        "interventions, environment) from a run directory written by relu_doctor, and print "
        "a short summary. Works on a run that was killed mid-way: it covers every logged step.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory (run_dir= of watch()/ReluDoctor, or doc.save())")
    report.add_argument("-o", "--output", metavar="FILE", default=None,
                        help="the HTML file to write (default: RUN_DIR/report.html)")
    report.add_argument("-q", "--quiet", action="store_true",
                        help="print only the path of the report")
    report.set_defaults(func=_cmd_report, check=None, parser=report)
    return parser


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {_printable(' '.join(str(message).split()))}", file=sys.stderr)
    return EXIT_USAGE


def _run_dirs_inside(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir() if (p / "meta.json").is_file())
    except OSError:
        return []


def _check_demo(args: argparse.Namespace) -> None:
    """The demo's numeric options, checked by the one copy of the checks (``_validate``)."""
    from relu_doctor._validate import positive_finite, positive_int

    if args.steps is not None:
        positive_int("--steps", args.steps)
    if args.lr is not None:
        positive_finite("--lr", args.lr)
    positive_int("--threads", args.threads)


def _cmd_report(args: argparse.Namespace) -> int:
    import warnings

    prog = "relu-doctor report"
    # Every warning (a damaged part or line skipped) is one line on stderr, never silence;
    # anything unexpected in a damaged run directory is one line and exit status 2, never a
    # traceback.
    broken = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = _report(args, prog)
        except BrokenPipeError:  # the reader left (`| head`): main says nothing of it
            status, broken = EXIT_PIPE, True
        except Exception as e:  # a run directory damaged in a way no check foresaw
            status = _fail(prog, f"cannot make the report of {args.run_dir!r}: "
                           f"{type(e).__name__}: {e}")
    for w in caught:
        if issubclass(w.category, ResourceWarning):
            # The interpreter's own (an unclosed file collected during the report, maybe made
            # by the caller's code when main() runs in process): not about the run, so it
            # goes back to the caller's warning filters, not onto the report's stderr.
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        elif not issubclass(w.category, DeprecationWarning):
            text = " ".join(str(w.message).removeprefix("relu_doctor: ").split())
            print(f"{prog}: warning: {_printable(text)}", file=sys.stderr)
    if broken:
        raise BrokenPipeError
    return status


def _quiet_broken_pipe() -> int:
    """The reader of stdout left (``relu-doctor report RUN | head``): stop without a word, as
    a tool killed by SIGPIPE does (git's exit status, 141), with stdout sent to /dev/null so
    that the interpreter's flush at exit raises nothing either."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout with no file (a test's)
        pass
    return EXIT_PIPE


def _progress(prog: str) -> Callable[[str], None] | None:
    """On a terminal, a function that shows one line of progress on stderr, each replacing
    the last ("" clears it), as git does; None elsewhere (a pipe, a log, a test: stderr
    holds warnings and errors only). A report of many sites takes tens of seconds (a
    trial's 120 sites x 400 logs: 29 s with nothing said)."""
    try:
        if not sys.stderr.isatty():
            return None
    except (AttributeError, ValueError):  # (a stderr replaced, or closed)
        return None

    def say(text: str) -> None:
        line = f"{prog}: {text}..." if text else ""
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    return say


def _printable(text: str) -> str:
    """``text`` without terminal control characters (a run directory is untrusted input)."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text)


def _report(args: argparse.Namespace, prog: str) -> int:
    from relu_doctor.errors import ReluDoctorError
    from relu_doctor.history import load_run
    from relu_doctor.reports.report import Report

    if not args.run_dir:
        return _fail(prog, "RUN_DIR: got an empty path ''; name a run directory (for the "
                     "current one, '.').")
    run_dir = Path(args.run_dir)
    say = _progress(prog) if not args.quiet else None
    if say is not None:
        say(f"reading {_printable(str(run_dir))}")

    def fail(message: str) -> int:  # (the progress line cleared first: not run together)
        if say is not None:
            say("")
        return _fail(prog, message)

    try:
        run = load_run(run_dir)
    except ReluDoctorError as e:
        inside = _run_dirs_inside(run_dir) if run_dir.is_dir() else []
        hint = f" It holds run directories: {', '.join(inside)}." if inside else ""
        return fail(f"{e}{hint}")
    out = args.output if args.output is not None else run_dir / "report.html"  # ("dir/" kept)
    report = Report(run)
    try:
        if say is not None:
            say("reading its tables")
            report.context  # noqa: B018 (built here, so that the line above is what is slow)
        path = report.save(out, progress=say)
    except OSError as e:
        elsewhere = (" Write it elsewhere with -o PATH (a read-only copy of a run, say)."
                     if args.output is None else "")
        blocker = next((str(a) for a in Path(out).parents if a.exists() and not a.is_dir()),
                       None)  # (mkdir says "File exists" of a file in the path)
        why = f"{blocker!r} is a file, not a directory" if blocker else e.strerror or e
        return fail(f"cannot write the report to {str(out)!r}: {why}.{elsewhere}")
    except ReluDoctorError as e:
        return fail(str(e).replace("path: ", "--output: ", 1))
    finally:
        if say is not None:
            say("")
    if args.quiet:
        print(path)
        return 0
    print(_printable(report.summary()))  # it says which steps were never written
    print(f"Report: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from relu_doctor.demo import run_demo
    from relu_doctor.errors import ReluDoctorError

    prog = "relu-doctor demo"
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        result = run_demo(args.out, steps=args.steps, quick=args.quick, seed=args.seed, lr=args.lr)
    except ReluDoctorError as e:
        return _fail(prog, str(e))
    except OSError as e:
        return _fail(prog, f"cannot write under {args.out!r}: {e.strerror or e}.")
    seconds = time.perf_counter() - t0
    runs = result.runs
    print(f"relu-doctor demo: done in {seconds:.0f} s ({result.config.steps} steps per run, "
          f"learning rate {result.config.lr:g}, too high on purpose).")
    print()
    names = list(runs)
    rows = [
        ("dead units at the end", [f"{r.dead_units}/{r.units} ({r.dead_units / max(r.units, 1):.0%})" for r in runs.values()]),
        ("test accuracy", [f"{r.accuracy:.1%}" for r in runs.values()]),
        ("final training loss", [f"{r.loss:.3f}" for r in runs.values()]),
        ("interventions", [str(r.interventions) for r in runs.values()]),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"  {'':<{width}}  " + "  ".join(f"{n:>12}" for n in names))
    for label, vals in rows:
        print(f"  {label:<{width}}  " + "  ".join(f"{v:>12}" for v in vals))
    print()
    for line in _where_lines(result.out, runs):
        print(line)
    return 0


def _command(name: str) -> str:
    """How to run ``name`` from a new shell: this environment's own copy by absolute path
    (a virtual environment need not be activated), else the bare name."""
    import shlex
    import shutil

    here = Path(sys.executable).parent / name
    if here.is_file():
        return shlex.quote(str(here.absolute()))
    found = shutil.which(name)
    return shlex.quote(found) if found else name


def _where_lines(out: Path, runs: Any) -> list[str]:
    """Where the demo wrote, and commands that work as printed in a new shell, from any
    working directory (absolute paths, quoted)."""
    import shlex

    pad = max(len(n) for n in runs)
    q = shlex.quote
    lines = [f"Everything is under {out.resolve()}", "Reports (self-contained HTML, open offline):"]
    lines += [f"  {n:<{pad}}  {Path(r.report).resolve()}" for n, r in runs.items()]
    lines += ["Run directories:"]
    lines += [f"  {n:<{pad}}  {Path(r.run_dir).resolve()}" for n, r in runs.items()]
    first = next(iter(runs.values()))
    report = q(str(Path(first.report).resolve()))
    lines += [
        "",
        "Open a report in a browser:",
        f"  xdg-open {report}    # macOS: open {report}",
        "See the runs side by side in TensorBoard (runs named " + " and ".join(runs) + "):",
        f"  {_command('tensorboard')} --logdir {q(str(out.resolve()))}",
        "Re-make a report from a run directory:",
        f"  {_command('relu-doctor')} report {q(str(Path(first.run_dir).resolve()))}",
    ]
    venv = Path(sys.prefix)
    if venv != Path(sys.base_prefix):
        lines += [
            "Or activate the environment to use the short names:",
            f"  source {q(str(venv / 'bin' / 'activate'))}",
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``relu-doctor``; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "func", None) is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}" if extra else
                     "a command is required: demo or report")
    if extra:  # (after the command word, the command's: argparse said "relu-doctor: error")
        words = list(sys.argv[1:] if argv is None else argv)
        before = words[:words.index(args.command)] if args.command in words else []
        (parser if any(e in before for e in extra) else args.parser).error(
            f"unrecognized arguments: {' '.join(extra)}")
    check: Any = args.check
    if check is not None:
        from relu_doctor.errors import ReluDoctorError

        try:
            check(args)
        except ReluDoctorError as e:
            args.parser.error(str(e))
    try:
        return int(args.func(args))
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        print("relu-doctor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
