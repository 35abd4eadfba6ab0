"""What a report cannot show: the steps whose records never reached the run directory (a
write failed and the writer paused, retrying at later logs; ``status.json`` keeps the step
ranges) and the files or lines the reader skipped (:attr:`~relu_doctor.history.Run.problems`).
The HTML report and the text summary both say it, in a section of its own.

Example:
    >>> import pandas as pd
    >>> from relu_doctor.history import Run
    >>> run = Run(meta={"unwritten": [[3, 5]], "write_error": "OSError: disk full"},
    ...           history=pd.DataFrame())
    >>> read_gaps(run).unwritten_text
    '3–5'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relu_doctor.history import Run

__all__ = ["Gaps", "read_gaps"]


@dataclass(frozen=True)
class Gaps:
    """What the report cannot show because it did not reach the run directory, or could not
    be read back from it.

    Attributes:
        unwritten: ``(first, last)`` step ranges whose records were never written (a write
            failed: disk full, permissions, a removed directory; writing paused and was
            retried at each later log). From ``status.json``.
        write_error: the first write failure, as the writer saw it ("" when unknown).
        skipped: one line per file or line the reader skipped (damaged, cut short, of
            another schema), as warned when it was read (:attr:`Run.problems`).
        unclosed: why the writer has not closed the run directory (:attr:`Run.writer_open`:
            still writing, or killed): the run may go on after what it shows.
        partly: steps of ``unwritten`` whose log reached some tables before a write failed
            (their rows are shown; the rest of that log is not).
        ended_by: what stopped training early (an exception in the loop, Ctrl-C), as
            ``meta.json``'s ``ended_by`` says ("" when it ran its course, or cannot tell).
        lost_tables: the tables the run wrote (``meta.json``'s ``tables``) whose folder is
            missing or cannot be listed, or with a part skipped: what they would show is
            lost (or partly), not unlogged.
        findings_step: the step ``findings.json`` was last written at, where the run
            logged after it and was not closed (:attr:`Run.findings_step`): which findings
            are open, and how severe, is the last log's (from the events), the numbers of
            those that did not change are that step's. None when they are the last log's.
        unwatched: what of the model no hook could watch (an ``nn.RNN`` with
            ``nonlinearity='relu'``, a TorchScript submodule), as said at ``watch``.
    """

    unwritten: list[tuple[int, int]] = field(default_factory=list)
    write_error: str = ""
    skipped: list[str] = field(default_factory=list)
    unclosed: str = ""
    lost_tables: list[str] = field(default_factory=list)
    ended_by: str = ""
    partly: list[int] = field(default_factory=list)
    unwatched: list[str] = field(default_factory=list)
    findings_step: int | None = None

    def __bool__(self) -> bool:
        return bool(self.unwritten or self.skipped or self.unclosed or self.ended_by
                    or self.unwatched or self.findings_step is not None)

    @property
    def findings_text(self) -> str:
        """What ``findings_step`` means for the findings shown ("" when None)."""
        if self.findings_step is None:
            return ""
        return (f"findings.json was last written at step {self.findings_step} (it is "
                "rewritten every few seconds, and when the run closes); which findings are "
                "open, and how severe, is the last log's, from events.jsonl, and the numbers "
                f"of those unchanged since are step {self.findings_step}'s")

    @property
    def one_unwritten(self) -> bool:
        """Whether a single log was never written (``4``, not ``2–4`` or ``2, 6``)."""
        return len(self.unwritten) == 1 and self.unwritten[0][0] == self.unwritten[0][1]

    @property
    def partly_text(self) -> str:
        """The unwritten logs that reached some table, as ``" (written in part: step 240)"``;
        "" when none did."""
        if not self.partly:
            return ""
        return (f" (written in part: step{'s' if len(self.partly) > 1 else ''} "
                f"{', '.join(map(str, self.partly))})")

    @property
    def unwritten_text(self) -> str:
        """The unwritten step ranges, like ``3–5, 9``."""
        return ", ".join(f"{a}–{b}" if a != b else str(a) for a, b in self.unwritten)


def read_gaps(run: Run) -> Gaps:
    """What did not reach the run directory and what was skipped reading it back; read
    after the unit rows the report draws (a damaged part found then is in the list)."""
    error = run.meta.get("write_error")
    skipped = [" ".join(str(p).removeprefix("relu_doctor: ").split()) for p in run.problems]
    lost = {t for t in run.meta.get("lost_tables") or [] if isinstance(t, str)}  # (load_run)
    if run.history_lost:
        lost.add("history")
    if run.units_damaged:  # (a part found damaged when read)
        lost.add("units")
    unwritten = [(int(a), int(b)) for a, b in run.unwritten]
    # (any table read whole: a stream cut short lost one table's rows of a log the others
    # hold; the unit rows, read lazily, are not read for it)
    logged = {int(s) for df in (run.history, run.layers, *run.tables.values())
              if "step" in df for s in df["step"].unique()}
    partly = sorted(s for s in logged if any(a <= s <= b for a, b in unwritten))
    return Gaps(
        unwritten=unwritten,
        partly=partly,
        write_error=error if isinstance(error, str) else "",
        skipped=list(dict.fromkeys(skipped)),
        unclosed=run.writer_open,
        lost_tables=sorted(lost),
        ended_by=ended if isinstance(ended := run.meta.get("ended_by"), str) else "",
        unwatched=[str(t) for t in run.meta.get("unwatched") or [] if isinstance(t, str)],
        findings_step=run.findings_step,
    )

