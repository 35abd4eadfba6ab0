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
    """Put the model's buffers (the same tensors, with their values) and the RNG states (CPU,
    and every CUDA device once CUDA is initialised) back as they were when the block ends.
    State a module keeps in plain Python attributes (a step counter) is not seen."""
    # by module and name: a module may replace a buffer (``self.ema = 0.9 * self.ema + x``)
    # rather than change it in place, and then gets its own tensor back
    buffers = [(mod, name, b, b.detach().clone())
               for mod in model.modules() for name, b in mod._buffers.items() if b is not None]
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        with torch.no_grad():
            for mod, name, b, saved in buffers:
                try:
                    if b.shape != saved.shape:  # resized in the pass: a QAT observer's
                        b.resize_(saved.shape)  # per-channel min/max, empty until its first
                    b.copy_(saved)
                except Exception:  # (one that cannot be put back in place: its saved copy,
                    b = saved      # and every other buffer still restored)
                mod._buffers[name] = b
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
