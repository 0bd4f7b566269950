from __future__ import annotations

import math

import pytest
import torch
from torch import nn


class Tiny(nn.Module):
    """A small CNN with a depthwise conv, a residual add and a linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())  # fmt: skip
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32),
                                    nn.ReLU6())  # fmt: skip
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False),
                                nn.BatchNorm2d(32), nn.ReLU6())  # fmt: skip
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.conv = nn.Conv2d(16, 24, 3, 2, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = self.relu(self.conv(x))
        return self.fc(self.pool(x).flatten(1))


def _trained_tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    net = Tiny()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


def test_groups_follow_the_dependency_graph() -> None:
    from codesign.compression.amc.own_layers import OwnGraph

    g = OwnGraph.build(_trained_tiny(), (1, 3, 16, 16))
    assert list(g.layers) == ["stem.0", "expand.0", "dw.0", "project.0", "conv", "fc"]
    assert g.head == "fc"
    by_layers = {frozenset(u.outs): u for u in g.units}
    # the residual add couples the stem's and the projection's outputs (and what reads them)
    res = by_layers[frozenset({"stem.0", "project.0"})]
    assert set(res.ins) == {"expand.0", "conv"} and res.channels == 16
    # the depthwise conv is pruned with the expansion that feeds it
    assert set(by_layers[frozenset({"expand.0", "dw.0"})].ins) == {"project.0"}
    assert set(by_layers[frozenset({"conv"})].ins) == {"fc"}
    eps = {n: s.epilogue for n, s in g.layers.items()}
    assert eps == {"stem.0": "relu6", "expand.0": "relu6", "dw.0": "relu6", "project.0": "add",
                   "conv": "relu", "fc": ""}  # fmt: skip
    assert not g.layers["stem.0"].nhwc_in and g.layers["conv"].nhwc_in


def test_pruning_keeps_shapes_consistent_and_outputs_close() -> None:
    from codesign.compression.amc.own_layers import OwnGraph, layer_specs

    net = _trained_tiny()
    g = OwnGraph.build(net, (1, 3, 16, 16))
    x = torch.randn(8, 3, 16, 16)
    counts = {u.name: u.channels * 3 // 4 for u in g.units}
    pruned = g.prune(counts)
    # the analytic shapes the latency model uses are the shapes torch-pruning produced
    assert tuple(layer_specs(pruned, (1, 3, 16, 16)).values()) == g.specs(counts)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    dw = pruned.dw[0]
    assert dw.groups == dw.in_channels == dw.out_channels == 24
    with torch.no_grad():
        ref, got = net(x), pruned(x)
    assert got.shape == ref.shape
    # a mild ratio keeps the big channels: outputs stay correlated with the original's
    corr = torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1]
    assert corr > 0.8, float(corr)
    # the original is untouched
    assert net.dw[0].out_channels == 32


def test_layer_lut_is_reused(tmp_path, x86, quick) -> None:
    from codesign.compression.amc.own_latency import LayerLatency
    from codesign.compression.amc.own_layers import LayerSpec
    from codesign.lut import LatencyTable

    specs = [LayerSpec("conv", 8, 8, (3, 3), padding=(1, 1), groups=8, h=4, w=4, epilogue="add")]
    db = tmp_path / "lut.sqlite"
    first = LayerLatency(db, x86, quick)
    ms = [first.layer_ms(s) for s in specs]
    assert first.measured == 1 and all(m > 0 for m in ms)
    second = LayerLatency(db, x86, quick)
    assert [second.layer_ms(s) for s in specs] == ms and second.measured == 0
    with LatencyTable(db) as table:
        assert set(table.latencies(x86.key, "untuned", kind="layer")) == {s.key for s in specs}
        assert table.latencies(x86.key, "untuned") == {}  # block lookups never see layers


def test_gap_model_is_fitted_on_whole_networks_measured_together(tmp_path, x86, quick) -> None:
    from codesign.compression.amc.env import AMCConfig
    from codesign.compression.amc.own import unit_options
    from codesign.compression.amc.own_latency import (
        LayerLatency,
        OwnLatency,
        calibrate,
        calibration_counts,
    )
    from codesign.compression.amc.own_layers import OwnGraph

    g = OwnGraph.build(_trained_tiny(), (1, 3, 16, 16))
    options = unit_options(g, AMCConfig(lbound=0.25, divisor=4), 4)
    counts = calibration_counts(g, options, (0.75, 0.5, 0.25), 2, seed=0)
    full = {u.name: u.channels for u in g.units}
    assert counts[0] == full and len({tuple(c.values()) for c in counts}) == len(counts) >= 4
    assert counts == calibration_counts(g, options, (0.75, 0.5, 0.25), 2, seed=0)  # seeded
    db = tmp_path / "lut.sqlite"
    lat = OwnLatency(g, LayerLatency(db, x86, quick))
    assert lat(full) == lat.lut_sum(full)  # uncalibrated: the LUT sum itself
    points = calibrate(lat, g, counts)
    assert lat.ridge is not None and lat.ridge.n == len(counts)
    assert [c for c, _ in points] == counts and all(ms > 0 for _, ms in points)
    # fewer kept channels, fewer weights (a feature); the correction applies to the LUT sum
    assert lat.features(counts[1])[1] < lat.features(full)[1]
    assert lat(full) != lat.lut_sum(full)
    # the fitted model stays near what it was fitted on: within 3 of its own LOO errors
    for c, ms in points:
        assert abs(math.log(lat(c) / ms)) <= 3 * lat.ridge.sigma + 0.05, (c, ms, lat(c))
    # a second run reuses the stored networks (the same pooled values)
    again = LayerLatency(db, x86, quick)
    assert again.networks_ms([g.model, g.prune(counts[1])], g.input_shape) == [
        points[0][1],
        points[1][1],
    ]
    assert again.reused == 2


def test_compress_refuses_what_it_cannot_prune_before_any_work(tmp_path) -> None:
    import pytest

    from codesign.compression.compress import CompressSettings, compress
    from codesign.errors import CompressError

    settings = CompressSettings(latency_ms=1.0, dataset="digits", out=str(tmp_path / "o"),
                                input_shape=(3, 16, 16), episodes=1)  # fmt: skip
    with pytest.raises(CompressError, match="3 outputs but digits has 10 classes"):
        compress(Tiny(classes=3), settings=settings, progress=False)
    with pytest.raises(CompressError, match="cannot be pruned and fine-tuned"):
        compress(str(tmp_path / "model.pt2"), settings=settings, progress=False)
    with pytest.raises(CompressError, match="does not exist"):
        compress(str(tmp_path / "model.onnx"), settings=settings, progress=False)
    with pytest.raises(CompressError, match="module:factory"):
        compress("model.h5", settings=settings, progress=False)
    with pytest.raises(CompressError, match="positive"):
        CompressSettings(latency_ms=0.0, dataset="digits", out="o")
    assert not (tmp_path / "o" / "lut.sqlite").exists()  # nothing measured, nothing written


FACTORY = """
import sys
sys.path.insert(0, {tests!r})
from test_own_model import Tiny


def make():
    return Tiny()
"""


@pytest.mark.parametrize("source", ["onnx", pytest.param("factory", marks=pytest.mark.slow)])
def test_compress_cli_end_to_end(tmp_path, monkeypatch, capsys, source) -> None:
    import json
    import sys
    from pathlib import Path

    from codesign.cli.main import main
    from codesign.data import load_dataset
    from codesign.peers import export_onnx
    from codesign.train import TrainConfig, train

    torch.manual_seed(0)
    net = Tiny()
    data = load_dataset("digits", (3, 16, 16))
    train(net, data, TrainConfig(epochs=2, lr=0.1), progress=False)
    if source == "onnx":  # BatchNorm folded into the convolutions by the exporter
        model = ["--model", str(export_onnx(net.eval(), (1, 3, 16, 16), tmp_path / "tiny.onnx"))]
    else:
        torch.save(net.state_dict(), tmp_path / "w.pt")
        (tmp_path / "tinyfactory.py").write_text(FACTORY.format(tests=str(Path(__file__).parent)))
        monkeypatch.syspath_prepend(str(tmp_path))
        model = ["--model", "tinyfactory:make", "--weights", str(tmp_path / "w.pt"),
                 "--input-shape", "3x16x16"]  # fmt: skip
    out = tmp_path / "out"
    args = ["compress", *model, "--dataset", "digits", "--target", "x86",
            "--latency-ms", "1000", "--out", str(out), "--episodes", "2", "--warmup", "1",
            "--levels", "2", "--reward-images", "200", "--finetune-epochs", "1",
            "--no-quantize", "--repeat", "3", "--min-repeat-ms", "5", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    rep = json.loads((out / "compress.json").read_text())
    steps = {s["name"]: s for s in rep["steps"]}
    assert list(steps) == ["original", "prune", "quantize", "compile"]
    assert steps["original"]["latency_ms"] > 0 and steps["prune"]["latency_ms"] > 0
    assert steps["prune"]["accuracy"] > 30.0  # 10 classes: well above chance after fine-tuning
    assert steps["quantize"]["latency_ms"] is None and "skipped" in steps["quantize"]["note"]
    assert (out / "model.tar").is_file() and "| prune |" in (out / "compress.md").read_text()
    assert "compile" in capsys.readouterr().out
    sys.modules.pop("tinyfactory", None)


def test_fill_budget_uses_the_budget_the_search_left() -> None:
    from codesign.compression.amc.budget import fill_budget

    channels = {"a": 64, "b": 32, "c": 128}
    options = {n: tuple(range(8, c + 1, 8)) for n, c in channels.items()}
    cost = {"a": 0.01, "b": 0.03, "c": 0.002}  # ms per kept channel

    def latency(counts: dict[str, int]) -> float:
        return 0.5 + sum(cost[n] * counts.get(n, c) for n, c in channels.items())

    searched = {"a": 16, "b": 8, "c": 32}
    budget = 1.2
    filled = fill_budget(searched, options, channels, latency, budget)
    assert latency(searched) < 0.9 * budget and latency(filled) <= budget
    assert all(filled[n] >= searched[n] for n in channels) and filled != searched
    for n, opts in options.items():  # nothing left that fits: every one-step widening overruns
        wider = [o for o in opts if o > filled[n]]
        assert not wider or latency({**filled, n: wider[0]}) > budget
    # an optimistic estimate ranks, the latency decides: still within the budget
    filled2 = fill_budget(searched, options, channels, latency, budget,
                          estimate=lambda c: 0.5 * latency(c))  # fmt: skip
    assert latency(filled2) <= budget
    # a policy already over its budget is left as it is
    assert fill_budget(searched, options, channels, latency, 0.1) == searched


def test_a_policy_measured_over_its_budget_is_brought_back_within_it() -> None:
    from codesign.compression.amc.budget import fill_budget, shrink_to_budget, to_budget

    channels = {"a": 64, "b": 32, "c": 128}
    options = {n: tuple(range(8, c + 1, 8)) for n, c in channels.items()}
    cost = {"a": 0.01, "b": 0.03, "c": 0.002}

    def latency(counts: dict[str, int]) -> float:  # the model: 30% optimistic
        return 0.5 + sum(cost[n] * counts.get(n, c) for n, c in channels.items())

    measured: list[dict[str, int]] = []

    def measure(counts: dict[str, int]) -> float:  # the device
        measured.append(dict(counts))
        return 1.3 * latency(counts)

    budget = 1.2
    start = fill_budget({"a": 16, "b": 8, "c": 32}, options, channels, latency, budget)
    assert measure(start) > budget  # predicted within the budget, measured over it
    counts, seen = to_budget(start, measure, latency, budget, options=options,
                             channels=channels, rounds=3)  # fmt: skip
    assert 1.3 * latency(counts) <= budget and len(seen) >= 2 and seen[0][1] > budget
    assert counts in measured[1:] and len(measured) <= 1 + 3 + 1  # bounded, and verified
    # narrowing alone stops at the budget, and at the smallest widths when it cannot get there
    assert latency(shrink_to_budget(start, options, channels, latency, 1.0)) <= 1.0
    smallest = shrink_to_budget(start, options, channels, latency, 0.0)
    assert smallest == {n: o[0] for n, o in options.items()}


def test_the_quantized_network_ships_only_when_faster_and_accurate_enough(x86) -> None:
    from codesign.compression.compress import _why_not_ship
    from codesign.targets import parse_target

    # against the float network as HAQ compiles it: same images, alternating passes
    def q(acc: float, ms: float) -> dict[str, float]:
        return {"accuracy": acc, "latency_ms": ms, "float_accuracy": 90.0, "float_ms": 1.0}

    assert _why_not_ship(q(89.6, 0.9), 0.5, x86) is None
    assert "lost more than 0.5 pt" in _why_not_ship(q(89.4, 0.5), 0.5, x86)
    assert "not faster by 2%" in _why_not_ship(q(90.0, 0.99), 0.5, x86)
    assert "local CPU" in _why_not_ship(q(90.0, 0.5), 0.5, parse_target("cuda"))
    assert _why_not_ship(None, 0.5, x86) == ""  # no HAQ step: the pruned one ships
