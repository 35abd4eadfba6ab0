"""Padded batches (``watch(..., padding_mask=...)``): the padding positions are left out of
every statistic, forward and gradients, against a reference taken over the real positions
alone (:mod:`tests.reference` on the captured tensors indexed by the mask), on Hugging Face
models built from tiny configs; a site the mask does not fit counts every position, said
once; a mask that cannot be read is said and counts every position; bad arguments name
what was expected."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.reports import write_report
from relu_doctor.stats import (
    FIELDS,
    forward_rows,
    grad_rows,
    mask_for,
    masked_forward_rows,
    masked_grad_rows,
)
from tests import reference as ref
from tests.test_real_models import _bert, _gpt2


def _batches() -> list[dict[str, torch.Tensor]]:
    """Three padded batches of varying length; each row's real tokens come first."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, lengths in ((9, [9, 4, 6]), (7, [2, 7, 7]), (11, [11, 1, 5])):
        ids = torch.randint(1, 40, (3, n), generator=g)
        mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _real(capture: ref.Capture, masks: list[torch.Tensor]) -> ref.Capture:
    """The captured tensors at the real positions only: ``(real positions, units)``."""
    keep = [m.bool() for m in masks]
    return ref.Capture(
        outputs=[o[k] for o, k in zip(capture.outputs, keep, strict=True)],
        grads=[g[k] for g, k in zip(capture.grads, keep, strict=True)],
        grad_inputs=[gi[k] for gi, k in zip(capture.grad_inputs, keep, strict=True)],
    )


def _total(site: Any) -> dict[str, np.ndarray]:
    m = (site.stats.window + site.stats.lifetime).to(torch.float64).numpy()
    return {name: m[i] for i, name in enumerate(FIELDS)}


def _train(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> relu_doctor.Doctor:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        with relu_doctor.watch(model, every_n_steps=1, log_every_n_steps=2,
                               padding_mask="attention_mask") as doc:
            for batch in batches:
                out = model(**batch).last_hidden_state
                out.square().mean().backward()  # the padding gets gradients too
                opt.step()
                opt.zero_grad()
                doc.step()
    return doc


@pytest.mark.parametrize("case", ["bert_relu", "bert_gelu", "gpt2_relu"])
def test_a_padded_batchs_padding_is_left_out_of_every_statistic(case: str) -> None:
    torch.manual_seed(0)
    model = (_gpt2("relu") if case.startswith("gpt2") else
             _bert("gelu" if case == "bert_gelu" else "relu")).train()
    act = "mlp.act" if case.startswith("gpt2") else "intermediate.intermediate_act_fn"
    acts = {p: m for p, m in model.named_modules() if p.endswith(act)}
    recorder = ref.Recorder(model, types=tuple({type(m) for m in acts.values()}))
    batches = _batches()
    try:
        doc = _train(model, batches)
    finally:
        recorder.remove()
    masks = [b["attention_mask"] for b in batches]
    sites = {s.module_path: s for s in doc.sites}
    assert set(sites) == set(acts)
    for path in acts:
        capture = recorder.calls[(path, 0)]
        real = _real(capture, masks)
        want = ref.expected_stats(real, 1)
        ref.assert_stats_match(_total(sites[path]), want, path, rtol=1e-4)
        # the padding made a difference: every position would count more elements
        assert want["elements"][0] < sum(o.shape[0] * o.shape[1] for o in capture.outputs)
    frame = doc.to_pandas()
    real_positions = sum(int(m.sum()) for m in masks[2:])  # the last window: batch 3
    for path in acts:
        site = sites[path]
        row = frame[frame["site"] == site.name].iloc[-1]
        mine = ref.derived_metrics(ref.expected_stats(
            _real(recorder.calls[(path, 0)], masks), 1, steps=[2]))
        assert row["activation_rate"] == pytest.approx(mine["site_activation_rate"], rel=1e-6)
        assert row["grad_zero_fraction"] == pytest.approx(mine["grad_zero_fraction"], rel=1e-6)
        assert site.stats.lifetime[FIELDS.index("elements")][0] + \
            site.stats.window[FIELDS.index("elements")][0] == sum(int(m.sum()) for m in masks)
    assert real_positions == 17


def test_the_gradients_of_a_checkpointed_forward_are_those_of_its_passs_real_positions():
    """Reentrant activation checkpointing recomputes the forward during backward, where the
    gradient is tapped: it reads the mask of the pass it recomputes. The same run without
    checkpointing (checked against the reference above) gives the same numbers."""
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = _bert("relu").train()
        if checkpointed:
            model.activation_checkpointing_enable({"use_reentrant": True})
        doc = _train(model, _batches())
        runs.append({s.name: _total(s) for s in doc.sites})
    plain, checkpointed = runs
    assert set(plain) == set(checkpointed) and plain
    for name, want in plain.items():
        ref.assert_stats_match(checkpointed[name], want, name, rtol=1e-4)


def test_a_site_the_mask_does_not_fit_counts_every_position_said_once() -> None:
    """A convolution's ``(batch, channels, length)`` output is masked along its length (its
    shape, the unit dim left out, is the mask's ``(batch, length)``: a point cloud trial's
    padded points were counted, and the warning blamed the mask's rate); a strided one's
    ``(batch, channels, length / 2)`` fits no mask and counts every position (said once),
    the sequence site beside them its real positions. A pass whose call holds no mask
    counts every position."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3, padding=1)
            self.conv_act = nn.ReLU()
            self.down = nn.Conv1d(6, 6, 2, stride=2)
            self.down_act = nn.ReLU()
            self.lin = nn.Linear(6, 5)
            self.lin_act = nn.ReLU()

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
            h = self.conv_act(self.conv(x))  # (B, 6, L)
            d = self.down_act(self.down(h))  # (B, 6, L / 2)
            return self.lin_act(self.lin(h.transpose(1, 2))).sum() + d.sum()  # (B, L, 5)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 4, 8)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5, [1] * 6 + [0] * 2])
    with pytest.warns(ReluDoctorWarning, match=r"1 site\(s\) ran with a padding mask that "
                      r"does not fit them.*'down_act' \(the first's output \(3, 6, 4\), its unit "
                      r"dim left out, does not begin with the mask's shape \(3, 8\).*2 other "
                      r"site\(s\) are masked") \
            as caught, relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=10,
                           padding_mask="attention_mask") as doc:
        for _ in range(2):
            net(x, attention_mask=mask).backward()
            doc.step()
        net(x).backward()  # no mask: every position
        doc.step()
    assert sum("padding mask" in str(w.message) for w in caught) == 1
    totals = {s.name: _total(s) for s in doc.sites}
    real = int(mask.sum())
    h = torch.relu(net.conv(x)).detach()
    assert totals["conv_act"]["elements"].tolist() == [2 * real + 3 * 8] * 6
    want = 2 * ((h > 0) & mask.bool()[:, None, :]).sum((0, 2)) + (h > 0).sum((0, 2))
    assert totals["conv_act"]["active"].tolist() == want.tolist()
    assert totals["conv_act"]["grad_elements"].tolist() == [2 * real + 3 * 8] * 6
    d = torch.relu(net.down(h)).detach()
    assert totals["down_act"]["elements"].tolist() == [3 * 3 * 4] * 6
    assert totals["down_act"]["active"].tolist() == (3 * (d > 0).sum((0, 2))).tolist()
    out = torch.relu(net.lin(h.transpose(1, 2))).detach()
    assert totals["lin_act"]["elements"].tolist() == [2 * real + 3 * 8] * 5
    want = 2 * (out[mask.bool()] > 0).sum(0) + (out > 0).sum((0, 1))
    assert totals["lin_act"]["active"].tolist() == want.tolist()


@pytest.mark.parametrize("given", ["keyword", "flattened"])
def test_flattened_and_routed_rows_are_named_as_they_are_now_or_masked_as_given(given) -> None:
    """A mixture of experts' block runs its tokens flattened, ``(batch * seq, features)``
    (Qwen-MoE's shared expert), and its experts on routed rows. Their rows' order is not
    known (a review: a sequence-first flatten, or rows sorted by expert, read 0 of 16 dead
    where all were on the real tokens), so no mask is laid on them by guess: they are said,
    by their names now (an MoE trial saw ``experts``, renamed ``experts#0`` by a second
    call, listed too). A mask given flattened (a function) is laid on the flattened rows,
    counted as the test's own; the routed rows fit it no more."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.shared_act = nn.Linear(4, 6), nn.ReLU()
            self.expert, self.experts = nn.Linear(4, 6), nn.ReLU()

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])  # (B * S, 4)
            out = self.shared_act(self.shared(flat)).sum()
            for rows in (flat[::3], flat[1::3]):  # two experts' routed rows, one module
                out = out + self.experts(self.expert(rows)).sum()
            return out

    torch.manual_seed(0)
    net = Block()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3])
    padding = ("attention_mask" if given == "keyword"
               else lambda args, kwargs: kwargs["attention_mask"].reshape(-1))
    with warnings.catch_warnings(record=True) as caught, relu_doctor.watch(
            net, every_n_steps=1, log_every_n_steps=1, padding_mask=padding) as doc:
        warnings.simplefilter("always")
        net(x, attention_mask=mask).backward()
        doc.step()
    said = [str(w.message) for w in caught if "padding mask that does not fit" in str(w.message)]
    named = "'shared_act', 'experts#0', 'experts#1'" if given == "keyword" else "'experts#0', 'experts#1'"
    assert len(said) == 1 and f"{named} (the first's" in said[0], said
    assert "'experts'," not in said[0]
    totals = {s.name: _total(s) for s in doc.sites}
    h = torch.relu(net.shared(x.reshape(-1, 4))).detach()
    keep = mask.reshape(-1).bool() if given == "flattened" else torch.ones(10, dtype=torch.bool)
    assert totals["shared_act"]["elements"].tolist() == [int(keep.sum())] * 6
    assert totals["shared_act"]["active"].tolist() == (h[keep] > 0).sum(0).tolist()


def test_a_pooled_head_one_row_a_sample_is_no_site_the_mask_misses() -> None:
    """A sequence encoder pooled to one row a sample, then a ReLU head: the head's
    ``(batch, units)`` output holds no padding position, and it was named among the sites
    the mask did not fit, at every run (a trial). It counts each sample, and nothing is
    said; the sequence site is masked."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(4, 6)
            self.enc_act = nn.ReLU()
            self.head = nn.Linear(6, 5)
            self.head_act = nn.ReLU()

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.enc_act(self.enc(x))  # (B, L, 6)
            m = attention_mask.unsqueeze(-1).float()
            return self.head_act(self.head((h * m).sum(1) / m.sum(1)))  # (B, 5)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 8, 4)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5, [1] * 6 + [0] * 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=10,
                               padding_mask="attention_mask") as doc:
            net(x, attention_mask=mask).sum().backward()
            doc.step()
    assert not [w for w in caught if "padding mask" in str(w.message)]
    totals = {s.name: _total(s) for s in doc.sites}
    assert totals["head_act"]["elements"].tolist() == [3] * 5
    assert totals["enc_act"]["elements"].tolist() == [int(mask.sum())] * 6


def test_a_cached_decode_steps_one_position_is_no_site_the_mask_misses() -> None:
    """An HF trial's generate() under eval_stream=True: after the prompt's pass, masked,
    each cached decode step runs (batch, 1, units) with the mask grown to (batch, L + k);
    it was named as counting padding, and the mask as of another rate ("No site is
    masked"), the prompt's pass masked. Its one position is the newest token: counted,
    nothing said; and a site that does miss the mask at some passes says that it is masked
    at the others."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act = nn.Linear(4, 6), nn.ReLU()

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.act(self.lin(x))

    torch.manual_seed(0)
    net = Net()
    prompt = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=10,
                               padding_mask=lambda a, k: k["mask"]) as doc:
            net(torch.randn(2, 5, 4), mask=prompt).sum().backward()
            for k in range(1, 4):  # (the decode steps: the mask grows by one each)
                grown = torch.cat([prompt, torch.ones(2, k, dtype=torch.long)], 1)
                net(torch.randn(2, 1, 4), mask=grown).sum().backward()
            doc.step()
    assert not [w for w in caught if "padding mask" in str(w.message)]
    (site,) = doc.sites
    assert _total(site)["elements"].tolist() == [float(prompt.sum()) + 2 * 3] * 6
    # (batch, 2, units) with that mask does not fit: named, and masked at the other passes
    with pytest.warns(ReluDoctorWarning, match=r"1 site\(s\) ran with a padding mask that does "
                      r"not fit them.* 0 other site\(s\) are masked; 1 of those named are "
                      r"masked at the passes the mask fits"), relu_doctor.watch(
            net, every_n_steps=1, log_every_n_steps=1, padding_mask=lambda a, k: k["mask"]) as doc:
        net(torch.randn(2, 5, 4), mask=prompt).sum().backward()
        net(torch.randn(2, 2, 4), mask=torch.ones(2, 7)).sum().backward()
        doc.step()


def test_a_mask_of_the_inputs_rate_that_fits_no_site_names_them_all(tmp_path) -> None:
    """A trial's Wav2Vec2 mask has one entry per audio sample, its activations run at the
    frame rate: no site fits it, and the one warning named the first site only, read as
    the only one unmasked (its transformer sites were unmasked too, silently). Every such
    site is named, said at the log, the hint given where none is masked, and
    meta.json lists them; their counts are every position's (the reference)."""

    class Audio(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 6, 4, stride=4)  # samples -> frames
            self.conv_act = nn.GELU()
            self.ff = nn.Linear(6, 6)
            self.ff_act = nn.GELU()

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.conv_act(self.conv(x.unsqueeze(1))).transpose(1, 2)  # (B, frames, 6)
            return self.ff_act(self.ff(h))

    torch.manual_seed(0)
    net = Audio()
    x = torch.randn(3, 32)
    mask = torch.ones(3, 32, dtype=torch.long)
    mask[1, 20:] = 0
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=2, run_dir=run,
                               padding_mask="attention_mask") as doc:
            for _ in range(4):
                net(x, attention_mask=mask).sum().backward()
                doc.step()
    said = [str(w.message) for w in caught if "padding mask" in str(w.message)]
    assert len(said) == 1, said
    assert "2 site(s)" in said[0] and "'conv_act', 'ff_act'" in said[0]
    assert "No site is masked" in said[0] and "activations' rate" in said[0]
    html = write_report(run).read_text()  # (the report names them too)
    assert "padding counted at" in html
    assert "2 sites the mask does not fit: conv_act, ff_act" in html
    assert relu_doctor.load_run(run).meta["unmasked_sites"] == ["conv_act", "ff_act"]
    h = net.ff_act(net.ff(net.conv_act(net.conv(x.unsqueeze(1))).transpose(1, 2))).detach()
    totals = {s.name: _total(s) for s in doc.sites}
    assert totals["ff_act"]["elements"].tolist() == [4 * 3 * 8] * 6  # every frame, 4 steps
    assert totals["ff_act"]["active"].tolist() == (4 * (h > 0).sum((0, 1))).tolist()


def test_a_mask_that_cannot_be_read_is_said_and_every_position_counts() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    x = torch.randn(2, 5, 4)

    def broken(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return "not a tensor"

    said = r"the padding mask could not be read \(TypeError: expected a tensor .*\); the "
    with pytest.warns(ReluDoctorWarning, match=said), relu_doctor.watch(
            net, every_n_steps=1, padding_mask=broken) as doc:
        net(x).sum().backward()
        doc.step()
    (site,) = doc.sites
    assert _total(site)["elements"].tolist() == [10.0] * 6
    # a function reading the mask from the positional arguments (a loop of your own)
    seen = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    with relu_doctor.watch(net, every_n_steps=1, padding_mask=lambda a, k: seen) as doc:
        net(x).sum().backward()
        doc.step()
    (site,) = doc.sites
    assert _total(site)["elements"].tolist() == [6.0] * 6
    assert doc.to_run().meta["config"]["padding_mask"].startswith("function ")
    for bad in ("", 3, ["attention_mask"]):
        with pytest.raises(ReluDoctorError, match=r"padding_mask: expected the name of a "
                           r"keyword argument .* got"):
            relu_doctor.watch(net, padding_mask=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_rows_equal_the_rows_of_the_real_positions(dtype: torch.dtype) -> None:
    """The masked rows are those of the real positions gathered (the eager reference), with a
    NaN in the padding left out and one at a real position marking its unit's step."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, 4).to(dtype)  # (batch, seq, heads, units): units beyond the mask
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    x[0, 4, 1, 2] = float("nan")  # padding
    keep = mask_for(x.shape, 3, mask)
    assert keep is not None and mask_for(x.shape, 1, mask) is None
    got = masked_forward_rows(x, 3, keep, nonnegative=False, cap=None)
    want = forward_rows(x[mask], 2, nonnegative=False, cap=None)
    torch.testing.assert_close(got, want)
    x[1, 2, 0, 3] = float("inf")  # a real position: unit 3's step is not finite
    got = masked_forward_rows(x, 3, keep, nonnegative=False, cap=None)
    assert got[:, 3].tolist() == [0.0] * 6 + [1.0]
    g = torch.randn(3, 5, 2, 4).to(dtype)
    gi = g * (torch.rand(3, 5, 2, 4) > 0.4)
    got = masked_grad_rows(g, gi, 3, keep, inv_scale=0.5)
    want = grad_rows(g[mask], gi[mask], 2, inv_scale=0.5)
    torch.testing.assert_close(got, want)


class _Block(nn.Module):
    """A sequence block run through reentrant checkpointing, called with its mask."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.act = None if functional else nn.ReLU()
        self.out = nn.Linear(6, 2)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return self.out(torch.relu(h) if self.act is None else self.act(h))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                checkpointed: bool = False) -> torch.Tensor:
        if checkpointed:
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)
        return self.inner(x)


def _grad_elements(doc: relu_doctor.Doctor) -> float:
    (site,) = doc.sites
    return float((site.stats.window + site.stats.lifetime)[FIELDS.index("grad_elements")][0])


def test_reentrant_checkpointing_reads_the_mask_of_the_pass_it_recomputes() -> None:
    """A recomputation in backward read the latest pass's mask: two micro-batches, each with
    its backward, read each their own; two passes before one backward (a siamese pair) with
    different masks cannot be told apart there: their gradients count every position, said
    (a review: the first pass's gradients were counted with the second pass's mask)."""
    torch.manual_seed(0)
    net = _Block()
    x1, x2 = torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True)
    m1 = torch.ones(3, 5, dtype=torch.long)
    m2 = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)
        with relu_doctor.watch(net, every_n_steps=1, padding_mask="attention_mask") as doc:
            for x, m in ((x1, m1), (x2, m2)):  # accumulation: a backward per micro-batch
                net(x, attention_mask=m, checkpointed=True).sum().backward()
            doc.step()
    assert _grad_elements(doc) == 15 + 4
    with pytest.warns(ReluDoctorWarning, match="recomputed by reentrant checkpointing in a "
                      "backward through several passes with different padding masks"), \
            relu_doctor.watch(net, every_n_steps=1, padding_mask="attention_mask") as doc:
        a = net(x1, attention_mask=m1, checkpointed=True)
        b = net(x2, attention_mask=m2, checkpointed=True)
        (a - b).square().sum().backward()
        doc.step()
    (site,) = doc.sites
    total = site.stats.window + site.stats.lifetime
    assert total[FIELDS.index("elements")][0] == 15 + 4  # the forward: masked
    assert _grad_elements(doc) == 15 + 15  # every position, as said


def test_a_model_of_functional_calls_only_reads_the_mask_at_its_root() -> None:
    """No activation module: the mask hook had no module to sit on, and the mask was
    ignored without a word (a review)."""
    torch.manual_seed(0)
    net = _Block(functional=True)
    x = torch.randn(3, 5, 4)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    with relu_doctor.watch(net, every_n_steps=1, padding_mask="attention_mask") as doc:
        net(x, attention_mask=m).sum().backward()
        doc.step()
    (site,) = doc.sites
    total = site.stats.window + site.stats.lifetime
    h = torch.relu(net.lin(x)).detach()
    assert total[FIELDS.index("elements")].tolist() == [9.0] * 6
    assert total[FIELDS.index("active")].tolist() == (h[m.bool()] > 0).sum(0).tolist()
    assert _grad_elements(doc) == 9


def test_a_mask_never_given_is_said_once() -> None:
    """A mask passed by position (or a LightningModule called with a batch dict) is never
    found by its keyword's name: every position counted without a word (a review)."""
    torch.manual_seed(0)
    net = _Block()
    x = torch.randn(3, 5, 4)
    m = torch.ones(3, 5)
    with pytest.warns(ReluDoctorWarning, match=r"padding_mask='attention_mask': no recorded "
                      r"pass of the window was given a mask") as caught, \
            relu_doctor.watch(net, every_n_steps=1, log_every_n_steps=1,
                              padding_mask="attention_mask") as doc:
        for _ in range(3):
            net(x, m).sum().backward()
            doc.step()
    assert sum("no recorded pass" in str(w.message) for w in caught) == 1
    assert _grad_elements(doc) == 3 * 15


class _Encoder(nn.Module):
    """PyTorch's own encoder, called with its own mask (True at the padding)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.enc(x, src_key_padding_mask=src_key_padding_mask)


@pytest.mark.parametrize("form", ["bool", "additive"])
def test_pytorchs_key_padding_mask_is_refused_by_name_and_the_advice_given_counts_real_tokens(
        form: str) -> None:
    """A sequence trial: padding_mask="src_key_padding_mask" (True at the padding, where
    padding_mask wants nonzero at the real positions) was taken without a word and counted
    the padding alone (11 positions for 9 real tokens; a batch without padding, none). It
    is refused, and the function the error gives counts the real tokens of either form of
    PyTorch's mask (bool, or float with -inf at the padding), against this test's own
    hook on the encoder's linear1."""
    torch.manual_seed(0)
    net = _Encoder()
    name = "src_key_padding_mask"
    with pytest.raises(ReluDoctorError, match=r"padding_mask: 'src_key_padding_mask' is, by "
                       r"PyTorch's convention .* give padding_mask=lambda args, kwargs: None "
                       r"if kwargs.get\('src_key_padding_mask'\) is None else "
                       r"kwargs\['src_key_padding_mask'\] == 0"):
        relu_doctor.watch(net, padding_mask=name)
    lengths = torch.tensor([5, 2, 1, 1])
    pad = torch.arange(5)[None, :] >= lengths[:, None]  # True at the padding
    given = pad if form == "bool" else torch.zeros(4, 5).masked_fill(pad, float("-inf"))
    x = torch.randn(4, 5, 8)
    hidden = []
    net.enc.layers[0].linear1.register_forward_hook(lambda m, a, o: hidden.append(o.detach()))
    def advised(args: Any, kwargs: dict[str, Any]) -> Any:  # (the error's, word for word)
        return None if kwargs.get(name) is None else kwargs[name] == 0

    with warnings.catch_warnings():
        warnings.simplefilter("error", ReluDoctorWarning)  # (a call without it: said nothing)
        with relu_doctor.watch(net, every_n_steps=1, overhead_budget=None,
                               padding_mask=advised) as doc:
            net(x, src_key_padding_mask=given).sum().backward()
            net.enc(x)  # (a part called on its own, with no mask: counts every position)
            doc.step()
    (site,) = doc.sites
    h = torch.relu(hidden[0])[~pad]  # the real tokens' rows, by this test's own hook
    whole = torch.relu(hidden[1]).reshape(-1, 16)  # the part's call: every position
    assert h.shape[0] == 9
    t = _total(site)
    assert t["elements"].tolist() == [9.0 + 20.0] * 16
    assert t["active"].tolist() == ((h > 0).sum(0) + (whole > 0).sum(0)).tolist()


def test_a_window_the_mask_left_empty_says_the_mask_may_be_the_wrong_way_round() -> None:
    """The mask of a window with no padding, given the wrong way round (zero at the real
    positions), leaves every position out: the warning said the batches were empty or the
    activations replaced, and nothing of the mask (a sequence trial)."""
    torch.manual_seed(0)
    net = _Block()
    x = torch.randn(3, 5, 4)
    with pytest.warns(ReluDoctorWarning, match=r"recorded nothing .* or the padding mask "
                      r"\(padding_mask=\) left every position out: it must be nonzero at the "
                      r"real positions"), relu_doctor.watch(
            net, every_n_steps=1, log_every_n_steps=1, overhead_budget=None,
            padding_mask="attention_mask") as doc:
        net(x, attention_mask=torch.zeros(3, 5)).sum().backward()
        doc.step()
    (site,) = doc.sites
    assert _total(site)["elements"].tolist() == [0.0] * site.units


class _Features(nn.Module):
    """ReLU on (batch, channels, time) features that no layer made (a spectrogram's)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.relu(x)
        return self.head((h * attention_mask[:, None]).sum(-1))


def test_an_output_no_layer_made_takes_the_dim_the_padding_mask_does_not_cover_as_units():
    """A sequence trial: F.relu on (4, 6, T) features with a (4, T) mask read the T time
    steps as units (the shape rule's last dim), unmasked, and, T varying, dropped every
    batch of another length (0 units seen). The mask's dims are positions: the 6 channels
    are the units, each batch's real positions counted, against this test's own count."""
    torch.manual_seed(0)
    net = _Features()
    active, real = torch.zeros(6), 0
    with relu_doctor.watch(net, every_n_steps=1, overhead_budget=None,
                           padding_mask="attention_mask") as doc:
        for t in (20, 33, 17):
            x = torch.randn(4, 6, t)
            lengths = torch.randint(1, t + 1, (4,))
            m = (torch.arange(t)[None, :] < lengths[:, None]).long()
            net(x, attention_mask=m).sum().backward()
            doc.step()
            keep = m.bool()[:, None, :].expand(-1, 6, -1)  # (this test's own: channels x real)
            active += ((x > 0) & keep).sum((0, 2))
            real += int(m.sum())
    (site,) = doc.sites
    assert (site.unit_dim, site.units) == (1, 6)
    assert "padding mask (4, 20)" in site.unit_rule
    t = _total(site)
    assert t["elements"].tolist() == [float(real)] * 6
    assert t["active"].tolist() == active.tolist()
