"""Compiling models from outside the search spaces: ONNX files, .pt2 ExportedPrograms and
'module:factory' + state_dict, into the same verified artifact; refusals that say what to do.

One small CNN (BatchNorm, residual adds, depthwise convolutions, a linear head) at 1x3x16x16,
written to a module file so that 'module:factory' can import it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import codesign
from codesign.artifact.imported import Preprocess, compile_model
from codesign.artifact.pack import CompileOptions
from codesign.artifact.verify import verify_artifact
from codesign.cli.main import main
from codesign.measurement import MeasureProtocol
from codesign.tvm_backend.frontend import (
    ModelImportError,
    UnsupportedOperatorError,
    import_model,
)

SHAPE = (1, 3, 16, 16)
NET = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw2 = nn.Conv2d(8, 16, 3, 2, 1, groups=8)
        self.pw2 = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        x = torch.relu(self.dw2(x))
        x = x + self.pw2(x)
        return self.head(x.mean((2, 3)))


def make():
    return TinyCNN().eval()


def trained(seed=0):
    """Seeded weights with non-trivial BatchNorm statistics (as if trained)."""
    torch.manual_seed(seed)
    net = TinyCNN()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()
'''


@pytest.fixture(scope="module")
def tinynet(tmp_path_factory: pytest.TempPathFactory):
    """The module `codesign_tinynet` (TinyCNN, make, trained), importable by name."""
    import importlib

    where = tmp_path_factory.mktemp("tinynet")
    (where / "codesign_tinynet.py").write_text(NET)
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module("codesign_tinynet")
    finally:
        sys.path.remove(str(where))
        sys.modules.pop("codesign_tinynet", None)


@pytest.fixture(scope="module")
def onnx_file(tinynet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from codesign.peers import export_onnx

    return export_onnx(tinynet.trained(), SHAPE, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def _opts() -> CompileOptions:
    return CompileOptions(
        check_inputs=2, protocol=MeasureProtocol(repeat=2, min_repeat_ms=5), progress=False
    )


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype("float32")


@pytest.mark.network
def test_cli_compiles_an_onnx_file(onnx_file: Path, tmp_path: Path, capsys) -> None:
    """`codesign compile --model tiny.onnx`: the artifact equals ONNX Runtime on a given and
    random inputs, records the input spec and preprocessing, loads with codesign.load, and the
    output compares its latency with ONNX Runtime and OpenVINO."""
    import onnxruntime as ort

    given = tmp_path / "given.npy"
    np.save(given, _x(7))
    out = tmp_path / "tiny.tar"
    rc = main(["compile", "--model", str(onnx_file), "--target", "x86", "--out", str(out),
               "--check-inputs", "2", "--check-input", str(given), "--repeat", "2",
               "--min-repeat-ms", "5", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
               "--no-progress"])  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "equal to ONNX Runtime on 3 inputs" in printed.out
    assert "onnxruntime" in printed.out and "codesign/onnxruntime" in printed.out
    d = verify_artifact(out).manifest.data
    assert d["model"]["source"] == "onnx" and d["model"]["ops"]["Conv"] == 5
    assert d["inputs"] == [{"name": "input", "shape": list(SHAPE), "dtype": "float32",
                            "layout": "NCHW"}]  # fmt: skip
    assert d["preprocessing"]["mean"] == [0.5] * 3 and d["preprocessing"]["std"] == [0.25] * 3
    assert d["equality"]["reference"] == "ONNX Runtime" and d["equality"]["max_abs_err"] <= 1e-4
    assert d["peers"]["per_call_ms"]["codesign"] > 0
    assert d["latency"]["median_ms"] > 0
    assert main(["verify", str(out)]) == 0
    assert "tiny for x86" in capsys.readouterr().out  # the summary names the imported model
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with codesign.load(out) as predict:
        for seed in (7, 11):
            x = _x(seed)
            want = sess.run(None, {"input": x})[0]
            assert np.abs(predict(x) - want).max() <= 1e-4


@pytest.mark.network
def test_onnx_relu6_is_fused_into_its_convolution(onnx_file: Path) -> None:
    """TVM's ONNX frontend emits Clip already lowered (call_tir of TOPI maximum / minimum),
    which ConvertLayout wrapped in transposes: MobileNetV2 from ONNX spent 4.5 of 16.6 ms in
    transpose-clip-transpose kernels. Now ReLU6 runs in its convolution's kernel."""
    from codesign.tvm_backend.build import prepare

    kernels = [gv.name_hint for gv in prepare(import_model(onnx_file).mod).functions]
    assert not [k for k in kernels if "maximum" in k and "transpose" in k], kernels
    assert [k for k in kernels if "conv2d" in k and "minimum" in k], kernels


def test_exported_program_compiles(tinynet, tmp_path: Path) -> None:
    """A .pt2 file (torch.export.save): compiled, equal to PyTorch, loadable."""
    import torch

    net = tinynet.trained(seed=1)
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(SHAPE),)), str(path))
    out = tmp_path / "pt2.tar"
    report = compile_model(path, out=out, options=_opts(), peers=False)
    assert report.source == "torch" and report.max_abs_diff <= 1e-4
    d = report.artifact.manifest.data
    assert d["model"]["source"] == "torch" and d["equality"]["reference"] == "PyTorch"
    assert d["inputs"][0]["shape"] == list(SHAPE) and d["preprocessing"] is None
    with codesign.load(out) as predict, torch.no_grad():
        x = _x(3)
        assert np.abs(predict(x) - net(torch.from_numpy(x)).numpy()).max() <= 1e-4


@pytest.mark.network
def test_factory_with_weights_compiles(tinynet, tmp_path: Path) -> None:
    """'module:factory' + a state_dict: the weights file, not the factory's init, is compiled."""
    import torch

    net = tinynet.trained(seed=2)
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "factory.tar"
    prep = Preprocess(mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    report = codesign.compile_model("codesign_tinynet:make", out=out, weights=weights,
                                    input_shape=SHAPE, preprocess=prep, options=_opts(),
                                    peers=False)  # fmt: skip
    assert report.max_abs_diff <= 1e-4
    assert report.artifact.manifest.preprocessing is not None
    x = _x(5)
    with codesign.load(out) as predict, torch.no_grad():
        got = predict(x)
        assert np.abs(got - net(torch.from_numpy(x)).numpy()).max() <= 1e-4
        fresh = tinynet.make()(torch.from_numpy(x)).numpy()
        assert np.abs(got - fresh).max() > 1e-3  # the state_dict was loaded


def test_unsupported_onnx_operator_is_refused_by_name_and_node(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], np.ones(12, np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv0"),
            helper.make_node("Celu", ["c"], ["y"], name="odd_activation"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [w],
    )
    path = tmp_path / "celu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedOperatorError) as err:
        import_model(path)
    msg = str(err.value)
    assert "Celu" in msg and "odd_activation" in msg and "index 1" in msg and "Replace" in msg
    assert "Conv" not in msg.split("convert", 1)[1].split(".")[0]  # only the unsupported one


def test_unsupported_torch_operator_is_refused_with_its_module_path() -> None:
    import torch
    from torch import nn

    class Odd(nn.Module):
        def forward(self, x):
            return torch.cummax(x, dim=1).values

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.block = nn.Sequential(nn.ReLU(), Odd())

        def forward(self, x):
            return self.block(self.conv(x))

    with pytest.raises(UnsupportedOperatorError) as err:
        import_model(Net(), input_shape=SHAPE)
    msg = str(err.value)
    assert "cummax" in msg and "block.1" in msg and "Rewrite" in msg


def test_dynamic_onnx_needs_an_input_shape(tinynet, tmp_path: Path, capsys) -> None:
    import torch

    path = tmp_path / "dyn.onnx"
    torch.onnx.export(tinynet.make(), (torch.zeros(SHAPE),), str(path), dynamo=False,
                      input_names=["image"], dynamic_axes={"image": {0: "batch", 2: "h", 3: "w"}})  # fmt: skip
    with pytest.raises(ModelImportError) as err:
        import_model(path)
    msg = str(err.value)
    assert "image" in msg and "dynamic" in msg and "--input-shape 1x3xNxN" in msg
    rc = main(["compile", "--model", str(path), "--target", "x86", "--out",
               str(tmp_path / "dyn.tar"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "--input-shape" in capsys.readouterr().err
    assert not (tmp_path / "dyn.tar").exists()
    with pytest.raises(ModelImportError, match="does not fit"):
        import_model(path, input_shape=(1, 4, 16, 16))  # 3 channels are fixed
    imported = import_model(path, input_shape=SHAPE)
    assert imported.input.shape == SHAPE and imported.input.name == "image"


def test_import_refusals_say_what_to_do(tinynet, tmp_path: Path) -> None:
    """A factory that does not import, weights beside a self-contained file, a module without a
    shape, an unknown file kind: each a ModelImportError naming the fix, before any compile."""
    import torch

    with pytest.raises(ModelImportError, match="PYTHONPATH"):
        import_model("no_such_module_xyz:make", input_shape=SHAPE)
    with pytest.raises(ModelImportError, match="state_dict"):
        bad = tmp_path / "bad.pt"
        torch.save({"nope": torch.zeros(1)}, bad)
        import_model("codesign_tinynet:make", weights=bad, input_shape=SHAPE)
    with pytest.raises(ModelImportError, match="--weights is for module:factory"):
        import_model(tmp_path / "x.onnx", weights=tmp_path / "w.pt")
    with pytest.raises(ModelImportError, match="--input-shape"):
        import_model(tinynet.make())
    with pytest.raises(ModelImportError, match="give an .onnx file"):
        import_model(tmp_path / "model.bin")


def test_exported_program_shapes(tinynet, tmp_path: Path) -> None:
    """A static .pt2 keeps its own shape (another one is refused: its guards fix it); dynamic
    dimensions need --input-shape and are made concrete by it."""
    import torch
    from torch.export import Dim

    static, dynamic = tmp_path / "static.pt2", tmp_path / "dynamic.pt2"
    x = torch.zeros(SHAPE)
    torch.export.save(torch.export.export(tinynet.make(), (x,)), str(static))
    assert import_model(static).input.shape == SHAPE
    with pytest.raises(ModelImportError, match="exported for input 1x3x16x16"):
        import_model(static, input_shape=(1, 3, 24, 24))
    dims = {"x": {2: 8 * Dim("h8", min=1, max=8), 3: 8 * Dim("w8", min=1, max=8)}}
    torch.export.save(torch.export.export(tinynet.make(), (x,), dynamic_shapes=dims), str(dynamic))
    with pytest.raises(ModelImportError, match="dynamic dimensions.*--input-shape"):
        import_model(dynamic)
    imported = import_model(dynamic, input_shape=(1, 3, 24, 24))
    assert imported.input.shape == (1, 3, 24, 24) and imported.source_sha256 is not None
    params = imported.mod["main"].params
    assert [int(d) for d in params[0].ty.shape] == [1, 3, 24, 24]
