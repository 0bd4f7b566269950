"""A user's ONNX CNN rebuilt in PyTorch for pruning (codesign.compression.onnx_module)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_own_model import _trained_tiny


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from codesign.peers import export_onnx

    net = _trained_tiny()
    return net, export_onnx(net, (1, 3, 16, 16), tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_an_onnx_cnn_is_rebuilt_in_pytorch_with_the_same_outputs(tiny_onnx) -> None:
    import onnxruntime as ort

    from codesign.compression.onnx_module import load_onnx_module

    net, path = tiny_onnx
    m = load_onnx_module(path)
    # named after the modules the exporter saw; BatchNorm was folded into the convolutions
    assert list(m.layers) == ["stem_0", "expand_0", "dw_0", "project_0", "conv", "fc"]
    assert m.input_shape == (1, 3, 16, 16) and m.layers["dw_0"].groups == 32
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    with torch.no_grad():
        got = m(torch.from_numpy(x)).numpy()
        orig = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref[0], atol=1e-5)
    np.testing.assert_allclose(got, orig, atol=1e-4)
    # trainable: gradients reach every weight, and torch.export traces it (TVM lowers it so)
    m.train()
    m(torch.randn(4, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    torch.export.export(m.eval(), (torch.from_numpy(x),))


def test_an_onnx_cnn_prunes_through_the_dependency_graph(tiny_onnx) -> None:
    from codesign.compression.amc.own_layers import OwnGraph, layer_specs
    from codesign.compression.onnx_module import load_onnx_module

    net, path = tiny_onnx
    m = load_onnx_module(path)
    g, ref_graph = OwnGraph.build(m, (1, 3, 16, 16)), OwnGraph.build(net, (1, 3, 16, 16))
    # the same coupled groups and fused epilogues as the PyTorch model the file came from
    assert sorted(u.channels for u in g.units) == sorted(u.channels for u in ref_graph.units)
    assert [s.epilogue for s in g.layers.values()] == [
        s.epilogue for s in ref_graph.layers.values()
    ]
    res = next(u for u in g.units if set(u.outs) == {"layers.stem_0", "layers.project_0"})
    assert set(res.ins) == {"layers.expand_0", "layers.conv"}
    counts = {u.name: u.channels * 3 // 4 for u in g.units}
    pruned = g.prune(counts)
    assert tuple(layer_specs(pruned, (1, 3, 16, 16)).values()) == g.specs(counts)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref, got = m(x), pruned(x)
    corr = torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1]
    assert got.shape == ref.shape and corr > 0.8, float(corr)
    assert m.layers["dw_0"].out_channels == 32  # the loaded module is untouched


def test_batchnorm_comes_back_where_the_exporter_folded_it(tiny_onnx) -> None:
    from codesign.compression.amc.own_layers import OwnGraph
    from codesign.compression.onnx_module import load_onnx_module
    from codesign.data import load_dataset

    net, path = tiny_onnx
    m = load_onnx_module(path)
    assert m.bare_convs == ("stem_0", "expand_0", "dw_0", "project_0", "conv")
    images = load_dataset("digits", (3, 16, 16)).calibration(128, seed=0)
    with torch.no_grad():
        before = m(images)
    assert m.restore_batchnorm(images) == m.bare_convs
    assert m.restore_batchnorm(images) == ()  # once
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) == 5
    with torch.no_grad():
        np.testing.assert_allclose(m(images).numpy(), before.numpy(), atol=1e-4)  # eval: same
        train_out = m.train()(images)  # batch statistics of the same images: the same again
    np.testing.assert_allclose(train_out.numpy(), before.numpy(), atol=1e-3)
    g = OwnGraph.build(m.eval(), (1, 3, 16, 16))  # BN folded again for latency, as in PyTorch
    assert [s.epilogue for s in g.layers.values()] == ["relu6", "relu6", "relu6", "add", "relu", ""]


def _graph_file(tmp_path, nodes, inits, name="bad.onnx"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_what_cannot_be_rebuilt_is_refused_by_operator_and_node(tmp_path) -> None:
    from onnx import helper

    from codesign.compression.onnx_module import load_onnx_module
    from codesign.errors import CompressError

    w = {"w": np.ones((4, 3, 3, 3), np.float32)}
    lrn = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
           helper.make_node("LRN", ["c"], ["y"], name="norm1", size=3)]  # fmt: skip
    with pytest.raises(CompressError, match=r"LRN at node norm1 \(index 1\).*onnxsim"):
        load_onnx_module(_graph_file(tmp_path, lrn, w))
    asym = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv1", pads=[0, 0, 1, 1])]
    with pytest.raises(CompressError, match="conv1.*asymmetric padding"):
        load_onnx_module(_graph_file(tmp_path, asym, w))
    reshape = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"),
               helper.make_node("Reshape", ["c", "s"], ["y"], name="shuffle")]  # fmt: skip
    with pytest.raises(CompressError, match=r"shuffle.*Reshape to \[1, 2, 2, 36\]"):
        load_onnx_module(_graph_file(tmp_path, reshape, {**w, "s": np.array([1, 2, 2, 36])}))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CompressError, match="not a readable ONNX model"):
        load_onnx_module(tmp_path / "junk.onnx")


def test_each_covered_operator_matches_onnx_runtime(tmp_path) -> None:
    """A graph as other exporters write it: BatchNorm unfolded, Clip bounds as inputs, pooling,
    a concat, a Reshape flatten and a MatMul + Add head."""
    import onnxruntime as ort
    from onnx import helper

    from codesign.compression.onnx_module import load_onnx_module

    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    inits = {"w": r(4, 3, 3, 3), "b": r(4), "s": r(4) + 2, "t": r(4), "m": r(4),
             "v": np.abs(r(4)) + 0.5, "lo": np.array(0.0, np.float32),
             "hi": np.array(6.0, np.float32), "shape": np.array([1, -1]), "fc": r(32, 5),
             "fcb": r(5)}  # fmt: skip
    N = helper.make_node
    nodes = [
        N("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[1, 1]),
        N("BatchNormalization", ["c", "s", "t", "m", "v"], ["bn"], name="bn", epsilon=1e-3),
        N("Clip", ["bn", "lo", "hi"], ["a"], name="relu6"),
        N("HardSigmoid", ["a"], ["g"], name="gate", alpha=0.25, beta=0.4),
        N("Mul", ["a", "g"], ["ag"], name="scale"),
        N("MaxPool", ["ag"], ["p1"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
          pads=[1, 1, 1, 1]),
        N("AveragePool", ["ag"], ["p2"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        N("Concat", ["p1", "p2"], ["cat"], name="cat", axis=1),
        N("GlobalAveragePool", ["cat"], ["gap"], name="gap"),
        N("Concat", ["gap", "gap", "gap", "gap"], ["gap4"], name="cat4", axis=1),
        N("Reshape", ["gap4", "shape"], ["flat"], name="flatten"),
        N("MatMul", ["flat", "fc"], ["mm"], name="fc"),
        N("Add", ["mm", "fcb"], ["y"], name="fc_bias"),
    ]  # fmt: skip
    path = _graph_file(tmp_path, nodes, inits, "ops.onnx")
    m = load_onnx_module(path)
    assert [type(v).__name__ for v in m.layers.values()] == ["Conv2d", "BatchNorm2d", "Linear"]
    x = r(1, 3, 8, 8)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(m(torch.from_numpy(x)).numpy(), ref[0], atol=1e-5)


def test_haq_lowers_an_imported_model_as_its_fake_quant_twin_computes(x86, tmp_path) -> None:
    """HAQ on an imported model: the traced graph of the rebuilt module (pooling with stride and
    padding included) compiles to a TVM module that agrees with it at fp32 and at int8."""
    from torch import nn

    from codesign.artifact.checks import TOLERANCES
    from codesign.compression.haq.own import _compile
    from codesign.compression.onnx_module import load_onnx_module
    from codesign.compression.quant.graph import calibrate_graph, fake_quant_graph, trace_graph
    from codesign.compression.quant.graphlower import max_abs_error
    from codesign.peers import export_onnx
    from codesign.tvm_backend.precision import precision_menu

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 16, 1), nn.ReLU6(),
                        nn.AvgPool2d(2, 2), nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()  # fmt: skip
    m = load_onnx_module(export_onnx(net, (1, 3, 16, 16), tmp_path / "pool.onnx"))
    x = torch.randn(4, 3, 16, 16)
    m.restore_batchnorm(x)
    g = trace_graph(m, (1, 3, 16, 16))
    ranges = calibrate_graph(g, [x])
    menu = precision_menu(x86)
    for bits, precision in (((32, 32), "fp32"), ((8, 8), "int8")):
        q = fake_quant_graph(g, ranges, [bits] * len(g.layers)).eval()
        built = _compile(q, g, [precision] * len(g.layers), menu, x86)
        err, scale = max_abs_error(built, q, x[:1].numpy())
        assert err <= TOLERANCES[precision][1] * max(1.0, scale), (precision, err, scale)
