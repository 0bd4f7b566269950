"""Lowering: PyTorch module -> torch.export -> Relax IRModule.

BatchNorm is folded into the convolutions before export, so the Relax graph holds only
conv2d + bias add + clip (ReLU6) + residual adds, which FuseOps turns into one PrimFunc per conv.
Weights are bound as constants (`params_as_input=False`, the default: what the artifact ships)
or kept as runtime inputs (`params_as_input=True`: needed for cache-flushing measurements).
Both give the same TIR tuning tasks: constants are passed to PrimFuncs as arguments.

Every lowering ends in `finish_lowering`: convolutions go to NHWC/OHWI (`layout.to_nhwc`)
before weights are lifted, so runtime weights are transposed once on the host, as constant
ones are by FoldConstant. Networks keep an NCHW input; a block lowered for the latency table
takes and returns NHWC where it sits between other blocks (`block_interface`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from codesign.blocks import BlockSpec
from codesign.errors import BuildError
from codesign.modules import build_block, fold_bn, init_weights
from codesign.tvm_backend.layout import nhwc_shape


@dataclass
class Lowered:
    """A Relax module and what is needed to call it."""

    mod: Any  # tvm.IRModule
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    params: list[np.ndarray] = field(default_factory=list)  # runtime weights, if kept as inputs
    label: str = ""


def lower_module(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    params_as_input: bool = False,
    label: str = "",
    nhwc_in: bool = False,
    nhwc_out: bool = False,
) -> Lowered:
    """Export an eval-mode copy of `module` (BN folded) for a batch-1 NCHW input of
    `input_shape`; `nhwc_in` / `nhwc_out`: the compiled module takes / returns NHWC instead."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    folded = fold_bn(module)
    example = torch.zeros(input_shape, dtype=torch.float32)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = torch.export.export(folded, (example,))
            mod = from_exported_program(
                program, keep_params_as_input=params_as_input, unwrap_unit_return_tuple=True
            )
    except Exception as err:  # torch.export / importer failures
        raise BuildError(
            f"could not lower {label or type(module).__name__} to Relax: {err}"
        ) from err
    params: list[np.ndarray] = []
    if params_as_input:
        mod, detached = detach_params(mod)
        params = [t.numpy() for t in detached.get("main", [])]
    mod, params = finish_lowering(mod, params, nhwc_in=nhwc_in, nhwc_out=nhwc_out)
    return Lowered(mod, nhwc_shape(input_shape) if nhwc_in else tuple(input_shape), "float32",
                   params, label)  # fmt: skip


def finish_lowering(
    mod: Any, params: list[np.ndarray], *, nhwc_in: bool = False, nhwc_out: bool = False
) -> tuple[Any, list[np.ndarray]]:
    """The end of every lowering: the requested interface, NHWC convolutions, and for runtime
    weights (`params`, when `main` has `num_input`) what `main` derives from weights alone
    (transposes, bias reshapes) precomputed on the host, so that kernels take runtime weights
    exactly where embedded ones take folded constants: both forms then have the same tuning
    tasks, weights marked layout-free in both."""
    from codesign.tvm_backend.build import lift_transform_params
    from codesign.tvm_backend.layout import nhwc_interface, to_nhwc

    try:
        mod = fold_batch_norm(mod)
        if nhwc_in or nhwc_out:
            mod = nhwc_interface(mod, nhwc_in=nhwc_in, nhwc_out=nhwc_out)
        mod = to_nhwc(mod)
    except Exception as err:
        raise BuildError(f"could not fold BatchNorm or convert the module to NHWC: {err}") from err
    if params:
        mod, params = lift_transform_params(mod, params)
    return mod, params


def fold_batch_norm(mod: Any) -> Any:
    """`mod` with inference BatchNorm folded into the conv before it, when it has any (a module
    without any is returned as it is: the project's, whose compiled code LUTs were measured
    with; they fold before export, `modules.fold_bn`); a user's model can still have it.
    Left alone it ran as separate kernels: MobileNetV2 at 64x64 in 1.8 ms instead of 0.67. The
    folded weights are computed at once (ConvertLayout crashes on the unfolded expressions)."""
    import tvm
    from tvm import relax

    from codesign.tvm_backend.folding import memoized_builds

    bn, found = tvm.ir.Op.get("relax.nn.batch_norm"), []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(bn):
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    if not found:
        return mod
    with memoized_builds():
        return relax.transform.FoldConstant()(relax.transform.FoldBatchnormToConv2D()(mod))


def block_interface(spec: BlockSpec) -> dict[str, bool]:
    """Where a block's input and output are NHWC inside a network: between blocks; the stem
    reads the NCHW image, the head returns class scores."""
    return {"nhwc_in": spec.kind != "conv", "nhwc_out": spec.kind != "head"}


def lower_block(
    spec: BlockSpec, *, seed: int = 0, params_as_input: bool = False, target: Any = None
) -> Lowered:
    """Lower one block with seeded weights (values do not change dense-kernel latency).

    fp32 blocks go through torch.export; fp16 and int8 blocks through the quantised lowering
    (`codesign.tvm_backend.quantize`), whose int8 weight packing follows `target`'s precision
    menu (default: this machine's x86 target).
    """
    if spec.precision != "fp32":
        from codesign.targets import parse_target
        from codesign.tvm_backend.precision import precision_menu
        from codesign.tvm_backend.quantize import lower_precision_block

        menu = precision_menu(parse_target(target if target is not None else "x86"))
        # the same Lowered, seen by pyright under its installed name codesign.tvm_backend.lower
        return lower_precision_block(  # pyright: ignore[reportReturnType]
            spec, menu, seed=seed, params_as_input=params_as_input
        )
    module = init_weights(build_block(spec), seed)
    return lower_module(
        module,
        spec.input_shape,
        params_as_input=params_as_input,
        label=spec.key,
        **block_interface(spec),
    )
