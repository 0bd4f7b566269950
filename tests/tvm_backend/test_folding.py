"""Constant folding with memoized kernels: a repeated weight transform is built once per
process, the folded values are still the module's own (new weights, same kernels)."""

from __future__ import annotations

import numpy as np
import torch
from tvm_helpers import run_built

from codesign.blocks import BlockSpec
from codesign.modules import build_block, init_weights, randomize_bn
from codesign.tvm_backend.build import compile_module
from codesign.tvm_backend.folding import fold_stats, memoized_builds
from codesign.tvm_backend.lower import lower_module

# a shape no other test compiles, so that its first compile builds its folding kernels
SPEC = BlockSpec("mb", 5, 40, 48, 1, 9, 9, mid=136)


def _compiled(seed: int, x86):  # noqa: ANN001, ANN202
    module = randomize_bn(init_weights(build_block(SPEC), seed=seed), seed=seed + 1).eval()
    return module, compile_module(lower_module(module, SPEC.input_shape), x86)


def test_repeated_transforms_are_built_once_and_fold_the_new_weights(x86) -> None:
    before = fold_stats()
    _compiled(1, x86)
    first = fold_stats()
    assert first.builds > before.builds  # its layout transforms were new to this process
    module, built = _compiled(2, x86)  # same shapes, other weights
    second = fold_stats()
    assert second.builds == first.builds and second.hits > first.hits
    x = np.random.default_rng(0).standard_normal(SPEC.input_shape).astype("float32")
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_built(built, x), ref, rtol=1e-4, atol=1e-4)


def test_tvms_own_builder_is_back_outside_the_context(x86) -> None:
    import tvm
    from tvm import te

    a = te.placeholder((8,), name="a")
    func = te.create_prim_func([a, te.compute((8,), lambda i: a[i] * 2.0, name="b")])
    with memoized_builds(), memoized_builds():  # re-entrant
        tvm.get_global_func("tirx.build")(func, "llvm")
        inside = fold_stats()
    tvm.get_global_func("tirx.build")(func, "llvm")
    assert fold_stats() == inside  # TVM's builder answered: the memo saw nothing
