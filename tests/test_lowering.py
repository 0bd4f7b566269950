"""Lowering correctness: TVM's output equals PyTorch's, for blocks and a whole network."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from codesign.blocks import BlockSpec
from codesign.modules import build_block, build_network, init_weights, randomize_bn
from codesign.targets import parse_target
from codesign.tvm_backend.build import compile_module
from codesign.tvm_backend.lower import lower_block, lower_module


def _run(built, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(built.executable, dev)
    args = [tvm.runtime.tensor(x, dev)] + [tvm.runtime.tensor(p, dev) for p in built.params]
    return vm["main"](*args).numpy()


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
    np.testing.assert_allclose(_run(built, x), ref, rtol=1e-4, atol=1e-4)


def test_whole_network_tvm_equals_torch(tiny, x86) -> None:
    arch = tiny.sample(random.Random(11))
    net = randomize_bn(build_network(tiny, arch, seed=2), seed=5).eval()
    built = compile_module(lower_module(net, (1, *tiny.input_shape)), x86)
    x = np.random.default_rng(1).standard_normal((1, *tiny.input_shape)).astype("float32")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(built, x), ref, rtol=1e-4, atol=1e-4)


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
