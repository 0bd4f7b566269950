"""Lowering of a fake-quant network without BlockSpecs (`graph.fake_quant_graph`) to Relax.

The FX graph goes through TVM's FX importer, except for the quantisable layers, which are
emitted here at their own execution precision, float32 in and out:

    int8  (NCHW) -> NHWC -> quantize to uint8 (a_scale, a_zero) -> integer conv / dense
          (uint8 x int8 -> int32, the kernels of `codesign.tvm_backend.quantize`) + integer
          bias -> dequantise -> NCHW
    fp16  cast to float16 -> conv / dense with float16 weights and bias -> cast to float32
    fp32  conv / dense with the (possibly fake-quantised, w <= 8) float weights

`lower_layer` emits one layer alone exactly as the network holds it: what the LUT measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from codesign.compression.quant.graph import GraphError, GraphLayer, TracedGraph
from codesign.errors import BuildError
from codesign.tvm_backend.lower import Lowered
from codesign.tvm_backend.precision import PrecisionMenu
from codesign.tvm_backend.quantize import LayerParams


def _relax() -> Any:
    from tvm import relax

    return relax


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _emit_float(em: Any, x: Any, lp: LayerParams, module: Any, dtype: str) -> Any:
    relax: Any = _relax()
    ly: GraphLayer = lp.layer  # type: ignore[assignment]
    xin = em.emit(relax.op.astype(x, dtype)) if dtype != "float32" else x
    if ly.linear:
        wt = em.emit(relax.op.permute_dims(em.const(lp.weight.astype(dtype)), axes=[1, 0]))
        y = em.emit(relax.op.matmul(xin, wt, out_dtype=dtype))
        y = em.emit(relax.op.add(y, em.const(lp.bias.astype(dtype))))
    else:
        from codesign.tvm_backend.quantize import conv_bias

        y = conv_bias(
            em, xin, lp, dtype, stride=_pair(module.stride), padding=_pair(module.padding),
            dilation=_pair(module.dilation),
        )  # fmt: skip
    return em.emit(relax.op.astype(y, "float32")) if dtype != "float32" else y


def _emit_int8(em: Any, x: Any, lp: LayerParams, menu: PrecisionMenu) -> Any:
    from codesign.tvm_backend.quantize import _dequantize, _iconv, _quantize

    relax: Any = _relax()

    ly: GraphLayer = lp.layer  # type: ignore[assignment]
    if ly.linear:
        q = em.emit(relax.op.reshape(_quantize(em, x, lp), [1, 1, 1, ly.cin]))
        y = _dequantize(em, _iconv(em, q, lp, menu), lp, relu6=False)
        return em.emit(relax.op.reshape(y, [1, ly.cout]))
    xt = em.emit(relax.op.permute_dims(x, axes=[0, 2, 3, 1]))  # NHWC
    y = _dequantize(em, _iconv(em, _quantize(em, xt, lp), lp, menu), lp, relu6=False)
    return em.emit(relax.op.permute_dims(y, axes=[0, 3, 1, 2]))  # NCHW


def emit_layer(
    em: Any, x: Any, lp: LayerParams, module: Any, precision: str, menu: PrecisionMenu
) -> Any:
    """One quantisable layer at `precision` (float32 in, float32 out)."""
    ly: GraphLayer = lp.layer  # type: ignore[assignment]
    if precision == "int8":
        if not (ly.int8_ok and menu.has_int8 and lp.qweight is not None):
            raise BuildError(f"layer {ly.path} cannot run in int8 on {menu.target_key}")
        if not menu.int8_exact(lp.w_bits, lp.a_bits):
            raise BuildError(f"layer {ly.path}: w{lp.w_bits}a{lp.a_bits} is not exact in int8")
        return _emit_int8(em, x, lp, menu)
    return _emit_float(em, x, lp, module, "float16" if precision == "fp16" else "float32")


def _finish(
    mod: Any, em: Any, shape: tuple[int, ...], label: str, nhwc_in: bool = False,
    nhwc_out: bool = False,
) -> Lowered:  # fmt: skip
    from tvm import relax

    from codesign.tvm_backend.layout import nhwc_shape
    from codesign.tvm_backend.lower import finish_lowering

    mod = relax.transform.CanonicalizeBindings()(mod)  # no `out = lv` left for the NHWC rewrites

    params = list(em.arrays)
    if em.params_as_input:
        mod["main"] = mod["main"].with_attr("num_input", 1)
    mod, params = finish_lowering(mod, params, nhwc_in=nhwc_in, nhwc_out=nhwc_out)
    return Lowered(mod, nhwc_shape(shape) if nhwc_in else shape, "float32", params, label)


def lower_layer(
    lp: LayerParams,
    module: Any,
    precision: str,
    menu: PrecisionMenu,
    *,
    params_as_input: bool = False,
) -> Lowered:
    """One layer alone, float32 in and out, as the network emits it (what the LUT measures):
    NHWC where the network keeps it so (`GraphLayer.nhwc`; every conv writes NHWC)."""
    relax: Any = _relax()

    from codesign.tvm_backend.intrin import register_intrinsics
    from codesign.tvm_backend.quantize import _Emitter

    ly: GraphLayer = lp.layer  # type: ignore[assignment]
    if precision == "int8" and menu.int8_intrin:
        register_intrinsics()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(ly.input_shape, "float32"))
    em = _Emitter(bb, params_as_input)
    try:
        with bb.function("main"):
            with bb.dataflow():
                out = bb.emit_output(emit_layer(em, x, lp, module, precision, menu))
            bb.emit_func_output(out, params=[x, *em.vars])
    except BuildError:
        raise
    except Exception as err:
        raise BuildError(f"could not lower layer {ly.path} at {precision}: {err}") from err
    return _finish(bb.get(), em, ly.input_shape, ly.lut_key(precision), ly.nhwc, not ly.linear)


def lower_graph(
    qnet: Any,
    graph: TracedGraph,
    params: Sequence[LayerParams],
    precisions: Sequence[str],
    menu: PrecisionMenu,
    *,
    label: str = "",
) -> Lowered:
    """The whole fake-quant network (`graph.fake_quant_graph`, bits set) with every layer at its
    precision; everything between the layers as TVM's FX importer lowers it."""
    from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

    from codesign.compression.quant.fakequant import QConv2d, QLinear
    from codesign.tvm_backend.intrin import register_intrinsics
    from codesign.tvm_backend.quantize import _Emitter

    if len(params) != len(graph.layers) or len(precisions) != len(graph.layers):
        raise GraphError(
            f"{len(graph.layers)} layers but {len(params)} parameters, {len(precisions)} precisions"
        )
    if "int8" in precisions and menu.int8_intrin:
        register_intrinsics()
    at = {ly.path: i for i, ly in enumerate(graph.layers)}
    imp = TorchFXImporter()
    em: Any = None

    def convert(node: Any) -> Any:
        nonlocal em
        if em is None or em.bb is not imp.block_builder:
            em = _Emitter(imp.block_builder, False)
        i = at[node.target]
        x = imp.env[node.args[0]]
        return emit_layer(em, x, params[i], qnet.get_submodule(node.target), precisions[i], menu)

    convert_map: Any = imp.convert_map
    convert_map[QConv2d] = convert
    convert_map[QLinear] = convert
    info: Any = [(graph.input_shape, "float32")]
    try:
        mod = imp.from_fx(qnet, info, False, True, False)
    except BuildError:
        raise
    except Exception as err:
        raise BuildError(
            f"could not lower {label or 'the network'} to Relax ({type(err).__name__}: {err})"
        ) from err
    return _finish(mod, _Emitter(None, False), graph.input_shape, label)


def max_abs_error(built: Any, reference: Any, x: np.ndarray) -> tuple[float, float]:
    """(max |compiled(x) - reference(x)|, max |reference(x)|) for one input (reference: the
    fake-quant torch net)."""
    import torch
    import tvm
    from tvm import relax

    dev: Any = tvm.cpu()
    vm = relax.VirtualMachine(built.executable, dev)
    args = [tvm.runtime.tensor(p) for p in built.params]
    got = vm["main"](tvm.runtime.tensor(x.astype(np.float32)), *args).numpy()
    with torch.no_grad():
        want = reference(torch.from_numpy(x.astype(np.float32))).numpy()
    return float(np.abs(got - want).max()), float(np.abs(want).max())
