"""Supernet memory behaviour (one path) and the ProxylessNAS / REINFORCE gradient estimators."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from codesign.errors import ArchError
from codesign.modules import MBConv
from codesign.search.estimators import (
    binary_gate_grad,
    reinforce_grad,
    rescale_involved,
    sample_path,
    sample_two,
)
from codesign.search.space import get_space
from codesign.search.supernet import MixedLayer, Supernet, recalibrate_bn

ARCH = "k3e6-k5e3_k7e6-skip_k3e3-k3e3"


@pytest.fixture(scope="module")
def spaces():
    """tiny (6 ops + skip per layer) and a variant with 12 ops + skip per layer."""
    tiny = get_space("tiny")
    big = dataclasses.replace(tiny, name="tiny-big", kernels=(3, 5, 7, 9), expansions=(3, 4, 6))
    return tiny, big


def _footprint(net: Supernet, run) -> dict:
    """Saved-for-backward bytes, autograd graph nodes, modules run, params given gradients."""
    torch.manual_seed(0)
    x = torch.randn(4, *net.space.input_shape)
    y = torch.tensor([0, 1, 2, 3])
    ran: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: ran.append(m))
        for m in net.modules()
        if isinstance(m, MBConv)
    ]
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    net.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(run(x), y)
    nodes, stack, seen = 0, [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes += 1
        stack.extend(f for f, _ in fn.next_functions)
    loss.backward()
    for h in hooks:
        h.remove()
    with_grad = {id(p) for p in net.parameters() if p.grad is not None}
    return {"saved": saved[0], "nodes": nodes, "ran": ran, "with_grad": with_grad}


def test_one_path_runs_and_trains_only_its_ops(spaces) -> None:
    tiny, big = spaces
    prints = {}
    for space in (tiny, big):
        net = Supernet(space, seed=0).train()
        path = net.path_of(space.decode(ARCH))
        fp = _footprint(net, lambda x, net=net, path=path: net(x, path))
        on_path = [m for m in net.path_modules(path) if isinstance(m, MBConv)]
        assert fp["ran"] == on_path  # exactly the path's blocks ran, in order
        assert fp["with_grad"] == {id(p) for p in net.path_parameters(path)}
        prints[space.name] = fp
        total = sum(1 for _ in net.parameters())
        assert len(fp["with_grad"]) < total / 4
    a, b = prints["tiny"], prints["tiny-big"]
    # twice the candidates, same memory, graph and trained parameters
    assert (a["saved"], a["nodes"], len(a["with_grad"])) == (
        b["saved"],
        b["nodes"],
        len(b["with_grad"]),
    )
    assert a["saved"] > 0


def test_gated_forward_keeps_one_graph_per_layer(spaces) -> None:
    tiny, big = spaces
    prints = {}
    for space in (tiny, big):
        net = Supernet(space, seed=0).train()
        active = net.path_of(space.decode(ARCH))
        other = net.path_of(space.decode("k5e6-k3e3_k3e3-k5e6_k7e3-skip"))
        pairs = [(a, o) for a, o in zip(active, other, strict=True)]
        gates = [torch.tensor([1.0, 0.0], requires_grad=True) for _ in pairs]
        fp = _footprint(net, lambda x, net=net, p=pairs, g=gates: net.forward_gated(x, p, g))
        # both ops of every pair ran, but only the active path's weights got gradients
        assert fp["with_grad"] == {id(p) for p in net.path_parameters(active)}
        assert all(g.grad is not None and g.grad.shape == (2,) for g in gates)
        prints[space.name] = fp
        with torch.no_grad():
            x = torch.randn(2, *space.input_shape)
            net.eval()
            assert torch.allclose(net.forward_gated(x, pairs, gates), net(x, active), atol=1e-6)
    a, b = prints["tiny"], prints["tiny-big"]
    assert (a["saved"], a["nodes"]) == (b["saved"], b["nodes"])


def test_paths_archs_and_subnets(tiny) -> None:
    net = Supernet(tiny, seed=3).eval()
    arch = tiny.decode(ARCH)
    path = net.path_of(arch)
    assert net.arch_of(path) == arch
    sub = net.subnet(path).eval()
    x = torch.randn(3, *tiny.input_shape)
    assert torch.allclose(sub(x), net(x, path), atol=1e-6)
    recalibrate_bn(sub, [x, x])
    assert not sub.training
    with pytest.raises(ArchError, match="out of range"):
        net(x, (99,) * len(path))
    with pytest.raises(ArchError, match="needs 6"):
        net(x, path[:2])


def test_mixed_layer_aligns_with_candidates(tiny) -> None:
    layer = tiny.layers()[1]
    mixed = MixedLayer(layer)
    assert len(mixed) == len(layer.candidates)
    for token, op in zip(layer.candidates, mixed.candidates, strict=True):
        assert isinstance(op, nn.Identity) if token == "skip" else op.spec == layer.block(token)


# ------------------------------------------------------------------ estimators on toy problems
def _toy(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.randn(n, generator=g)
    outs = torch.randn(n, 3, generator=g)  # op j outputs outs[j]
    w = torch.randn(3, generator=g)  # linear loss L(y) = w . y, so L_j = w . outs[j]
    return alpha, outs, w, outs @ w


def _gate_grads(outs: torch.Tensor, w: torch.Tensor, involved, active: int) -> torch.Tensor:
    gates = torch.zeros(len(involved))
    gates[active] = 1.0
    gates.requires_grad_(True)
    y = sum(gates[j] * outs[i] for j, i in enumerate(involved))
    (w @ y).backward()
    return gates.grad


def test_full_binary_gate_estimator_matches_finite_differences() -> None:
    alpha, outs, w, losses = _toy()
    n = len(alpha)

    def expected_loss(a: torch.Tensor) -> float:  # J(alpha) = sum_i p_i L_i
        return float((torch.softmax(a, -1) * losses).sum())

    eps = 1e-3
    fd = torch.tensor(
        [
            (
                expected_loss(alpha + eps * torch.eye(n)[i])
                - expected_loss(alpha - eps * torch.eye(n)[i])
            )
            / (2 * eps)
            for i in range(n)
        ]
    )
    for active in range(n):  # whichever op is active, the estimate is exact for a linear loss
        est = binary_gate_grad(alpha, range(n), _gate_grads(outs, w, list(range(n)), active))
        assert torch.allclose(est, fd, atol=1e-4), (active, est, fd)


def test_two_path_estimator_matches_its_analytic_expectation() -> None:
    alpha, outs, w, losses = _toy(n=5, seed=1)
    p = torch.softmax(alpha, -1)
    n = len(alpha)
    # analytic: unordered pair {a, b} drawn without replacement; estimate on a: q_a q_b (L_a - L_b)
    analytic = torch.zeros(n)
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            prob = p[a] * p[b] / (1 - p[a]) + p[a] * p[b] / (1 - p[b])
            q = torch.softmax(alpha[[a, b]], -1)
            analytic[a] += prob * q[0] * q[1] * (losses[a] - losses[b])
    gen = torch.Generator().manual_seed(0)
    total, draws = torch.zeros(n), 6000
    for _ in range(draws):
        pair = sample_two(alpha, gen)
        assert len(set(pair)) == 2
        total += binary_gate_grad(alpha, pair, _gate_grads(outs, w, pair, 0))
    mc = total / draws
    assert torch.allclose(mc, analytic, atol=0.01), (mc, analytic)
    # and a step against it lowers the expected loss J (a descent direction)
    true = p * (losses - (p * losses).sum())
    assert float(mc @ true) > 0
    # the two-op update keeps the other ops' probabilities
    a2 = alpha.clone()
    before = a2[[0, 1]].clone()
    a2[[0, 1]] += torch.tensor([0.3, -0.1])
    rescale_involved(a2, (0, 1), before)
    assert torch.allclose(torch.softmax(a2, -1)[2:], p[2:], atol=1e-6)


def test_reinforce_gradient_points_to_rewarded_op() -> None:
    alphas = [torch.zeros(4), torch.zeros(3)]
    gen = torch.Generator().manual_seed(0)
    paths = [sample_path(alphas, gen) for _ in range(4000)]
    rewards = [1.0 if path[0] == 2 else 0.0 for path in paths]
    baseline = sum(rewards) / len(rewards)
    g0, g1 = reinforce_grad(alphas, paths, rewards, baseline)
    # gradient of the loss -E[R]: descending it raises alpha[2] and lowers the others
    assert g0[2] < 0 and all(g0[i] > 0 for i in (0, 1, 3))
    p = 0.25
    analytic = torch.tensor([p * p, p * p, -p * (1 - p), p * p])  # -dE[R]/dalpha
    assert torch.allclose(g0, analytic, atol=0.03)
    assert g1.abs().max() < 0.03  # the reward ignores layer 1
    assert math.isclose(float(g0.sum()), 0.0, abs_tol=1e-5)


def test_equal_init_makes_every_op_the_same_function(tiny) -> None:
    x = torch.randn(4, *tiny.input_shape)
    for init, same in (("equal", True), ("independent", False)):
        net = Supernet(tiny, seed=0, init=init).eval()
        outs = [net(x, net.path_of(tiny.uniform(t))) for t in ("k3e3", "k5e6", "k7e3", "skip")]
        close = all(torch.allclose(o, outs[0], atol=1e-5) for o in outs)
        assert close == same, init
    with pytest.raises(ValueError, match="init must be"):
        Supernet(tiny, init="random")


def test_latency_objectives() -> None:
    from codesign.search.objective import LatencyObjective, SearchError

    ce = torch.tensor(1.2)
    for target in (0.3, 80.0):  # sub-millisecond nets as well as ProxylessNAS-sized ones
        mul = LatencyObjective(target, "mul")
        assert float(mul(ce, torch.tensor(target))) == pytest.approx(0.2 * 1.2)
        assert (
            float(mul(ce, torch.tensor(0.5 * target)))
            < 0.24
            < float(mul(ce, torch.tensor(2 * target)))
        )
    add, hinge = LatencyObjective(0.5, "add"), LatencyObjective(0.5, "hinge")
    assert float(add(ce, torch.tensor(0.25))) == pytest.approx(1.2 - 0.25)
    assert float(hinge(ce, torch.tensor(0.25))) == pytest.approx(1.2)
    assert float(hinge(ce, torch.tensor(1.0))) == pytest.approx(1.2 + 0.5)
    e = torch.tensor(0.25, requires_grad=True)
    hinge(ce, e).backward()
    assert float(e.grad) == 0.0  # under the target only accuracy counts
    with pytest.raises(SearchError, match="one of"):
        LatencyObjective(0.5, "square")
    with pytest.raises(SearchError, match="above 0.001"):
        LatencyObjective(0.0)
