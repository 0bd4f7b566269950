"""HAQ on your own CNN (no BlockSpecs): layers found in the FX graph with BatchNorm folded, a
per-layer LUT measured on demand and reused, a real mixed-precision TVM module that agrees
with its fake-quant PyTorch twin, and a resumable search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codesign.compression.quant.graph import (
    GraphError,
    calibrate_graph,
    export_graph_params,
    fake_quant_graph,
    trace_graph,
)

SHAPE = (1, 3, 16, 16)


class SmallNet(nn.Module):
    """A user's CNN: BN everywhere, a depthwise-separable residual block, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Conv2d(16, 32, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.pw(self.dw(x))
        x = torch.relu(self.down(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding matters
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_layers_found_by_module_path_with_bn_folded() -> None:
    net = small_net()
    g = trace_graph(net, SHAPE)
    assert [ly.path for ly in g.layers] == ["stem.0", "dw.0", "pw.0", "down", "fc"]
    assert [ly.depthwise for ly in g.layers] == [False, True, False, False, False]
    assert [(ly.h, ly.w) for ly in g.layers] == [(16, 16), (8, 8), (8, 8), (8, 8), (1, 1)]
    assert all(ly.int8_ok for ly in g.layers)
    assert g.layers[1].lut_key("int8") == "layer:conv2d:1x16x8x8:o16:k3:s1:p1:g16:int8:nhwc"
    assert g.layers[4].lut_key("fp32") == "layer:linear:1x32:o10:fp32"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in g.module.modules())
    x = torch.randn(4, *SHAPE[1:])
    ranges = calibrate_graph(g, [x])
    q = fake_quant_graph(g, ranges, [(32, 32)] * 5).eval()
    with torch.no_grad():
        torch.testing.assert_close(q(x), net(x), rtol=1e-4, atol=1e-5)  # folded == unfolded
        q8 = fake_quant_graph(g, ranges, [(8, 8)] * 5).eval()
        assert not torch.allclose(q8(x), net(x), atol=1e-4)  # 8 bits do change the function
    params = export_graph_params(q8, g)
    assert [p.layer.path for p in params] == [ly.path for ly in g.layers]
    assert all(p.qweight is not None for p in params)


def test_a_layer_is_measured_in_the_layout_the_network_runs_it(x86) -> None:
    """Inside the compiled network activations stay NHWC: a layer's LUT entry times it so, not
    with NCHW<->NHWC transposes around it (they cost more than many a conv); the stem alone
    reads the NCHW image."""
    from codesign.compression.quant.graphlower import lower_layer
    from codesign.tvm_backend.build import prepare
    from codesign.tvm_backend.precision import precision_menu

    net = small_net()
    g = trace_graph(net, SHAPE)
    ranges = calibrate_graph(g, [torch.randn(4, *SHAPE[1:])])
    params = export_graph_params(fake_quant_graph(g, ranges, [(8, 8)] * 5), g)
    menu = precision_menu(x86)
    for i, want in ((0, (1, 3, 16, 16)), (1, (1, 8, 8, 16)), (3, (1, 8, 8, 16))):
        ly = g.layers[i]
        for p in ("fp32", "int8"):
            low = lower_layer(params[i], g.module.get_submodule(ly.path), p, menu)
            assert low.input_shape == want
            kernels = [gv.name_hint for gv in prepare(low.mod).functions if gv.name_hint != "main"]
            assert not any("transpose" in k for k in kernels) or i == 0, (ly.path, p, kernels)
            if p == "fp32" and i > 0:
                assert len(kernels) == 1, kernels  # the conv with its bias: nothing else


def test_untraceable_and_layerless_models_are_refused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(GraphError, match="torch.fx"):
        trace_graph(Branchy(), SHAPE)
    with pytest.raises(GraphError, match="no nn.Conv2d or nn.Linear"):
        trace_graph(nn.Sequential(nn.ReLU()), SHAPE)
    with pytest.raises(GraphError, match=r"\(1, C, H, W\)"):
        trace_graph(small_net(), (3, 16, 16))


@pytest.mark.slow
def test_quantize_own_builds_a_real_mixed_precision_module_and_reuses_the_lut(
    x86, tmp_path
) -> None:
    from codesign.artifact.checks import TOLERANCES
    from codesign.compression.ddpg import DDPGConfig
    from codesign.compression.haq.env import BudgetError
    from codesign.compression.haq.own import OwnHAQSettings, _compile, quantize_own
    from codesign.compression.quant.graphlower import max_abs_error
    from codesign.compression.quant.policy import QuantPolicy
    from codesign.compression.quant.qat import QATConfig
    from codesign.data import load_dataset
    from codesign.measurement import MeasureProtocol
    from codesign.tvm_backend.precision import precision_menu

    data = load_dataset("digits", SHAPE[1:])
    settings = OwnHAQSettings(
        episodes=3,
        calib_images=64,
        val_images=100,
        search_qat=QATConfig(images=64, batch_size=32),
        final_qat=QATConfig(images=128, batch_size=32),
        ddpg=DDPGConfig(hidden=32, warmup_episodes=2, batch_size=16),
        protocol=MeasureProtocol(repeat=3, min_repeat_ms=5),
        checkpoint=str(tmp_path / "search.pt"),
        check_images=2,
    )
    lut = tmp_path / "lut.sqlite"
    kw = dict(input_shape=SHAPE, data=data, target=x86, lut_path=lut, settings=settings)
    res = quantize_own(small_net(), budget_ms=None, seed=0, progress=False, **kw)
    menu = precision_menu(x86)
    # every layer at every precision (each fits int8 here), and the float network
    n_entries = len(res.layers) * len(menu.precisions) + 1
    assert res.lut == {"measured": n_entries, "reused": 0}
    assert len(res.policy.precisions) == len(res.layers) == 5
    assert set(res.policy.precisions) <= set(menu.precisions)
    assert res.lut_ms <= res.budget_ms - res.search["rest_ms"] + 1e-9
    assert res.latency_ms > 0 and res.float_ms > 0
    rtol, atol = TOLERANCES["int8"]
    assert res.max_abs_error <= atol * max(1.0, res.output_scale)
    assert 0 <= res.accuracy <= 100 and abs(res.accuracy - res.accuracy_fakequant) <= 5
    assert set(res.layer_policy()) == {"stem.0", "dw.0", "pw.0", "down", "fc"}
    saved = res.save(tmp_path / "out")
    assert QuantPolicy.from_json((saved / "policy.json").read_text()) == res.policy
    assert (saved / "model.so").stat().st_size > 0

    # the compiled integer path itself: every layer in int8 against the fake-quant twin
    g = trace_graph(small_net(), SHAPE)
    x = data.calibration(8, 1)
    q = fake_quant_graph(g, calibrate_graph(g, [x]), [(7, 8)] * 5).eval()
    built = _compile(q, g, ["int8"] * 5, menu, x86)
    for i in range(2):
        err, scale = max_abs_error(built, q, x[i : i + 1].numpy())
        assert err <= atol * max(1.0, scale)

    # a second run: the LUT is reused (nothing measured), the search resumes from its checkpoint
    again = quantize_own(small_net(), budget_ms=None, seed=0, progress=False, **kw)
    assert again.lut == {"measured": 0, "reused": n_entries}
    assert again.search["resumed_from"] == 3
    assert again.policy == res.policy
    assert again.budget_ms == res.budget_ms
    # measured again beside the quantized module, in alternating passes
    assert again.float_ms > 0 and again.latency_ms > 0
    # a budget below the fastest reachable policy is refused before any search
    with pytest.raises(BudgetError, match="Raise the budget"):
        quantize_own(small_net(), budget_ms=1e-4, seed=0, progress=False, **kw)


def test_a_quantized_module_ships_as_a_verified_artifact(x86, tmp_path) -> None:
    """`codesign compress` ships HAQ's module as the same verified archive, checked against its
    fake-quant twin with the int8 tolerance; a twin that disagrees writes nothing."""
    import numpy as np

    import codesign
    from codesign.artifact.imported import ship_built
    from codesign.artifact.pack import CompileOptions
    from codesign.compression.haq.own import _compile
    from codesign.data import load_dataset
    from codesign.errors import EqualityError
    from codesign.measurement import MeasureProtocol
    from codesign.tvm_backend.frontend import torch_reference
    from codesign.tvm_backend.precision import precision_menu

    g = trace_graph(small_net(), SHAPE)
    data = load_dataset("digits", SHAPE[1:])
    x = data.calibration(8, 1)
    q = fake_quant_graph(g, calibrate_graph(g, [x]), [(8, 8)] * 5).eval()
    built = _compile(q, g, ["int8"] * 5, precision_menu(x86), x86)
    opts = CompileOptions(progress=False, protocol=MeasureProtocol.quick(), check_inputs=3)
    kw = dict(target=x86, label="small (int8)", precisions=["int8"] * 5, data=data, options=opts)
    ref = torch_reference(q)
    with pytest.raises(EqualityError, match="int8 tolerance"):
        ship_built(built, reference=lambda a: -ref(a), out=tmp_path / "bad.tar", **kw)
    assert not (tmp_path / "bad.tar").exists()
    rep = ship_built(built, reference=ref, out=tmp_path / "int8.tar", policy="w8a8:int8", **kw)
    manifest = rep.artifact.manifest.data
    assert manifest["equality"]["precision"] == "int8" and manifest["equality"]["ok"]
    assert manifest["equality"]["n_inputs"] == 3
    assert manifest["model"]["policies"]["quantization"] == "w8a8:int8"
    assert rep.latency_ms is not None and rep.latency_ms > 0
    xi = x[:1].numpy()
    got = codesign.load(rep.path)(xi)
    np.testing.assert_allclose(got, ref(xi), atol=0.05 * max(1.0, float(np.abs(ref(xi)).max())))
