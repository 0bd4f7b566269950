"""A quantised network ships like any other: saved as a model directory, reloaded as the same
fake-quant twin, compiled into a verified artifact whose integer library matches it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import codesign
from codesign.errors import ArtifactError


@pytest.fixture(scope="module")
def quantized_dir(trained_model_dir: Path, x86, tmp_path_factory) -> tuple[Path, object]:
    """The trained tiny model quantised at w7a8 with int8 in every other block."""
    from codesign.artifact.checks import validation_dataset
    from codesign.compression.quant.fakequant import calibrate, quantize_network
    from codesign.compression.quant.policy import QuantPolicy
    from codesign.compression.quant.saved import save_quantized_model
    from codesign.model_dir import load_model
    from codesign.tvm_backend.precision import precision_menu

    net, meta = load_model(trained_model_dir)
    data = validation_dataset(meta.dataset)
    ranges = calibrate(net, [data.calibration(64, 0)])
    n = len(net.specs)
    bits = [(7, 8)] * sum(1 for _ in _layers(net.specs))
    menu = precision_menu(x86)
    policy = QuantPolicy.derive(net.specs, bits, menu, [i % 2 == 0 for i in range(n)])
    # float blocks run in the narrowest float the CPU computes in (fp16 with avx512fp16)
    assert set(policy.precisions) == {"int8", menu.float_precisions[0]}
    qnet = quantize_network(net, ranges, policy).eval()
    path = tmp_path_factory.mktemp("quant") / "model"
    save_quantized_model(path, qnet, policy, ranges, meta, accuracy=None)
    return path, qnet


def _layers(blocks):
    from codesign.compression.quant.layers import quant_layers

    return quant_layers(blocks)


def test_quantized_model_dir_reloads_the_same_twin(quantized_dir, x86) -> None:
    from codesign.model_dir import load_model
    from codesign.tvm_backend.precision import precision_menu

    path, qnet = quantized_dir
    loaded, meta = load_model(path)
    assert meta.quantized and {b.precision for b in meta.blocks} == {
        "int8",
        precision_menu(x86).float_precisions[0],
    }
    x = torch.randn(4, *meta.dataset.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), qnet(x))


def test_inconsistent_quantized_model_dir_is_refused(quantized_dir, tmp_path: Path) -> None:
    import shutil

    from codesign.model_dir import ModelDirError, load_model

    path, _ = quantized_dir
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    data = json.loads((bad / "model.json").read_text())
    data["blocks"] = [k.removesuffix("_int8") for k in data["blocks"]]  # precisions dropped
    (bad / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelDirError, match="precisions differ from the quantisation policy"):
        load_model(bad)


def test_quantized_artifact_matches_its_fake_quant_twin(quantized_dir, tmp_path: Path) -> None:
    from codesign.artifact.checks import validation_dataset
    from codesign.artifact.pack import CompileOptions, compile_artifact
    from codesign.measurement import MeasureProtocol
    from codesign.model_dir import load_model

    path, qnet = quantized_dir
    opts = CompileOptions(protocol=MeasureProtocol.quick(), val_limit=100, progress=False)
    art = compile_artifact(path, "x86", tmp_path / "q.tar", opts).artifact
    m = art.manifest.data
    _, meta = load_model(path)
    assert m["model"]["policies"]["quantization"] == meta.policies["quantization"]
    assert m["model"]["blocks"] == [b.key for b in meta.blocks]
    assert m["equality"]["ok"] and m["equality"]["precision"] == "int8"
    assert m["latency"]["median_ms"] > 0 and m["accuracy"]["n"] == 100
    x, _ = next(validation_dataset(meta.dataset).batches("val", 8))
    with torch.no_grad():
        ref = qnet(x).numpy()
    with codesign.load(tmp_path / "q.tar") as predict:  # plain TVM runtime, no codesign lowering
        got = predict(x.numpy())
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= 0.05 * scale  # rounding ties differ by one step at most
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_quantized_model_for_another_target_is_refused(quantized_dir, tmp_path: Path) -> None:
    from codesign.artifact.pack import CompileOptions, compile_artifact

    path, _ = quantized_dir
    with pytest.raises(ArtifactError, match="quantised for another target.*codesign quantize"):
        compile_artifact(path, "arm", tmp_path / "a.tar", CompileOptions(progress=False))
    assert not (tmp_path / "a.tar").exists()


def test_pruning_a_quantized_model_is_refused(quantized_dir, tmp_path: Path) -> None:
    from codesign.compression.amc.env import AMCConfig
    from codesign.compression.amc.pipeline import PruneError, PruneJob, prune_model
    from codesign.train import TrainConfig

    path, _ = quantized_dir
    job = PruneJob(str(path), "x86", 1.0, "digits", str(tmp_path / "p"))
    with pytest.raises(PruneError, match="is quantised; prune the float model first"):
        prune_model(job, AMCConfig(episodes=1), TrainConfig(epochs=1), progress=False)
