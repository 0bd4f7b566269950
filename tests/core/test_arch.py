from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codesign.arch import Arch
from codesign.errors import ArchError
from codesign.search.space import get_space, list_spaces

SPACES = [s.name for s in list_spaces()]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SPACES), st.integers(0, 2**32 - 1))
def test_encode_decode_round_trip(space_name: str, seed: int) -> None:
    space = get_space(space_name)
    arch = space.sample(random.Random(seed))
    text = arch.encode()
    assert Arch.decode(text) == arch
    assert space.decode(text) == arch
    assert Arch.from_json(arch.to_json()) == arch
    assert hash(Arch.decode(text)) == hash(arch)


def test_string_form_is_readable() -> None:
    tiny = get_space("tiny")
    arch = tiny.decode("k3e6-k5e3_k7e6-skip_k3e3-k3e3")
    assert arch.encode() == "tiny:k3e6-k5e3_k7e6-skip_k3e3-k3e3"
    assert arch.stages[1] == ("k7e6", "skip")
    assert arch.depth == 5
    assert Arch.decode("tiny:k3e6-k5e3_k7e6-zero_k3e3-k3e3") == arch  # ProxylessNAS alias


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("tiny:k3e6-k5e3_k9e6-skip_k3e3-k3e3", "k7e6|k9e6|kernel|not allowed"),
        ("tiny:k3e6-k5x3_k7e6-skip_k3e3-k3e3", "k5x3"),
        ("tiny:k3e6-k5e3__k3e3-k3e3", "empty"),
        ("k3e6-k5e3_k7e6-skip_k3e3-k3e3", "space prefix"),
        ("tiny:", "no layers"),
    ],
)
def test_malformed_strings_name_the_bad_token(text: str, bad: str) -> None:
    with pytest.raises(ArchError, match=bad):
        get_space("tiny").validate(Arch.decode(text))


def test_space_rejects_misfit() -> None:
    tiny = get_space("tiny")
    with pytest.raises(ArchError, match="'skip' at stage 1, layer 1"):
        tiny.decode("skip-k5e3_k7e6-skip_k3e3-k3e3")  # first layer of a stage cannot skip
    with pytest.raises(ArchError, match="depths 2-2-2"):
        tiny.decode("k3e6_k7e6-skip_k3e3-k3e3")
    with pytest.raises(ArchError, match="'k9e6'"):
        tiny.decode("k3e6-k5e3_k9e6-skip_k3e3-k3e3")
    with pytest.raises(ArchError, match="not 'tiny'"):
        tiny.validate(get_space("proxyless").uniform("k3e6"))
