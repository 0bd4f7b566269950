"""HAQ on your own CNN (no BlockSpecs): a user-written MobileNet-style net (BN, depthwise
separable residual blocks, linear head) trained briefly on digits, then `quantize_own` at the
uniform-8-bit budget (budget_ms=None). Reports, side by side in one run, the float network and
the mixed-precision module as compiled TVM modules (latency by the shared runner, accuracy of
the compiled module), and per layer the LUT's int8 / fp16 / fp32 latency.

    python benchmarks/haq_own.py --quick     # 3x16x16, 4 episodes
    python benchmarks/haq_own.py             # 3x32x32, 20 episodes

Writes benchmarks/results/haq_own.json (haq_own_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import machine, write_result  # noqa: E402
from torch import nn  # noqa: E402


class UserNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(
                nn.Sequential(
                    nn.Conv2d(w, w, 3, 1, 1, groups=w, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU6(),
                    nn.Conv2d(w, w, 1, bias=False),
                    nn.BatchNorm2d(w),
                )  # fmt: skip
            )
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * w))
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        x = torch.relu(self.down(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--episodes", type=int, default=None)
    args = ap.parse_args()

    from codesign.compression.ddpg import DDPGConfig
    from codesign.compression.haq.own import OwnHAQSettings, quantize_own
    from codesign.compression.quant.qat import QATConfig
    from codesign.data import load_dataset
    from codesign.measurement import MeasureProtocol
    from codesign.targets import parse_target
    from codesign.train import TrainConfig, train

    size = 16 if args.quick else 32
    episodes = args.episodes or (4 if args.quick else 20)
    host = machine()
    data = load_dataset("digits", (3, size, size))
    torch.manual_seed(0)
    net = UserNet(16 if args.quick else 32)
    train(net, data, TrainConfig(epochs=2 if args.quick else 6, seed=0), progress=False)
    settings = OwnHAQSettings(
        episodes=episodes,
        val_images=300,
        search_qat=QATConfig(images=256, batch_size=32),
        final_qat=QATConfig(images=1000, batch_size=32),
        ddpg=DDPGConfig(hidden=64, warmup_episodes=max(2, episodes // 3), batch_size=32),
        protocol=MeasureProtocol(repeat=10, min_repeat_ms=20),
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = quantize_own(
            net.eval(), input_shape=(1, 3, size, size), data=data, target=parse_target("x86"),
            lut_path=Path(tmp) / "lut.sqlite", budget_ms=None, settings=settings, seed=0,
            progress=True,
        )  # fmt: skip
    seconds = time.time() - t0
    # side by side: the float module and the HAQ module timed alternately, 3 rounds each
    from codesign.compression.haq.own import _compile
    from codesign.compression.haq.pipeline import measure_built
    from codesign.compression.quant.graph import calibrate_graph, fake_quant_graph, trace_graph
    from codesign.tvm_backend.precision import precision_menu

    g = trace_graph(net, (1, 3, size, size))
    fnet = fake_quant_graph(
        g, calibrate_graph(g, [data.calibration(64)]), [(32, 32)] * len(g.layers)
    )
    target = parse_target("x86")
    fbuilt = _compile(fnet.eval(), g, ["fp32"] * len(g.layers), precision_menu(target), target)
    rounds = [
        (measure_built(fbuilt, settings.protocol), measure_built(res.built, settings.protocol))
        for _ in range(3)
    ]
    float_ms = sorted(r[0] for r in rounds)[1]
    haq_ms = sorted(r[1] for r in rounds)[1]
    layers = []
    layer_ms = res.search["layer_ms"]
    print(f"float {float_ms:.4f} ms  acc {res.float_accuracy:.1f}%  (side by side, median of 3)")
    print(
        f"HAQ   {haq_ms:.4f} ms  acc {res.accuracy:.1f}% (fake-quant {res.accuracy_fakequant:.1f}%)"
    )
    print(f"float / HAQ latency: {float_ms / haq_ms:.3f}x  policy {res.policy}")
    for path, p in res.layer_policy().items():
        layers.append({"path": path, **p, "lut_ms": layer_ms[path]})
        lut = "  ".join(f"{k} {v:.4f}" for k, v in layer_ms[path].items())
        print(f"  {path:14s} {p['precision']:5s} w{p['w_bits']}a{p['a_bits']}   LUT ms: {lut}")
    write_result(
        "haq_own_quick" if args.quick else "haq_own",
        {
            "host": host,
            "input": [1, 3, size, size],
            "episodes": episodes,
            "seconds": round(seconds, 1),
            "float_ms": float_ms,
            "haq_ms": haq_ms,
            "float_over_haq": float_ms / haq_ms,
            "rounds_ms": rounds,
            "in_run": {"float_ms": res.float_ms, "haq_ms": res.latency_ms},
            "lut_ms": res.lut_ms,
            "budget_ms": res.budget_ms,
            "float_accuracy": res.float_accuracy,
            "haq_accuracy": res.accuracy,
            "haq_accuracy_fakequant": res.accuracy_fakequant,
            "max_abs_error": res.max_abs_error,
            "output_scale": res.output_scale,
            "policy": res.policy.encode(),
            "layers": layers,
        },
    )


if __name__ == "__main__":
    main()
