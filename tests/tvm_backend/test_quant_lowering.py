"""Integer lowering: the compiled TVM module against the numpy integer reference (bit exact on
the integer path) and the PyTorch fake-quant model it was exported from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tvm_helpers import run_built

from codesign.blocks import BlockSpec
from codesign.compression.quant import reference
from codesign.compression.quant.fakequant import calibrate, export_params, quantize_network
from codesign.compression.quant.policy import QuantPolicy
from codesign.modules import Network, init_weights, randomize_bn

BLOCKS = (
    BlockSpec("conv", 3, 1, 16, 2, 16, 16),
    BlockSpec.mb(3, 2, 16, 16, 1, 8),  # residual; 1x1 convs tensorizable (16 % 8, 16 % 4)
    BlockSpec.mb(5, 1, 16, 24, 2, 8),  # no expansion, stride 2
    BlockSpec("head", 1, 24, 10, 1, 4, 4, mid=32),
)


@pytest.fixture(scope="module")
def setup(x86):
    from codesign.tvm_backend.precision import precision_menu

    net = randomize_bn(init_weights(Network(BLOCKS), 0), 0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 16, 16, generator=g)
    return net, calibrate(net, [x]), x, precision_menu(x86)


POLICIES = [
    "int8:w7a8_int8:w7a8-w7a8-w7a8_int8:w7a8-w7a8_int8:w7a8-w7a8",  # uniform int8
    "int8:w4a6_fp32:w5a32-w3a32-w6a32_int8:w6a8-w2a4_fp32:w32a32-w8a32",  # mixed
]


@pytest.mark.parametrize("text", POLICIES)
@pytest.mark.parametrize("params_as_input", [False, True])
def test_tvm_matches_fake_quant(setup, x86, text, params_as_input):
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.quantize import lower_quantized

    net, ranges, x, menu = setup
    policy = QuantPolicy.decode(text).check(BLOCKS).check_menu(menu)
    qnet = quantize_network(net, ranges, policy).eval()
    params = export_params(qnet)
    blocks = policy.apply(BLOCKS)
    built = compile_module(
        lower_quantized(blocks, params, menu, params_as_input=params_as_input), x86
    )
    for i in range(2):
        xi = x[i : i + 1].numpy()
        out = run_built(built, xi)
        ref = reference.run_network(xi, blocks, params)
        fq = qnet(torch.from_numpy(xi)).detach().numpy()
        scale = float(np.abs(fq).max())
        # the numpy reference mirrors the integer graph step by step
        assert np.abs(out - ref).max() <= 1e-4 * scale
        # the fake-quant model computes the same grid in float: rounding ties may differ by one
        # step in a few activations, nothing more
        assert np.abs(out - fq).max() <= 0.05 * scale
        assert out.argmax() == fq.argmax()


@pytest.mark.parametrize("spec", ["x86:mcpu=haswell", "x86:mcpu=cascadelake"])
def test_int8_convolutions_are_tensorized_without_tuning(setup, spec):
    """Untuned int8 convolutions get an analytic schedule in the tensorizing design space (the
    target's dot-product intrinsic): in the default space none built, and they ran as naive
    loop nests, 5-60x slower than their float32 twins."""
    from tvm.s_tir import meta_schedule as ms

    from codesign.targets import parse_target
    from codesign.tvm_backend.build import prepare
    from codesign.tvm_backend.intrin import is_int8_task
    from codesign.tvm_backend.precision import precision_menu
    from codesign.tvm_backend.quantize import lower_quantized
    from codesign.tvm_backend.schedules import analytic_database

    net, ranges, _, _ = setup
    target = parse_target(spec)
    menu = precision_menu(target)
    assert menu.int8_intrin, spec
    policy = QuantPolicy.decode(POLICIES[0]).check(BLOCKS).check_menu(menu)
    params = export_params(quantize_network(net, ranges, policy).eval())
    fused = prepare(lower_quantized(policy.apply(BLOCKS), params, menu).mod)
    database = analytic_database(fused, target)
    tasks = ms.relax_integration.extract_tasks(fused, target.tvm_target())
    int8 = [t for t in tasks if is_int8_task(t.dispatched[0])]
    assert int8
    for task in int8:
        (record,) = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
        assert menu.int8_intrin in str(record.trace), task.task_name


def test_integer_intermediates_are_exact(setup):
    """The reference's int32 accumulators equal a float64 conv of the dequantised operands."""
    net, ranges, x, menu = setup
    policy = QuantPolicy.uniform(BLOCKS, 6, 8, menu)
    params = export_params(quantize_network(net, ranges, policy).eval())
    lp = params[0]
    q = reference.quantize(x[:1].numpy().transpose(0, 2, 3, 1), lp)
    acc = reference.int_conv(q, lp)
    xf = (q.astype(np.float64) - lp.a_zero).transpose(0, 3, 1, 2)
    wf = lp.qweight.astype(np.float64)
    pad = lp.layer.kernel // 2
    want = torch.nn.functional.conv2d(
        torch.from_numpy(xf), torch.from_numpy(wf), stride=lp.layer.stride, padding=pad
    ).numpy()
    bias = np.round(lp.bias / (np.float32(lp.a_scale) * lp.w_scale)).astype(np.int64)
    np.testing.assert_array_equal(acc[0], (want[0].transpose(1, 2, 0) + bias).round())


def test_int8_block_needs_exact_bits(setup, x86):
    """w8a8 overflows the int16 pairs of vpmaddubsw (AVX2 / AVX-512BW kernels: bits <= 15);
    on a VNNI host the menu allows 16, so the check runs against a 15-bit kernel's menu."""
    import dataclasses

    from codesign.errors import BuildError
    from codesign.tvm_backend.quantize import lower_quantized

    net, ranges, _, menu = setup
    if menu.int8_exact(8, 8):
        menu = dataclasses.replace(menu, int8_kernel="avx512-pmaddubsw", int8_bits_sum=15)
    policy = QuantPolicy.decode(
        "int8:w8a8_fp32:w32a32-w32a32-w32a32_fp32:w32a32-w32a32_fp32:w32a32-w32a32"
    )
    params = export_params(quantize_network(net, ranges, policy).eval())
    with pytest.raises(BuildError, match="not exact"):
        lower_quantized(policy.apply(BLOCKS), params, menu)


_TUNED_CHECK = """
import sys, numpy as np, tvm
from tvm import relax
from codesign.blocks import BlockSpec
from codesign.compression.quant import reference
from codesign.targets import parse_target
from codesign.tvm_backend.build import compile_module
from codesign.tvm_backend.database import open_tuning_database
from codesign.tvm_backend.precision import precision_menu
from codesign.tvm_backend.quantize import lower_quantized, random_params

t = parse_target("x86")
db = open_tuning_database(sys.argv[1], t.key)  # before any int8 lowering registers intrinsics
spec = BlockSpec.from_key(sys.argv[2])
params = random_params(spec, 0)
built = compile_module(lower_quantized([spec], params, precision_menu(t)), t, db)
x = np.random.default_rng(0).standard_normal(spec.input_shape).astype("float32")
out = relax.VirtualMachine(built.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
ref = reference.run_network(x, [spec], params)
print("maxdiff", float(np.abs(out - ref).max()), float(np.abs(ref).max()))
"""


@pytest.mark.slow
def test_tuned_tensorized_int8_is_exact(x86, tmp_path):
    """A MetaSchedule-tuned int8 block (AVX2 intrinsic) loads its records in a fresh process
    and still reproduces the integer reference."""
    import subprocess
    import sys

    from codesign.compression.haq.pipeline import precision_lut
    from codesign.tvm_backend.precision import precision_menu

    spec = BlockSpec("conv", 3, 16, 16, 1, 8, 8)
    db = tmp_path / "lut.sqlite"
    precision_lut([spec], x86, db, precision_menu(x86), trials=4, progress=False)
    import sqlite3

    with sqlite3.connect(db) as con:  # tensorized records (read through SQLite: WAL mode)
        (n,) = con.execute(
            "SELECT count(*) FROM tuning_records WHERE instr(json, ?) > 0",
            (precision_menu(x86).int8_intrin,),
        ).fetchone()
    assert n > 0
    out = subprocess.run(
        [sys.executable, "-c", _TUNED_CHECK, str(db), spec.with_precision("int8").key],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    diff, scale = map(float, out.stdout.split("maxdiff")[1].split())
    assert diff <= 1e-4 * scale
