"""A numpy reference of the quantised lowering (`codesign.tvm_backend.quantize`).

Integer blocks are computed with exact int64 accumulation and the same float32 requantisation
steps as the Relax graph, so the compiled module must reproduce the int32 accumulators and the
uint8 activations bit for bit; float blocks are computed in float64 (compare with a tolerance).
Used by the tests and for debugging; it is slow and meant for small inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from codesign.blocks import BlockSpec
from codesign.compression.quant.layers import quant_layers
from codesign.tvm_backend.quantize import LayerParams


def quantize(x: np.ndarray, lp: LayerParams) -> np.ndarray:
    q = np.round(x.astype(np.float32) / np.float32(lp.a_scale)) + np.float32(lp.a_zero)
    return np.clip(q, 0, 2**lp.a_bits - 1).astype(np.uint8)


def int_conv(q: np.ndarray, lp: LayerParams) -> np.ndarray:
    """uint8 NHWC input -> int64 NHWC accumulators (+ integer bias), padding with the zero point."""
    ly, w = lp.layer, lp.qweight
    assert w is not None
    k, s, p = ly.kernel, ly.stride, ly.kernel // 2
    qp = np.pad(q.astype(np.int64), ((0, 0), (p, p), (p, p), (0, 0)), constant_values=lp.a_zero)
    ho, wo = ly.out_h, ly.out_w
    if ly.linear:
        ho = wo = 1
    acc = np.zeros((1, ho, wo, ly.cout), np.int64)
    w64 = w.astype(np.int64).reshape(ly.cout, ly.cin // ly.groups, k, k)
    for r in range(k):
        for c in range(k):
            patch = qp[:, r : r + s * (ho - 1) + 1 : s, c : c + s * (wo - 1) + 1 : s, :]
            if ly.depthwise:
                acc += patch * w64[:, 0, r, c]
            else:
                acc += np.einsum("nhwi,oi->nhwo", patch, w64[:, :, r, c])
    return acc + lp.int_bias().astype(np.int64)


def _scale(lp: LayerParams) -> np.ndarray:
    assert lp.w_scale is not None  # a quantized layer's
    return np.float32(lp.a_scale) * lp.w_scale.astype(np.float32)


def requantize(acc: np.ndarray, lp: LayerParams, nxt: LayerParams, relu6: bool) -> np.ndarray:
    m = (_scale(lp) / np.float32(nxt.a_scale)).astype(np.float32)
    qmax = 2**nxt.a_bits - 1
    lo, hi = 0, qmax
    if relu6:
        lo = nxt.a_zero
        hi = min(qmax, nxt.a_zero + int(np.round(np.float32(6.0) / np.float32(nxt.a_scale))))
    y = np.round(acc.astype(np.int32).astype(np.float32) * m) + np.float32(nxt.a_zero)
    return np.clip(y, lo, hi).astype(np.uint8)


def dequantize(acc: np.ndarray, lp: LayerParams, relu6: bool) -> np.ndarray:
    y = acc.astype(np.int32).astype(np.float32) * _scale(lp)
    return np.clip(y, 0, 6) if relu6 else y


def _fconv(x: np.ndarray, lp: LayerParams, act: bool) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    ly = lp.layer
    y = F.conv2d(
        torch.from_numpy(x.astype(np.float64)),
        torch.from_numpy(lp.weight.astype(np.float64)),
        torch.from_numpy(lp.bias.astype(np.float64)),
        stride=ly.stride,
        padding=ly.kernel // 2,
        groups=ly.groups,
    ).numpy()
    return np.clip(y, 0, 6) if act else y


def run_block(
    x: np.ndarray, spec: BlockSpec, lps: Sequence[LayerParams], trace: list | None = None
) -> np.ndarray:
    """One block on a float NCHW input. `trace` collects integer intermediates of int8 blocks."""
    if spec.precision != "int8":
        if spec.kind == "head":
            mix, cls = lps
            y = _fconv(x, mix, True).mean(axis=(2, 3))
            return y @ cls.weight.astype(np.float64).T + cls.bias
        y = x
        for lp in lps:
            y = _fconv(y, lp, lp.layer.role != "project")
        return x + y if spec.residual else y
    xt = x.transpose(0, 2, 3, 1)
    if spec.kind == "head":
        mix, cls = lps
        acc = int_conv(quantize(xt, mix), mix)
        y = dequantize(acc, mix, True).mean(axis=(1, 2))
        q = quantize(y, cls).reshape(1, 1, 1, -1)
        acc2 = int_conv(q, cls)
        if trace is not None:
            trace += [acc, q, acc2]
        return dequantize(acc2, cls, False).reshape(1, -1)
    q = quantize(xt, lps[0])
    if trace is not None:
        trace.append(q)
    for i, lp in enumerate(lps):
        acc = int_conv(q, lp)
        if trace is not None:
            trace.append(acc)
        relu6 = lp.layer.role != "project"
        if i + 1 < len(lps):
            q = requantize(acc, lp, lps[i + 1], relu6)
            if trace is not None:
                trace.append(q)
        else:
            y = dequantize(acc, lp, relu6)
    y = y.transpose(0, 3, 1, 2)
    return x + y if spec.residual else y


def run_network(x: np.ndarray, blocks: Sequence[BlockSpec], params: Sequence[LayerParams]):
    layers = quant_layers(blocks)
    y = x
    for bi, spec in enumerate(blocks):
        lps = [p for p, ly in zip(params, layers, strict=True) if ly.block == bi]
        y = run_block(y, spec, lps)
    return y
