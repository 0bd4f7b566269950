"""Quantisable layers of an arbitrary PyTorch CNN (no BlockSpecs): found in its FX graph.

    graph = trace_graph(model, input_shape)   BN folded (torch.fx conv/linear + BN fusion),
                                              shapes propagated, one `GraphLayer` per
                                              nn.Conv2d / nn.Linear call, by module path
    ranges = calibrate_graph(graph, images)   min/max of every layer's input (float network)
    qnet = fake_quant_graph(graph, ranges, bits)  a copy whose layers are `QConv2d` / `QLinear`
                                              (`codesign.compression.quant.fakequant`)
    export_graph_params(qnet, graph)          per-layer `LayerParams` for the TVM lowering

Each layer is its own unit of execution precision (int8 / fp16 / fp32), so every layer takes
and returns float32 and its latency is measured alone (`GraphLayer.lut_key`). A layer can run
in int8 only where the integer kernels fit it (`GraphLayer.int8_ok`): a square kernel with
"same" padding (kernel // 2), no dilation, dense or depthwise (groups == cin == cout), and for a
linear layer a (1, features) input.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from codesign.errors import CodesignError


class GraphError(CodesignError, ValueError):
    """A model that cannot be traced or quantised layer by layer."""


@dataclass(frozen=True, slots=True)
class GraphLayer:
    """One nn.Conv2d / nn.Linear call of a traced model; `h`, `w` its input size."""

    index: int
    path: str  # module path in the (BN-folded) model
    linear: bool
    cin: int
    cout: int
    kernel: int  # kh (int8 needs kh == kw)
    stride: int
    padding: int
    groups: int
    h: int
    w: int
    int8_ok: bool
    geometry: str = ""  # non-square kernel/stride/padding or dilation: "k1x7s1x1p0x3d1x1"

    # the attributes the HAQ state embedding and the integer lowering read from a QLayer
    @property
    def block(self) -> int:
        return self.index  # every layer is its own unit of execution precision

    @property
    def name(self) -> str:
        return self.path

    @property
    def role(self) -> str:
        return "classifier" if self.linear else "conv"

    @property
    def depthwise(self) -> bool:
        return self.groups > 1

    @property
    def weights(self) -> int:
        return self.cout * (self.cin // self.groups) * self.kernel**2

    @property
    def out_h(self) -> int:
        return 1 if self.linear else (self.h + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_w(self) -> int:
        return 1 if self.linear else (self.w + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.cin) if self.linear else (1, self.cin, self.h, self.w)

    @property
    def nhwc(self) -> bool:
        """Whether the layer reads NHWC inside the compiled network: every conv but the first,
        which reads the NCHW image; every conv writes NHWC. Measured so, without the transposes
        a layer alone in NCHW would add (72 of 110 us for a 16->96 1x1 conv at 32x32)."""
        return not self.linear and self.index > 0

    def lut_key(self, precision: str) -> str:
        """The LUT key of this layer measured alone at `precision` (float32 in and out, NHWC
        where `nhwc`)."""
        from codesign.lut import layer_key

        if self.linear:
            return layer_key("linear", self.input_shape, out=self.cout, precision=precision)
        return layer_key(
            "conv2d",
            self.input_shape,
            out=self.cout,
            kernel=self.kernel,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            precision=precision,
            variant="-".join(v for v in (self.geometry, "nhwc" if self.nhwc else "nhwc-out") if v),
        )


@dataclass(frozen=True)
class TracedGraph:
    """A BN-folded FX GraphModule (float, eval) and its quantisable layers in call order."""

    module: Any  # torch.fx.GraphModule
    layers: tuple[GraphLayer, ...]
    input_shape: tuple[int, ...]


def _as_int(v: Any) -> int:
    return int(v[0]) if isinstance(v, tuple | list) else int(v)


def _layer(index: int, path: str, m: nn.Module, shape: Sequence[int]) -> GraphLayer:
    if isinstance(m, nn.Linear):
        ok = len(shape) == 2 and shape[0] == 1
        return GraphLayer(index, path, True, m.in_features, m.out_features, 1, 1, 0, 1, 1, 1, ok)
    assert isinstance(m, nn.Conv2d)
    if len(shape) != 4:
        raise GraphError(f"{path}: expected a 4-d input, got shape {tuple(shape)}")
    kh, kw = m.kernel_size
    sh, sw = m.stride
    if not isinstance(m.padding, tuple) or m.padding_mode != "zeros":
        raise GraphError(
            f"{path}: padding={m.padding!r}, padding_mode={m.padding_mode!r}; only zero padding "
            "given as numbers is supported"
        )
    pad = m.padding
    dh, dw = m.dilation
    square = kh == kw and sh == sw and pad[0] == pad[1] and dh == dw == 1
    geometry = "" if square else f"k{kh}x{kw}s{sh}x{sw}p{pad[0]}x{pad[1]}d{dh}x{dw}"
    dense = m.groups == 1
    depthwise = m.groups == m.in_channels == m.out_channels
    ok = square and pad[0] == kh // 2 and (dense or depthwise) and shape[0] == 1
    return GraphLayer(
        index, path, False, m.in_channels, m.out_channels, kh, sh, pad[0], m.groups,
        int(shape[2]), int(shape[3]), ok, geometry,
    )  # fmt: skip


def trace_graph(model: nn.Module, input_shape: Sequence[int]) -> TracedGraph:
    """Trace an eval copy of `model` with torch.fx, fold BatchNorm, find its layers."""
    from torch.fx.experimental.optimization import fuse
    from torch.fx.passes.shape_prop import ShapeProp

    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 4 or input_shape[0] != 1:
        raise GraphError(f"input_shape must be (1, C, H, W), got {input_shape}")
    gm: Any = None
    try:
        gm = fuse(copy.deepcopy(model).eval())
        ShapeProp(gm).propagate(torch.zeros(input_shape))
    except Exception as err:
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "HAQ on your own network needs a model without data-dependent control flow"
        ) from None
    mods = dict(gm.named_modules())
    layers: list[GraphLayer] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.Conv2d | nn.Linear):
            continue
        if node.target in seen:
            raise GraphError(f"{node.target} is called twice; give each call its own module")
        seen.add(node.target)
        meta = node.args[0].meta.get("tensor_meta") if node.args else None
        if meta is None:
            raise GraphError(f"{node.target}: no input shape (is its input a tensor?)")
        layers.append(_layer(len(layers), node.target, mods[node.target], meta.shape))
    if not layers:
        raise GraphError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear to quantise")
    return TracedGraph(gm, tuple(layers), input_shape)


@torch.no_grad()
def calibrate_graph(graph: TracedGraph, images: Iterable[torch.Tensor]) -> list[Any]:
    """Min/max of every layer's input over `images` (batches) in the float network."""
    from codesign.compression.quant.fakequant import Range

    n = len(graph.layers)
    lo, hi = [float("inf")] * n, [float("-inf")] * n
    hooks = []
    for i, ly in enumerate(graph.layers):

        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], i: int = i) -> None:
            lo[i] = min(lo[i], float(inp[0].min()))
            hi[i] = max(hi[i], float(inp[0].max()))

        hooks.append(graph.module.get_submodule(ly.path).register_forward_pre_hook(hook))
    try:
        for x in images:
            graph.module(x)
    finally:
        for h in hooks:
            h.remove()
    return [Range(a, b) for a, b in zip(lo, hi, strict=True)]


def _swap(gm: nn.Module, ly: GraphLayer, rng: Any) -> nn.Module:
    from codesign.compression.quant.fakequant import QConv2d, QLinear

    old: Any = gm.get_submodule(ly.path)
    new: Any
    if ly.linear:
        new = QLinear(old.in_features, old.out_features, bias=True)
        bias = old.bias if old.bias is not None else torch.zeros(old.out_features)
    else:
        new = QConv2d(
            old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
            old.dilation, old.groups, bias=True,
        )  # fmt: skip
        bias = old.bias if old.bias is not None else torch.zeros(old.out_channels)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(bias)
    new.layer = ly  # a GraphLayer has what QLayer users read
    new.act_range = rng
    parent, _, name = ly.path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)
    return new


def fake_quant_graph(
    graph: TracedGraph, ranges: Sequence[Any], bits: Sequence[tuple[int, int]] | None = None
) -> nn.Module:
    """A copy of the traced network whose layers fake-quantise at `bits` (float if None)."""
    if len(ranges) != len(graph.layers):
        raise GraphError(f"{len(ranges)} activation ranges for {len(graph.layers)} layers")
    qnet = copy.deepcopy(graph.module)
    for ly, rng in zip(graph.layers, ranges, strict=True):
        _swap(qnet, ly, rng)
    if bits is not None:
        set_graph_bits(qnet, graph, bits)
    return qnet


def set_graph_bits(qnet: nn.Module, graph: TracedGraph, bits: Sequence[tuple[int, int]]) -> None:
    if len(bits) != len(graph.layers):
        raise GraphError(f"{len(bits)} layer bits for {len(graph.layers)} layers")
    for ly, (w, a) in zip(graph.layers, bits, strict=True):
        qnet.get_submodule(ly.path).set_bits(int(w), int(a))  # type: ignore[operator]


@torch.no_grad()
def export_graph_params(qnet: nn.Module, graph: TracedGraph) -> list[Any]:
    """Every layer's `LayerParams` (the fake-quant forward's numbers), in layer order."""
    from codesign.compression.quant.fakequant import export_params

    net: Any = qnet
    by_layer = {id(p.layer): p for p in export_params(net)}
    return [by_layer[id(qnet.get_submodule(ly.path).layer)] for ly in graph.layers]
