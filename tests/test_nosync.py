"""No host synchronisation on a non-logging step (the budget in the README's overhead section).

Two independent detectors, each shown to fire on the logging step (so neither can pass by
seeing nothing):

* a ``TorchDispatchMode`` counting ``aten._local_scalar_dense`` (``.item()``, ``float(t)``,
  ``bool(t)``), copies from a non-CPU device to the CPU, and ops whose output size depends
  on the data (``nonzero``...: a sync on an accelerator);
* on CPU, ``.tolist()``, ``.numpy()`` and ``.cpu()`` never reach the dispatcher, so the
  second detector counts calls of those ``torch.Tensor`` methods (and ``__bool__``,
  ``__float__``, ``__int__``, ``__repr__``, ``__format__``) directly.

Every statistics path is covered: the fused CPU kernel (relu_doctor._kernels) and the eager
path it falls back to (the ``stats_path`` parameter).

Each non-logging step does everything a training step does: forward, backward, an
optimizer step with ``optimizer=`` passed to ``watch`` (its step hooks run), ``doc.step()``.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import relu_doctor
from relu_doctor import _kernels
from tests import zoo

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
                  aten._unique2.default}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOG_EVERY = 5


@pytest.fixture(params=["fused", "eager"])
def stats_path(request):
    """Run the test on the fused kernel, then on the eager path."""
    if request.param == "eager":
        with _kernels.disabled():
            yield request.param
        return
    if not _kernels.available():
        pytest.skip("no C compiler: the fused kernel is not built")
    yield request.param


def _device_of(x):
    return x.device if isinstance(x, torch.Tensor) else None


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.events: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SCALAR_READS or func in DATA_DEPENDENT:
            self.events[str(func)] += 1
        elif func is aten._to_copy.default:
            src, dst = _device_of(args[0]), kwargs.get("device")
            if src is not None and src.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
                self.events["device-to-host copy"] += 1
        elif func is aten.copy_.default:
            dst, src = _device_of(args[0]), _device_of(args[1])
            if src is not None and dst is not None and src.type != "cpu" and dst.type == "cpu":
                self.events["device-to-host copy"] += 1
        return func(*args, **kwargs)


WATCH_OPTIONS = {
    "every step": {},
    "every 2nd step": {"every_n_steps": 2},
    "with run_dir": {"run_dir": True},
}


def setup(device, options, tmp_path, name="small_cnn"):
    case = zoo.ARCH_CASES[name]
    model = case.model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    kwargs = {**options, "optimizer": opt, "log_every_n_steps": LOG_EVERY}
    if options.get("run_dir"):
        kwargs["run_dir"] = tmp_path / "run"
    doc = relu_doctor.watch(model, **kwargs)
    batches = [case.batch(4).to(device) for _ in range(2 * LOG_EVERY)]
    return model, opt, doc, batches


def one_step(model, opt, doc, x):
    out = model(x)
    out.square().mean().backward()
    opt.step()
    opt.zero_grad()
    return doc.step()


@pytest.mark.parametrize("options", WATCH_OPTIONS.values(), ids=WATCH_OPTIONS.keys())
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["small_cnn", "resnetish", "sequence"])
def test_no_sync_ops_on_non_logging_steps(device, options, tmp_path, name, stats_path):
    model, opt, doc, batches = setup(device, options, tmp_path, name)
    with doc:
        for step, x in enumerate(batches, start=1):
            with SyncCounter() as counter:
                record = one_step(model, opt, doc, x)
            if step % LOG_EVERY:
                assert record is None
                assert not counter.events, f"step {step} synchronised: {dict(counter.events)}"
            else:
                assert record is not None and record.step == step
                assert counter.events, "the detector saw no sync on a logging step"


FORBIDDEN = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__repr__",
             "__format__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts calls of the torch.Tensor methods that read a tensor back to the host."""
    calls: collections.Counter[str] = collections.Counter()

    for name in FORBIDDEN:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __name=name, __original=original, **kwargs):
            calls[__name] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("options", WATCH_OPTIONS.values(), ids=WATCH_OPTIONS.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_no_host_reads_on_non_logging_steps(device, options, tmp_path, host_reads, stats_path):
    model, opt, doc, batches = setup(device, options, tmp_path)
    with doc:
        for step, x in enumerate(batches, start=1):
            host_reads.clear()
            record = one_step(model, opt, doc, x)
            if step % LOG_EVERY:
                assert not host_reads, f"step {step} read tensors back: {dict(host_reads)}"
            else:
                assert record is not None
                # the detector sees the logging step read back (from a device through
                # .cpu(); on the CPU the sums are already host memory, read in place)
                assert sum(host_reads.values()) > 1, dict(host_reads)
                assert device == "cpu" or host_reads["cpu"], dict(host_reads)


def test_the_method_counter_sees_a_read_inside_a_hook(host_reads):
    """The detector catches a hook that reads back (what the test above must rule out)."""
    model = zoo.mlp()

    def reading_hook(module, args, out):
        bool(out.sum() > 0)

    model[1].register_forward_hook(reading_hook)
    host_reads.clear()
    model(torch.randn(2, 10))
    assert host_reads["__bool__"] == 1


def test_the_dispatch_counter_sees_a_read_inside_a_gradient_hook():
    """The dispatch mode also covers the backward pass, where the gradient taps run."""
    model = zoo.mlp()
    out = model[1](model[0](torch.randn(2, 10)))

    def reading_hook(grad):
        grad.sum().item()

    out.register_hook(reading_hook)
    with SyncCounter() as counter:
        out.sum().backward()
    assert counter.events[str(aten._local_scalar_dense.default)] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_no_sync_or_host_read_with_a_padding_mask(device, tmp_path, host_reads):
    """The masked path (padding zeroed, the real positions counted on the device, the
    gradient bound to its pass's mask) reads nothing back either: both detectors."""
    model, opt, _, batches = setup(device, {}, tmp_path, "sequence")
    x = batches[0]
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=device)
    mask[1:, x.shape[1] // 2:] = 0
    doc = relu_doctor.watch(model, optimizer=opt, log_every_n_steps=LOG_EVERY,
                            padding_mask=lambda args, kwargs: mask)
    with doc:
        for step, x in enumerate(batches, start=1):
            host_reads.clear()
            with SyncCounter() as counter:
                record = one_step(model, opt, doc, x)
            if step % LOG_EVERY:
                assert not counter.events and not host_reads, (dict(counter.events),
                                                                dict(host_reads))
            else:
                assert record is not None and counter.events | host_reads
    (site, *_) = doc.sites
    elements = (site.stats.window + site.stats.lifetime)[0, 0]
    assert int(elements) == 2 * LOG_EVERY * int(mask.sum())  # the mask was applied
