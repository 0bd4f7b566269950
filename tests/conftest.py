"""Shared fixtures. Tests use real TVM builds with tiny budgets, real SQLite files in tmp dirs."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

from codesign.targets import host_threads

# A test run must not depend on the user's own LUTs or environment. Tests measure with the
# default x86 target (every CPU this process may use), so TVM's pool holds as many threads.
os.environ["TVM_NUM_THREADS"] = str(host_threads())
# Nor on (or into) the user's cache: the tuning cache and the detected host CPU go to a
# directory of this test run (CLI subprocesses inherit it).
if "CODESIGN_TEST_KEEP_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CODESIGN_CACHE_DIR"] = tempfile.mkdtemp(prefix="codesign-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CODESIGN_CACHE_DIR"], ignore_errors=True)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Tests sit in one folder per package part (tests/<part>/); the shared helpers stay here.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def lut_path(tmp_path: Path) -> Path:
    return tmp_path / "lut.sqlite"


@pytest.fixture(scope="session")
def tiny():
    from codesign.search.space import get_space

    return get_space("tiny")


@pytest.fixture(scope="session")
def x86():
    from codesign.targets import parse_target

    return parse_target("x86")


@pytest.fixture(scope="session")
def quick():
    from codesign.measurement import MeasureProtocol

    return MeasureProtocol.quick()


@pytest.fixture
def mb_block():
    """One inverted residual (expand, depthwise, project + residual) with non-trivial BatchNorm,
    lowered as it runs inside a network: (spec, module, Lowered)."""
    from codesign.blocks import BlockSpec
    from codesign.modules import build_block, init_weights, randomize_bn
    from codesign.tvm_backend.lower import block_interface, lower_module

    spec = BlockSpec.mb(3, 6, 16, 16, 1, 14)
    module = randomize_bn(init_weights(build_block(spec), seed=3), seed=4).eval()
    return spec, module, lower_module(module, spec.input_shape, **block_interface(spec))


@pytest.fixture
def block_tasks(tmp_path, x86, mb_block):
    """The three tuning tasks of `mb_block` and an empty tuning database."""
    from codesign.tvm_backend.build import prepare
    from codesign.tvm_backend.database import open_tuning_database
    from codesign.tvm_backend.tuning import extract_tasks

    fused = prepare(mb_block[2].mod)
    db = open_tuning_database(tmp_path / "lut.sqlite", x86.key)
    yield extract_tasks({"b": fused}, x86), db
    db.close()


@pytest.fixture
def farm_factory(tmp_path: Path):
    """Start real farms (tracker + servers + supervisor on 127.0.0.1, free ports); always stopped
    afterwards, and every recorded process tree killed by PID."""
    from codesign.farm.supervisor import start_farm, stop_farm

    started = []

    def start(cfg):
        started.append(cfg)
        start_farm(cfg)
        return cfg

    yield start
    for cfg in started:
        stop_farm(cfg.state_dir)


@pytest.fixture(scope="session")
def tiny_lut(tmp_path_factory, tiny, x86) -> Path:
    """A complete untuned LUT of the tiny space on this CPU (39 blocks, quick protocol), built
    once per session (~90 s). Tests that write to it work on a copy (`shutil.copy`)."""
    from codesign.lut_build import build_lut
    from codesign.measurement import MeasureProtocol

    db = tmp_path_factory.mktemp("tiny-lut") / "lut.sqlite"
    rep = build_lut(
        tiny, x86, db, protocol=MeasureProtocol(repeat=5, min_repeat_ms=5), progress=False
    )
    assert rep.measured == len(tiny.blocks()) and not rep.failed, rep
    return db


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory) -> Path:
    """A tiny-space network trained 1 epoch on `digits`, saved as a model directory."""
    import torch

    from codesign.data import load_dataset
    from codesign.model_dir import ModelDir, save_model
    from codesign.modules import build_network
    from codesign.search.space import get_space
    from codesign.train import TrainConfig, evaluate, train

    torch.set_num_threads(2)
    space = get_space("tiny")
    arch = space.uniform("k3e3")
    data = load_dataset("digits", space.input_shape)
    net = build_network(space, arch, seed=0)
    train(net, data, TrainConfig(epochs=1, lr=0.1, seed=0), progress=False)
    meta = ModelDir(
        tuple(net.specs),
        arch=arch.encode(),
        space=space.name,
        dataset=data.info,
        accuracy=evaluate(net, data),
    )
    return save_model(tmp_path_factory.mktemp("model") / "digits-tiny", net, meta)


@pytest.fixture(scope="session")
def x86_artifact(trained_model_dir: Path, tmp_path_factory) -> Path:
    """The trained model compiled for this CPU (untuned), checked and measured."""
    from codesign.artifact.pack import CompileOptions, compile_artifact
    from codesign.measurement import MeasureProtocol

    out = tmp_path_factory.mktemp("artifact") / "model.tar"
    opts = CompileOptions(protocol=MeasureProtocol.quick(), progress=False)
    return compile_artifact(trained_model_dir, "x86", out, opts).path


# Test tiers (pyproject.toml markers; `make test-fast` leaves out tuning, rpc, network and slow).
# A test that uses one of these fixtures pays for what the fixture does, so it carries its mark.
_MARK_BY_FIXTURE = {
    "block_tasks": "tuning",  # tests take its tasks and database to MetaSchedule
    "farm_factory": "rpc",
    "tiny_lut": "network",  # the whole tiny space measured (39 blocks)
    "trained_model_dir": "network",  # a network trained on digits
    "x86_artifact": "network",  # that network compiled, checked and measured
    "measured": "network",  # tests/latency: whole networks measured
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        for fixture in set(_MARK_BY_FIXTURE) & set(getattr(item, "fixturenames", ())):
            item.add_marker(_MARK_BY_FIXTURE[fixture])
