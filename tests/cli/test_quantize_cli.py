"""`codesign quantize` as a user types it: clear errors, and (slow) a whole run whose compiled
artifact is reloaded from disk and agrees with the reported accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import CliResult, run_cli


def run(*args: str) -> CliResult:
    return run_cli(*args)


def test_budget_is_required_and_exclusive(tmp_path: Path) -> None:
    base = ["quantize", "--model", str(tmp_path), "--target", "x86", "--dataset", "digits"]
    out = run(*base, "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "--latency-ms" in out.stderr
    out = run(*base, "--out", str(tmp_path / "o"), "--latency-ms", "1", "--size-mb", "1")
    assert out.returncode == 2 and "not allowed" in out.stderr
    out = run(*base, "--out", str(tmp_path / "o"), "--latency-ms", "0")
    assert out.returncode == 2 and "--latency-ms: 0 is not allowed" in out.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    out = run(
        "quantize", "--model", str(tmp_path / "nope"), "--target", "x86", "--dataset", "digits",
        "--size-mb", "0.01", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert out.returncode == 2
    assert "not a codesign model directory" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_quantize_end_to_end(tmp_path: Path) -> None:
    from codesign.blocks import BlockSpec
    from codesign.data import load_dataset
    from codesign.model_dir import ModelDir, save_model
    from codesign.modules import Network, init_weights
    from codesign.train import TrainConfig, evaluate, train

    blocks = (
        BlockSpec("conv", 3, 1, 16, 2, 16, 16),
        BlockSpec.mb(3, 2, 16, 16, 1, 8),
        BlockSpec("head", 1, 16, 10, 1, 8, 8, mid=32),
    )
    data = load_dataset("digits", (1, 16, 16))
    net = init_weights(Network(blocks), 0)
    train(net, data, TrainConfig(epochs=2), progress=False)
    save_model(
        tmp_path / "m", net, ModelDir(blocks, dataset=data.info, accuracy=evaluate(net, data))
    )
    out = tmp_path / "q"
    args = [
        "quantize", "--model", str(tmp_path / "m"), "--target", "x86", "--dataset", "digits",
        "--size-mb", "0.004", "--out", str(out), "--episodes", "3", "--warmup", "2",
        "--qat-images", "128", "--final-qat-images", "512", "--val-images", "200", "--json",
        "--no-progress",
    ]  # fmt: skip
    res = run(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert result["size_mb"] <= 0.004
    assert abs(result["acc"] - result["acc_fakequant"]) <= 0.5 + 1e-9  # 200 images: 1 image
    # the shipped artifact runs with the plain TVM runtime and reproduces the reported accuracy
    import codesign

    assert result["artifact"]["equality"]["ok"]
    assert result["artifact"]["acc"] == pytest.approx(result["acc"])
    correct = 0
    with codesign.load(out / "model.tar") as predict:
        for x, y in data.batches("val", 50, limit=200):
            correct += int((predict(x.numpy()).argmax(1) == y.numpy()).sum())
    assert correct / 2 == pytest.approx(result["acc"])
    # re-running resumes: the search has nothing left to do and the answer is the same
    again = json.loads(run(*args).stdout)
    assert again["policy"] == result["policy"] and again["search"]["resumed_from"] == 3
