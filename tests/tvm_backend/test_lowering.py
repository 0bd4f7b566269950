"""Lowering correctness: TVM's output equals PyTorch's, for blocks and a whole network."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from tvm_helpers import run_built

from codesign.blocks import BlockSpec
from codesign.modules import build_block, build_network, init_weights, randomize_bn
from codesign.targets import parse_target
from codesign.tvm_backend.build import compile_module
from codesign.tvm_backend.lower import lower_block, lower_module


@pytest.mark.parametrize(
    "spec",
    [
        BlockSpec.mb(3, 6, 16, 16, 1, 14),  # residual
        BlockSpec.mb(7, 3, 16, 24, 2, 14),  # stride 2, no residual
        BlockSpec.mb(3, 1, 16, 8, 1, 28),  # expansion 1 (no expansion conv)
        BlockSpec("mb", 5, 24, 24, 1, 7, 7, mid=50),  # pruned width
        BlockSpec("conv", 3, 1, 16, 1, 28, 28),
        BlockSpec("head", 1, 32, 10, 1, 7, 7, mid=128),
    ],
    ids=lambda s: s.key,
)
@pytest.mark.parametrize("params_as_input", [False, True], ids=["embedded", "params-input"])
def test_block_tvm_equals_torch(spec: BlockSpec, params_as_input: bool, x86) -> None:
    module = randomize_bn(init_weights(build_block(spec), seed=3), seed=4).eval()
    low = lower_module(module, spec.input_shape, params_as_input=params_as_input)
    assert bool(low.params) == params_as_input
    built = compile_module(low, x86)
    x = np.random.default_rng(0).standard_normal(spec.input_shape).astype("float32")
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_built(built, x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.network
def test_whole_network_tvm_equals_torch(tiny, x86) -> None:
    arch = tiny.sample(random.Random(11))
    net = randomize_bn(build_network(tiny, arch, seed=2), seed=5).eval()
    built = compile_module(lower_module(net, (1, *tiny.input_shape)), x86)
    x = np.random.default_rng(1).standard_normal((1, *tiny.input_shape)).astype("float32")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_built(built, x), ref, rtol=1e-4, atol=1e-4)


class _ResidualBN(torch.nn.Module):
    """A user's CNN that calls its BatchNorms by attribute (as ResNets do): no Sequential pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 16, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(16)
        self.conv2, self.bn2 = torch.nn.Conv2d(16, 16, 3, 1, 1, groups=16), torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(y + self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def test_a_user_models_batch_norm_folds_into_its_convolutions(x86) -> None:
    net = randomize_bn(_ResidualBN(), seed=3).eval()
    lowered = lower_module(net, (1, 3, 16, 16))
    assert "batch_norm" not in lowered.mod.script()  # folded: no BatchNorm kernels at run time
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype("float32")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    out = run_built(compile_module(lowered, x86), x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # an ExportedProgram (no module to trace) is folded in Relax: convs without a bias
    from tvm.relax.frontend.torch import from_exported_program

    from codesign.tvm_backend.lower import fold_batch_norm

    program = torch.export.export(net, (torch.zeros(1, 3, 16, 16),))
    mod = fold_batch_norm(from_exported_program(program, unwrap_unit_return_tuple=True))
    assert mod.script().count("R.nn.batch_norm(") == 1  # bn2 follows conv2's bias add: kept


def test_arm_cross_compiled_library_is_aarch64(tmp_path) -> None:
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64 cross compiler not installed (apt-get install gcc-aarch64-linux-gnu)")
    arm = parse_target("arm")
    built = compile_module(lower_block(BlockSpec.mb(3, 6, 16, 16, 1, 14)), arm)
    lib = built.export(tmp_path / "block_arm64.so")
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    assert int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def test_cuda_compiles_without_a_gpu() -> None:
    cuda = parse_target("cuda:arch=sm_80")
    built = compile_module(lower_block(BlockSpec.mb(3, 6, 16, 16, 1, 14)), cuda)
    src = built.executable.mod.imports[0].imports[0].inspect_source("cuda")
    assert "__global__" in src


@pytest.mark.tuning
@pytest.mark.slow  # ~30 s; prepacked tuned kernels also run in test_compile_applies_the_lut_tuning_records
def test_tuned_kernels_read_prepacked_weights_in_both_weight_forms(tmp_path, x86) -> None:
    """Tuned x86 convolutions rewrite their weight layout; the rewrite runs once at compile
    time (not in every call), and embedded and runtime-input weights share the same tasks."""
    import tvm_ffi

    from codesign.tvm_backend.build import apply_database, prepack_weights, prepare
    from codesign.tvm_backend.database import open_tuning_database
    from codesign.tvm_backend.tuning import extract_tasks, tune

    spec = BlockSpec.mb(3, 6, 16, 16, 1, 14)
    module = randomize_bn(init_weights(build_block(spec), seed=3), seed=4).eval()
    x = np.random.default_rng(0).standard_normal(spec.input_shape).astype("float32")
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    db = open_tuning_database(tmp_path / "lut.sqlite", x86.key)
    lows = [lower_module(module, spec.input_shape, params_as_input=p) for p in (False, True)]
    fused = [prepare(low.mod) for low in lows]
    tasks = [extract_tasks({"b": f}, x86) for f in fused]
    hashes = [sorted(tvm_ffi.structural_hash(t.mod) for t in ts.tasks) for ts in tasks]
    assert hashes[0] == hashes[1]
    tune(tasks[0], x86, db, trials_per_task=4)
    assert not any(db.needs_tuning(t.mod, 4) for t in tasks[1].tasks)

    packed, _ = prepack_weights(apply_database(fused[0], x86, db), [])
    names = [gv.name_hint for gv in packed.functions]
    assert any(n.endswith("_prepacked") for n in names)
    assert not any(n.endswith("_weight_prepack") for n in names)  # folded into constants
    for low in lows:
        built = compile_module(low, x86, db)
        if low.params:  # runtime weights arrive already in the kernels' layout
            assert [p.shape for p in built.params] != [p.shape for p in low.params]
        np.testing.assert_allclose(run_built(built, x), ref, rtol=1e-4, atol=1e-4)
