"""A short plain-text summary of a run, for a terminal, read from the report context.

The same numbers as the HTML report: both read
:class:`~relu_doctor.reports.context.ReportContext`.

Example:
    >>> import pandas as pd
    >>> from relu_doctor.history import Run
    >>> print(summary(Run(meta={"model": "Net"}, history=pd.DataFrame(),
    ...                   units=pd.DataFrame(), layers=pd.DataFrame())))
    Net: Nothing logged
"""

from __future__ import annotations

import os

from relu_doctor.history import Run
from relu_doctor.reports.context import ReportContext, as_run, build_context

__all__ = ["summary"]


def _plain(line: str) -> str:
    """``line`` with terminal control characters (escape sequences from a copied run
    directory's names) replaced by ``?``."""
    return "".join(c if c.isprintable() else "?" for c in line)


def _clip(s: str, width: int) -> str:
    return s if len(s) <= width else s[: width - 1] + "…"


def _site_labels(names: list[str], limit: int = 48) -> tuple[list[str], int]:
    """Site names for a column at most ``limit`` wide, and its width: a long name keeps its
    start and its end (``resnet.enc…layers.0.activation``: the end tells sites apart);
    where that still makes two alike, the names are shown whole."""
    width = max(4, *(len(n) for n in names)) if names else 4
    if width <= limit:
        return names, width
    head = (limit - 1) // 3
    tail = limit - 1 - head
    labels = [n if len(n) <= limit else f"{n[:head]}…{n[-tail:]}" for n in names]
    if len(set(labels)) < len(set(names)):
        return names, width
    return labels, limit


def _gap_lines(ctx: ReportContext, shown: int = 3) -> list[str]:
    """What did not reach the run directory, and what was skipped reading it."""
    gaps = ctx.gaps
    lines = []
    if gaps.unclosed:
        lines.append(f"  Not closed: {gaps.unclosed}")
    if gaps.findings_text:
        lines.append(f"  Findings: {gaps.findings_text}")
    if gaps.ended_by:
        lines.append(f"  Ended early: training stopped on {gaps.ended_by}; what it logged up "
                     "to then is shown")
    lines += [f"  Not watched: {_clip(t, 200)}" for t in gaps.unwatched]
    if gaps.unwritten:
        cause = f" ({gaps.write_error})" if gaps.write_error else ""
        one = gaps.one_unwritten
        lines.append(f"  Never written{cause}: the {'log of step' if one else 'logs of steps'} "
                     f"{gaps.unwritten_text} {'is' if one else 'are'} not in the run directory"
                     f"{gaps.partly_text}")
    if gaps.skipped:
        n = len(gaps.skipped)
        lines.append(f"  Skipped while reading: {n} damaged file{'s' * (n != 1)} or "
                     f"line{'s' * (n != 1)}:")
        lines += [f"    {_clip(line, 160)}" for line in gaps.skipped[:shown]]
        if n > shown:
            lines.append(f"    ... and {n - shown} more (see the report)")
    return lines


def summary(
    run: Run | ReportContext | str | os.PathLike[str],
    *,
    max_sites: int = 20,
    max_findings: int = 5,
) -> str:
    """Verdict, the most severe findings and a per-site table, as plain text.

    Args:
        run: a run record, its report context (built once, shared with the HTML), or the
            path of a run directory.
        max_sites: most rows of the per-site table (the rest are counted).
        max_findings: most findings listed.
    """
    ctx = run if isinstance(run, ReportContext) else build_context(as_run(run))
    lines = [f"{ctx.model or 'model'}: {ctx.verdict.headline}"]
    lines += _gap_lines(ctx)
    damaged = ctx.verdict.status == "damaged"  # the history is lost: no site row to show
    if ctx.last_step is None:
        if damaged or dict(ctx.key_numbers).get("steps logged", "none") != "none":
            lines.append(f"  {ctx.verdict.detail}")
        if not damaged:
            return "\n".join(_plain(line) for line in lines)
    lines.append("  " + ", ".join(f"{k} {v}" for k, v in ctx.key_numbers))
    if ctx.findings_stale:
        lines.append(f"  {ctx.findings_stale}")
    serious = [f for f in ctx.findings if f.severity != "info"] or ctx.findings
    for f in serious[:max_findings]:
        units = f" [{f.unit_label}: {_clip(f.units_text, 60)}]" if f.units_named else ""
        as_of = f" (evidence from step {f.as_of})" if f.as_of is not None else ""
        lines.append(f"  [{f.severity}] {f.site}: {f.message}{units}{as_of}")
    if len(serious) > max_findings:
        lines.append(f"  ... and {len(serious) - max_findings} more findings (see the report)")
    if serious and serious[0].remedy:  # what to do, for the most severe (the rest: the HTML)
        first = serious[0]
        lines.append(f"  What to do first ({first.site}): {first.remedy}"
                     if first.severity != "info" else  # a healthy run: advice, no fix
                     f"  Worth a try, nothing needs it ({first.site}, info): {first.remedy}")
    ev = ctx.evaluation
    if ev is not None and ev.findings:  # (said apart: they are the evaluation data's)
        sev, site, message = ev.findings[0]
        more = f" (and {len(ev.findings) - 1} more)" if len(ev.findings) > 1 else ""
        lines.append(f"  On the evaluation data ({ev.name}): [{sev}] {site}: {message}{more}; "
                     f"{ev.command}")
    rows = ctx.sites
    if rows and not damaged:
        labels, width = _site_labels([r.site for r in rows[:max_sites]])
        lines.append(
            f"  {'site':<{width}} {'family':<10} {'units':>6} {'dead':>6} {'dormant':>7} "
            f"{'sparsity':>8} {'grad RMS':>9}"
        )
        for r, label in zip(rows[:max_sites], labels, strict=True):
            lines.append(
                f"  {label:<{width}} {_clip(r.family, 10):<10} "
                f"{r.units:>6} {r.dead:>6} {r.dormant:>7} {r.sparsity:>8} {r.grad_rms:>9}"
            )
        if len(rows) > max_sites:
            lines.append(f"  ... {len(rows) - max_sites} more sites")
        frozen = [r.site for r in rows if r.frozen]
        if frozen:
            lines.append(f"  Frozen (fed by layers that do not train, or reached by no "
                         "gradient; no remedy acts there): "
                         f"{_clip(', '.join(frozen), 100)}")
    return "\n".join(_plain(line) for line in lines)
