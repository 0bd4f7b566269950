"""Fake quantisation in PyTorch: the training-time twin of the integer TVM module.

`quantize_network(net, ranges, policy)` returns a BN-folded copy of a `Network` whose convs and
classifier are `QConv2d` / `QLinear`. Each computes, for its (w, a) bits:

    activations  a <= 8: (clamp(round(x / s_a) + z, 0, 2^a - 1) - z) * s_a  (s_a, z calibrated)
                 a == 16: rounded through float16;  a == 32: unchanged
    weights      w <= 8: per-output-channel symmetric, s_w = max|W| / (2^(w-1) - 1)
                 w == 16: rounded through float16;  w == 32: unchanged
    bias         integer layers (a, w <= 8): rounded to the int32 grid of s_a * s_w

which is exactly what `codesign.tvm_backend.quantize` computes with integers (up to float
rounding order). Rounding uses a straight-through estimator, so the network trains (QAT).
Activation ranges come from `calibrate` on the float network and are kept for every policy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codesign.compression.quant.layers import QLayer, quant_layers
from codesign.compression.quant.policy import PolicyError, QuantPolicy
from codesign.modules import Network, fold_bn
from codesign.tvm_backend.quantize import LayerParams


@dataclass(frozen=True, slots=True)
class Range:
    lo: float
    hi: float

    def qparams(self, bits: int) -> tuple[float, int]:
        """(scale, zero point) of an asymmetric uint grid of `bits` covering [lo, hi] and 0."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        qmax = 2**bits - 1
        scale = float(np.float32(max(hi - lo, 1e-8) / qmax))
        zero = int(np.clip(np.round(-lo / scale), 0, qmax))
        return scale, zero


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _half(x: torch.Tensor) -> torch.Tensor:
    return x + (x.half().float() - x).detach()


def weight_qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer weights, per-output-channel scales) of symmetric `bits` quantisation."""
    qmax = 2 ** (bits - 1) - 1
    s = (w.detach().abs().reshape(w.shape[0], -1).amax(dim=1) / qmax).clamp(min=1e-12)
    view = s.view(-1, *[1] * (w.dim() - 1))
    q = torch.clamp(_ste_round(w / view), -qmax, qmax)
    return q, s


class _QMixin:
    layer: QLayer
    w_bits: int = 32
    a_bits: int = 32
    a_scale: float = 1.0
    a_zero: int = 0
    act_range: Range | None = None

    def set_bits(self, w_bits: int, a_bits: int) -> None:
        self.w_bits, self.a_bits = w_bits, a_bits
        if a_bits <= 8:
            if self.act_range is None:
                raise PolicyError(f"layer {self.layer.name} has no calibrated activation range")
            self.a_scale, self.a_zero = self.act_range.qparams(a_bits)

    @property
    def integer(self) -> bool:
        return self.w_bits <= 8 and self.a_bits <= 8

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits <= 8:
            s = torch.tensor(self.a_scale, dtype=torch.float32)
            q = torch.clamp(_ste_round(x / s) + self.a_zero, 0, 2**self.a_bits - 1)
            return (q - self.a_zero) * s
        return _half(x) if self.a_bits == 16 else x

    def _weights(self, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w_bits <= 8:
            q, s = weight_qparams(w, self.w_bits)
            w = q * s.view(-1, *[1] * (w.dim() - 1))
            if self.integer:
                step = torch.tensor(self.a_scale, dtype=torch.float32) * s
                b = _ste_round(b / step) * step
        elif self.w_bits == 16:
            w = _half(w)
        if self.a_bits == 16:
            b = _half(b)
        return w, b


class QConv2d(nn.Conv2d, _QMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._weights(self.weight, cast(torch.Tensor, self.bias))  # bias=True
        y = F.conv2d(self._act(x), w, b, self.stride, self.padding, self.dilation, self.groups)
        return _half(y) if self.a_bits == 16 else y


class QLinear(nn.Linear, _QMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._weights(self.weight, self.bias)
        y = F.linear(self._act(x), w, b)
        return _half(y) if self.a_bits == 16 else y


def _swap(parent: nn.Module, name: str, old: nn.Module, layer: QLayer) -> QConv2d | QLinear:
    new: QConv2d | QLinear
    if isinstance(old, nn.Conv2d):
        new = QConv2d(
            old.in_channels,
            old.out_channels,
            cast(tuple[int, int], old.kernel_size),
            cast(tuple[int, int], old.stride),
            cast(Any, old.padding),  # as nn.Conv2d keeps it: a 2-tuple or a string
            groups=old.groups,
            bias=True,
        )
        bias = old.bias if old.bias is not None else torch.zeros(old.out_channels)
    else:
        assert isinstance(old, nn.Linear)  # quant_layers names convolutions and linears
        new = QLinear(old.in_features, old.out_features, bias=True)
        bias = old.bias
    with torch.no_grad():
        assert new.bias is not None and bias is not None  # built with bias=True
        new.weight.copy_(old.weight)
        new.bias.copy_(bias)
    new.layer = layer
    setattr(parent, name, new)
    return new


def qmodules(net: nn.Module) -> list[QConv2d | QLinear]:
    return [m for m in net.modules() if isinstance(m, QConv2d | QLinear)]


def quantize_network(
    net: Network, ranges: Sequence[Range], policy: QuantPolicy | None = None
) -> Network:
    """A BN-folded fake-quant copy of `net` (float until a policy is set)."""
    layers = quant_layers(net.specs)
    if len(ranges) != len(layers):
        raise PolicyError(f"{len(ranges)} activation ranges for {len(layers)} layers")
    qnet = fold_bn(net)
    for ly, rng in zip(layers, ranges, strict=True):
        path = ly.name.split(".")
        parent = qnet.get_submodule(".".join(path[:-1]))
        _swap(parent, path[-1], getattr(parent, path[-1]), ly).act_range = rng
    if policy is not None:
        set_policy(qnet, policy)
    return qnet


def set_policy(qnet: Network, policy: QuantPolicy) -> Network:
    policy.check(qnet.specs)
    mods = qmodules(qnet)
    for m, lb in zip(mods, policy.layers, strict=True):
        m.set_bits(lb.w, lb.a)
    return qnet


@torch.no_grad()
def calibrate(net: Network, images: Iterable[torch.Tensor]) -> list[Range]:
    """Min/max of every quantisable layer's input over `images` (batches), float network."""
    folded = fold_bn(net)
    layers = quant_layers(net.specs)
    lo = [float("inf")] * len(layers)
    hi = [float("-inf")] * len(layers)
    hooks = []
    for i, ly in enumerate(layers):

        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], i: int = i) -> None:
            lo[i] = min(lo[i], float(inp[0].min()))
            hi[i] = max(hi[i], float(inp[0].max()))

        hooks.append(folded.get_submodule(ly.name).register_forward_pre_hook(hook))
    try:
        for x in images:
            folded(x)
    finally:
        for h in hooks:
            h.remove()
    return [Range(a, b) for a, b in zip(lo, hi, strict=True)]


def copy_network(qnet: Network) -> Network:
    return copy.deepcopy(qnet)


@torch.no_grad()
def export_params(qnet: Network) -> list[LayerParams]:
    """Every layer's parameters for `codesign.tvm_backend.quantize.lower_quantized`, computed
    with the same torch ops as the fake-quant forward pass."""
    out = []
    for m in qmodules(qnet):
        assert m.bias is not None  # built with bias=True
        w, b = m.weight.detach().float(), m.bias.detach().float()
        qweight = w_scale = None
        if m.w_bits <= 8:
            q, s = weight_qparams(w, m.w_bits)
            qweight, w_scale = q.numpy().astype(np.int8), s.numpy().astype(np.float32)
            w = q * s.view(-1, *[1] * (w.dim() - 1))
        elif m.w_bits == 16:
            w = w.half().float()
        if m.a_bits == 16:
            b = b.half().float()
        out.append(
            LayerParams(
                m.layer,
                m.w_bits,
                m.a_bits,
                w.numpy(),
                b.numpy(),
                qweight,
                w_scale,
                float(m.a_scale),
                int(m.a_zero),
            )
        )
    return out
