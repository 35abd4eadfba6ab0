"""Unit links (relu_doctor.remedies.unit_links): the producer and consumer layers of a site,
read from one recorded forward pass, in Sequential, nested and functional models, found from
SiteKeys whatever the module names."""

from __future__ import annotations

import pytest
import torch

import relu_doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import find_unit_links
from relu_doctor.remedies.dataflow import record_dataflow
from relu_doctor.sites import SiteKey
from tests.remedies.helpers import mlp
from tests.zoo import BasicBlock, FxNet, MixedActivations, SmallCNN, Untraceable, odd_name_net


def test_links_in_sequential_nested_and_fx_models():
    cnn = SmallCNN(8)
    xc = torch.randn(2, 3, 8, 8)
    assert find_unit_links(cnn, site="features.2", example_inputs=xc).describe() == {
        "site": "features.2",
        "units": 8,
        "producer": "features.0",
        "norm": "features.1",
        "consumers": [{"path": "features.4", "span": 1}],
    }
    # conv-to-linear flatten in the parent's forward: each channel owns 4x4 head inputs.
    links = find_unit_links(cnn, site="features.6", example_inputs=xc)
    assert (links.producer_path, links.norm_path) == ("features.4", "features.5")
    assert [(c.path, c.span) for c in links.consumers] == [("head", 16)]
    fx = FxNet()
    xf = torch.randn(2, 3, 4, 4)
    links = find_unit_links(fx, site="act", example_inputs=xf)
    assert (links.producer_path, links.norm_path) == ("conv", "bn")
    assert [(c.path, c.span) for c in links.consumers] == [("fc", 4)]
    with relu_doctor.watch(fx, functional=True, log_every_n_steps=1) as doc:
        fx(torch.randn(2, 3, 4, 4))
        names = [s.name for s in doc.sites]
        key = doc.site_key("(root):relu#0")
    assert names == ["act", "(root):relu#0"]
    assert key == SiteKey("", 0, "relu")
    links = find_unit_links(fx, site=key, example_inputs=xf)
    assert (links.producer_path, links.norm_path, links.consumers[0].path) == ("fc", None, "out")
    assert links.site == "(root):relu#0"


def test_links_errors_name_the_site():
    block = BasicBlock(4)
    x = torch.randn(2, 4, 5, 5)
    flow = record_dataflow(block, x)
    assert find_unit_links(block, site=SiteKey("relu", 0), dataflow=flow).producer_path == "conv1"
    with pytest.raises(
        ReluDoctorError, match=r"site 'relu#1': its input comes from a sum \(add in \(root\)"
    ):
        find_unit_links(block, site=SiteKey("relu", 1), dataflow=flow)
    with pytest.raises(ReluDoctorError, match="site: the model has no module at 'x'"):
        find_unit_links(mlp(), site="x", example_inputs=torch.randn(2, 8))
    with pytest.raises(ReluDoctorError, match="site: the model has no module at 'relu#1'"):
        find_unit_links(block, site="relu#1", dataflow=flow)  # a str is a module path, never parsed
    with pytest.raises(ReluDoctorError, match="site 'second': its input"):
        find_unit_links(block, site=SiteKey("relu", 1), name="second", dataflow=flow)
    with pytest.raises(ReluDoctorError, match="example_inputs: expected the input"):
        find_unit_links(block, site=SiteKey("relu", 0))
    with pytest.raises(ReluDoctorError, match=r"site 'relu#2': the recorded forward pass called"):
        find_unit_links(block, site=SiteKey("relu", 2), dataflow=flow)
    with pytest.raises(ReluDoctorError, match="site 'relu': the forward pass on example_inputs"):
        find_unit_links(block, site="relu", example_inputs=torch.randn(2, 3))


def test_data_dependent_control_flow_is_what_the_pass_did():
    """No tracing: the branch that ran is the graph. Here the branch reads the units' sum,
    so a fresh unit could flip it: refused, naming that path."""
    with pytest.raises(ReluDoctorError, match=r"sum in \(root\)\.forward sums the units.*relu -> sum"):
        find_unit_links(Untraceable(), site="act", example_inputs=torch.randn(2, 3))


def test_one_recorded_pass_serves_every_site_and_leaves_the_model_as_it_was():
    net = SmallCNN(4)
    x = torch.randn(4, 3, 8, 8)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    rng = torch.random.get_rng_state()
    flow = record_dataflow(net, x)
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())
    assert torch.equal(torch.random.get_rng_state(), rng)
    a = find_unit_links(net, site="features.2", dataflow=flow)
    b = find_unit_links(net, site="features.6", dataflow=flow)
    assert (a.producer_path, b.producer_path) == ("features.0", "features.4")


@pytest.mark.parametrize("name", ["enc:act", "a#1"])
def test_links_of_modules_whose_names_look_like_sites(name):
    net = odd_name_net(name)
    x = torch.randn(2, 4)
    links = find_unit_links(net, site=name, example_inputs=x)
    assert links.describe() == {
        "site": name,
        "units": 8,
        "producer": "fc",
        "norm": None,
        "consumers": [{"path": f"{name}_blk.fc", "span": 1}],
    }
    assert find_unit_links(net, site=SiteKey(name), example_inputs=x).producer_path == "fc"
    # The functional call inside "<name>_blk": its output leaves the block to `out`.
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        net(torch.randn(2, 4))
        key = doc.site_key(f"{name}_blk:relu#0")
    assert key == SiteKey(f"{name}_blk", 0, "relu")
    links = find_unit_links(net, site=key, example_inputs=x)
    assert (links.site, links.producer_path, [c.path for c in links.consumers]) == (
        f"{name}_blk:relu#0",
        f"{name}_blk.fc",
        ["out"],
    )


def test_a_functional_call_inside_a_child_is_told_from_the_parents_own_calls():
    """``block:relu#0`` leaves its block; in the pass it is the block's call, not the
    parent's own ``F.relu`` (``(root):relu#0``), though both are call 0 of ``relu``."""
    net = MixedActivations()
    flow = record_dataflow(net, torch.randn(2, 6))
    own = find_unit_links(net, site=SiteKey("", 0, "relu"), dataflow=flow)
    assert (own.producer_path, [c.path for c in own.consumers]) == ("fc2", ["fc3"])
    child = find_unit_links(net, site=SiteKey("block", 0, "relu"), dataflow=flow)
    assert (child.producer_path, [c.path for c in child.consumers]) == ("block.fc", ["out"])
    assert child.site == "block:relu#0"


def test_per_unit_sums_a_consumers_inputs_by_unit():
    """What a remedy reading outgoing weights needs: per unit, whatever span or offset."""
    from tests.zoo import DenseNetish

    net = DenseNetish()
    flow = record_dataflow(net, torch.randn(2, 3, 8, 8))
    links = find_unit_links(net, site="block.0.relu2", dataflow=flow)
    (conv2,) = links.consumers
    w = conv2.module.weight.detach()
    got = conv2.per_unit(w.abs().sum((0, 2, 3)), links.units)
    torch.testing.assert_close(got, w.abs().sum((0, 2, 3)))  # channel i is unit i
    head = find_unit_links(SmallCNN(4), site="features.6", example_inputs=torch.randn(2, 3, 8, 8))
    (lin,) = head.consumers
    cols = torch.arange(lin.module.in_features, dtype=torch.float32)
    expected = cols.reshape(head.units, 16).sum(1)  # 16 columns per channel after flatten
    torch.testing.assert_close(lin.per_unit(cols, head.units), expected)
    # relu0's units reach the transition's BatchNorm: channels 0-7 of 16
    t = find_unit_links(net, site="relu0", dataflow=flow).consumers[-1]
    assert t.path == "transition.norm" and t.unit_of_inputs(16).tolist() == [*range(8)] + [-1] * 8


class _ShapeOnly(torch.nn.Module):
    """A buffer made in the activation's shape (GNN code's scatter targets): it reads no
    value of the units; ``kind`` how it is made. ``"scaled"`` reads them (a control)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.l1, self.l2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        buf = {"zeros_like": lambda: torch.zeros_like(h),
               "new_zeros": lambda: h.new_zeros(h.shape),
               "full_like": lambda: torch.full_like(h, 2.0),
               "scaled": lambda: h * 0.5}[self.kind]()
        return self.l2(h) + buf.sum()


@pytest.mark.parametrize("kind", ["zeros_like", "new_zeros", "full_like", "scaled"])
def test_a_tensor_made_in_the_units_shape_does_not_read_them(kind):
    """``torch.zeros_like(h)`` reads h's shape only: a GNN trial's sites were refused as
    "its units reach zeros_like". Their links are l1 to l2, as without the buffer; a buffer
    computed from h's values still refuses them."""
    site = SiteKey(module_path="", call_index=0, op="relu")
    if kind == "scaled":
        with pytest.raises(ReluDoctorError, match="relu -> mul -> sum"):
            find_unit_links(_ShapeOnly(kind), site=site, example_inputs=torch.randn(3, 4))
        return
    links = find_unit_links(_ShapeOnly(kind), site=site, example_inputs=torch.randn(3, 4))
    described = links.describe()
    assert described["producer"] == "l1"
    assert [c["path"] for c in described["consumers"]] == ["l2"]
