"""The HAQ environment's budget enforcement (size exact; latency from a real per-precision LUT)
and the search loop: budget always met, seeded, resumable from its checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from codesign.blocks import BlockSpec
from codesign.compression.ddpg import DDPGConfig
from codesign.compression.haq.env import BudgetError, HAQConfig, HAQEnv
from codesign.compression.quant.fakequant import calibrate
from codesign.compression.quant.policy import QuantPolicy
from codesign.compression.quant.qat import QATConfig
from codesign.modules import Network, init_weights

# the module fixtures measure every block at every precision of the menu and the tests search
# and evaluate whole quantized networks (minutes on 2 cores): not in `make test-fast`
pytestmark = pytest.mark.network

BLOCKS = (
    BlockSpec("conv", 3, 1, 16, 2, 16, 16),
    BlockSpec.mb(3, 2, 16, 16, 1, 8),
    BlockSpec.mb(5, 1, 16, 24, 2, 8),
    BlockSpec("head", 1, 24, 10, 1, 4, 4, mid=32),
)
QAT = QATConfig(images=64, batch_size=32)


@pytest.fixture(scope="module")
def world(x86):
    from codesign.data import load_dataset
    from codesign.tvm_backend.precision import precision_menu

    net = init_weights(Network(BLOCKS), 0).eval()
    data = load_dataset("digits", (1, 16, 16))
    return net, data, calibrate(net, [data.calibration(64)]), precision_menu(x86)


@pytest.fixture(scope="module")
def lut(world, x86, tmp_path_factory):
    """A real untuned LUT of the blocks at every precision on this CPU's menu."""
    from codesign.compression.haq.pipeline import precision_lut

    db = tmp_path_factory.mktemp("haq") / "lut.sqlite"
    return precision_lut(BLOCKS, x86, db, world[3], trials=0, progress=False)


def _env(world, kind, budget, latency):
    net, data, ranges, menu = world
    cfg = HAQConfig(kind, budget, qat=QAT, val_images=100)
    return HAQEnv(net, data, ranges, menu, latency, cfg)


def _play(env, action):
    env.reset()
    while env.step(action) is not None:
        pass
    return env.finish()


def test_size_budget_lowers_bits_greedily_from_the_last_layer(world, lut):
    net, _, _, menu = world
    fp = QuantPolicy.uniform(BLOCKS, 32, 32, menu).size_mb(BLOCKS)
    env = _env(world, "size", 0.5 * fp, lut)
    raw = [(32, 32)] * len(env.layers)
    policy = env.enforce(raw)
    assert policy.size_mb(BLOCKS) <= 0.5 * fp
    # greedy from the last layer: later layers reach low bits before earlier ones move
    ws = [lb.w for lb in policy.layers]
    assert ws[0] == 32 and ws[-1] < 32 and ws == sorted(ws, reverse=True)
    # a policy that already fits is left alone
    assert env.enforce([(6, 8)] * len(env.layers)) == QuantPolicy.derive(
        BLOCKS, [(6, 8)] * len(env.layers), menu, env.int8_blocks, env.fp16_blocks
    )
    # int8 execution only where the LUT measured it faster than every float on the menu,
    # fp16 only where measured faster than fp32
    floats = menu.float_precisions
    for b, fast, half, p in zip(
        BLOCKS, env.int8_blocks, env.fp16_blocks, policy.precisions, strict=True
    ):
        ms = {q: lut([b.with_precision(q)]) for q in menu.precisions}
        assert fast == (ms.get("int8", np.inf) < min(ms[q] for q in floats))
        assert half == ("fp16" in ms and ms["fp16"] < ms["fp32"])
        assert p == "fp32" or (p == "int8" and fast) or (p == "fp16" and half)
    res = _play(env, 1.0)  # the agent asks for float everywhere; the wall cuts it down
    assert res.cost <= 0.5 * fp and res.policy == policy
    assert res.actions == env.policy_actions(policy)
    with pytest.raises(BudgetError, match="Raise the budget"):
        _env(world, "size", 1e-5, lut)


def test_action_to_bits_ladder(world, lut):
    env = _env(world, "size", 1.0, lut)
    menu = world[3]
    fp16 = (16,) if "fp16" in menu.precisions else ()  # avx512fp16 hosts run half natively
    assert env.ladder == (2, 3, 4, 5, 6, 7, 8, *fp16, 32)
    assert env.bits_of(0.0) == 2 and env.bits_of(1.0) == 32
    assert all(env.bits_of(env.action_of(b)) == b for b in env.ladder)
    s = env.reset()
    assert s.shape == (10,) and s.min() >= 0 and s.max() <= 1


def test_latency_budget_from_measured_lut(world, lut):
    _, _, _, menu = world
    lat = lut
    per = {p: [lat([b.with_precision(p)]) for b in BLOCKS] for p in menu.precisions}
    fp = sum(per["fp32"])
    best = sum(min(v[i] for v in per.values()) for i in range(len(BLOCKS)))
    faster = [min(v[i] for v in per.values()) < per["fp32"][i] for i in range(len(BLOCKS))]
    if not any(faster):  # measured: nothing on the menu beats fp32 for any block here
        with pytest.raises(BudgetError, match="cheapest reachable"):
            _env(world, "latency", 0.9 * fp, lat)
        return
    budget = (fp + best) / 2
    env = _env(world, "latency", budget, lat)
    policy = env.enforce([(32, 32)] * len(env.layers))
    assert env.cost(policy) <= budget
    for i, p in enumerate(policy.precisions):  # a block leaves fp32 only for a faster precision
        assert p == "fp32" or per[p][i] < per["fp32"][i]


def test_search_meets_budget_and_resumes_exactly(world, lut, tmp_path):
    from codesign.compression.haq.search import SearchCheckpointError, haq_search

    _, _, _, menu = world
    fp = QuantPolicy.uniform(BLOCKS, 32, 32, menu).size_mb(BLOCKS)
    ddpg = DDPGConfig(hidden=32, warmup_episodes=2, batch_size=16, seed=3)
    full = haq_search(_env(world, "size", 0.4 * fp, lut), 4, ddpg, progress=False)
    assert all(h["cost"] <= 0.4 * fp for h in full.history)
    # the first episode is the uniform 8-bit probe, lowered greedily to the budget
    env = _env(world, "size", 0.4 * fp, lut)
    probe = env.probe_actions()
    assert {env.bits_of(a) for a in probe[1::2]} == {8}
    bits = [
        (env.bits_of(probe[2 * i]), env.bits_of(probe[2 * i + 1])) for i in range(len(env.layers))
    ]
    assert full.history[0]["policy"] == env.enforce(bits).encode()
    assert full.best.reward == max(h["reward"] for h in full.history)
    ck = tmp_path / "search.pt"
    haq_search(_env(world, "size", 0.4 * fp, lut), 2, ddpg, checkpoint=ck, progress=False)
    resumed = haq_search(_env(world, "size", 0.4 * fp, lut), 4, ddpg, checkpoint=ck, progress=False)
    assert resumed.resumed_from == 2
    assert [h["policy"] for h in resumed.history] == [h["policy"] for h in full.history]
    np.testing.assert_allclose(
        [h["reward"] for h in resumed.history], [h["reward"] for h in full.history]
    )
    with pytest.raises(SearchCheckpointError, match="different HAQ search"):
        haq_search(_env(world, "size", 0.3 * fp, lut), 4, ddpg, checkpoint=ck, progress=False)
