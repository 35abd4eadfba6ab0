"""Tests that spawn 2 gloo processes on the CPU (DDP, FSDP2): their marks, the process group
each worker joins and leaves, and the spawn itself.

The processes meet through a file in the test's own folder (``torch.distributed``'s
FileStore), not a TCP port picked free and released before use, which another test running
beside it could take. Each worker leaves through a barrier, so that no process closes its
connections while the other still reads its last message; a worker that raised leaves
at once, without waiting at a barrier the other will never reach. A process killed by a signal
(an abort in gloo's I/O thread, which turns a socket error there into ``std::terminate``)
is spawned once more, with a warning saying so; a worker that raised fails at once.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2

SPAWNED = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo processes: Linux only"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::relu_doctor.ReluDoctorWarning"),
]


def spawned(fn: Callable[..., None]) -> Callable[..., None]:
    """The marks of a test reading a 2-process run."""
    for mark in SPAWNED:
        fn = mark(fn)
    return fn


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The Doctor's cross-process sum (the default process group)."""
    dist.all_reduce(t)
    return t


@contextmanager
def member(rank: int, store: str) -> Iterator[None]:
    """Be one of the ``WORLD`` gloo processes meeting at the file ``store`` for the block;
    leave through a barrier when the block finished, at once when it raised."""
    dist.init_process_group("gloo", init_method=Path(store).as_uri(), rank=rank,
                            world_size=WORLD)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[..., None], out: Path, *args: Any) -> None:
    """Run ``worker(rank, store, str(out), *args)`` in ``WORLD`` processes (``store``: the
    file to meet at, see :func:`member`, new for each try)."""
    for attempt in (1, 2):
        store = out / f"store-{attempt}"
        try:
            mp.spawn(worker, args=(str(store), str(out), *args), nprocs=WORLD, join=True)
            return
        except mp.ProcessExitedException as e:
            if e.signal_name is None or attempt == 2:
                raise
            warnings.warn(f"spawned gloo processes: {e}; spawning them once more",
                          RuntimeWarning, stacklevel=2)  # not among the UserWarnings ignored
