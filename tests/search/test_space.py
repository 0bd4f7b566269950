from __future__ import annotations

import random

import pytest

from codesign.arch import SKIP
from codesign.errors import SpaceError
from codesign.search.space import get_space, list_spaces


def test_proxyless_layout_matches_published_mobile_space() -> None:
    s = get_space("proxyless")
    assert s.input_shape == (3, 224, 224) and s.stem == 32 and s.num_classes == 1000
    assert s.depths == (4, 4, 4, 4, 4, 1) and s.num_layers == 21
    layers = s.layers()
    # resolution after stem 112, first block keeps it; stage strides 2,2,2,1,2,1
    assert [ly.h for ly in layers if ly.position == 0] == [112, 56, 28, 14, 14, 7]
    assert [ly.cout for ly in layers if ly.position == 0] == [32, 40, 80, 96, 192, 320]
    assert s.head_block().key == "head_i320_m1280_o1000_h7_w7"
    assert s.stem_block().key == "conv_k3_i3_o32_s2_h224_w224"
    assert s.first_block().key == "mb_k3_e1_i32_o16_s1_h112_w112"
    for ly in layers:
        mb = [c for c in ly.candidates if c != SKIP]
        assert sorted(mb) == ["k3e3", "k3e6", "k5e3", "k5e6", "k7e3", "k7e6"]
        # zero/skip only where the layer keeps its shape (ProxylessNAS's rule)
        assert ly.skippable == (ly.stride == 1 and ly.cin == ly.cout)
    assert sum(ly.skippable for ly in layers) == 15


@pytest.mark.parametrize("name", [s.name for s in list_spaces()])
def test_blocks_cover_every_architecture(name: str) -> None:
    s = get_space(name)
    blocks = s.blocks()
    keys = [b.key for b in blocks]
    assert len(keys) == len(set(keys)), "blocks() must be distinct"
    rng = random.Random(0)
    for _ in range(50):
        arch = s.sample(rng)
        assert set(s.arch_blocks(arch)) <= set(blocks)
    # every block of the space is used by some architecture
    used = set()
    for token in s.ops:
        used |= set(s.arch_blocks(s.uniform(token)))
    assert used == set(blocks)


def test_sampling_is_seeded_and_valid(tiny) -> None:
    a = [tiny.sample(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(1)
    parent, other = tiny.sample(rng), tiny.sample(rng)
    for _ in range(20):
        tiny.validate(tiny.mutate(parent, rng, prob=0.5))
        child = tiny.crossover(parent, other, rng)
        tiny.validate(child)
        assert all(
            c in (x, y)
            for c, x, y in zip(child.choices, parent.choices, other.choices, strict=True)
        )


def test_scaled_spaces_and_unknown_names() -> None:
    half = get_space("tiny-w0.5")
    assert half.name == "tiny-w0.5"
    assert [st.width for st in half.stages] == [8, 16, 16]
    assert get_space("proxyless-w1.4").stem == 48
    with pytest.raises(SpaceError, match="unknown search space 'mobile'.*proxyless"):
        get_space("mobile")


def test_space_serialisation(tiny) -> None:
    from codesign.search.space import SearchSpace

    assert SearchSpace.from_dict(tiny.to_dict()) == tiny
    assert len(tiny.digest) == 16 and tiny.digest != get_space("proxyless").digest
