"""ProxylessNAS net.config import/export (configs reconstructed from the published tables)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from codesign.search.netconfig import (
    PUBLISHED,
    NetConfigError,
    export_netconfig,
    import_netconfig,
    load_netconfig,
    published_netconfig,
)
from codesign.search.space import get_space

DATA = Path(__file__).parent / "data"

# Written by hand from the published tables (kernel/expansion per layer, zero = skip).
EXPECTED = {
    "proxyless_mobile": "proxyless:k5e3-k3e3-skip-skip_k7e3-k3e3-k5e3-k5e3_"
    "k7e6-k5e3-k5e3-k5e3_k5e6-k5e3-k5e3-k5e3_k7e6-k7e6-k7e3-k7e3_k7e6",
    "proxyless_cpu": "proxyless-cpu:k3e6-k3e3-k3e3-k3e3_k3e6-k3e3-k3e3-k5e3_"
    "k3e6-skip-skip-k3e3_k5e6-k3e3-k3e3-k3e3_k5e6-k5e3-k5e3-k3e3_k5e6",
    "proxyless_gpu": "proxyless-gpu:k5e3-skip-skip-skip_k7e3-skip-skip-k3e3_"
    "k7e6-skip-skip-k5e3_k5e6-skip-k3e3-k5e3_k7e6-k7e6-k7e6-k5e6_k7e6",
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_nets_import_to_their_space(name: str) -> None:
    cfg = json.loads((DATA / f"{name}.net.config.json").read_text())
    space, arch = load_netconfig(DATA / f"{name}.net.config.json")
    assert arch.encode() == EXPECTED[name]
    assert space.name == PUBLISHED[name]["space"] and space.input_shape == (3, 224, 224)
    assert cfg == published_netconfig(name)  # the fixture is the table, rendered
    assert export_netconfig(space, arch) == cfg  # round trip
    assert load_netconfig(name) == (space, arch)


def test_round_trip_of_random_archs() -> None:
    rng = random.Random(0)
    for name in ("proxyless", "proxyless-cpu", "proxyless-gpu", "tiny", "tiny-w0.5"):
        space = get_space(name)
        for _ in range(5):
            arch = space.sample(rng)
            cfg = json.loads(json.dumps(export_netconfig(space, arch)))
            # scaled spaces are not registered: name the space to import into
            got = import_netconfig(cfg, space if "-w" in name else None)
            assert got == (space, arch)


def _mobile() -> dict:
    return copy.deepcopy(published_netconfig("proxyless_mobile"))


def _zero_at(cfg: dict, i: int, shortcut: bool = True) -> dict:
    cfg["blocks"][i]["mobile_inverted_conv"] = {"name": "ZeroLayer", "stride": 2}
    cfg["blocks"][i]["shortcut"] = {"name": "IdentityLayer"} if shortcut else None
    return cfg


@pytest.mark.parametrize(
    ("mutate", "msg"),
    [
        (lambda c: [], "must be a JSON object"),
        (lambda c: {k: v for k, v in c.items() if k != "blocks"}, "lacks 'blocks'"),
        (lambda c: {**c, "name": "MobileNetV3"}, "not a ProxylessNAS net.config"),
        (lambda c: {**c, "blocks": c["blocks"][:-3]}, "18 searchable blocks"),
        (
            lambda c: c["blocks"][3]["mobile_inverted_conv"].update(name="ShuffleLayer") or c,
            "unknown layer 'ShuffleLayer'",
        ),
        (
            lambda c: c["blocks"][2]["mobile_inverted_conv"].update(kernel_size=9) or c,
            "op k9e3 not among",
        ),
        (lambda c: _zero_at(c, 1), "cannot be skipped"),
        (lambda c: _zero_at(c, 1, shortcut=False), "without an identity shortcut"),
        (
            lambda c: c["blocks"][2]["mobile_inverted_conv"].update(expand_ratio="6") or c,
            "positive integer",
        ),
        (lambda c: c["first_conv"].update(out_channels=48) or c, "stem width 48"),
        (lambda c: c["classifier"].update(out_features=10) or c, "classes 10"),
        (lambda c: c["blocks"][2].update(shortcut=None) or c, "shortcut missing"),
    ],
)
def test_malformed_configs_get_clear_errors(mutate, msg: str) -> None:
    with pytest.raises(NetConfigError, match=msg):
        import_netconfig(mutate(_mobile()))


def test_layout_of_no_space_names_the_closest(tmp_path: Path) -> None:
    cfg = _mobile()
    for b in cfg["blocks"][1:5]:
        if b["mobile_inverted_conv"]["name"] != "ZeroLayer":
            b["mobile_inverted_conv"]["out_channels"] = 48
    with pytest.raises(NetConfigError, match="closest is 'proxyless'.*channels"):
        import_netconfig(cfg)
    bad = tmp_path / "net.config"
    bad.write_text("{not json")
    with pytest.raises(NetConfigError, match="not valid JSON"):
        load_netconfig(bad)
    with pytest.raises(NetConfigError, match="proxyless_mobile"):
        load_netconfig(tmp_path / "missing.json")
    with pytest.raises(NetConfigError, match="no expansion-1 first block"):
        space = get_space("tiny").__class__.from_dict({**get_space("tiny").to_dict(), "first": 0})
        export_netconfig(space, space.uniform("k3e3"))


def test_published_nets_predict_from_a_lut_model() -> None:
    """A published net is an ordinary Arch: its blocks are blocks of the proxyless space."""
    space, arch = load_netconfig("proxyless_gpu")
    blocks = space.arch_blocks(arch)
    assert len(blocks) == 2 + 1 + arch.depth  # stem, first, head + non-skipped layers
    assert {b.key for b in blocks} <= {b.key for b in space.blocks()}


@pytest.mark.slow
def test_published_net_compiles_through_tvm() -> None:
    from codesign.modules import build_network
    from codesign.targets import parse_target
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.lower import lower_module

    space, arch = load_netconfig("proxyless_mobile")
    net = build_network(space, arch)
    built = compile_module(lower_module(net, (1, *space.input_shape)), parse_target("x86"))
    from codesign.measurement import MeasureProtocol
    from codesign.tvm_backend.runner import LocalRunner

    m = LocalRunner(seed=0).run(built, MeasureProtocol.quick())  # it runs, not just compiles
    assert m.ok and m.median_ms > 0, m.error
