"""The run directory on disk and its writer (:class:`RunWriter`, one per directory, held by
a lock); it is read back by :mod:`relu_doctor.runread` (:func:`load_run`, re-exported here).

Format 3 (formats 1 and 2 are still read)::

    meta.json            format version, run id, versions, sites, configuration, and the
                         steps whose records could not be written (replaced atomically)
    findings.json        the findings of a recent logged step (replaced atomically, at
                         most every ``FINDINGS_EVERY_S`` seconds and at close; a reader
                         brings it up to the last log from events.jsonl)
    events.jsonl         findings when they begin, change severity or end; interventions
                         and their results: one JSON object a line (appended)
    <table>/seg-N.arrows the open segment of a table: an Arrow IPC stream, one record batch
                         per log, flushed at each log; readable while written, and read up
                         to its last complete batch when the writer died mid-batch
    <table>/seg-N.parquet a closed segment, compacted from its stream when it reached
                         ``rotate_rows`` rows or ``rotate_bytes`` bytes, or at close
    .lock                the writer's run id, process id and host
    status.json          the steps whose records could not be written: a file reserved at
                         open and rewritten in place, so it can be updated on a full disk

Tables: ``history`` (step, site), ``units`` (step, site, unit), ``layers`` (step, layer),
``metrics`` (step, name, value) and any other lower-case name. A long run is a handful of
files per table. Every file read back is checked (JSON shape, columns, types); a damaged
file or line is skipped with a :class:`~relu_doctor.errors.ReluDoctorWarning` that names it,
and recorded in :attr:`Run.problems`; what cannot be read at all raises a one-line
:class:`~relu_doctor.errors.RunDirError`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from relu_doctor.diagnosis import Finding
from relu_doctor.errors import RunDirError
from relu_doctor.events import Event
from relu_doctor.history import FORMAT_VERSION, clean_json, event_dict, json_text
from relu_doctor.runread import (
    _HELD,
    LOCK_NAME,
    LOGGED_TABLES,
    STATUS_NAME,
    TABLE_COLUMNS,
    TABLE_NAME,
    StreamChunks,
    TableParts,
    _pid_alive,
    last_step,
    load_run,
    open_writer_state,
    process_token,
    read_meta,
    read_status,
    read_stream,
    read_table,
    segments,
    table_folders,
    warn_problem,
)
from relu_doctor.stats import group_size

__all__ = [
    "FINDINGS_EVERY_S", "LOCK_NAME", "STATUS_NAME", "TABLE_COLUMNS", "RunWriter", "atomic_write_bytes",
    "check_claimable", "fresh_dir", "load_run", "open_writer_state", "read_table",
]

#: ``findings.json`` is rewritten at most this often (seconds, the host's monotonic clock)
#: while both the findings it holds and the new ones are not empty; at once otherwise, and
#: at close or the interpreter's exit. Each finding that begins, changes severity or ends
#: is an event, appended at every log: a reader applies those after the step it holds
#: (:func:`relu_doctor.runread.load_run`), so a run killed meanwhile loses no finding, only
#: the latest numbers of the unchanged ones. (A 256-site model with ~700 findings wrote
#: half a megabyte of JSON at every log: ~8 ms of a ~65 ms step.)
FINDINGS_EVERY_S = 5.0

_ROW_GROUP = 64 * 1024  # rows per Parquet row group (at least) when a stream is compacted
_STATUS_BYTES = 4096


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to a fresh temporary name beside ``path``, fsync, then rename.

    The temporary file is opened like any new file (mode 0666 less the umask), so a run
    directory or report stays readable by whoever it is shared with. ``fsync=False`` keeps
    the rename's protection against a killed process, not against a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- the lock
def _acquire_lock(path: Path, run_id: str) -> Path:
    """Create ``path/.lock`` for this process, taking over a stale one (dead process)."""
    lock = path / LOCK_NAME
    host = socket.gethostname()
    body = json.dumps({"run_id": run_id, "pid": os.getpid(), "host": host,
                       "started": process_token(os.getpid())}).encode()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text(encoding="utf-8"))
                if not isinstance(held, dict):
                    raise ValueError("not a JSON object")
                pid, other_host = int(held.get("pid", -1)), str(held.get("host") or host)
            except (OSError, ValueError, TypeError, UnicodeDecodeError):
                with contextlib.suppress(OSError):  # (gone meanwhile: the next try takes it)
                    if time.time() - lock.stat().st_mtime < 1.0:
                        time.sleep(0.2)  # another writer may be writing it now: read again
                        continue
                pid, other_host, held = -1, host, {}  # cannot be read: its writer is gone
            token = held.get("started")  # tells the writer from a later process of its pid
            same_process = pid == os.getpid() and other_host == host
            live = not held.get("exited") and (
                str(lock.resolve()) in _HELD if same_process
                else other_host != host or _pid_alive(pid, token)
            )
            if live:
                where = f"process {pid} on {other_host}" if other_host != host else f"process {pid}"
                raise RunDirError(
                    f"run_dir: {str(path)!r} is being written by another writer ({where}, "
                    f"run {held.get('run_id')!r}); two writers would mix their records. Use "
                    f"another directory, or stop that writer (if it is gone, delete "
                    f"{str(lock)!r})."
                ) from None
            left_by = (f"left by process {pid} (run {held.get('run_id')!r}), which is no longer "
                       "running" if held else "that cannot be read (its writer stopped while "
                       "taking it)")
            warn_problem(None, f"relu_doctor: run_dir {str(path)!r}: taking over the lock {left_by}.")
            lock.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
        except BaseException:  # a full disk: no empty lock left to refuse the next try
            lock.unlink(missing_ok=True)
            raise
        _HELD.add(str(lock.resolve()))
        return lock
    raise RunDirError(f"run_dir: cannot take the lock {str(lock)!r} (it keeps coming back).")


def _release_lock(lock: Path, key: str, run_id: str, *, exited: bool = False) -> None:
    """Remove the lock this process holds; ``exited``: the interpreter exits with the run
    still open (an uncaught error, a loop that never closed its watch), so the lock stays,
    marked, and a reader says so (:func:`~relu_doctor.runread.open_writer_state`)."""
    _HELD.discard(key)
    with contextlib.suppress(OSError, ValueError):
        held = json.loads(lock.read_text(encoding="utf-8"))
        # ours: this run's, and this process's (not a forked child's exit)
        if isinstance(held, dict) and held.get("run_id") == run_id and held.get("pid") == os.getpid():
            if exited:
                atomic_write_bytes(lock, json.dumps({**held, "exited": True}).encode())
            else:
                lock.unlink()


# ---------------------------------------------------------------------- segments
def _by_schema(frame: pd.DataFrame, seg: _Segment | None) -> pa.Table | None:
    """``frame`` as the open segment's schema has it, column by column, with no type
    inference (``Table.from_pandas`` spends milliseconds on the pandas metadata of a frame of
    a few rows); None where it does not fit that schema (no segment open, other columns, a
    value of another type), for the general path. A column that pandas holds in Arrow (its
    strings, in pandas 3) goes over as it is held: its ``to_numpy()``, a Python object per
    row, cost a unit table of 16k rows a millisecond. The others go as numpy arrays, which
    Arrow takes faster than their Series."""
    if seg is None or list(frame.columns) != seg.schema.names:
        return None
    try:
        arrays = []
        for (_, col), f in zip(frame.items(), seg.schema, strict=True):
            held = col.array
            arrays.append(pa.array(
                held if hasattr(held, "__arrow_array__") else col.to_numpy(),
                type=f.type, from_pandas=True,
            ))
        return pa.Table.from_arrays(arrays, schema=seg.schema)
    except (pa.ArrowException, ValueError, TypeError):
        return None


def _rows_by_schema(rows: Sequence[Mapping[str, Any]], seg: _Segment | None) -> pa.Table | None:
    """``rows`` (dicts, one a row) as the open segment's schema has them, converted by Arrow
    from the dicts themselves (pandas' DataFrame of a list of dicts cost a 256-site model's
    history 2.4 ms a log, a 2-site one's 1 ms; this 0.55 and 0.13); None where they do not
    fit it (no segment open, other keys, a value of another type), for the general path.
    A NaN stays NaN where pandas' path makes it null: both read back as NaN."""
    if seg is None or not rows:
        return None
    keys = rows[0].keys()
    if keys != set(seg.schema.names) or any(r.keys() != keys for r in rows):
        return None
    try:
        return pa.Table.from_pylist(list(rows), schema=seg.schema)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return None


def _as_table(
    frame: pd.DataFrame | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    seg: _Segment | None,
) -> pa.Table | None:
    """``frame`` (as :meth:`RunWriter.append_table` takes it) as an Arrow table, as the
    open segment ``seg`` has its columns where it can; None where it holds no row."""
    if isinstance(frame, Mapping):  # its columns
        data = pa.table({str(k): list(v) for k, v in frame.items()})
        return data if data.num_rows else None
    if not isinstance(frame, pd.DataFrame):  # its rows
        data = _rows_by_schema(frame, seg)
        if data is not None:
            return data
        frame = pd.DataFrame(list(frame))
    if frame.empty:
        return None
    data = _by_schema(frame, seg)
    if data is None:
        data = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    return data


class _Segment:
    """One open Arrow IPC stream of a table: one record batch per append, flushed."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self._file = open(path, "xb")  # noqa: SIM115 - closed in close()
        try:
            self._writer = ipc.new_stream(self._file, schema)
        except BaseException:
            with contextlib.suppress(OSError):
                self._file.close()
            path.unlink(missing_ok=True)  # (no batch in it: no torn file left)
            raise
        self._good = 0  # where its last complete batch ends

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self._file.flush()
        self.rows += table.num_rows
        self._good = self._file.tell()

    @property
    def nbytes(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        try:
            self._writer.close()
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abandon(self) -> None:
        """Close after a failed write, ignoring errors, and cut the stream back to its last
        complete batch (a truncation needs no free space), or remove it when it holds none
        (the schema goes out with the first batch): what relu_doctor itself left is not read
        back as a damaged file."""
        cut = ((lambda: os.truncate(self.path, self._good)) if self.rows
               else (lambda: self.path.unlink(missing_ok=True)))
        for fn in (self._writer.close, self._file.close, cut):
            with contextlib.suppress(Exception):  # the write already failed, was reported
                fn()


def _compact(stream: Path) -> bool:
    """Rewrite a closed (or torn) stream as a Parquet file of the same segment number,
    a row group at a time: memory stays that of one row group (its log batches folded into
    a few contiguous tables as they are read), not of the segment, and what Arrow's
    allocator kept of it is handed back to the system afterwards (a 20,000-log run's exit
    grew by ~300 MB without both). Returns whether its tail was cut short (and dropped)."""
    out = stream.with_suffix(".parquet")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(stream, "rb") as f:
            chunks = StreamChunks(f)  # a torn tail: the complete batches are kept
            with pq.ParquetWriter(tmp, chunks.schema, write_page_checksum=True) as writer:
                group: list[pa.Table] = []
                rows = 0
                for table in chunks:
                    group.append(table)
                    rows += table.num_rows
                    if rows >= _ROW_GROUP:
                        writer.write_table(pa.concat_tables(group))
                        group, rows = [], 0
                if group:
                    writer.write_table(pa.concat_tables(group))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        pa.default_memory_pool().release_unused()
    if chunks.torn:  # (kept as it was: damage mid-file, not a torn tail, loses more)
        os.replace(stream, damaged_copy(stream))
    else:
        stream.unlink()
    return chunks.torn


def damaged_copy(stream: Path) -> Path:
    """Where a stream cut short is kept as it was once compacted: beside its Parquet
    file, under a name no reader takes for a part (``seg-000001.arrows.damaged``)."""
    return stream.with_name(stream.name + ".damaged")


def fresh_dir(base: Path) -> Path:
    """``base`` when it does not exist or is empty, else the first free ``base_1``,
    ``base_2``... (a default run directory never collides with an earlier run)."""
    path, n = base, 0
    while path.exists() and (not path.is_dir() or any(path.iterdir())):
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


def check_claimable(path: Path, arg: str = "run_dir") -> None:
    """Refuse ``path`` as a run directory if it is not one: a file, or a folder that holds
    other things and no ``meta.json``. A new or empty folder, or a run, passes. ``arg`` is
    the argument the message names.

    Raises:
        RunDirError: naming what it holds.
    """
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{arg}: {str(path)!r} exists and is not a directory.")
    # (a lock alone is a writer's that stopped before its first write: judged live or
    # stale when the writer takes it)
    held = [x.name for x in path.iterdir() if x.name != LOCK_NAME] if path.is_dir() else []
    if held and not (path / "meta.json").is_file():
        names = sorted(held)[:5]
        raise RunDirError(
            f"{arg}: {str(path)!r} is not empty and is not a relu_doctor run "
            f"directory (it holds {names}); pass a new or empty directory."
        )


#: what a refused directory holding a run tells a ``watch()`` or ``Doctor`` user to do
RESUME_ADVICE = "pass resume=True to continue it, or a new directory"


class RunWriter:
    """Writes a run directory incrementally; one writer per directory. Create it on rank
    zero only, and :meth:`close` it when done (the lock is also released when it is garbage
    collected or the interpreter exits).

    Args:
        path: the directory (created if missing).
        resume: continue the run already in ``path`` (it must be in the current format). Without it, a
            directory that holds a run is refused, so two runs never mix.
        replace: remove the run already in ``path`` first (``doc.save()``).
        claimed: the caller passed ``path`` through :func:`check_claimable` before anything of
            its own went in (a Doctor's TensorBoard events, written while a full disk kept
            this writer from opening): what it holds now is not someone else's.
        rotate_rows: close a table's segment (compacting it to Parquet) at this many rows.
        rotate_bytes: ... or at this many bytes of its stream.
        resume_advice: what the refusal of a directory holding a run tells its caller to
            do, in the words of the entry point that made this writer (a callback continues
            a run from its framework's checkpoint, not with ``resume=True``).

    Raises:
        RunDirError: ``path`` is not a directory, is foreign, holds a run and neither
            ``resume`` nor ``replace`` was given, or another live writer holds its lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resume: bool = False,
        replace: bool = False,
        claimed: bool = False,
        rotate_rows: int = 4_000_000,
        rotate_bytes: int = 256 * 2**20,
        resume_advice: str = RESUME_ADVICE,
    ) -> None:
        self.path = p = Path(path)
        self.rotate_rows, self.rotate_bytes = rotate_rows, rotate_bytes
        if not claimed:
            check_claimable(p)
        meta_path = p / "meta.json"
        old = read_meta(p) if meta_path.is_file() else None
        #: the meta.json of the run this writer continues (``resume``), else None
        self.previous_meta: dict[str, Any] | None = old if resume and not replace else None
        p.mkdir(parents=True, exist_ok=True)
        self.run_id = uuid.uuid4().hex[:12]
        if old is not None and not replace:
            if not resume:
                held = open_writer_state(p)
                raise RunDirError(
                    f"run_dir: {str(p)!r} already holds run {old.get('run_id', '(unnamed)')!r}"
                    + (f", and {held.why}; " + (
                        f"under torch.distributed ({n} processes) one process writes: pass "
                        "is_writer=(rank == 0) to watch on each, with all_reduce= and "
                        f"world_size={n} (the README's 'Distributed' section)."
                        if (n := group_size()) > 1 else "pass a new directory.")
                       if held.writing else
                       f"; {resume_advice} (two runs in one directory would mix their records).")
                )
            if old.get("format_version") != FORMAT_VERSION:
                raise RunDirError(
                    f"run_dir: {str(p)!r} was written in format {old.get('format_version')!r}; "
                    f"a run can be resumed in format {FORMAT_VERSION} only: use a new directory."
                )
            self.run_id = str(old.get("run_id") or self.run_id)
        self._lock = _acquire_lock(p, self.run_id)
        self._finalizer = weakref.finalize(
            self, _release_lock, self._lock, str(self._lock.resolve()), self.run_id
        )
        self._finalizer.atexit = False  # at exit, _exiting() marks the lock instead
        _OPEN.add(self)
        self._segs: dict[str, _Segment] = {}
        self._findings: bytes | None = None  # what findings.json holds, as last written
        self._findings_at = 0.0  # when (time.monotonic())
        self._findings_step = -1  # the latest step it holds findings of
        self._pid = os.getpid()  # (a forked child's exit writes none of its parent's)
        self._pending: tuple[Finding, ...] | None = None  # findings not written yet
        self._meta: dict[str, Any] | None = None  # as last written (without what is added)
        #: the tables that hold rows (a run continued: those it held), listed in meta.json
        self._tables: set[str] = (
            set() if old is None or replace else
            {str(t) for t in old.get("tables", [])} | table_folders(p))
        self._next: dict[str, int] = {}
        for tmp in [*p.glob(".*.tmp"), *p.glob("*/.*.tmp")]:  # left by killed writes
            tmp.unlink(missing_ok=True)
        if replace and old is not None:
            for f in ("meta.json", "findings.json", "events.jsonl"):
                (p / f).unlink(missing_ok=True)
            for folder in p.iterdir():
                for _, part in segments(folder):
                    part.unlink()
        torn: list[Path] = []
        for folder in p.iterdir():  # streams of a writer that died: compact them
            for _, part in segments(folder):
                if part.suffix == ".arrows":
                    try:
                        if _compact(part):
                            torn.append(part)
                    except (OSError, pa.ArrowException) as e:
                        warn_problem(None, f"relu_doctor: cannot compact {str(part)!r} ({e}); it is "
                              "still read as it is.")
        self.last_step = last_step(p) if old is not None and resume else None
        #: the first step this directory holds a log of (1 for a run it continues)
        self.first_step: int | None = 1 if self.last_step is not None else None
        self._status = p / STATUS_NAME
        #: the step ranges the run continued never wrote (its status.json), for a resume
        self.previous_unwritten: list[list[int]] = (
            _read_unwritten(self._status) if self.previous_meta is not None else [])
        if self.previous_meta is not None:
            lost = _cut_short(p, torn)  # (one range: a stream loses all past its damage)
            self.previous_unwritten += [[lost[0], lost[-1]]] if lost else []
        # events.jsonl's last line cut short (a process killed mid-write, a run continued in
        # a copy): ended at the first append, so that readers skip that one line, not the
        # first event appended with it (this writer's own appends end whole or are cut back)
        events = p / "events.jsonl"
        self._events_cut = events.is_file() and events.stat().st_size > 0 and (
            _last_byte(events) != b"\n")
        if not self._status.is_file() or self._status.stat().st_size < _STATUS_BYTES:
            atomic_write_bytes(self._status, b"{}".ljust(_STATUS_BYTES))

    def write_status(self, status: Mapping[str, Any]) -> None:
        """Rewrite ``status.json`` in place (no new disk blocks: it works on a full disk)."""
        data = json_text(status).encode()
        if len(data) > _STATUS_BYTES:
            raise ValueError(f"status: {len(data)} bytes, at most {_STATUS_BYTES}")
        fd = os.open(self._status, os.O_WRONLY)
        try:
            os.pwrite(fd, data.ljust(_STATUS_BYTES), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def in_place(self) -> bool:
        """Whether the directory it writes is still there: its lock is (one ``stat``). A
        directory removed while written (``rm -rf``, a cleanup job) takes the lock with it,
        and open segments would go on writing to files no longer in any directory."""
        return self._lock.exists()

    def abandon(self) -> None:
        """After a failed write: drop the open segments (each is read up to its last
        complete batch); the next append starts new ones."""
        segs, self._segs = self._segs, {}
        for seg in segs.values():
            seg.abandon()

    # ------------------------------------------------------------------ writing
    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace ``meta.json`` atomically (``format_version``, ``run_id`` and ``tables``,
        the tables written so far, are added: a reader then knows a missing one is lost)."""
        self._meta = dict(meta)
        data = {"format_version": FORMAT_VERSION, "run_id": self.run_id, **clean_json(meta),
                "tables": sorted(self._tables)}
        atomic_write_bytes(self.path / "meta.json", json.dumps(data, indent=2).encode())

    def append_table(
        self,
        table: str,
        step: int,
        frame: pd.DataFrame | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    ) -> None:
        """Append ``frame`` (the rows of ``step``) to ``table`` as one record batch.

        Any lower-case table name is accepted (``history``, ``units``, ``layers``,
        ``metrics`` ...). ``frame`` is a DataFrame, its columns ``{name: values}`` (a few
        rows go to Arrow without pandas, about 0.3 ms less), or its rows as a list of dicts
        (Arrow reads them where they fit the open segment: :func:`_rows_by_schema`). A
        frame whose columns or types differ from the open segment's starts a new segment.
        """
        if not isinstance(table, str) or not TABLE_NAME.fullmatch(table):
            raise ValueError(f"table: expected a lower-case name like 'metrics', got {table!r}")
        seg = self._segs.get(table)
        data = _as_table(frame, seg)
        if data is None:
            return
        if seg is not None and not seg.schema.equals(data.schema):
            try:
                data = data.cast(seg.schema)
            except (pa.ArrowException, ValueError):
                self._close_segment(table)
                seg = None
        if seg is None:
            folder = self.path / table
            folder.mkdir(exist_ok=True)
            if table not in self._next:
                found = segments(folder)
                self._next[table] = found[-1][0] + 1 if found else 1
            n = self._next[table]
            self._next[table] = n + 1
            seg = self._segs[table] = _Segment(folder / f"seg-{n:06d}.arrows", data.schema)
        try:
            seg.write(data)
        except BaseException:
            self._segs.pop(table, None)
            seg.abandon()
            raise
        if table not in self._tables:  # its first rows: meta.json says the table exists
            self._tables.add(table)
            if self._meta is not None:
                self.write_meta(self._meta)
        if table in LOGGED_TABLES:
            self.last_step = step if self.last_step is None else max(self.last_step, step)
            self.first_step = step if self.first_step is None else self.first_step
        if seg.rows >= self.rotate_rows or seg.nbytes >= self.rotate_bytes:
            self._close_segment(table)

    def _close_segment(self, table: str) -> None:
        seg = self._segs.pop(table, None)
        if seg is None:
            return
        try:
            seg.close()
        except BaseException:
            seg.abandon()
            raise
        _compact(seg.path)

    def write_findings(self, findings: Iterable[Finding]) -> None:
        """Replace ``findings.json`` (the findings of the last logged step) atomically; within
        ``FINDINGS_EVERY_S`` of the last write, where neither it nor ``findings`` is empty
        and they are of a later step than it holds, they are kept for the next write
        (:meth:`flush_findings`, done at :meth:`close`). A reader brings the file up from
        the events after its step, so a second log at the step it holds (two evaluations
        at one training step) is written at once."""
        held = tuple(findings)
        if (held and self._findings is not None and self._findings != b"[]\n"
                and max(f.step for f in held) > self._findings_step
                and time.monotonic() - self._findings_at < FINDINGS_EVERY_S
                and (self.path / "findings.json").is_file()):  # (made again at once)
            self._pending = held
            return
        self._pending = None
        self._replace_findings(held)

    def write_findings_next(self) -> None:
        """Write the next findings at once: a log failed to write, and the finding events
        it held with it, which a reader of a file older than it could not apply."""
        self._findings = None

    def flush_findings(self) -> None:
        """Write the findings :meth:`write_findings` kept back, if any (not in a forked
        child: they are its parent's to write)."""
        if self._pending is not None and os.getpid() == self._pid:
            held, self._pending = self._pending, None
            self._replace_findings(held)

    def _replace_findings(self, findings: tuple[Finding, ...]) -> None:
        # One finding a line: json's indented output is written by its Python encoder, which
        # cost a log of 725 findings tens of milliseconds.
        text = ",\n".join(json_text(f.to_dict(copy=False)) for f in findings)
        data = f"[\n{text}\n]\n".encode() if text else b"[]\n"
        path = self.path / "findings.json"
        self._findings_at = time.monotonic()
        self._findings_step = max((f.step for f in findings), default=-1)
        if data == self._findings and path.is_file():  # (no findings, log after log)
            return
        # Replaced at every write: no fsync (a killed process still leaves the old or new).
        atomic_write_bytes(path, data, fsync=False)
        self._findings = data

    def append_events(self, events: Iterable[Event | Mapping[str, Any]]) -> None:
        """Append events to ``events.jsonl``, one whole line each, flushed to disk; a write
        that fails (a full disk) is cut back, so that no half line is left for the next."""
        lines = "".join(json_text(event_dict(e)) + "\n" for e in events)
        if not lines:
            return
        path = self.path / "events.jsonl"
        start = path.stat().st_size if path.is_file() else 0
        if self._events_cut and start:
            lines = "\n" + lines
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            self._events_cut = False
        except BaseException:
            with contextlib.suppress(OSError):
                os.truncate(path, start)
            raise

    def truncate_after(self, step: int) -> None:
        """Drop every row and event logged after ``step`` (a run resumed from a checkpoint
        older than its last log continues from the checkpoint)."""
        for table in list(self._segs):
            self._close_segment(table)
        for folder in self.path.iterdir():
            for _, part in segments(folder):
                try:
                    data = (pq.read_table(part, page_checksum_verification=True)
                            if part.suffix == ".parquet" else read_stream(part)[0])
                except (OSError, pa.ArrowException, ValueError) as e:  # a damaged part
                    warn_problem(None, f"relu_doctor: cannot read {str(part)!r} to drop its rows "
                                 f"after step {step} ({' '.join(str(e).split())[:160]}); it is "
                                 "left as it is (readers skip it).")
                    continue
                if "step" not in data.column_names:
                    continue
                keep = data.filter(pa.compute.less_equal(data["step"], step))
                if keep.num_rows == data.num_rows:
                    continue
                if keep.num_rows == 0:
                    part.unlink()
                    continue
                buf = pa.BufferOutputStream()
                pq.write_table(keep, buf, write_page_checksum=True)
                atomic_write_bytes(part.with_suffix(".parquet"), buf.getvalue().to_pybytes())
                if part.suffix != ".parquet":
                    part.unlink()
        ev = self.path / "events.jsonl"
        if ev.is_file():
            kept = [
                line for line in ev.read_bytes().splitlines(keepends=True)
                if _event_step(line) <= step
            ]
            atomic_write_bytes(ev, b"".join(kept))
        self._pending, self._findings = None, None  # (its next findings: written at once)
        # a table left with no part holds no row now: meta.json (rewritten by the caller)
        # must not say it lost them
        self._tables &= table_folders(self.path) | set(self._segs)
        self.last_step = step

    def close(self) -> None:
        """Write the findings kept back, close every open segment (compacting it to Parquet)
        and release the lock."""
        _OPEN.discard(self)
        try:
            try:
                self.flush_findings()
            finally:  # (a full disk: the segments are still closed)
                for table in list(self._segs):
                    self._close_segment(table)
        except BaseException:
            self.abandon()  # the others too: no file left open to the garbage collector
            raise
        finally:
            self._finalizer()


_OPEN: weakref.WeakSet[RunWriter] = weakref.WeakSet()  # writers not closed yet


@atexit.register
def _exiting() -> None:
    """The interpreter exits with writers still open: the findings each kept back are
    written, and each lock stays, marked ``exited``, where it was removed and the run read
    as closed; what was written stays readable."""
    for w in list(_OPEN):
        with contextlib.suppress(Exception):  # what can be written is (a full disk: not)
            if w.in_place():  # (a directory removed meanwhile is not made again)
                w.flush_findings()
        if w._finalizer.alive:
            args = w._finalizer.detach()
            if args is not None:
                _release_lock(*args[2], exited=True)


def _cut_short(p: Path, torn: list[Path]) -> list[int]:
    """The log lost from the streams in ``torn``, cut short by a writer that stopped
    mid-write (their complete batches kept), said once each: the latest step the other
    logged tables hold, where it is past the last the stream kept (a writer dies writing its
    latest log; a table written at some logs only, as the metrics, holds no row for the
    others). The report then lists it as written in part. Reads the ``step`` column only."""
    if not torn:
        return []
    names = {*LOGGED_TABLES, *(s.parent.name for s in torn)}
    steps = {t: TableParts(p / t, problems=[]).read(columns=["step"]) for t in names}
    held = {t: {int(x) for x in df["step"]} if "step" in df else set() for t, df in steps.items()}
    lost: set[int] = set()
    for part in torn:
        table = part.parent.name
        kept = max(held.get(table) or {0})
        # the logs the other tables hold past the last this one kept: all of them for a
        # table written at every log (it held each before: damaged mid-file, a resume
        # compacting it said "step 150 lost" where 15 of its 30 logs were), the latest for
        # one written at some logs (metrics: its writer died writing its latest log)
        others = {x for t, xs in held.items() if t != table for x in xs}
        past = sorted(x for x in others if x > kept)
        before = {x for x in others if x <= kept}
        every_log = len(before) > 1 and before <= (held.get(table) or set())
        gone = past if every_log else past[-1:]
        lost.update(gone)
        said = ("" if not gone else f"its rows of step {gone[0]} are lost" if len(gone) == 1
                else f"its rows of {len(gone)} logs, steps {gone[0]} to {gone[-1]}, are lost")
        warn_problem(None, f"relu_doctor: {str(part)!r} was cut short (its writer stopped "
                     "mid-write, or the file was damaged): its complete logs "
                     f"{'up to step ' + str(kept) + ' ' if kept else ''}are kept"
                     + (f"; {said}, and the report lists them as written in part" if gone
                        else "")
                     + f"; the file as it was is kept as {damaged_copy(part).name!r}.")
    return sorted(lost)


def _read_unwritten(status: Path) -> list[list[int]]:
    """The ``unwritten`` step ranges of a ``status.json`` ([] when it has none, or cannot
    be read: the reader says why)."""
    try:
        return read_status(status)[0]
    except (OSError, ValueError):
        return []


def _event_step(line: bytes) -> int:
    try:
        step = json.loads(line).get("step", 0)
        return int(step) if isinstance(step, int) else 0
    except (ValueError, AttributeError):
        return 0


def _last_byte(path: Path) -> bytes:
    """The last byte of the file at ``path`` (b"" where it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1)
    except OSError:
        return b""
