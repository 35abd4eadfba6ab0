"""Adaptive gradient clipping: AutoClip (a percentile of the gradient-norm history) and AGC
(unit-wise, relative to the weight norm).

Both keep their state on the gradients' device and never synchronise with the host between
logging intervals: the clip counts and the threshold are read once per interval
(:meth:`read`), where an interval that clipped anything becomes a model-wide intervention.
Call :meth:`clip_` after AMP unscaling and before the optimizer step, or :meth:`attach` the
clipper to the optimizer as a step pre-hook (``GradScaler.step`` unscales first).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from relu_doctor._validate import (
    finite_or_none,
    nonnegative,
    number_in,
    one_optimizer,
    positive_finite,
    positive_int,
)
from relu_doctor.errors import ReluDoctorWarning
from relu_doctor.events import Intervention
from relu_doctor.remedies.base import (
    DTENSOR,
    MODEL,
    DoctorLike,
    RecordLike,
    Remedy,
    model_snapshot,
    refuse_sharded,
    sharding_of,
)
from relu_doctor.remedies.evidence import Snapshot

__all__ = ["AGC", "AutoClip"]

C = TypeVar("C", bound="_Clipper")
#: Logging windows a bound clipper may see without a step before it says it clips nothing.
_IDLE_WINDOWS = 3
#: ... and steps: a WGAN's generator, clipped every 5th step, logged every step (a review)
_IDLE_STEPS = 20


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _total_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The total norm of ``grads`` as float32; a half-precision gradient's own norm taken in
    float32 (a float16 norm overflows past 65504: the step read as infinite, and clipping
    multiplied it by 0), a float32 or float64 one in its own dtype."""
    half = [g for g in grads if g.dtype in (torch.float16, torch.bfloat16)]
    rest = [g for g in grads if g.dtype not in (torch.float16, torch.bfloat16)]
    norms = [*(torch._foreach_norm(half, 2, dtype=torch.float32) if half else ()),
             *(torch._foreach_norm(rest) if rest else ())]
    total: torch.Tensor = torch.linalg.vector_norm(
        torch.stack([n.to(device, torch.float32) for n in norms]))
    return total


#: The metric a clipper's changes are judged on: the total gradient norm before clipping,
#: as it records it (the root mean square over a window's steps that had a finite, nonzero
#: one). The parameter-gradient norm a Doctor's optimizer tap reads is the clipped one where
#: clipping runs first (``clip_`` called by hand, Lightning's hook): that one sits near the
#: threshold whatever the model does.
UNCLIPPED = "unclipped_grad_norm"


class _Clipper(Remedy):
    """Shared parts of the clippers: an on-device window of counts and of the gradient norm
    before clipping, read at log time. Its per-window report (:meth:`decide`) says what the
    window clipped; it is no one-off change, so it is not judged (a plan switching AutoClip
    on is, on :data:`UNCLIPPED`)."""

    name = "adaptive_grad_clip"
    holds_final = False  # its decision reports the window's clipping, done step by step
    reads_records = False  # it clips by the gradients, which DDP made the same everywhere
    on_shards = (
        "it measures the norms of the gradient shards this process holds, not of the whole "
        "gradient, so processes would clip by different norms"
    )

    def __init__(self) -> None:
        super().__init__()
        self._whole = False  # the gradients were seen whole (checked at the first clip)
        self._failed = False  # a clip in the attached hook raised: it clips no more
        self._clipped: torch.Tensor | None = None  # clipped steps (AutoClip) or units (AGC)
        self._total = 0  # steps (AutoClip) or units (AGC) seen in the window, host-side
        self._steps = 0
        self._threshold: torch.Tensor | None = None
        #: the window's sum of squared total norms before clipping and its count of steps
        #: with a finite, nonzero one (float64, on the gradients' device)
        self._norms: torch.Tensor | None = None
        self._handles: list[Any] = []
        #: the optimizer and the ``params`` (None: all of its) of the last :meth:`attach`
        self.attached_to: tuple[torch.optim.Optimizer, list[torch.Tensor] | None] | None = None
        self.last: dict[str, Any] = {}  # the numbers of the last closed window
        #: which of several optimizers it clips (its events say so, and their ids differ
        #: from the other clippers'); None for the only one
        self.optimizer_index: int | None = None
        self._listening = False  # bound as a listener: it reports its windows itself
        self._said_idle = False
        self._idle_windows = 0  # windows read since bind, while it never clipped a step
        self._idle_steps = 0  # the steps of those windows (a resume's global step: a review)

    def bind(self: C, doctor: DoctorLike, *, listen: bool = True) -> C:
        """Record its clipping through ``doctor``, window by window: binding clips nothing;
        :meth:`attach` it to the optimizer, or call :meth:`clip_` before each step."""
        super().bind(doctor, listen=listen)
        self._listening = listen
        return self

    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        params: Iterable[torch.Tensor] | None = None,
    ) -> _Clipper:
        """Clip in a step pre-hook of ``optimizer`` (GradScaler.step unscales before the
        optimizer's step runs, so clipping sees true gradients). ``params`` defaults to every
        parameter of the optimizer. Remove with :meth:`detach`."""
        optimizer = one_optimizer("optimizer", optimizer)
        chosen = list(params) if params is not None else None
        every = chosen if chosen is not None else [p for g in optimizer.param_groups
                                                   for p in g["params"]]
        refuse_sharded(type(self).__name__, self.on_shards, self._sharding(every),
                       arg="optimizer")

        def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self._failed:
                return
            ps = (
                chosen if chosen is not None else [p for g in opt.param_groups for p in g["params"]]
            )
            try:
                self.clip_(ps)
            except Exception as e:  # do no harm: the optimizer steps unclipped, as before
                self._failed = True
                warnings.warn(
                    f"relu_doctor: {type(self).__name__} could not clip this step's gradients "
                    f"({type(e).__name__}: {e}); it clips no more. Training goes on unclipped.",
                    ReluDoctorWarning,
                    stacklevel=3,
                )

        self._handles.append(optimizer.register_step_pre_hook(pre))
        self.attached_to = (optimizer, chosen)  # (what a plan hooks it on again: see its
        return self                             # watch_attached)

    def detach(self) -> None:
        """Remove the hooks :meth:`attach` registered (idempotent)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def clip_(self, params: Iterable[torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        """Clip the gradients of ``params`` in place; return their total norm before clipping
        (a 0-dim tensor on their device, like ``torch.nn.utils.clip_grad_norm_``; no host
        synchronisation)."""
        raise NotImplementedError

    def _check_whole(self, grads: list[torch.Tensor]) -> None:
        """Refuse sharded gradients, at the first clip (before the first update)."""
        if not self._whole:
            refuse_sharded(type(self).__name__, self.on_shards, self._sharding(grads),
                           arg="params")
            self._whole = True

    def _sharding(self, tensors: list[torch.Tensor]) -> str | None:
        """How ``tensors`` are sharded across processes, where this clipper cannot act."""
        return sharding_of(params=tensors)

    def _note_norm(self, total: torch.Tensor) -> None:
        """Add a step's total norm before clipping to the window (no host sync). A step with
        no gradient (norm 0) or a non-finite one is left out, as AutoClip's history leaves it."""
        kept = torch.isfinite(total) & (total > 0)
        wide = torch.float32 if total.device.type == "mps" else torch.float64  # (no float64)
        part = torch.stack([torch.where(kept, total.to(wide).square(), 0.0), kept.to(wide)])
        if self._norms is None or self._norms.device != part.device:  # (or from a checkpoint)
            self._norms = part.new_zeros(2) if self._norms is None else self._norms.to(part.device)
        self._norms.add_(part)

    def _count(self, mask: torch.Tensor) -> None:
        c = mask.sum(dtype=torch.int64) if mask.dim() else mask.to(torch.int64)
        if self._clipped is None:
            self._clipped = torch.zeros((), dtype=torch.int64, device=c.device)
        elif self._clipped.device != c.device:  # restored from a checkpoint on the CPU
            self._clipped = self._clipped.to(c.device)
        self._clipped.add_(c)

    def state_dict(self) -> dict[str, Any]:
        """With the open window's counts (read back: a host sync, as a checkpoint makes): a
        resumed run's first record counts the whole window, as one run's would."""
        clipped = 0 if self._clipped is None else int(self._clipped.detach().cpu())
        norms = [0.0, 0.0] if self._norms is None else self._norms.detach().cpu().tolist()
        return {**super().state_dict(),
                "window": {"clipped": clipped, "total": self._total, "steps": self._steps,
                           "norm_sq": norms[0], "norm_steps": int(norms[1])},
                # the last window's numbers: a held record decided on at resume reads them
                "last": dict(self.last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        window = state.get("window") or {}
        self._clipped = torch.tensor(int(window.get("clipped", 0)), dtype=torch.int64)
        self._total, self._steps = int(window.get("total", 0)), int(window.get("steps", 0))
        self._norms = torch.tensor([float(window.get("norm_sq", 0.0)),
                                    float(window.get("norm_steps", 0))], dtype=torch.float64)
        self.last = dict(state.get("last") or {})

    def read(self) -> dict[str, Any]:
        """This window's numbers (one host sync), then start a new window."""
        vals = [self._clipped, self._threshold]
        host = [None if v is None else float(v.detach().cpu()) for v in vals]
        norm_sq, kept = (0.0, 0.0) if self._norms is None else self._norms.detach().cpu().tolist()
        clipped = int(host[0] or 0)
        out = {
            "threshold": finite_or_none(host[1]),
            "clipped": clipped,
            "total": self._total,
            "steps": self._steps,
            "clip_fraction": clipped / self._total if self._total else 0.0,
            # the norm before clipping: RMS over the steps that had a finite, nonzero one
            "grad_norm": finite_or_none((norm_sq / kept) ** 0.5) if kept else None,
        }
        if self._clipped is not None:
            self._clipped.zero_()
        if self._norms is not None:
            self._norms.zero_()
        self._total = 0
        self._steps = 0
        return out

    def model_snapshot(self, record: RecordLike, sites: Sequence[str] | None = None) -> Snapshot:
        """The model-wide metrics, with the gradient norm before clipping of the window last
        read (:data:`UNCLIPPED`)."""
        out = model_snapshot(record, sites)
        out[UNCLIPPED] = self.last.get("grad_norm")
        return out

    def decide(self, record: RecordLike) -> list[Intervention]:
        """Report the window's clipping (not judged: it clipped step by step, no one-off
        change)."""
        stats = self.read()
        self.last = stats
        # never a step in its first windows (not one: an optimizer stepped less often than
        # the logs, a GAN's, has windows without a step; a review)
        self._idle_windows = -1 if stats["steps"] or self._idle_windows < 0 else (
            self._idle_windows + 1)
        self._idle_steps += int(getattr(record, "steps_run", 0) or 0)
        if self._listening and self._idle_windows >= _IDLE_WINDOWS and not self._handles and (
                self._idle_steps >= _IDLE_STEPS and not self._said_idle):
            self._said_idle = True  # (a trial: AutoClip(1).bind(doc) alone, nothing clipped)
            self.warn(f"relu_doctor: {type(self).__name__} is bound but clipped no step in "
                      f"{self._idle_windows} logging windows ({self._idle_steps} steps): "
                      "binding only records its clipping. Attach it to the "
                      f"optimizer ({type(self).__name__}(...).attach(opt).bind(doc)) or call "
                      "its clip_(model.parameters()) before each optimizer step.")
        if not stats["clipped"]:
            return []
        i = self.optimizer_index
        which: dict[str, Any] = {} if i is None else {"optimizer": i}
        return [
            self._intervention(
                site=MODEL,
                step=record.step,
                what=("" if i is None else f"optimizer {i}: ") + self._describe(stats),
                before=self.model_snapshot(record),
                measure_after=False,
                id_suffix="" if i is None else f"@optimizer{i}",
                clip=stats,
                **which,
            )
        ]

    def _describe(self, stats: Mapping[str, Any]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _norm_said(stats: Mapping[str, Any]) -> str:
        norm = stats.get("grad_norm")
        return "" if norm is None else f"; gradient norm before clipping {norm:.4g} (RMS)"


class AutoClip(_Clipper):
    """AutoClip (Seetharaman et al. 2020): clip the total gradient norm to the ``percentile``-th
    percentile of the norms seen so far.

    The history is a ring buffer of the last ``history`` total norms on the gradients'
    device; the threshold is ``torch.nanquantile`` over it (non-finite norms, e.g. fp16
    overflow steps, are stored as NaN and ignored). No host synchronisation per step; the
    clip count and the threshold are read at logging time (:meth:`read`).

    Call :meth:`clip_` after ``scaler.unscale_(optimizer)`` and before ``optimizer.step()``,
    or :meth:`attach` it to the optimizer as a step pre-hook. On DTensor parameters (FSDP2
    ``fully_shard``) the norm is the whole gradient's, summed across the shards, the same on
    every process; other sharded parameters (FSDP1, DeepSpeed ZeRO-3) are refused.

    Args:
        percentile: in (0, 100]; the paper's best values are around 10.
        history: how many past norms the percentile is taken over.
        warmup_steps: steps that only record their norm, without clipping.

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> clip = AutoClip(percentile=10)
        >>> net(torch.randn(4, 3)).sum().backward()
        >>> total = clip.clip_(net.parameters())  # the norm before clipping, like torch's
        >>> clip.read()["steps"]
        1
    """

    def __init__(
        self, percentile: float = 10.0, *, history: int = 1000, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        self.percentile = number_in(
            "percentile", percentile, 0.0, 100.0, hint=" (AutoClip's paper uses 10)"
        )
        self.history = positive_int("history", history)
        self.warmup_steps = positive_int("warmup_steps", warmup_steps, minimum=0)
        self._buf: torch.Tensor | None = None
        self._pos = 0
        self._seen = 0
        #: the dtype of the gradients it last clipped (what the precision of their norms is)
        self.grad_dtype = torch.float32

    def clip_(self, params: Iterable[torch.Tensor]) -> torch.Tensor:
        """Record this step's total gradient norm and clip to the percentile (in place).

        Returns:
            The total gradient norm before clipping (0-dim float32 tensor on the gradients'
            device; no host synchronisation), as ``torch.nn.utils.clip_grad_norm_`` does.
        """
        return self.clip_grads_(_grads(params))

    @torch.no_grad()
    def clip_grads_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`clip_` of the gradient tensors themselves (a Keras optimizer's accumulated
        gradient, which no parameter's ``.grad`` holds)."""
        if not grads:
            return torch.tensor(0.0)
        self._check_whole(grads)
        device, self.grad_dtype = grads[0].device, grads[0].dtype
        total: torch.Tensor = _total_norm(grads, device)
        full = getattr(total, "full_tensor", None)
        if full is not None:  # DTensor shards: the whole gradient's norm, on every process
            total = full()
        self._note_norm(total)
        if self._buf is None:
            self._buf = torch.full((self.history,), float("nan"), device=device)
        elif self._buf.device != device:  # restored from a checkpoint on the CPU
            self._buf = self._buf.to(device)
        # A step with no gradient (zero norm: a branch not taken, a GAN's idle optimizer) is
        # no norm to learn a threshold from: with enough of them the percentile was 0, and
        # every step that had a gradient was multiplied by 0.
        kept = torch.isfinite(total) & (total > 0)
        self._buf[self._pos].copy_(torch.where(kept, total, float("nan")))
        self._pos = (self._pos + 1) % self.history
        self._seen += 1
        self._steps += 1
        self._total += 1
        threshold = torch.nanquantile(self._buf, self.percentile / 100.0)
        self._threshold = threshold
        if self._seen <= self.warmup_steps:
            return total
        over = total > threshold  # False for NaN threshold or NaN norm
        coef = torch.where(over, threshold / (total + 1e-6), 1.0)
        torch._foreach_mul_(grads, coef)
        self._count(over)
        return total

    def _sharding(self, tensors: list[torch.Tensor]) -> str | None:
        found = sharding_of(params=tensors)
        return None if found == DTENSOR else found  # DTensor: the norm of the whole gradient

    def _describe(self, stats: Mapping[str, Any]) -> str:
        thr = stats["threshold"]
        return (
            f"AutoClip (p{self.percentile:g}) clipped the gradient norm on {stats['clipped']} of "
            f"{stats['steps']} steps; threshold now {thr:.4g}"
            if thr is not None
            else f"AutoClip clipped {stats['clipped']} of {stats['steps']} steps"
        ) + self._norm_said(stats)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "percentile": self.percentile,
            "history_size": self.history,
            "history": None if self._buf is None else self._buf.detach().cpu().clone(),
            "pos": self._pos,
            "seen": self._seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        buf = state.get("history")
        if buf is not None:
            buf = torch.as_tensor(buf, dtype=torch.float32)
            if buf.numel() != self.history:  # oldest first (the ring starts at pos), then cut
                ordered = torch.roll(buf, -int(state.get("pos", 0)))
                keep = ordered[~torch.isnan(ordered)][-self.history :]
                new = torch.full((self.history,), float("nan"))
                new[: keep.numel()] = keep
                buf = new
                self._pos = keep.numel() % self.history
            else:
                self._pos = int(state.get("pos", 0))
            device = self._buf.device if self._buf is not None else torch.device("cpu")
            self._buf = buf.to(device)
        self._seen = int(state.get("seen", 0))

    @property
    def norm_history(self) -> torch.Tensor:
        """The recorded norms, oldest first (NaN-free; a host copy)."""
        if self._buf is None:
            return torch.empty(0)
        b = torch.roll(self._buf.detach().cpu(), -self._pos)
        return b[~torch.isnan(b)]


def clipped_at(norms: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> float | None:
    """The norm a loop's own clipping holds the total gradient norm to, where ``norms`` (a
    step's each, of gradients of ``dtype``) reached their maximum and no more on several
    steps, else None. ``clip_grad_norm_(params, c)`` scales a gradient past ``c`` to
    ``c * T / (T + 1e-6)``: in float32, within about 1e-6 of ``c`` (norms that training
    makes do not repeat so: 3 steps there are enough); in half precision, within about twice
    its epsilon, where norms that sit near their maximum are less rare (5 steps, and a
    twentieth of them). A gradient whose norm is the same at every step (a collapsed
    model's constant one) reads so too."""
    finite = norms[torch.isfinite(norms)]
    half = torch.finfo(dtype).eps > 1e-6 if dtype.is_floating_point else False
    times = max(5, math.ceil(0.05 * finite.numel())) if half else 3
    if finite.numel() < times:
        return None
    top = float(finite.max())
    if not top > 0:
        return None
    rel = max(2 * torch.finfo(dtype).eps if half else 1e-5, 2e-6 / top)
    return top if int((finite >= top * (1.0 - rel)).sum()) >= times else None


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    dims = None if x.dim() <= 1 else tuple(range(1, x.dim()))
    norm: torch.Tensor = torch.linalg.vector_norm(
        x, dim=dims, keepdim=dims is not None, dtype=torch.float32
    )
    return norm


class AGC(_Clipper):
    """Adaptive gradient clipping (Brock et al. 2021, NFNets): unit-wise, each output unit's
    gradient norm is clipped to ``clipping`` times that unit's weight norm (at least ``eps``).

    Units are rows (dim 0) of weights with two or more dims; vectors (biases, norms' scales)
    count as one unit. The paper leaves the final classifier layer unclipped: pass only the
    parameters you want clipped. No host synchronisation per step.

    Args:
        clipping: the ratio lambda, e.g. 0.01 to 0.16 (smaller for larger batches).
        eps: floor of the weight norm, so zero-initialised units still move.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> agc = AGC(clipping=0.01)
        >>> (net(torch.randn(4, 3)) * 1e3).sum().backward()
        >>> total = agc.clip_(net.parameters())
        >>> agc.read()["clipped"] > 0
        True
    """

    def __init__(self, clipping: float = 0.01, *, eps: float = 1e-3) -> None:
        super().__init__()
        self.clipping = positive_finite("clipping", clipping)
        self.eps = nonnegative("eps", eps)
        self._threshold = torch.tensor(self.clipping)

    @torch.no_grad()
    def clip_(self, params: Iterable[torch.Tensor]) -> torch.Tensor:
        """Clip every parameter's gradient unit-wise (in place).

        Returns:
            The total gradient norm before clipping (0-dim float32 tensor on the gradients'
            device; no host synchronisation), as ``torch.nn.utils.clip_grad_norm_`` does.
        """
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return torch.tensor(0.0)
        grads = [p.grad for p in ps if p.grad is not None]
        self._check_whole(grads)
        device, self.grad_dtype = grads[0].device, grads[0].dtype
        total: torch.Tensor = _total_norm(grads, device)
        self._steps += 1
        self._note_norm(total)
        for p in ps:
            g = p.grad
            assert g is not None
            max_norm = _unitwise_norm(p.detach()).clamp(min=self.eps).mul_(self.clipping)
            gnorm = _unitwise_norm(g)
            over = gnorm > max_norm
            scale = torch.where(over, max_norm / gnorm.clamp(min=1e-6), 1.0)
            g.mul_(scale.to(g.dtype))
            self._count(over)
            self._total += over.numel()
        return total

    def _describe(self, stats: Mapping[str, Any]) -> str:
        return (
            f"AGC (lambda {self.clipping:g}) clipped {stats['clipped']} of {stats['total']} "
            f"unit-gradients over {stats['steps']} steps ({stats['clip_fraction']:.1%})"
        ) + self._norm_said(stats)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clipping": self.clipping}
