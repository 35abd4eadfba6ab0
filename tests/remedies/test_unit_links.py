"""Unit links (relu_doctor.remedies.unit_links): the producer and consumer layers of a site,
in Sequential, nested and fx-traced models, found from SiteKeys whatever the module names."""

from __future__ import annotations

import pytest
import torch

import relu_doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import find_unit_links
from relu_doctor.sites import SiteKey
from tests.remedies.helpers import mlp
from tests.zoo import BasicBlock, FxNet, MixedActivations, SmallCNN, Untraceable, odd_name_net


def test_links_in_sequential_nested_and_fx_models():
    cnn = SmallCNN(8)
    assert find_unit_links(cnn, site="features.2").describe() == {
        "site": "features.2",
        "units": 8,
        "producer": "features.0",
        "norm": "features.1",
        "consumers": [{"path": "features.4", "span": 1}],
    }
    # conv-to-linear flatten in the parent's forward: each channel owns 4x4 head inputs.
    links = find_unit_links(cnn, site="features.6")
    assert (links.producer_path, links.norm_path) == ("features.4", "features.5")
    assert [(c.path, c.span) for c in links.consumers] == [("head", 16)]
    fx = FxNet()
    links = find_unit_links(fx, site="act")
    assert (links.producer_path, links.norm_path) == ("conv", "bn")
    assert [(c.path, c.span) for c in links.consumers] == [("fc", 4)]
    with relu_doctor.watch(fx, functional=True, log_every_n_steps=1) as doc:
        fx(torch.randn(2, 3, 4, 4))
        names = [s.name for s in doc.sites]
        key = doc.site_key("(root):relu#0")
    assert names == ["act", "(root):relu#0"]
    assert key == SiteKey("", 0, "relu")
    links = find_unit_links(fx, site=key)
    assert (links.producer_path, links.norm_path, links.consumers[0].path) == ("fc", None, "out")
    assert links.site == "(root):relu#0"


def test_links_errors_name_the_site():
    block = BasicBlock(4)
    assert find_unit_links(block, site=SiteKey("relu", 0)).producer_path == "conv1"
    with pytest.raises(
        ReluDoctorError, match=r"site 'relu#1': its input comes from function i?add"
    ):
        find_unit_links(block, site=SiteKey("relu", 1))
    with pytest.raises(ReluDoctorError, match=r"site 'act': cannot find.*torch\.fx"):
        find_unit_links(Untraceable(), site="act")
    with pytest.raises(ReluDoctorError, match="site: the model has no module at 'x'"):
        find_unit_links(mlp(), site="x")
    with pytest.raises(ReluDoctorError, match="site: the model has no module at 'relu#1'"):
        find_unit_links(block, site="relu#1")  # a str is a module path, never parsed
    with pytest.raises(ReluDoctorError, match="site 'second': its input"):
        find_unit_links(block, site=SiteKey("relu", 1), name="second")


def test_graph_cache_is_reused_and_keyed_by_module():
    net = mlp()
    cache: dict[int, object] = {}
    find_unit_links(net, site="1", cache=cache)
    assert list(cache) == [id(net)]
    graph = cache[id(net)]
    find_unit_links(net, site="3", cache=cache)
    assert cache[id(net)] is graph


@pytest.mark.parametrize("name", ["enc:act", "a#1"])
def test_links_of_modules_whose_names_look_like_sites(name):
    net = odd_name_net(name)
    links = find_unit_links(net, site=name)
    assert links.describe() == {
        "site": name,
        "units": 8,
        "producer": "fc",
        "norm": None,
        "consumers": [{"path": f"{name}_blk.fc", "span": 1}],
    }
    assert find_unit_links(net, site=SiteKey(name)).producer_path == "fc"
    # The functional call inside "<name>_blk": its output leaves the block to `out`.
    with relu_doctor.watch(net, log_every_n_steps=1) as doc:
        net(torch.randn(2, 4))
        key = doc.site_key(f"{name}_blk:relu#0")
    assert key == SiteKey(f"{name}_blk", 0, "relu")
    links = find_unit_links(net, site=key)
    assert (links.site, links.producer_path, [c.path for c in links.consumers]) == (
        f"{name}_blk:relu#0",
        f"{name}_blk.fc",
        ["out"],
    )


def test_a_functional_call_inside_a_child_is_told_from_the_parents_own_calls():
    """``block:relu#0`` leaves its block; in the parent's graph it is the block's call, not
    the parent's own ``F.relu`` (``(root):relu#0``), though both are call 0 of ``relu``."""
    net = MixedActivations()
    own = find_unit_links(net, site=SiteKey("", 0, "relu"))
    assert (own.producer_path, [c.path for c in own.consumers]) == ("fc2", ["fc3"])
    child = find_unit_links(net, site=SiteKey("block", 0, "relu"))
    assert (child.producer_path, [c.path for c in child.consumers]) == ("block.fc", ["out"])
    assert child.site == "block:relu#0"
