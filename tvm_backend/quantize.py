"""Lowering of quantised networks to Relax: integer convolutions in int8 blocks, float elsewhere.

Execution precision is chosen per block; every block takes and returns float32 NCHW, so blocks
of different precisions compose freely and a network's latency is the sum of its blocks' (the
LUT measures each block exactly as it is emitted here).

    fp32 block  the same Relax ops as the torch.export import (conv2d NCHW + bias + clip ...),
                hence the same TIR tasks and tuning records as the fp32 LUT entries
    fp16 block  the fp32 graph in float16 (input cast in, output cast out)
    int8 block  NCHW float -> NHWC -> quantize (uint8, zero point z) -> per layer: integer conv
                (uint8 x int8 -> int32, padded with z) -> + integer bias -> requantize to the
                next layer's uint8 input (ReLU6 folded into the clip bounds) -> ... -> last layer
                dequantised to float -> NCHW (+ float residual)

Integer semantics of a layer with input scale s_a, zero point z, int weights W, channel scales
s_w and float bias b (the fake-quant model computes the same values in float):
    acc  = sum (q - z) W            = conv(q padded with z, W) - z * sum(W)
    B    = round(b / (s_a s_w)) - z * sum(W)                                (int32)
    next = clip(round(float(acc + B) * (s_a s_w / s_next)) + z_next, lo, hi)  (uint8)
    out  = float(acc + B) * (s_a s_w)                                       (float, last layer)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codesign.blocks import BlockSpec
from codesign.compression.quant.layers import QLayer, quant_layers
from codesign.errors import BuildError
from codesign.tvm_backend.lower import Lowered
from codesign.tvm_backend.precision import PrecisionMenu


@dataclass
class LayerParams:
    """One layer ready for lowering (numpy, torch layouts: [O, I/g, KH, KW] or [O, I]).

    `weight` is what float execution uses (already fake-quantised when w_bits <= 8); integer
    execution uses `qweight` (int8 values) with per-output-channel `w_scale`, and quantises its
    input with (`a_scale`, `a_zero`) at `a_bits`.
    """

    layer: QLayer
    w_bits: int
    a_bits: int
    weight: np.ndarray
    bias: np.ndarray
    qweight: np.ndarray | None = None
    w_scale: np.ndarray | None = None
    a_scale: float = 1.0
    a_zero: int = 0

    def int_bias(self) -> np.ndarray:
        """B = round(b / (s_a s_w)) - z * sum(W) per output channel (int32)."""
        assert self.qweight is not None and self.w_scale is not None
        sw = np.float32(self.a_scale) * self.w_scale.astype(np.float32)
        b = np.round(self.bias.astype(np.float32) / sw).astype(np.int64)
        w_sum = self.qweight.reshape(self.qweight.shape[0], -1).astype(np.int64).sum(axis=1)
        out = b - int(self.a_zero) * w_sum
        if np.abs(out).max(initial=0) >= 2**31:
            raise BuildError(f"layer {self.layer.name}: integer bias overflows int32")
        return out.astype(np.int32)


class _Emitter:
    """BlockBuilder helpers; weights become constants or (params_as_input) function inputs."""

    def __init__(self, bb: Any, params_as_input: bool) -> None:
        self.bb = bb
        self.params_as_input = params_as_input
        self.vars: list[Any] = []
        self.arrays: list[np.ndarray] = []

    def const(self, arr: np.ndarray) -> Any:
        from tvm import relax

        arr = np.ascontiguousarray(arr)
        if not self.params_as_input:
            return relax.const(arr)
        var = relax.Var(f"p{len(self.vars)}", relax.TensorType(arr.shape, str(arr.dtype)))
        self.vars.append(var)
        self.arrays.append(arr)
        return var

    def emit(self, expr: Any) -> Any:
        return self.bb.emit(expr)


# ------------------------------------------------------------------ float blocks
def conv_bias(
    em: Any,
    x: Any,
    lp: LayerParams,
    dtype: str,
    *,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int] = (1, 1),
) -> Any:
    """One float convolution of a quantised network in `dtype` (NCHW/OIHW) plus its bias: the
    layers of the project's blocks and of imported models (graphlower) alike."""
    from tvm import relax

    ly = lp.layer
    y = em.emit(
        relax.op.nn.conv2d(
            x,
            em.const(lp.weight.astype(dtype)),
            strides=list(stride),
            padding=[padding[0], padding[1], padding[0], padding[1]],
            dilation=list(dilation),
            groups=ly.groups,
            data_layout="NCHW",
            kernel_layout="OIHW",
            out_layout="NCHW",
            out_dtype=dtype,
        )
    )
    b = em.emit(relax.op.reshape(em.const(lp.bias.astype(dtype)), [1, ly.cout, 1, 1]))
    return em.emit(relax.op.add(y, b))


def _fconv(em: _Emitter, x: Any, lp: LayerParams, dtype: str, act: bool) -> Any:
    from tvm import relax

    ly = lp.layer
    pad = ly.kernel // 2
    y = conv_bias(em, x, lp, dtype, stride=(ly.stride, ly.stride), padding=(pad, pad))
    return em.emit(relax.op.clip(y, 0.0, 6.0)) if act else y


def _emit_float(em: _Emitter, x: Any, spec: BlockSpec, lps: Sequence[LayerParams], dtype: str):
    from tvm import relax

    xin = em.emit(relax.op.astype(x, dtype)) if dtype != "float32" else x
    if spec.kind == "head":
        mix, cls = lps
        y = _fconv(em, xin, mix, dtype, act=True)
        y = em.emit(relax.op.mean(y, axis=[2, 3], keepdims=False))
        wt = em.emit(relax.op.permute_dims(em.const(cls.weight.astype(dtype)), axes=[1, 0]))
        y = em.emit(relax.op.matmul(y, wt, out_dtype=dtype))
        y = em.emit(relax.op.add(em.const(cls.bias.astype(dtype)), y))
    else:
        y = xin
        for lp in lps:
            y = _fconv(em, y, lp, dtype, act=lp.layer.role != "project")
        if spec.residual:
            y = em.emit(relax.op.add(xin, y))
    return em.emit(relax.op.astype(y, "float32")) if dtype != "float32" else y


# ------------------------------------------------------------------ int8 blocks
def _scalar(em: _Emitter, v: float) -> Any:
    """A float32 0-d tensor: a PrimFunc argument, never a literal baked into the TIR."""
    return em.const(np.array(v, dtype=np.float32))


def _clamp(em: _Emitter, y: Any, lo: float, hi: float) -> Any:
    from tvm import relax

    y = em.emit(relax.op.maximum(y, _scalar(em, lo)))
    return em.emit(relax.op.minimum(y, _scalar(em, hi)))


def _quantize(em: _Emitter, x: Any, lp: LayerParams) -> Any:
    """float -> uint8: clip(round(x / s) + z, 0, 2^bits - 1), as the fake-quant model does."""
    from tvm import relax

    y = em.emit(relax.op.divide(x, _scalar(em, lp.a_scale)))
    y = em.emit(relax.op.add(relax.op.round(y), _scalar(em, lp.a_zero)))
    y = _clamp(em, y, 0.0, float(2**lp.a_bits - 1))
    return em.emit(relax.op.astype(y, "uint8"))


def _iconv(em: _Emitter, q: Any, lp: LayerParams, menu: PrecisionMenu) -> Any:
    """Integer conv of uint8 NHWC `q` -> int32 accumulators + integer bias."""
    from tvm import relax

    from codesign.tvm_backend import qops

    ly, wq = lp.layer, lp.qweight
    assert wq is not None
    pad = ly.kernel // 2
    zp = em.const(np.array([lp.a_zero], dtype=np.uint8)) if pad else None
    if ly.depthwise:
        w = wq[:, 0].transpose(1, 2, 0)  # [C, 1, KH, KW] -> [KH, KW, C]
        acc = em.bb.emit_te(qops.qdwconv, q, em.const(w), zp, ly.stride, pad)
    else:
        w = wq.reshape(ly.cout, ly.cin, ly.kernel, ly.kernel).transpose(0, 2, 3, 1)  # OHWI
        lanes, red = menu.int8_lanes, menu.int8_reduce
        if lanes and ly.cout % lanes == 0 and ly.cin % red == 0:
            o, kh, kw, i = w.shape
            w = w.reshape(o // lanes, lanes, kh, kw, i // red, red).transpose(0, 2, 3, 4, 1, 5)
            acc = em.bb.emit_te(qops.qconv, q, em.const(w), zp, ly.stride, pad)
        else:
            acc = em.bb.emit_te(qops.qconv_generic, q, em.const(w), zp, ly.stride, pad)
    return em.emit(relax.op.add(acc, em.const(lp.int_bias())))


def _scale(lp: LayerParams) -> np.ndarray:
    assert lp.w_scale is not None
    return np.float32(lp.a_scale) * lp.w_scale.astype(np.float32)


def _requantize(em: _Emitter, acc: Any, lp: LayerParams, nxt: LayerParams, relu6: bool) -> Any:
    from tvm import relax

    m = (_scale(lp) / np.float32(nxt.a_scale)).astype(np.float32)
    qmax = 2**nxt.a_bits - 1
    lo, hi = 0, qmax
    if relu6:
        lo = nxt.a_zero
        hi = min(qmax, nxt.a_zero + int(np.round(np.float32(6.0) / np.float32(nxt.a_scale))))
    y = em.emit(relax.op.multiply(relax.op.astype(acc, "float32"), em.const(m)))
    y = em.emit(relax.op.add(relax.op.round(y), _scalar(em, nxt.a_zero)))
    y = _clamp(em, y, float(lo), float(hi))
    return em.emit(relax.op.astype(y, "uint8"))


def _dequantize(em: _Emitter, acc: Any, lp: LayerParams, relu6: bool) -> Any:
    from tvm import relax

    y = em.emit(relax.op.multiply(relax.op.astype(acc, "float32"), em.const(_scale(lp))))
    return em.emit(relax.op.clip(y, 0.0, 6.0)) if relu6 else y


def _emit_int8(
    em: _Emitter, x: Any, spec: BlockSpec, lps: Sequence[LayerParams], menu: PrecisionMenu
) -> Any:
    from tvm import relax

    xt = em.emit(relax.op.permute_dims(x, axes=[0, 2, 3, 1]))  # NHWC
    if spec.kind == "head":
        mix, cls = lps
        y = _dequantize(em, _iconv(em, _quantize(em, xt, mix), mix, menu), mix, relu6=True)
        y = em.emit(relax.op.mean(y, axis=[1, 2], keepdims=False))
        q = em.emit(relax.op.reshape(_quantize(em, y, cls), [1, 1, 1, cls.layer.cin]))
        y = _dequantize(em, _iconv(em, q, cls, menu), cls, relu6=False)
        return em.emit(relax.op.reshape(y, [1, cls.layer.cout]))
    q = _quantize(em, xt, lps[0])
    for i, lp in enumerate(lps):
        acc = _iconv(em, q, lp, menu)
        relu6 = lp.layer.role != "project"
        if i + 1 < len(lps):
            q = _requantize(em, acc, lp, lps[i + 1], relu6)
        else:
            y = _dequantize(em, acc, lp, relu6)
    y = em.emit(relax.op.permute_dims(y, axes=[0, 3, 1, 2]))  # NCHW
    return em.emit(relax.op.add(x, y)) if spec.residual else y


# ------------------------------------------------------------------ entry points
def check_int8(spec: BlockSpec, lps: Sequence[LayerParams], menu: PrecisionMenu) -> None:
    if not menu.has_int8:
        raise BuildError(f"{spec.key}: target {menu.target_key} has no int8 on its precision menu")
    for lp in lps:
        if lp.qweight is None or lp.w_scale is None or lp.a_bits > 8:
            raise BuildError(f"layer {lp.layer.name} of an int8 block lacks integer parameters")
        if not menu.int8_exact(lp.w_bits, lp.a_bits):
            raise BuildError(
                f"layer {lp.layer.name}: w{lp.w_bits}a{lp.a_bits} is not exact on "
                f"{menu.int8_kernel} (w_bits + a_bits must be <= {menu.int8_bits_sum})"
            )


def lower_quantized(
    blocks: Sequence[BlockSpec],
    params: Sequence[LayerParams],
    menu: PrecisionMenu,
    *,
    params_as_input: bool = False,
    label: str = "",
    nhwc_in: bool = False,
    nhwc_out: bool = False,
) -> Lowered:
    """The Relax module of a network given by `blocks` (their `.precision` says how each block
    executes) and the parameters of every quantisable layer (see `quant_layers`); NCHW input
    unless `nhwc_in`, output NCHW unless `nhwc_out` (see `lower.finish_lowering`)."""
    from tvm import relax

    from codesign.tvm_backend.intrin import register_intrinsics

    layers = quant_layers(blocks)
    if len(params) != len(layers):
        raise BuildError(f"{len(layers)} quantisable layers but {len(params)} layer parameters")
    if any(b.precision == "int8" for b in blocks) and menu.int8_intrin:
        register_intrinsics()  # records that tensorize must find the intrinsic when applied
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(blocks[0].input_shape, "float32"))
    em = _Emitter(bb, params_as_input)
    try:
        with bb.function("main"):
            with bb.dataflow():
                y = x
                for bi, spec in enumerate(blocks):
                    lps = [p for p, ly in zip(params, layers, strict=True) if ly.block == bi]
                    if spec.precision == "int8":
                        check_int8(spec, lps, menu)
                        y = _emit_int8(em, y, spec, lps, menu)
                    else:
                        dtype = "float16" if spec.precision == "fp16" else "float32"
                        y = _emit_float(em, y, spec, lps, dtype)
                out = bb.emit_output(y)
            bb.emit_func_output(out, params=[x, *em.vars])
    except BuildError:
        raise
    except Exception as err:
        raise BuildError(f"could not lower {label or 'quantised network'}: {err}") from err
    from codesign.tvm_backend.layout import nhwc_shape
    from codesign.tvm_backend.lower import finish_lowering

    mod, params_in = bb.get(), list(em.arrays)
    if params_as_input:  # as torch's importer marks it: weights follow the one data input
        mod["main"] = mod["main"].with_attr("num_input", 1)
    mod, params_in = finish_lowering(mod, params_in, nhwc_in=nhwc_in, nhwc_out=nhwc_out)
    shape = blocks[0].input_shape
    return Lowered(mod, nhwc_shape(shape) if nhwc_in else shape, "float32", params_in, label)


def random_params(spec: BlockSpec, seed: int = 0) -> list[LayerParams]:
    """Plausible parameters for one block at its precision (values do not change latency):
    int8 blocks get w7/a8 layers (exact on every int8 kernel), a signed input (zero point 128)
    and unsigned ReLU6 outputs (zero point 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for ly in quant_layers([spec]):
        shape = (ly.cout, ly.cin // ly.groups, ly.kernel, ly.kernel)
        if ly.linear:
            shape = (ly.cout, ly.cin)
        fan_in = int(np.prod(shape[1:]))
        w = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(ly.cout) * 0.1).astype(np.float32)
        if spec.precision != "int8":
            bits = 16 if spec.precision == "fp16" else 32
            out.append(LayerParams(ly, bits, bits, w, b))
            continue
        qmax = 2 ** (7 - 1) - 1
        s_w = (np.abs(w).reshape(ly.cout, -1).max(axis=1) / qmax).astype(np.float32)
        qw = np.clip(np.round(w / s_w.reshape(-1, *[1] * (w.ndim - 1))), -qmax, qmax)
        first = ly.index == 0 or ly.role == "classifier"
        out.append(
            LayerParams(
                ly,
                7,
                8,
                w,
                b,
                qw.astype(np.int8),
                s_w,
                4.0 / 255 if first else 6.0 / 255,
                128 if first else 0,
            )
        )
    return out


def lower_precision_block(
    spec: BlockSpec, menu: PrecisionMenu, *, seed: int = 0, params_as_input: bool = False
) -> Lowered:
    """One block at its precision with random parameters: what the LUT measures."""
    from codesign.tvm_backend.lower import block_interface

    return lower_quantized(
        [spec],
        random_params(spec, seed),
        menu,
        params_as_input=params_as_input,
        label=spec.key,
        **block_interface(spec),
    )
