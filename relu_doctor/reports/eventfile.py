"""TensorBoard event files written in the calling thread: a failing write warns once and
never becomes a thread's traceback.

``torch.utils.tensorboard.SummaryWriter`` hands its events to tensorboard's
``EventFileWriter``, whose background thread re-raises a write error (a full disk, a removed
directory) in that thread: ``threading.excepthook`` prints a traceback, and the next
``add_*`` or ``flush`` call raises the error again in the training loop.
:class:`SafeSummaryWriter` is a ``SummaryWriter`` whose event file is an :class:`EventFile`:
events are framed (as tensorboard's ``RecordWriter`` frames them) into a memory buffer and
appended to the file at each ``flush`` (and whenever the buffer passes 1 MiB), in the thread
that calls it, with no thread of its own. A write that fails warns once
(:class:`~relu_doctor.errors.ReluDoctorWarning`, naming the cause and the file), cuts the
file back to its last complete flush, drops the events of that flush, and is tried again at
the next flush: TensorBoard writing steps aside while the disk is full and resumes when it
is not, in the same file.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
import threading
import time
import warnings
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SourceMetadata
from torch.utils.tensorboard.writer import FileWriter, SummaryWriter

from relu_doctor.errors import ReluDoctorWarning, write_failure_noted
from relu_doctor.reports._crc32c import masked_crc32c

__all__ = ["EventFile", "SafeSummaryWriter"]

_MAX_BUFFER = 1 << 20  # bytes held between flushes before they are written anyway
_uid = itertools.count()


def _frame(data: bytes) -> bytes:
    """One TFRecord as tensorboard's ``RecordWriter`` frames it: the length (8 bytes, little
    endian), its masked CRC-32C, the data, the data's masked CRC-32C. The checksums are
    :mod:`relu_doctor.reports._crc32c`'s, not tensorboard's Python loop over the bytes."""
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                     struct.pack("<I", masked_crc32c(data))))


class EventFile:
    """An event file appended to in the calling thread (the ``EventFileWriter`` interface
    ``torch.utils.tensorboard.writer.FileWriter`` uses: ``add_event``, ``flush``, ``close``,
    ``reopen``, ``get_logdir``). Never raises ``OSError``: see the module docstring.

    Args:
        log_dir: the folder of the event file (created when first written).
        filename_suffix: appended to the file's name.
    """

    def __init__(self, log_dir: str | os.PathLike[str], filename_suffix: str = "") -> None:
        self._log_dir = str(log_dir)
        self.path = Path(log_dir) / (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_uid)}{filename_suffix}"
        )
        version = Event(wall_time=time.time(), file_version="brain.Event:2",
                        source_metadata=SourceMetadata(writer="relu_doctor"))
        self._header = _frame(version.SerializeToString())  # begins the file
        self._buffer = bytearray()
        self._good = 0  # bytes of the file written by complete flushes
        self._warned = False
        self._lock = threading.Lock()
        self.flush()

    def get_logdir(self) -> str:
        """The folder of the event file."""
        return self._log_dir

    def add_event(self, event: Event) -> None:
        """Buffer one event (written at the next :meth:`flush`)."""
        data = _frame(event.SerializeToString())
        with self._lock:
            self._buffer += data
            if len(self._buffer) >= _MAX_BUFFER:
                self._flush()

    def flush(self) -> None:
        """Append the buffered events to the file; a failure warns once and drops them."""
        with self._lock:
            self._flush()

    def close(self) -> None:
        """Flush (the file is open only while a flush writes it)."""
        self.flush()

    def reopen(self) -> None:
        """Nothing to do: the file is opened at each flush."""

    def _flush(self) -> None:
        if self._good and not self.path.exists():  # the file (or its folder) was removed
            self._good = 0
        data = (self._header if self._good == 0 else b"") + bytes(self._buffer)
        self._buffer.clear()
        if not data:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "r+b" if self._good else "wb", buffering=0) as f:
                try:
                    with contextlib.suppress(OSError):  # a torn tail left by a failed flush
                        f.truncate(self._good)
                    f.seek(self._good)
                    view = memoryview(data)
                    while view:
                        n = f.write(view)
                        if not n:
                            raise OSError(errno.EIO, "the event file took no bytes")
                        view = view[n:]
                except BaseException:
                    with contextlib.suppress(OSError):
                        f.truncate(self._good)
                    raise
            self._good += len(data)
        except OSError as e:  # a full disk, permissions, a removed folder...: never raised
            self._failed(e)

    def _failed(self, error: OSError) -> None:
        if self._warned:
            return
        self._warned = True
        if write_failure_noted(self.path.parent, error):
            return  # the run directory's writer said why, for every file in it
        warnings.warn(
            f"relu_doctor: cannot write the TensorBoard event file {str(self.path)!r} "
            f"({type(error).__name__}: {error}); training goes on, TensorBoard events are "
            "dropped while writing fails, and writing is retried at each later flush.",
            ReluDoctorWarning,
            stacklevel=4,
        )


class _FileWriter(FileWriter):
    """torch's ``FileWriter`` over an :class:`EventFile` (no background thread)."""

    def __init__(self, log_dir: str, filename_suffix: str = "") -> None:
        # FileWriter.__init__ would start an EventFileWriter and its thread: not called.
        self.event_writer = EventFile(log_dir, filename_suffix)


class SafeSummaryWriter(SummaryWriter):
    """A ``torch.utils.tensorboard.SummaryWriter`` whose event file is an
    :class:`EventFile`: written in the calling thread, and a failing write warns once and
    is retried at later flushes, never raised.

    Args:
        log_dir: where the event file goes.
        purge_step: a continued run's first step: TensorBoard hides the steps from it on
            that earlier event files of the run hold (a run resumed from a checkpoint older
            than its last log logs them again: the curves doubled back, an operations
            trial); torch's ``purge_step``.
    """

    def __init__(self, log_dir: str | os.PathLike[str], purge_step: int | None = None) -> None:
        super().__init__(log_dir=str(log_dir), purge_step=purge_step)

    def _get_file_writer(self) -> FileWriter:
        """The event file's writer (torch's method, over an :class:`EventFile`)."""
        writer: FileWriter | None = self.file_writer
        if self.all_writers is None or writer is None:
            writer = _FileWriter(self.log_dir, self.filename_suffix)
            # torch declares both None (they are set here and cleared by close()).
            self.file_writer = writer  # type: ignore[assignment]
            self.all_writers = {self.log_dir: writer}  # type: ignore[assignment]
            if self.purge_step is not None:  # (as torch's own _get_file_writer does)
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                writer.add_event(Event(step=self.purge_step, file_version="brain.Event:2"))
                writer.add_event(Event(step=self.purge_step,
                                       session_log=SessionLog(status=SessionLog.START)))
                self.purge_step = None
        return writer
