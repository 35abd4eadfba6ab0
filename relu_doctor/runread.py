"""Reading a run directory back (:func:`load_run`, :func:`read_table`; the format is
described in :mod:`relu_doctor.rundir`), with a check on every file: a damaged part or line
is skipped with a :class:`~relu_doctor.errors.ReluDoctorWarning` naming it (and kept in
:attr:`~relu_doctor.history.Run.problems`); what cannot be read at all is a one-line
:class:`~relu_doctor.errors.RunDirError`.

Parts are checked from their schema when listed and read one file at a time with
``pyarrow.dataset`` (so a damaged one can be named and skipped), as plain columns: no pandas
or extension-type metadata is deserialised. A read of some steps or sites is pushed down to
the Parquet row groups (:class:`TableParts`), so a report of a long run reads only the unit
rows it draws.
"""

from __future__ import annotations

import json
import os
import re
import socket
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from relu_doctor._validate import path as check_path
from relu_doctor.diagnosis import Finding, finding_order
from relu_doctor.errors import ReluDoctorWarning, RunDirError, user_stacklevel
from relu_doctor.events import FindingEvent, event_from_dict
from relu_doctor.history import READABLE_VERSIONS, WINDOW_COLUMNS, Run, finding_from_dict

__all__ = ["STATUS_NAME", "TABLE_COLUMNS", "TableParts", "legacy_dormant", "load_run", "read_table"]

STATUS_NAME = "status.json"
LOCK_NAME = ".lock"  # held by the writer while it writes (see rundir)
_HELD: set[str] = set()  # lock files held by live writers of this process


def process_token(pid: int) -> str | None:
    """What tells process ``pid`` apart from a later process given the same pid: the boot's
    id and the process's start time (Linux ``/proc``); None where they cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        stat = Path(f"/proc/{int(pid)}/stat").read_text(encoding="ascii", errors="replace")
        start = stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime (after "pid (comm)")
    except (OSError, IndexError, ValueError):
        return None
    return f"{boot}:{start}"


def _pid_alive(pid: int, token: object = None) -> bool:
    """Whether process ``pid`` runs; with the ``token`` (:func:`process_token`) its writer
    recorded, whether that same process runs (not a later one given its pid)."""
    if pid <= 0:  # (os.kill would signal a process group, or every process, and succeed)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, OverflowError, ValueError):
        return False
    if isinstance(token, str):
        now = process_token(pid)
        return now is None or now == token
    return True


class WriterState(NamedTuple):
    """Why a run directory's writer has not closed it, from the lock it left."""

    #: in words ("" when it was closed, or holds no lock)
    why: str = ""
    #: whether it may still be writing it (a live process, another host's, or a lock that
    #: cannot be read); False when closed or gone without closing it
    writing: bool = False


def read_status(path: Path) -> tuple[list[list[int]], str | None]:
    """A ``status.json``'s step ranges never written and the write error that stopped them
    (None when it names none).

    Raises:
        OSError: it cannot be read.
        ValueError: it is not such a file (not JSON, or ranges that are not [first, last]).
    """
    status = json.loads(path.read_bytes().decode("utf-8"))
    ranges = status.get("unwritten", []) if isinstance(status, dict) else None
    if not isinstance(ranges, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in ranges
    ):
        raise ValueError("'unwritten' must be a list of [first, last] steps")
    error = status.get("error") if isinstance(status, dict) else None
    return ranges, error if isinstance(error, str) and error else None


def open_writer_state(path: Path) -> WriterState:
    """Why the run directory's writer did not close it, from the lock it left: still
    writing (a live process, or another host's), or gone without closing it (killed,
    crashed, the machine stopped)."""
    lock = path / LOCK_NAME
    try:
        held = json.loads(lock.read_text(encoding="utf-8"))
        pid, host, token = int(held["pid"]), str(held.get("host", "")), held.get("started")
    except FileNotFoundError:
        return WriterState()
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError):
        return WriterState("its writer left a lock that cannot be read: it may still be "
                           "writing, or have been stopped without closing the run directory",
                           writing=True)
    if held.get("exited"):
        return WriterState(f"its writer, process {pid}, exited without closing it (an error "
                           "it did not catch, or a loop that never closed its watch): what it "
                           "trained after its last log is not recorded")
    if host and host != socket.gethostname():
        return WriterState(f"its writer, process {pid} on {host}, has not closed it: the run "
                           "is still being written there, or was stopped without closing it",
                           writing=True)
    if pid == os.getpid():  # ours, or a dead writer's whose pid this process now has
        if str(lock.resolve()) in _HELD:
            return WriterState("this process is still writing it", writing=True)
    elif _pid_alive(pid, token):
        return WriterState(f"process {pid} is still writing it", writing=True)
    if not os.access(path, os.W_OK):
        # a writer that lost write access can remove no lock and write no status: it may
        # have run its course, its later logs failing, not died
        return WriterState(f"its writer, process {pid}, did not close it, and the run "
                           "directory is not writable now: it was killed or crashed, or it "
                           "lost write access (permissions changed?) and trained on, unable "
                           "to write its later logs, its status or its closing")
    return WriterState(f"its writer, process {pid}, ended without closing it (killed, or "
                       "crashed): what it trained after its last log is not recorded")


TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "history": ("step", "site"),
    "units": ("step", "site", "unit"),
    "layers": ("step", "layer"),
    "metrics": ("step", "name", "value"),
    "windows": WINDOW_COLUMNS,
}
TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SEGMENT = re.compile(r"(?:seg|part)-(\d+)\.(parquet|arrows)")
_MAX_NAMED = 10  # skipped lines named one by one in a warning; the rest are counted


def warn_problem(problems: list[str] | None, message: str) -> None:
    if problems is not None:
        problems.append(message)
    warnings.warn(message, ReluDoctorWarning, stacklevel=user_stacklevel())  # the user's line



#: Record batches of a stream (one a log) folded into one contiguous table before more are
#: read (at this many batches or rows): thousands of small batches held at once cost ~10 KB
#: of bookkeeping each (20,000 logs: +290 MB), which the C allocator keeps after they are
#: freed.
FOLD_BATCHES = 256
FOLD_ROWS = 64 * 1024


class StreamChunks:
    """The batches of an Arrow IPC stream, up to its last complete one, as contiguous tables
    of :data:`FOLD_BATCHES` batches or :data:`FOLD_ROWS` rows each (the rows matching
    ``where``, in ``columns``); ``torn`` says, once iterated, whether the stream was cut short.

    Args:
        source: an open binary file.
        where: keep only the rows matching this expression.
        columns: keep only these columns (each must be in the stream).
    """

    def __init__(self, source: Any, *, where: pc.Expression | None = None,
                 columns: list[str] | None = None) -> None:
        self.reader = ipc.open_stream(source)
        schema = self.reader.schema
        self.schema = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        self.where, self.columns = where, columns
        self.torn = False
        self._source = source
        self.read_to = self._tell()  # the end of the last complete batch (-1: unknown)

    def _tell(self) -> int:
        try:
            return int(self._source.tell())
        except (AttributeError, OSError, ValueError):
            return -1

    def where_torn(self) -> str:
        """Where a torn stream stopped, in words: " at byte 3120 of its 9576" ("" where the
        file cannot say): a tail cut short stops a batch from its end, damage inside the
        file (a trial's flipped bytes a third in, read as "cut short") well before it."""
        try:  # (an Arrow file says its size; a Python one, its descriptor's)
            size = (int(self._source.size()) if hasattr(self._source, "size")
                    else os.fstat(self._source.fileno()).st_size)
        except (AttributeError, OSError, ValueError, pa.ArrowException):
            return ""
        return f" at byte {self.read_to} of its {size}" if self.read_to >= 0 else ""

    def _fold(self, batches: list[pa.RecordBatch]) -> pa.Table:
        table = pa.Table.from_batches(batches, self.reader.schema)
        if self.where is not None:
            table = table.filter(self.where)
        if self.columns is not None:
            table = table.select(self.columns)
        return table.combine_chunks()

    def __iter__(self) -> Iterator[pa.Table]:
        batches: list[pa.RecordBatch] = []
        rows = 0
        while True:
            try:
                batches.append(self.reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError, ValueError):
                self.torn = True
                break
            rows += batches[-1].num_rows
            self.read_to = self._tell()
            if len(batches) >= FOLD_BATCHES or rows >= FOLD_ROWS:
                yield self._fold(batches)
                batches, rows = [], 0
        if batches:
            yield self._fold(batches)


def read_stream(path: Path) -> tuple[pa.Table, bool]:
    """The complete batches of an Arrow IPC stream, and whether its tail was cut short."""
    with open(path, "rb") as f:
        chunks = StreamChunks(f)
        tables = list(chunks)
    return (pa.concat_tables(tables) if tables else chunks.schema.empty_table()), chunks.torn


def segments(folder: Path) -> list[tuple[int, Path]]:
    """``(number, file)`` of a table's parts, in order; a stream whose Parquet exists (a
    crash between the compaction's rename and the stream's removal) is left out."""
    if not folder.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in folder.iterdir():
        m = _SEGMENT.fullmatch(p.name)
        if m is None:
            continue
        n = int(m.group(1))
        if m.group(2) == "parquet" or n not in found:
            found[n] = p
    return sorted(found.items())


def read_meta(p: Path) -> dict[str, Any]:
    path = p / "meta.json"
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise RunDirError(f"{str(path)!r} cannot be read as JSON: {e}.") from None
    if not isinstance(meta, dict):
        raise RunDirError(
            f"{str(path)!r} holds a JSON {type(meta).__name__}, not an object: it is damaged."
        )
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise RunDirError(
            f"{str(p)!r} was written in run-directory format {version!r}; this relu_doctor "
            f"reads formats {list(READABLE_VERSIONS)}. Re-make the report with the relu_doctor "
            f"version that wrote it ({_get(meta, 'versions', 'relu_doctor')})."
        )
    sites = meta.get("sites", [])
    if not isinstance(sites, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) for s in sites
    ):
        raise RunDirError(f"{str(path)!r}: 'sites' must be a list of objects with a name.")
    for key in ("config", "versions"):
        if key in meta and not isinstance(meta[key], dict):
            raise RunDirError(f"{str(path)!r}: {key!r} must be a JSON object.")
    return meta


def _get(meta: Mapping[str, Any], *keys: str) -> Any:
    v: Any = meta
    for k in keys:
        v = v.get(k) if isinstance(v, Mapping) else None
    return v if v is not None else "unknown"


#: The tables a log writes its step to: ``windows`` (every log; a run directory written
#: before it existed has ``history`` only), ``history`` (a window with sites), ``metrics``.
LOGGED_TABLES = ("windows", "history", "metrics")


def last_step(p: Path) -> int | None:
    """The last step logged in run directory ``p`` (None: none yet)."""
    found = [int(s.max()) for s in _logged_steps(p) if not s.empty]
    return max(found) if found else None


def logged_at(p: Path, step: int) -> bool:
    """Whether run directory ``p`` holds a log at ``step``."""
    return any(bool((s == step).any()) for s in _logged_steps(p))


def _logged_steps(p: Path) -> list[pd.Series]:
    return [read_table(p, t, problems=[])["step"] for t in LOGGED_TABLES]


def _check_part(schema: pa.Schema, required: tuple[str, ...]) -> str | None:
    missing = [c for c in required if c not in schema.names]
    if missing:
        return f"its columns {schema.names} lack {missing}"
    if "step" in required and not pa.types.is_integer(schema.field("step").type):
        return f"its 'step' column is {schema.field('step').type}, not integers"
    return None


def _part_schema(part: Path) -> pa.Schema:
    """The schema of a part, from its footer (Parquet) or its first message (a stream):
    nothing else is read."""
    if part.suffix == ".parquet":
        return pq.read_schema(part)  # plain columns only: no pandas/extension metadata
    with pa.OSFile(str(part)) as source:
        return ipc.open_stream(source).schema


def _read_part(
    part: Path, columns: list[str] | None, where: pc.Expression | None,
    dictionary: frozenset[str] = frozenset(),
) -> tuple[pa.Table, str | None]:
    """The rows of one part that match ``where`` (pushed down to the Parquet row groups; a
    stream is filtered as it is read), in ``columns``, and, where a stream was cut short
    (it is read up to its last complete batch), where (:meth:`StreamChunks.where_torn`),
    else None. The ``dictionary`` columns of a Parquet part are read dictionary-encoded, as
    stored."""
    if part.suffix == ".parquet":
        fmt = ds.ParquetFileFormat(
            read_options=ds.ParquetReadOptions(dictionary_columns=set(dictionary or ())),
            default_fragment_scan_options=_VERIFIED)
        return ds.dataset(part, format=fmt).to_table(columns=columns, filter=where), None
    with pa.OSFile(str(part)) as source:
        chunks = StreamChunks(source, where=where, columns=columns)
        tables = list(chunks)
        torn = chunks.where_torn() if chunks.torn else None
    return (pa.concat_tables(tables) if tables else chunks.schema.empty_table()), torn


#: Parquet pages are written with a CRC (``rundir``) and checked when read: bytes changed
#: inside a part (a bad copy, a disk) raise, and the part is skipped with a warning, where
#: they were read as wrong numbers (a part written without CRCs is read as it is).
_VERIFIED = ds.ParquetFragmentScanOptions(page_checksum_verification=True)


class TableParts:
    """The readable parts of one table, each checked from its schema when listed (a part
    that cannot be opened, or whose columns or types do not fit, is skipped with a warning
    naming it); their rows are read when asked, only those of the steps and sites asked for.

    Args:
        folder: the table's folder in a run directory.
        problems: where the warnings are also kept (:attr:`Run.problems`).

    Attributes:
        skipped: ``(part, why)`` of each part skipped so far, as warned.
    """

    def __init__(self, folder: Path, *, problems: list[str] | None = None,
                 legacy: bool = False) -> None:
        self.folder = folder
        self.problems = problems
        self.legacy = legacy  # written in format 3 or earlier: see legacy_dormant
        required = TABLE_COLUMNS.get(folder.name, ("step",))
        self.parts: list[tuple[Path, pa.Schema]] = []
        self.skipped: list[tuple[Path, str]] = []  # (part, why), as warned
        self._torn: set[Path] = set()  # streams cut short, warned about once
        try:
            found = segments(folder)
        except OSError as e:  # a folder it may not list (its permissions)
            self._skip(folder, f"it cannot be read ({e.strerror or e})")
            found = []
        for _, part in found:
            try:
                schema = _part_schema(part)
            except (OSError, pa.ArrowException, ValueError) as e:
                self._skip(part, f"it cannot be read ({' '.join(str(e).split())[:200]})")
                continue
            why = _check_part(schema, required)
            if why is None and self.parts:
                try:
                    pa.unify_schemas([self.parts[0][1], schema], promote_options="permissive")
                except (pa.ArrowException, ValueError) as e:
                    why = ("its schema does not fit the earlier parts "
                           f"({' '.join(str(e).split())[:160]})")
            if why is not None:
                self._skip(part, why)
                continue
            self.parts.append((part, schema.remove_metadata()))

    def _skip(self, part: Path, why: str) -> None:
        self.skipped.append((part, why))
        warn_problem(self.problems, f"relu_doctor: skipped {str(part)!r}: {why}.")

    def _read(self, part: Path, schema: pa.Schema, columns: list[str] | None,
              where: pc.Expression | None, dictionary: frozenset[str] = frozenset(),
              ) -> pa.Table | None:
        """One part's rows; None (warned once, and not read again) when it cannot be read."""
        try:
            data, torn = _read_part(part, columns, where, dictionary)
        except (OSError, pa.ArrowException, ValueError) as e:
            self.parts.remove((part, schema))
            self._skip(part, f"it cannot be read ({' '.join(str(e).split())[:200]})")
            return None
        if torn is not None and part not in self._torn:
            self._torn.add(part)
            warn_problem(self.problems, f"relu_doctor: {str(part)!r} was cut short, or is "
                         f"damaged,{torn}; read up to its last complete record batch before "
                         "that.")
        return data

    def read(
        self,
        *,
        steps: Iterable[int] | None = None,
        sites: Iterable[str] | None = None,
        columns: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """The rows of ``steps`` and ``sites`` (all when None), in ``columns`` (all when
        None; those a part lacks are left out), every readable part in order. A part whose
        rows cannot be read is skipped with a warning naming it, and not read again."""
        where: pc.Expression | None = None
        if steps is not None:
            where = pc.field("step").isin(pa.array(sorted({int(s) for s in steps}), pa.int64()))
        if sites is not None:
            in_sites = pc.field("site").isin(pa.array(sorted({str(s) for s in sites}), pa.string()))
            where = in_sites if where is None else where & in_sites
        wanted = None if columns is None else list(dict.fromkeys(columns))
        legacy = self.legacy and (wanted is None or bool({"dormant", "below_tau"} & set(wanted)))
        reading = wanted if wanted is None or not legacy else [*wanted, "dormant", "dead"]
        tables: list[pa.Table] = []
        for part, schema in list(self.parts):
            cols = None if reading is None else [c for c in dict.fromkeys(reading)
                                                 if c in schema.names]
            data = self._read(part, schema, cols, where)
            if data is not None:
                tables.append(data.replace_schema_metadata(None))
        if not tables:  # (every part skipped, or none: the columns asked for, no row)
            return pd.DataFrame(columns=wanted if wanted is not None
                                else list(TABLE_COLUMNS.get(self.folder.name, ("step",))))
        try:
            joined = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowException, ValueError) as e:
            warn_problem(self.problems, f"relu_doctor: {str(self.folder)!r}: parts do not fit "
                         f"together ({e}); only the first is read.")
            joined = tables[0]
        frame = joined.to_pandas()
        if legacy:
            frame = legacy_dormant(frame, units=True)
            if wanted is not None:
                frame = frame[[c for c in wanted if c in frame.columns]]
        return frame

    def sites(self) -> list[str]:
        """The sites with rows, in order of first appearance (from the ``site`` column alone,
        as the dictionaries Parquet stores it in)."""
        seen: dict[str, None] = {}
        for part, schema in list(self.parts):
            if "site" not in schema.names:
                continue
            data = self._read(part, schema, ["site"], None, frozenset({"site"}))
            if data is None:
                continue
            for chunk in data.column("site").chunks:
                values = chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk
                for name in pc.unique(values).to_pylist():
                    seen.setdefault(str(name), None)
        return list(seen)


def legacy_dormant(frame: pd.DataFrame, *, units: bool) -> pd.DataFrame:
    """A unit (``units``) or site table of format 3 or earlier in today's vocabulary.

    Until format 3 ``dormant`` was ReDo's criterion, score <= tau, dead units included: that
    is now ``below_tau``, and ``dormant`` the units below tau that are not dead. Per unit the
    translation is exact. Per site it is exact where dead implies below tau (ReLU-like sites:
    a dead unit's score is 0); a leaky site's dead units may score above tau, so its new
    ``dormant`` count is unknown (NaN), and so is that of a site whose row does not say
    whether it is leaky. A frame that already has ``below_tau``, or has no ``dormant``, comes
    back unchanged.
    """
    if "dormant" not in frame.columns or "below_tau" in frame.columns or "dead" not in frame:
        return frame
    out = frame.copy()
    out["below_tau"] = out["dormant"]
    if units:
        out["dormant"] = out["dormant"].astype(bool) & ~out["dead"].astype(bool)
        return out
    leaky = out["leaky"] if "leaky" in out else pd.Series(None, index=out.index, dtype=object)
    exact = leaky.map(lambda v: v is False or v == 0)  # known not leaky (NaN/None: unknown)
    new = pd.to_numeric(out["dormant"], errors="coerce") - pd.to_numeric(out["dead"],
                                                                        errors="coerce")
    out["dormant"] = new.where(exact.astype(bool))
    if "dormant_fraction" in out:
        out["below_tau_fraction"] = out["dormant_fraction"]
        seen_col = next((c for c in ("units_seen", "units") if c in out), None)
        seen = (pd.to_numeric(out[seen_col], errors="coerce") if seen_col is not None
                else pd.Series(float("nan"), index=out.index))
        out["dormant_fraction"] = (out["dormant"] / seen).where(seen > 0)
    return out


def read_table(
    path: str | os.PathLike[str], table: str, *, problems: list[str] | None = None
) -> pd.DataFrame:
    """One table of a run directory, every readable part in order.

    A part that cannot be read, or whose columns or types do not fit the table, is skipped
    with a warning naming it; a stream cut short is read up to its last complete batch.
    """
    return TableParts(Path(path) / table, problems=problems).read()


def table_folders(p: Path) -> set[str]:
    """The tables run directory ``p`` holds: its folders named as tables that hold parts
    (one it may not list does, for all it knows: :class:`TableParts` says it cannot be read)."""

    def holds(folder: Path) -> bool:
        try:
            return bool(segments(folder))
        except OSError:
            return True

    return {d.name for d in p.iterdir() if d.is_dir() and TABLE_NAME.fullmatch(d.name)
            and holds(d)}


def _read_events(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if not path.is_file():
        if path.exists():
            warn_problem(problems, f"relu_doctor: skipped {str(path)!r}: it is not a file.")
        return events
    bad: list[str] = []
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, after the lines are read)
    except OSError as e:
        warn_problem(problems, f"relu_doctor: skipped {str(path)!r}: it cannot be read "
                     f"({e.strerror or e}).")
        return events
    with f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw.decode("utf-8"))
                event_from_dict(data)  # validates the type and the fields
            except UnicodeDecodeError:
                bad.append(f"{n} (not UTF-8)")
                continue
            except (ValueError, TypeError, KeyError) as e:
                torn = not raw.endswith(b"\n")
                bad.append(f"{n} ({'cut short' if torn else ' '.join(str(e).split())[:80]})")
                continue
            events.append(data)
    if bad:
        more = f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
        warn_problem(problems, f"relu_doctor: skipped line {', '.join(bad[:_MAX_NAMED])}{more} of "
              f"{str(path)!r}.")
    return events


def _read_findings(path: Path, events: list[dict[str, Any]], problems: list[str]) -> list[Finding]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"a JSON {type(data).__name__}, not a list")
        return [finding_from_dict(d) for d in data]
    except (OSError, ValueError, TypeError, AttributeError) as e:
        warn_problem(problems, f"relu_doctor: {str(path)!r} cannot be read ({e}); the findings are "
              "taken from events.jsonl.")
    return _findings_from_events(events)


def _brought_up(findings: list[Finding], events: list[dict[str, Any]]
                ) -> tuple[list[Finding], int | None]:
    """``findings.json``'s findings brought up to the last log, and the step they were of
    (None where no event came after it). Its writer rewrites it at most every
    ``FINDINGS_EVERY_S`` seconds while it holds findings (at once when it holds none, and at
    close), and appends every finding that begins, changes severity or ends to
    ``events.jsonl`` at each log: those after the step it holds are applied to it."""
    if not findings:
        return findings, None
    held = max(f.step for f in findings)
    later = [e for e in events if e.get("type") == "finding"
             and isinstance(e.get("step"), int) and e["step"] > held]
    if not later:
        return findings, None
    out = sorted(_findings_from_events(later, findings),
                 key=lambda f: finding_order(f.severity, f.kind, f.site, f.evidence))
    return out, held


def _findings_from_events(events: list[dict[str, Any]],
                          open_before: Iterable[Finding] = ()) -> list[Finding]:
    """The findings open after the last event: each begun or changed, and not ended (of
    ``open_before`` too, those open before the events)."""
    open_ = {(f.kind, f.site): f for f in open_before}
    for data in events:
        ev = event_from_dict(data)
        if isinstance(ev, FindingEvent):
            key = (ev.finding.kind, ev.finding.site)
            if ev.status == "ended":
                open_.pop(key, None)
            else:
                open_[key] = ev.finding
    return list(open_.values())


def _history_lost(parts: TableParts, history: pd.DataFrame, windows: pd.DataFrame | None,
                  units: TableParts, problems: list[str]) -> str:
    """Why a run directory's per-site history holds no row although the run logged some
    ("" when it holds rows, or the run never saw a site): its parts were skipped (each
    already warned about), or the folder is missing or empty (warned here). A window that
    saw an activation (``judged`` in the windows table) always wrote history rows, and so
    did a log with unit rows; a run whose windows saw nothing (its model left in eval mode)
    has no history folder, and nothing is lost."""
    if not history.empty:
        return ""
    if parts.skipped:
        return "; ".join(f"{str(part)!r} is damaged: {why}" for part, why in parts.skipped)
    judged = windows is not None and "judged" in windows and bool(windows["judged"].eq(True).any())
    if not (judged or units.parts):
        return ""
    folder = parts.folder
    what = ("is missing" if not folder.exists() else "holds no part" if not segments(folder)
            else "holds no complete row")
    seen = "windows that saw activations" if judged else "unit rows"
    why = f"{str(folder)!r} {what}, although the run logged {seen}"
    warn_problem(problems, f"relu_doctor: {why}.")
    return why


def load_run(path: str | os.PathLike[str]) -> Run:
    """Load a run directory written by :class:`RunWriter` (formats 1 to 4), also while it is
    being written.

    Damaged parts and event lines are skipped with a warning naming each (also kept in
    :attr:`Run.problems`). The per-unit table, the largest by far, is read when first asked
    for (:attr:`Run.units`), or only the steps and sites asked for (:meth:`Run.read_units`);
    its parts are checked now.

    Raises:
        ReluDoctorError: ``path`` is not a path (str or os.PathLike).
        RunDirError: the path is missing, not a directory, empty, foreign, written by an
            unsupported format version, or its ``meta.json`` is damaged; the message says
            which.
    """
    p = Path(check_path("path", path))
    if not p.exists():
        raise RunDirError(f"run directory {str(p)!r} does not exist.")
    if not p.is_dir():
        raise RunDirError(f"run directory {str(p)!r} is not a directory.")
    if not (p / "meta.json").is_file():
        what = ("is empty" if not any(p.iterdir()) else "has no meta.json"
                if not (p / "meta.json").exists() else "holds a meta.json that is not a file")
        raise RunDirError(
            f"{str(p)!r} {what}: it is not a relu_doctor run directory. Pass the directory "
            "given as run_dir= to watch()/ReluDoctor, or made by doc.save()."
        )
    meta = read_meta(p)
    problems: list[str] = []
    status_path = p / STATUS_NAME
    if status_path.is_file():
        try:
            ranges, error = read_status(status_path)
            if ranges:
                meta["unwritten"] = ranges
            if error:
                meta["write_error"] = error
        except (OSError, ValueError) as e:
            warn_problem(problems, f"relu_doctor: skipped {str(status_path)!r}: {e}.")
    events = _read_events(p / "events.jsonl", problems)
    held = table_folders(p)  # the tables with parts
    tables = {"history", "layers", "metrics"} | held
    legacy = meta.get("format_version", 1) < 4
    # its parts checked now, read when asked
    units = TableParts(p / "units", problems=problems, legacy=legacy)
    history_parts = TableParts(p / "history", problems=problems)
    history = history_parts.read()
    frames: dict[str, pd.DataFrame] = {}
    lost_tables = []  # a part skipped, or a table the run wrote gone: what it shows is lost
    for t in sorted(tables - {"units", "history"}):
        parts = TableParts(p / t, problems=problems)
        frames[t] = parts.read()
        if parts.skipped:
            lost_tables.append(t)
    lost = _history_lost(history_parts, history, frames.get("windows"), units, problems)
    for table in meta.get("tables") or []:  # (history: said by _history_lost)
        # (a table is listed after its first part was made, so one with none lost them)
        if isinstance(table, str) and table != "history" and table not in held:
            what = "is missing" if not (p / table).exists() else "holds none of its parts"
            warn_problem(problems, f"relu_doctor: {str(p / table)!r} {what}, although the "
                         "run wrote that table.")
            lost_tables.append(table)
    if units.skipped and "units" not in lost_tables:  # (one it may not list)
        lost_tables.append("units")
    if lost_tables:
        meta["lost_tables"] = sorted(set(lost_tables))
    f_path = p / "findings.json"
    last_findings: list[Finding] | None = None
    findings_step = None
    if f_path.is_file():
        last_findings, findings_step = _brought_up(
            _read_findings(f_path, events, problems), events)
    elif meta.get("format_version") != 1:
        windows = frames.get("windows")
        if history.empty and lost == "" and (windows is None or windows.empty):
            last_findings = []  # nothing logged yet
        else:
            what = "is not a file" if f_path.exists() else "is missing"
            warn_problem(problems, f"relu_doctor: {str(f_path)!r} {what}, though the run "
                         "logged; the findings are taken from events.jsonl.")
            last_findings = _findings_from_events(events)
    logged = history["step"] if "step" in history else pd.Series(dtype="int64")
    # Findings that began at a step this directory logged began with an event here (one
    # carried over from a checkpoint into a new directory began before it; one of a log
    # dropped by a resume from an older checkpoint, after its last step).
    began_here = [f for f in last_findings or [] if not logged.empty
                  and int(logged.min()) <= f.began <= int(logged.max())]
    if (began_here and not meta.get("unwritten")
            and not any(e.get("type") == "finding" for e in events)):
        ev = p / "events.jsonl"
        what = "is missing" if not ev.exists() else "holds no finding"
        warn_problem(problems, f"relu_doctor: {str(ev)!r} {what}, although findings.json "
                     f"holds {len(began_here)} that began there: the timeline of findings "
                     "and interventions is lost.")
    if meta.get("format_version", 1) >= 3 and not status_path.exists():
        warn_problem(problems, f"relu_doctor: {str(status_path)!r} is missing: the steps whose "
                     "logs could not be written, if any, cannot be told from steps never logged.")
    writer = open_writer_state(p)
    return Run(
        meta=meta,
        history=legacy_dormant(history, units=False) if legacy else history,
        units=None,
        layers=frames.pop("layers"),
        events=events,
        path=p,
        last_findings=last_findings,
        tables=frames,
        problems=problems,
        unit_source=units,
        history_lost=lost,
        writer_open=writer.why,
        writer_writing=writer.writing,
        findings_step=findings_step,
    )
