"""A model's state kept across a pass relu_doctor runs itself (``check_init``, ``scan``, the
dataflow pass of the remedies): its buffers (BatchNorm's running statistics and counters)
and the random number generators (dropout's draws) are put back as they were, so that the
user's training goes on exactly as without the pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

__all__ = ["kept_state"]


@contextlib.contextmanager
def kept_state(model: nn.Module) -> Iterator[None]:
    """Put the model's buffers and the RNG states (CPU, and every CUDA device once CUDA is
    initialised) back as they were when the block ends."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
