from __future__ import annotations

import random

import torch

from codesign.modules import build_block, build_network, fold_bn, init_weights, randomize_bn


def test_network_shapes_params_and_macs_agree_with_specs(tiny) -> None:
    arch = tiny.sample(random.Random(3))
    net = build_network(tiny, arch, seed=0)
    x = torch.randn(2, *tiny.input_shape)
    assert net(x).shape == (2, tiny.num_classes)
    folded = fold_bn(net)
    n_params = sum(p.numel() for p in folded.parameters())
    assert n_params == sum(b.params() for b in net.specs)


def test_bn_folding_preserves_outputs(tiny) -> None:
    for spec in tiny.blocks()[:6]:
        m = randomize_bn(init_weights(build_block(spec), seed=1), seed=2).eval()
        x = torch.randn(1, *spec.input_shape[1:])
        with torch.no_grad():
            ref, got = m(x), fold_bn(m)(x)
        assert torch.allclose(ref, got, atol=1e-5, rtol=1e-4), spec.key
        assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fold_bn(m).modules())


def test_init_is_seeded(tiny) -> None:
    arch = tiny.uniform("k5e6")
    a, b = build_network(tiny, arch, seed=5), build_network(tiny, arch, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
