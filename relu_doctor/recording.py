"""The Doctor's run record: where each logged interval goes (a bounded buffer in memory,
the run directory, whose write failures never reach training) and how the record is read
back (``history()``, ``to_run()``, ``save()``).

:class:`RunRecording` is a part of :class:`~relu_doctor.doctor.Doctor` (a mixin), kept in
its own module so that ``doctor.py`` holds the wiring of one step and one log.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch

from relu_doctor import _heap as heap
from relu_doctor._validate import finite_or_none, flag
from relu_doctor._validate import path as check_path
from relu_doctor._version import __version__
from relu_doctor.errors import (
    ReluDoctorWarning,
    RunDirError,
    forget_write_failure,
    note_write_failure,
    user_stacklevel,
)
from relu_doctor.events import Event, is_judged, optimizer_of
from relu_doctor.history import FORMAT_VERSION, IntervalRecord, Run, event_dict
from relu_doctor.record import window_columns, windows_frame
from relu_doctor.rundir import RunWriter, check_claimable, load_run, read_table
from relu_doctor.runread import logged_at, read_meta
from relu_doctor.training_metrics import metrics_columns, metrics_frame

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable

    import torch.nn as nn

    from relu_doctor.diagnosis import DiagnosisConfig
    from relu_doctor.doctor import Doctor
    from relu_doctor.probes import Probe
    from relu_doctor.reports.tensorboard import RunTensorBoard

__all__ = ["ANNOUNCED", "RunRecording"]

#: The message of a remedy's first change at a site (a ``warnings.filterwarnings`` pattern)
ANNOUNCED = r"relu_doctor: step \d+: \S+ changed the training at "


def merged_ranges(ranges: list[list[int]], gap: int, most: int = 100) -> list[list[int]]:
    """``[first, last]`` step ranges sorted, those ``gap`` steps apart or closer joined (one
    log apart is one stretch), and at most ``most`` of them (the last ones joined)."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    while len(out) > most:
        out[-2:] = [[out[-2][0], out[-1][1]]]
    return out


def _versions() -> dict[str, str]:
    return {
        "relu_doctor": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "pandas": pd.__version__,
        "platform": platform.platform(),
    }


def _model_title(model: object) -> str:
    """The model's class, after the name a Keras model (or any model with a ``name``) was
    given: ``"mlp (Functional)"``, where the class alone says little."""
    cls = type(model).__name__
    name = getattr(model, "name", None)
    return f"{name} ({cls})" if isinstance(name, str) and name and name != cls else cls


def _with_previous(sites: list[dict[str, Any]], previous: list[dict[str, Any]]) -> list[
        dict[str, Any]]:
    """``sites``, then the sites of the run continued that are not among them (ordered
    after them): a site that has not run again in this process is still the run's."""
    names = {d["name"] for d in sites}
    after = max((int(d.get("order", 0)) for d in sites), default=-1) + 1
    rest = [d for d in previous if d["name"] not in names]
    return sites + [{**d, "order": after + i} for i, d in enumerate(rest)]


class RunRecording:
    """The run-record half of :class:`~relu_doctor.doctor.Doctor` (see the module)."""

    if TYPE_CHECKING:  # what it uses of the Doctor (set in Doctor.__init__)
        model: nn.Module
        probe: Probe
        config: DiagnosisConfig
        eval: Doctor | None
        run_dir: Path | None
        resume: bool
        is_writer: bool
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None
        processes: int
        log_every_n_steps: int
        every_n_steps: int | Literal["auto"]
        overhead_budget: float | None
        global_step: int
        window_steps: int
        steps_run: int
        keep_records: int
        _eval_name: str | None
        _writer: RunWriter | None
        _wrote_run_dir: bool
        _tb: RunTensorBoard | None
        _claimed_run_dir: bool
        _announced: set[tuple[str, str]]
        _saved_to: set[str]
        _write_error: str | None
        _meta_dirty: bool
        _meta_unmasked: int
        _previous_sites: list[dict[str, Any]]
        _previous_unwritten: list[list[int]]
        _previous_dropped: int
        _lifetime_since: int | None
        _unloaded_resume: int | None
        _resumed_at: int | None
        _replace_at: int | None
        _warned_other_model: bool
        ended_by: str | None
        resume_advice: str
        _declined: dict[str, set[str]]
        _unwritten: list[list[int]]
        _events_unwritten: list[dict[str, Any]]
        _closed: bool
        _run_id: str | None
        _said_after_close: bool
        _records: deque[IntervalRecord]
        _records_dropped: int
        _events: deque[dict[str, Any]]
        _event_listeners: list[Callable[[dict[str, Any]], None]]

        def _collecting(self) -> bool: ...

        def _read(self, close: bool, *, final: bool = False) -> IntervalRecord | None: ...

    def _open_writer(self) -> None:
        assert self.run_dir is not None
        if not self._claimed_run_dir:
            # Checked once, before anything of ours goes in: when a full disk keeps the
            # writer from opening, the TensorBoard events written meanwhile are this run's
            # and must not make the retry refuse the directory as someone else's.
            check_claimable(self.run_dir)
            self._claimed_run_dir = True
        writer = RunWriter(self.run_dir, resume=self.resume or self._wrote_run_dir, claimed=True,
                           resume_advice=self.resume_advice)
        self._writer, self._wrote_run_dir, self._closed = writer, True, False
        self._run_id = writer.run_id
        if writer.previous_meta is not None and not self._previous_sites:
            self._take_previous_sites(writer.previous_meta)
        self._previous_unwritten = writer.previous_unwritten
        # a run saved by a Doctor without run_dir=, continued here: the logs it no longer
        # held before its save stay missing, and the run's meta still says so
        dropped = (writer.previous_meta or {}).get("records_dropped")
        self._previous_dropped = dropped if isinstance(dropped, int) and dropped > 0 else 0
        since = (writer.previous_meta or {}).get("lifetime_since")
        self._lifetime_since = since if isinstance(since, int) else None
        if writer.last_step is not None and self.global_step == 0 and self._resumed_at is None:
            # resume=True without a checkpoint: go on after its last log, the lifetime
            # counts starting again (load_state_dict, if called next, restores them; an
            # evaluation stream's state saved before its first log holds step 0: loaded)
            self.global_step = writer.last_step
            self._lifetime_since = writer.last_step + 1
            self._unloaded_resume = writer.last_step  # (said at the first log, if still so)
            self.probe.collecting = self._collecting()
        self._continue_after_checkpoint()  # (its unwritten logs carried, later rows dropped)
        self._write_meta()

    def _carry_unwritten(self, since: int) -> None:
        """The logs never written, this process's and those of the run it continued, up to
        ``since``, the step it goes on from (it logs the later ones again; a checkpoint
        loaded later moves it)."""
        ranges = [*self._previous_unwritten, *self._unwritten]
        if not ranges:
            return
        kept = [[a, min(b, since)] for a, b in ranges if a <= since]
        self._unwritten = merged_ranges(kept, self.log_every_n_steps)
        self._save_status()

    def _take_previous_sites(self, previous: Mapping[str, Any]) -> None:
        """A run continued in its directory: the sites it described that this process has
        not made stay in ``meta.json`` (their rows are in its tables), and a model that is
        plainly another (another class, or a site of another width: checked as sites are
        made, :meth:`_check_previous_sites`) is said once: the report would mix
        two models' records."""
        self._previous_sites = [
            d for d in previous.get("sites") or [] if isinstance(d, dict) and "name" in d]
        title = previous.get("model")
        if isinstance(title, str) and title != _model_title(self.model):
            self._warn_other_model(f"a {title}, where this model is a {_model_title(self.model)}")
        self._check_previous_sites()

    def _check_previous_sites(self) -> None:
        if self._warned_other_model or not self._previous_sites:
            return
        now = {s.name: s for s in self.probe.sites()}
        # (by width only: a remedy swapping ReLU for LeakyReLU changes a site's family)
        clash = [str(d["name"]) for d in self._previous_sites
                 if d["name"] in now and d.get("units") != now[d["name"]].units]
        if clash:
            self._warn_other_model(
                f"its site{'s' if len(clash) > 1 else ''} {', '.join(map(repr, clash[:3]))} "
                "of another width")

    def _warn_other_model(self, what: str) -> None:
        if self._warned_other_model:
            return
        self._warned_other_model = True
        warnings.warn(
            f"relu_doctor: run_dir {str(self.run_dir)!r} is continued (resume=True) but holds "
            f"the run of another model ({what}): its record and this one's will be read as "
            "one run. Pass a new run_dir for another model.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _continue_after_checkpoint(self) -> None:
        """Drop what the run directory holds after the restored step (logged after the
        checkpoint, or a partial log of the window the checkpoint keeps open, which is
        logged again when it closes): the resumed run's record equals an uninterrupted one."""
        writer = self._writer
        keep = self._kept_step()
        self._carry_unwritten(keep)
        if writer is None or writer.last_step is None or writer.last_step <= keep:
            return
        try:
            writer.truncate_after(keep)
            self._write_meta()  # (the tables it lists: those left with rows)
        except OSError as e:
            self._write_failed(e)

    def _check_kept_log(self) -> None:
        """At an evaluation stream's load: its log at the training checkpoint's step, where
        its own restored step is earlier, came after the checkpoint and holds the window the
        checkpoint kept open, which is then not restored as open (a review: a checkpoint
        taken mid-evaluation logged those passes again at the next log, a window that never
        was). A log of the resumed run at that step replaces it (a plain loop that evaluates
        again at the step it resumes from: its rows were there twice). The run directory is
        read here, whether or not this process writes it or its writer is open yet (one that
        opened later, at a log, cleared the passes run since: a review)."""
        at = self._resumed_at
        if at is None or self.run_dir is None or self.global_step >= at:
            return
        writer = self._writer
        try:  # (an open writer has dropped the logs after it: its last is that step's)
            kept = (writer.last_step == at if writer is not None
                    else self.run_dir.is_dir() and logged_at(self.run_dir, at))
        except Exception:  # (a damaged directory: its log, if any, is not taken as kept)
            kept = False
        if kept:
            self.probe.clear_windows()
            self._passes_logged = self.probe.passes
            self._replace_at = at

    def _kept_step(self) -> int:
        """The last step whose log a resumed run keeps: the restored step, less one where
        the checkpoint kept its window open (logged again when it closes). An evaluation
        stream's: the training checkpoint's step. Its own is its last log's, and the
        evaluation run after the checkpoint at that step (Lightning's, at a batch's end)
        is not run again on resume: its log was dropped, for good (a Lightning trial)."""
        if self._resumed_at is not None:
            return self._resumed_at
        return self.global_step - (1 if self.steps_run > 0 else 0)

    def _write_failed(self, error: BaseException) -> None:
        """Warn once (cause and path); the writer is dropped and re-opened at a later log."""
        if self._write_error is None:
            self._write_error = f"{type(error).__name__}: {error}"
            if self.run_dir is not None:  # (its TensorBoard file then says nothing more)
                note_write_failure(self.run_dir, error)
            warnings.warn(
                f"relu_doctor: cannot write the run directory {str(self.run_dir)!r} "
                f"({self._write_error}); training goes on, statistics keep accumulating, and "
                "writing is retried at each later log (the report says which steps are "
                "missing).",
                ReluDoctorWarning,
                stacklevel=user_stacklevel(),
            )
        writer = self._writer
        if writer is not None:
            writer.abandon()  # the lock is kept: the next log retries with it
            # (its finding events may be lost with it: the next findings are written at once)
            writer.write_findings_next()

    def _ensure_writer(self) -> RunWriter:
        """The open writer: opened when there is none (at the first log, or after a failed
        open), started again when its directory was removed."""
        if self._writer is not None and not self._writer.in_place():
            self._directory_removed(self._writer)
        if self._writer is None:
            self._open_writer()
            if self._unwritten:
                self._save_status()
        assert self._writer is not None
        return self._writer

    def _directory_removed(self, writer: RunWriter) -> None:
        """The run directory went while written: what it held is lost (noted, for the report),
        and a new one is started at this log, with the warning of a failed write."""
        self._writer = None
        writer.abandon()  # (its lock went with the directory)
        if writer.first_step is not None and writer.last_step is not None:
            self._unwritten = merged_ranges(
                [*self._unwritten, [writer.first_step, writer.last_step]], self.log_every_n_steps
            )
            self._meta_dirty = True
        self._write_failed(FileNotFoundError(
            errno.ENOENT, "the run directory was removed while it was being written; a new one "
            "is started", str(self.run_dir)))

    def _save_status(self) -> None:
        """Record the unwritten steps in place (``status.json``; works on a full disk)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):  # nothing more can be written; warned
                self._writer.write_status({"unwritten": self._unwritten, "error": self._write_error})

    def _note_unwritten(self, step: int) -> None:
        self._unwritten = merged_ranges([*self._unwritten, [step, step]], self.log_every_n_steps)
        self._meta_dirty = True

    def _write_record(self, record: IntervalRecord, events: list[dict[str, Any]]) -> None:
        """Write one log to the run directory; a failure never reaches training. After a
        large log, the C heap's free memory goes back to the system (:mod:`._heap`)."""
        if self.is_writer and self.run_dir is not None:
            self._append_record(record, events)
        heap.after_log(len(record.unit_table))

    def _append_record(self, record: IntervalRecord, events: list[dict[str, Any]]) -> None:
        try:
            writer = self._ensure_writer()
            if self._replace_at is not None:  # (see _check_kept_log)
                at, self._replace_at = self._replace_at, None
                if record.step == at:
                    writer.truncate_after(at - 1)
            if len(self.probe.unmasked) != self._meta_unmasked:
                self._meta_unmasked = len(self.probe.unmasked)  # (new ones: meta.json names)
                self._meta_dirty = True
            if self._meta_dirty:
                self._write_meta()
            writer.append_table("history", record.step, record.site_rows)
            writer.append_table("units", record.step, record.unit_table)
            writer.append_table("layers", record.step, record.layer_table)
            writer.append_table("metrics", record.step, metrics_columns(record))
            writer.append_table("windows", record.step, window_columns(record))
            # events first: a reader meanwhile sees no finding without the event it began with
            self._append_events(writer, events)
            writer.write_findings(record.findings)
        except Exception as e:  # disk full, permissions, a removed directory...
            self._note_unwritten(record.step)
            self._write_failed(e)
            self._save_status()
        except BaseException:  # Ctrl-C midway: the log is said unwritten (in part), and it
            self._note_unwritten(record.step)  # goes on up (the exit writes the meta)
            self._save_status()
            if self._writer is not None:
                self._writer.write_findings_next()
            raise

    def add_metrics(self, record: IntervalRecord, values: Mapping[str, Any]) -> None:
        """Training metrics that a framework reports only after ``record`` was logged (the
        HF Trainer logs its loss right after each of our logs): added to ``record.metrics``,
        the run directory's ``metrics`` table and its TensorBoard files (``train/<name>``)
        at the record's step. Finite numbers only; a name the record holds is kept as it is.
        A failing write warns as any other; training goes on."""
        new = {}
        for name, value in values.items():
            v = finite_or_none(value) if isinstance(value, (int, float)) else None
            if v is not None and str(name) not in record.metrics:
                new[str(name)] = v
        if not new:
            return
        record.metrics.update(new)
        rows = {"step": [record.step] * len(new), "name": list(new), "value": list(new.values())}
        if self.is_writer and self._writer is not None:
            try:
                self._writer.append_table("metrics", record.step, rows)
            except Exception as e:  # disk full...: as a record's write
                self._write_failed(e)
        if self._tb is not None:
            self._tb.write_training(record.step, new)

    def close(self) -> None:
        """Close the run directory (its open segments are compacted, its lock released).
        Reading it back (``history()``, ``to_run()``) still works. Idempotent."""
        if self.eval is not None:
            self.eval.close()
        if self._writer is not None and not self._writer.in_place():
            try:  # removed since the last log: started again, its lost logs named
                self._ensure_writer()
            except Exception as e:
                self._write_failed(e)
        writer, self._writer = self._writer, None
        self._closed = self._wrote_run_dir  # (later events go into its run, _run_id, alone)
        if writer is not None:
            try:
                try:
                    if self._meta_dirty:
                        writer.write_meta(self._meta())
                finally:  # (the findings kept back, the segments: whatever the meta did)
                    writer.close()
            except Exception as e:
                self._write_failed(e)
        if self._write_error is not None and self.run_dir is not None:
            forget_write_failure(self.run_dir)

    def record_event(self, event: Event | Mapping[str, Any]) -> None:
        """Record an event (an :class:`~relu_doctor.events.Intervention` or its result) in
        memory and in the run directory, and tell the event listeners (its dict form)."""
        ev = {"step": self.global_step, **event_dict(event)}
        self._events.append(ev)
        if ev.get("type") == "declined":  # (the next diagnoses advise it there no more)
            self._declined.setdefault(str(ev.get("site")), set()).add(str(ev.get("remedy")))
        if ev.get("type") == "intervention" and self.is_writer:
            self._announce(ev)
        if self._writer is not None:
            try:
                self._append_events(self._writer, [ev])
            except OSError as e:
                self._write_failed(e)
        elif self.is_writer and self.run_dir is not None:
            self._events_unwritten.append(ev)  # written with the next log that reaches disk
            if self._closed:  # none comes: a remedy acting after training (a test's load)
                self._write_events_after_close()
        for fn in self._event_listeners:
            fn(ev)

    def _write_events_after_close(self) -> None:
        """Append the events kept back to the closed run directory, through a writer opened
        for them alone (an undo of a swap at ``trainer.test(ckpt_path=...)``, after ``fit``
        closed the run: it was kept in memory only, and the run directory still said the
        swap was in place). Only while the directory still holds this run: one removed is
        not made again, and another run's is not written into (a review); said once."""
        assert self.run_dir is not None
        try:
            meta = self.run_dir / "meta.json"
            if not meta.is_file() or read_meta(self.run_dir).get("run_id") != self._run_id:
                raise RunDirError(f"{str(self.run_dir)!r} no longer holds this run "
                                  f"({self._run_id!r}): removed, or another run's since")
            writer = RunWriter(self.run_dir, resume=True, claimed=True)
            try:
                self._append_events(writer, [])
            finally:
                writer.close()
        except Exception as e:
            if not self._said_after_close:
                self._said_after_close = True
                warnings.warn(f"relu_doctor: an event after the run closed ({e}) is not "
                              "written to the run directory; it is kept in memory only.",
                              ReluDoctorWarning,
                              stacklevel=user_stacklevel())

    def _append_events(self, writer: RunWriter, events: list[dict[str, Any]]) -> None:
        """Append ``events`` after those a failed write kept back (at most 10,000 kept)."""
        todo = [*self._events_unwritten, *events]
        try:
            writer.append_events(todo)
        except BaseException:
            self._events_unwritten = todo[-10_000:]
            raise
        self._events_unwritten = []

    def _announce(self, ev: Mapping[str, Any]) -> None:
        """A remedy changed the training: say so, once per (remedy, site) and on the writing
        process only. Every change is in the run directory and the report."""
        part = optimizer_of(ev)
        key = (str(ev.get("remedy")),  # (each of several optimizers' clippers is said)
               str(ev.get("site")) + (f" (optimizer {part})" if part is not None else ""))
        if key in self._announced:
            return
        self._announced.add(key)
        warnings.warn(
            f"relu_doctor: step {ev.get('step')}: {key[0]} changed the training at {key[1]}: "
            f"{str(ev.get('what', '')).rstrip('.')}. "
            + ("Its effect is judged at the next log; its" if is_judged(ev) else "Its")
            + " later changes there are recorded in the run directory and the report, not said."
            + (_copies(self.config.loop) if key[0] == "leaky_relu_swap" else ""),
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _meta(self) -> dict[str, Any]:
        return {
            "versions": _versions(),
            "model": _model_title(self.model),
            "device": str(next(iter(self.model.parameters()), torch.empty(0)).device),
            "sites": _with_previous([s.describe() for s in self.probe.sites()],
                                    self._previous_sites),
            "unwritten": [list(r) for r in self._unwritten],
            "stream": self.probe.stream,
            "eval_stream": self._eval_name,
            "config": {
                "log_every_n_steps": self.log_every_n_steps,
                "every_n_steps": self.every_n_steps,
                "overhead_budget": self.overhead_budget,
                **self.config.__dict__,
                **_padding_mask(self.probe.padding_mask),
                **_processes(self.processes, self.all_reduce is not None),
            },
            **({"ended_by": self.ended_by} if self.ended_by else {}),
            **({"unwatched": list(self.probe.unwatched)} if self.probe.unwatched else {}),
            # (sites a padding mask did not fit: they count padding too)
            **({"unmasked_sites": sorted(self.probe.unmasked_names())}
               if self.probe.unmasked else {}),
            **({"records_dropped": self._previous_dropped} if self._previous_dropped else {}),
            **({"lifetime_since": self._lifetime_since} if self._lifetime_since else {}),
        }

    def _write_meta(self) -> None:
        if self._writer is not None:
            self._writer.write_meta(self._meta())
            self._meta_dirty = False

    def _on_disk(self) -> bool:
        """Whether the run directory holds the record (``history()`` reads it back)."""
        return self._wrote_run_dir and self.run_dir is not None

    def history(self) -> pd.DataFrame:
        """Every logged (step, site) row so far: read back from the run directory, or
        without one the rows of the last ``keep_records`` logs."""
        if self._on_disk():
            assert self.run_dir is not None
            return read_table(self.run_dir, "history")
        if not self._records:
            return pd.DataFrame()
        return pd.DataFrame([r for rec in self._records for r in rec.site_rows])

    def to_run(self) -> Run:
        """The run record: read back from the run directory, or without one built from the
        last ``keep_records`` logs (the current window when nothing was logged)."""
        run_dir = self.run_dir
        if self._on_disk() and run_dir is not None and self._records and (
            (run_dir / "meta.json").is_file()
        ):
            if self._writer is not None:  # (the last log's findings, if kept back)
                try:
                    self._writer.flush_findings()
                except OSError as e:
                    self._write_failed(e)
            return load_run(run_dir)
        records = list(self._records)
        events = list(self._events)
        if not records:
            read = self._read(close=False) if self.probe.sites() else None
            if read is not None:
                records = [read]
                events += [e.to_dict() for e in read.finding_events]

        def cat(frames: list[pd.DataFrame]) -> pd.DataFrame:
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

        return Run(
            meta={"format_version": FORMAT_VERSION, **self._meta(),
                  "records_dropped": self._previous_dropped + self._records_dropped},
            history=pd.DataFrame([r for rec in records for r in rec.site_rows]),
            units=cat([r.unit_table for r in records]),
            layers=cat([r.layer_table for r in records]),
            events=events,
            last_findings=list(records[-1].findings) if records else [],
            tables={"metrics": cat([metrics_frame(r) for r in records if r.metrics]),
                    "windows": cat([windows_frame(r) for r in records])},
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write everything recorded so far as a run directory at ``path``.

        A directory this Doctor saved before is written over. One that holds another run is
        refused, unless ``overwrite``: then that run goes, its TensorBoard event files and
        ``report.html`` with it (they would show it under this run's record).

        Raises:
            ReluDoctorError: ``path`` is not a path.
            RunDirError: the directory cannot be written (the message names the path and the
                OS's reason; the ``OSError`` is its ``__cause__``), holds another run
                (without ``overwrite``), or holds something else.
        """
        check_path("path", path)
        overwrite = flag("overwrite", overwrite)
        p = Path(path)
        key = str(p.resolve())
        if self.run_dir is not None and key == str(Path(self.run_dir).resolve()):
            raise RunDirError(
                f"path: {str(p)!r} is this Doctor's own run directory, which it writes as it "
                "goes: it holds this run already. Pass another directory to save a copy."
            )
        check_claimable(p, "path")
        old = read_meta(p) if (p / "meta.json").is_file() else None
        if old is not None and key not in self._saved_to:
            if not overwrite:
                raise RunDirError(
                    f"path: {str(p)!r} already holds run {old.get('run_id', '(unnamed)')!r}, "
                    "which this Doctor did not save; pass a new directory, or overwrite=True "
                    "to replace that run."
                )
            for stale in [*p.glob("events.out.tfevents.*"), p / "report.html"]:
                stale.unlink(missing_ok=True)
        run = self.to_run()
        try:
            writer = RunWriter(path, replace=True)
            try:
                writer.write_meta(
                    {k: v for k, v in run.meta.items() if k not in ("format_version", "run_id")}
                )
                frames = {"history": run.history, "units": run.units, "layers": run.layers,
                          **run.tables}
                for name, frame in frames.items():
                    if not frame.empty:
                        writer.append_table(name, int(frame["step"].max()), frame)
                writer.append_events(run.events)
                writer.write_findings(run.findings())
            finally:
                writer.close()
            self._saved_to.add(key)
        except OSError as e:  # an explicit call: an error, unlike a write during training
            raise RunDirError(
                f"path: cannot write the run directory {str(path)!r} ({e.strerror or e}); "
                "pass a directory that can be created and written."
            ) from e
        dropped = self._records_dropped  # this process's (a continued run's: its report says)
        if dropped:  # (said by the report too)
            warnings.warn(
                f"relu_doctor: {str(path)!r} holds the latest {len(self._records)} logs, "
                f"not the {dropped} before them: a Doctor that writes no run directory keeps "
                f"only its latest keep_records={self.keep_records} logs in memory. "
                + ("Pass watch(..., run_dir=...) to keep every log, or a larger keep_records=."
                   if self.run_dir is None else
                   "Save from the process that writes its run directory (is_writer=True), "
                   "or pass a larger keep_records="),
                ReluDoctorWarning,
                stacklevel=user_stacklevel(),
            )
        return Path(path)


def _copies(loop: str) -> str:
    """What a swap's announcement says of copies of the model made before it."""
    if loop == "keras":
        return (" A copy of the model made before it (keras.models.clone_model) keeps the old "
                "activation, which set_weights does not change: clone it anew.")
    return (" A copy of the model made before it (an EMA, a DQN's target network) keeps the "
            "old activation, which load_state_dict does not change (and a PReLU's slopes are "
            "keys it lacks): make such copies anew (copy.deepcopy(model)), or swap them too: "
            "ActivationSwapper(copy).load_state_dict(state), with state the swapping remedy's "
            "state_dict() (an AveragedModel's copy is its .module).")


def _processes(n: int, summed: bool) -> dict[str, Any]:
    """The run configuration's processes, where torch.distributed ran ``n`` (> 1) as the
    Doctor was made: how many, and whether the statistics are summed across them
    (``all_reduce=``) or this process's own."""
    return {"processes": n, "statistics": "summed across the processes" if summed
            else "this process's own batches alone"} if n > 1 else {}


def _padding_mask(how: Any) -> dict[str, str]:
    """The run configuration's ``padding_mask``: the keyword argument's name, or that a
    function reads it; nothing where no mask is read."""
    if how is None:
        return {}
    return {"padding_mask": how if isinstance(how, str) else
            f"function {getattr(how, '__qualname__', type(how).__name__)}"}
