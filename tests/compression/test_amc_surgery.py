"""Pruning policies and channel surgery: structure, encoding, exactness of the pruned network."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codesign.blocks import BlockSpec
from codesign.compression.amc.policy import (
    PruneError,
    PrunePolicy,
    pruned_specs,
    structure,
)
from codesign.compression.amc.surgery import Keep, importance, prune_network
from codesign.modules import MBConv, Network, build_network, init_weights, randomize_bn

ARCH = "k3e6-k5e3_k7e6-skip_k3e3-k3e3"  # residual blocks in stages 1 and 3, a skipped layer


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small forward passes: one thread (a 2-thread pool on a busy 2-core host is ~20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net(tiny) -> Network:
    torch.manual_seed(0)
    net = randomize_bn(build_network(tiny, tiny.decode(ARCH), seed=1), seed=2)
    with torch.no_grad():  # zero-init of residual BNs would hide the residual branch
        for m in net.modules():
            if isinstance(m, MBConv) and m.spec.residual:
                m.project[1].weight.uniform_(0.5, 1.0)
    return net.eval()


def masked(net: Network, policy: PrunePolicy, keep: Keep, prune_outputs: bool = True) -> Network:
    """The original network with every weight that reads a pruned channel set to zero."""
    net = copy.deepcopy(net)
    st = structure(net.specs, prune_outputs=prune_outputs)

    def zero_cols(w: torch.Tensor, unit: str | None) -> None:
        if unit is not None:
            drop = torch.ones(w.shape[1], dtype=torch.bool)
            drop[keep[unit]] = False
            w.data[:, drop] = 0.0

    for i, block in enumerate(net):
        if isinstance(block, MBConv):
            if block.expand is not None:
                zero_cols(block.expand[0].weight, st.in_unit[i])
            zero_cols(block.project[0].weight, st.mid_unit[i])
        elif block.spec.kind == "head":
            zero_cols(block.mix[0].weight, st.in_unit[i])
            zero_cols(block.classifier.weight, st.mid_unit[i])
    return net.eval()


def test_units_follow_shortcuts(net: Network) -> None:
    st = structure(net.specs)
    names = [u.name for u in st.units]
    # stem group, first block output, stage-1 group (blocks 2, 3), block 4, stage-3 group
    assert [n for n in names if n[0] == "o"] == ["o0", "o1", "o2", "o4", "o5"]
    assert st.unit("o2").blocks == (2, 3, 4) and st.unit("o5").blocks == (5, 6, 7)
    assert st.mid_unit[1] == "o0"  # the expansion-1 block's depthwise works on its input
    assert [n for n in names if n[0] == "m"] == ["m2", "m3", "m4", "m5", "m6", "m7"]
    only_mid = structure(net.specs, prune_outputs=False)
    assert all(u.kind == "mid" for u in only_mid.units) and only_mid.mid_unit[1] is None
    with pytest.raises(PruneError, match="no prunable unit 'o3'"):
        st.unit("o3")


POLICIES = [
    "m2=0.5,m3=0.25,m4=0.5,m5=0.3333,m6=0.75,m7=0.5",  # expanded channels only
    "o0=0.75,o1=0.5,o2=0.5,o4=0.6667,o5=0.75",  # block outputs, shortcut groups included
    "o0=0.5,o1=0.75,m2=0.25,o2=0.75,m3=0.5,m4=0.125,o4=0.6667,m5=0.5,o5=0.5,m6=0.25,m7=0.25",
]


@pytest.mark.parametrize("text", POLICIES)
def test_pruned_network_equals_original_without_pruned_contributions(net, text) -> None:
    policy = PrunePolicy.decode(text)
    pruned, keep = prune_network(net, policy)
    st = structure(net.specs)
    counts = policy.counts(st)
    assert pruned.specs == pruned_specs(st, counts)
    assert {k: len(v) for k, v in keep.items()} == counts
    for a, b in zip(net.specs, pruned.specs, strict=True):
        assert a.residual == b.residual and a.kind == b.kind
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    x = torch.randn(8, *net.input_shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, full = masked(net, policy, keep)(x), pruned(x), net(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # pruning did change the function


def test_each_block_is_the_original_restricted_to_kept_channels(net) -> None:
    policy = PrunePolicy.decode(POLICIES[2])
    pruned, keep = prune_network(net, policy)
    st = structure(net.specs)
    ref = masked(net, policy, keep)
    gen = torch.Generator().manual_seed(1)
    for i in range(1, len(net) - 1):  # every inverted residual, shortcut or not
        s = net.specs[i]
        x = torch.randn(4, s.cin, s.h, s.w, generator=gen)
        kin, kout = keep[st.in_unit[i]], keep[st.out_unit[i]]
        x_zero = torch.zeros_like(x)
        x_zero[:, kin] = x[:, kin]
        with torch.no_grad():
            torch.testing.assert_close(
                pruned[i](x[:, kin]), ref[i](x_zero)[:, kout], rtol=1e-4, atol=1e-5
            )


def test_magnitude_keeps_the_largest_channels(net) -> None:
    pruned, keep = prune_network(net, PrunePolicy.decode("m4=0.25"))
    scores = importance(net)["m4"]
    dropped = torch.ones(96, dtype=torch.bool)
    dropped[keep["m4"]] = False
    assert scores[keep["m4"]].min() >= scores[dropped].max()
    assert pruned.specs[4].key == "mb_k7_m24_i16_o24_s1_h7_w7"
    # the project conv is the original's kept input columns
    torch.testing.assert_close(pruned[4].project[0].weight, net[4].project[0].weight[:, keep["m4"]])


def test_least_squares_reconstruction_reduces_output_error(net) -> None:
    policy = PrunePolicy.decode("m2=0.25,m3=0.25,m4=0.25,m5=0.25,m6=0.25,o5=0.5")
    x = torch.randn(64, *net.input_shape[1:], generator=torch.Generator().manual_seed(3))
    calib, test = x[:48], x[48:]
    plain, _ = prune_network(net, policy)
    rec, keep = prune_network(net, policy, calibration=calib)
    assert rec.specs == plain.specs
    with torch.no_grad():
        want = net(test)
        err_plain = (plain(test) - want).pow(2).mean()
        err_rec = (rec(test) - want).pow(2).mean()
    assert err_rec < 0.5 * err_plain, (float(err_rec), float(err_plain))


def test_policies_that_would_add_a_shortcut_are_refused(net) -> None:
    st = structure(net.specs)
    # block 4 is 16 -> 24 at stride 1 without shortcut: o4 at 16 channels would add one
    with pytest.raises(PruneError, match="block 4 .* same width 16"):
        pruned_specs(st, PrunePolicy.decode("o4=0.6667").counts(st))
    with pytest.raises(PruneError, match="no prunable unit 'm1'"):
        PrunePolicy.decode("m1=0.5").counts(st)  # the expansion-1 block has no own mid


def test_policy_encoding_round_trips() -> None:
    p = PrunePolicy.decode("m2=0.5, o2=0.75,m3=0.3333")
    assert p.encode() == "m2=0.5,o2=0.75,m3=0.3333" and str(p) == p.encode()
    assert PrunePolicy.decode(p.encode()) == p and hash(PrunePolicy.decode(str(p))) == hash(p)
    assert PrunePolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert PrunePolicy.decode("none") == PrunePolicy() and PrunePolicy().encode() == "none"
    assert p.ratio("m3") == 0.3333 and p.ratio("m9") == 1.0
    for bad, msg in [
        ("m2=0.5,x3=0.2", r"bad token 'x3=0.2' \(#2\)"),
        ("m2=1.5", r"must be in \(0, 1\]"),
        ("m2=0.5,m2=0.4", "appears twice"),
        ("m2:0.5", "bad token"),
    ]:
        with pytest.raises(PruneError, match=msg):
            PrunePolicy.decode(bad)
    with pytest.raises(PruneError, match="needs 'ratios'"):
        PrunePolicy.from_dict({"m2": 0.5})


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(1, 8), min_size=3, max_size=3),
    kernel=st.sampled_from([3, 5]),
)
def test_random_small_networks_prune_exactly(counts, kernel) -> None:
    """Any widths (bar the refused ones) give a network equal to the masked original."""
    specs = (
        BlockSpec("conv", 3, 3, 8, 1, 6, 6),
        BlockSpec.mb(kernel, 3, 8, 8, 1, 6),
        BlockSpec.mb(kernel, 2, 8, 12, 2, 6),
        BlockSpec("head", 1, 12, 5, 1, 3, 3, mid=16),
    )
    net = randomize_bn(init_weights(Network(specs), seed=sum(counts)), seed=1).eval()
    st_ = structure(specs)
    chosen = dict(zip(["o0", "m1", "m2"], counts, strict=True))
    chosen["m2"] = min(chosen["m2"] * 2, 16)
    policy = PrunePolicy.from_counts(st_, chosen)
    pruned, keep = prune_network(net, policy)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(net, policy, keep)(x), rtol=1e-4, atol=1e-5)
