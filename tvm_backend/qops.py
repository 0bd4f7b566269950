"""TE computes of the integer operators the quantised lowering emits (NHWC, uint8 x int8 -> int32).

    qconv          dense conv, weights packed [O/L, KH, KW, I/4, L, 4]: tensorizable with an
                   L x 4 dot-product intrinsic (block name `qconv`, see `intrin.INT8_BLOCK`)
    qconv_generic  dense conv, weights OHWI (channel counts the packing cannot take)
    qdwconv        depthwise conv, weights [KH, KW, C]

Inputs are padded with the activation zero point (not 0): padding then contributes
`zero_point * sum(weights)`, a per-channel constant folded into the integer bias, exactly as
zero padding of the real-valued input would in the fake-quant model. The zero point is a
tensor argument (shape (1,), uint8), not a literal, so the TIR of a layer (its tuning task)
depends only on shapes: LUT blocks and shipped networks share tasks and tuning records.
"""

from __future__ import annotations

from typing import Any


def _pad(x: Any, pad: int, zero_point: Any) -> Any:
    from tvm import te, tirx

    if pad == 0:
        return x
    n, h, w, c = x.shape

    def value(b: Any, i: Any, j: Any, k: Any) -> Any:
        inside = tirx.all(i >= pad, i < h + pad, j >= pad, j < w + pad)
        return tirx.if_then_else(inside, x[b, i - pad, j - pad, k], zero_point[0])

    return te.compute((n, h + 2 * pad, w + 2 * pad, c), value, name="qpad")


def _out(size: Any, kernel: int, stride: int, pad: int) -> Any:
    return (size + 2 * pad - kernel) // stride + 1


def qconv(x: Any, w: Any, zero_point: Any, stride: int, pad: int) -> Any:
    """x (1, H, W, I) uint8, w (O/L, KH, KW, I/4, L, 4) int8 -> (1, Ho, Wo, O) int32."""
    from tvm import te

    n, h, wd, ci = x.shape
    oo, kh, kw, _, lanes, red = w.shape
    xp = _pad(x, pad, zero_point)
    r = te.reduce_axis((0, kh), "r")
    s = te.reduce_axis((0, kw), "s")
    c = te.reduce_axis((0, ci), "c")
    return te.compute(
        (n, _out(h, kh, stride, pad), _out(wd, kw, stride, pad), oo * lanes),
        lambda b, i, j, o: te.sum(
            xp[b, i * stride + r, j * stride + s, c].astype("int32")
            * w[o // lanes, r, s, c // red, o % lanes, c % red].astype("int32"),
            axis=[r, s, c],
        ),
        name="qconv",
    )


def qconv_generic(x: Any, w: Any, zero_point: Any, stride: int, pad: int) -> Any:
    """x (1, H, W, I) uint8, w (O, KH, KW, I) int8 -> (1, Ho, Wo, O) int32."""
    from tvm import te

    n, h, wd, ci = x.shape
    co, kh, kw, _ = w.shape
    xp = _pad(x, pad, zero_point)
    r = te.reduce_axis((0, kh), "r")
    s = te.reduce_axis((0, kw), "s")
    c = te.reduce_axis((0, ci), "c")
    return te.compute(
        (n, _out(h, kh, stride, pad), _out(wd, kw, stride, pad), co),
        lambda b, i, j, o: te.sum(
            xp[b, i * stride + r, j * stride + s, c].astype("int32")
            * w[o, r, s, c].astype("int32"),
            axis=[r, s, c],
        ),
        name="qconv_generic",
    )


def qdwconv(x: Any, w: Any, zero_point: Any, stride: int, pad: int) -> Any:
    """x (1, H, W, C) uint8, w (KH, KW, C) int8 -> (1, Ho, Wo, C) int32."""
    from tvm import te

    n, h, wd, ch = x.shape
    kh, kw, _ = w.shape
    xp = _pad(x, pad, zero_point)
    r = te.reduce_axis((0, kh), "r")
    s = te.reduce_axis((0, kw), "s")
    return te.compute(
        (n, _out(h, kh, stride, pad), _out(wd, kw, stride, pad), ch),
        lambda b, i, j, k: te.sum(
            xp[b, i * stride + r, j * stride + s, k].astype("int32") * w[r, s, k].astype("int32"),
            axis=[r, s],
        ),
        name="qdwconv",
    )
