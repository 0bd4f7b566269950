"""An ONNX CNN as a PyTorch module, so that `codesign compress` can prune and fine-tune it.

`codesign compile` lowers an ONNX file with TVM's Relax frontend and needs nothing else;
pruning needs a dependency graph over trainable parameters (torch-pruning traces a forward
pass) and fine-tuning needs gradients. So the graph is rebuilt in PyTorch: every Conv,
BatchNormalization, Gemm and MatMul-by-a-constant becomes an `nn.Conv2d` / `nn.BatchNorm2d` /
`nn.Linear` holding the file's weights (under the node's name), every operator with attributes a
parameterless module (`nn.MaxPool2d`, `nn.ReLU6`, `nn.Flatten`, ...: FX-based importers such as
TVM's, which HAQ lowers through, read a module's attributes reliably, a functional call's
keywords not always), the others functions of their inputs, and `forward` runs the nodes in
the file's (topological) order. The result is an ordinary module: torch-pruning changes its layers in
place, `torch.export` and `torch.onnx.export` trace it, `codesign compile` ships it.

Only what a CNN needs is covered (`OPS`); any other operator, and any attribute value outside
what is covered (asymmetric padding, a reshape that is not a flatten, ...), is refused with the
operator and node before any work, saying how to get around it. An exporter that folded
BatchNorm into the convolutions (PyTorch's does in eval mode) leaves convolutions with biases;
`OnnxModule.restore_batchnorm` puts calibrated BatchNorms back for fine-tuning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from codesign.errors import CompressError

LAYERS = ("Conv", "BatchNormalization", "Gemm", "MatMul")
FUNCTIONS = (
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Add", "Sub", "Mul", "Div", "GlobalAveragePool", "GlobalMaxPool", "AveragePool",
    "MaxPool", "Flatten", "Reshape", "Concat", "ReduceMean", "Identity", "Dropout", "Constant",
)  # fmt: skip
OPS = frozenset(LAYERS + FUNCTIONS)
_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}


@dataclass(frozen=True)
class _Step:
    """One node: a layer with weights (`layer`, a key of `OnnxModule.layers`), a parameterless
    module (`op_module`, a key of `OnnxModule.ops`) or a function of its inputs (`fn`).
    `inputs` name tensors of the graph (the input, earlier outputs or buffers holding the
    file's constants)."""

    op: str
    inputs: tuple[str, ...]
    output: str
    layer: str | None = None
    op_module: str | None = None  # a key of `OnnxModule.ops` (parameterless modules)
    fn: Callable[..., torch.Tensor] | None = None


class OnnxModule(nn.Module):
    """The CNN of an ONNX file (see the module docstring). `input_shape` is the file's
    (N, C, H, W) when it is static, else None."""

    def __init__(self, model: Any, label: str = "onnx") -> None:
        super().__init__()
        graph = model.graph
        self.label = label
        self.layers = nn.ModuleDict()  # Conv / BatchNorm / Linear: the weights
        self.ops = nn.ModuleDict()  # activations, pooling, flatten: no weights
        consts = {t.name: _array(t) for t in graph.initializer}
        inputs = [v for v in graph.input if v.name not in consts]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise CompressError(
                f"{label} has {len(inputs)} inputs and {len(graph.output)} outputs; codesign "
                "compresses models with one input and one output"
            )
        self.input_name, self.output_name = inputs[0].name, graph.output[0].name
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        self.input_shape = tuple(dims) if len(dims) == 4 and min(dims) > 0 else None
        _refuse_unsupported(graph, label)
        self._buffers_of: dict[str, str] = {}  # graph tensor name -> buffer name
        self._steps: list[_Step] = []
        for i, node in enumerate(graph.node):
            if node.op_type == "Constant":
                consts[node.output[0]] = _array(node.attribute[0].t)
                continue
            if node.op_type == "Identity" and node.input[0] in consts:
                # PyTorch's exporter gives a weight used twice one initializer and an Identity
                consts[node.output[0]] = consts[node.input[0]]
                continue
            self._steps.append(self._step(node, i, consts))
        with_bn = {s.inputs[0] for s in self._steps if s.op == "BatchNormalization"}
        self.bare_convs = tuple(s.layer for s in self._steps
                                if s.op == "Conv" and s.layer and s.output not in with_bn)  # fmt: skip

    def restore_batchnorm(self, images: torch.Tensor) -> tuple[str, ...]:
        """Put a BatchNorm after every convolution the exporter folded it into (`bare_convs`),
        so that fine-tuning and AMC's BatchNorm refresh work as on the original: each gets the
        mean and variance of its convolution's outputs over `images` as running statistics, and
        scale and shift that undo them, so the module computes what it did in eval mode (and
        about the same in train mode on batches like `images`). Fine-tuning a folded network
        without it diverged (ResNet-18 on digits, lr 0.01: 97.5% -> 16% after one epoch, 86%
        after five). Returns the layers that got one; idempotent."""
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        todo = [k for k in self.bare_convs if isinstance(self.layers[k], nn.Conv2d)]

        def hook(key: str) -> Callable[..., None]:
            def record(_m: nn.Module, _i: Any, y: torch.Tensor) -> None:
                y = y.detach().transpose(0, 1).flatten(1).double()
                stats[key] = (y.mean(1), y.var(1, unbiased=False))

            return record

        handles = [self.layers[k].register_forward_hook(hook(k)) for k in todo]
        training = self.training
        try:
            with torch.no_grad():
                self.eval()(images)
        finally:
            for h in handles:
                h.remove()
            self.train(training)
        for key in todo:
            conv = self.layers[key]
            assert isinstance(conv, nn.Conv2d)
            mean, var = stats[key]
            bn = nn.BatchNorm2d(conv.out_channels)
            with torch.no_grad():
                bn.running_mean.copy_(mean.float())  # type: ignore[union-attr]
                bn.running_var.copy_(var.float())  # type: ignore[union-attr]
                bn.weight.copy_(torch.sqrt(var + bn.eps).float())
                bn.bias.copy_(mean.float())
            self.layers[key] = nn.Sequential(conv, bn).train(training)
        return tuple(todo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for step in self._steps:
            args = [env[n] if n in env else getattr(self, self._buffers_of[n]) for n in step.inputs]
            if step.layer is not None:
                env[step.output] = self.layers[step.layer](args[0])
            elif step.op_module is not None:
                env[step.output] = self.ops[step.op_module](args[0])
            else:
                assert step.fn is not None
                env[step.output] = step.fn(*args)
        return env[self.output_name]

    # ---------------------------------------------------------------- construction
    def _step(self, node: Any, index: int, consts: dict[str, np.ndarray]) -> _Step:
        op, attrs = node.op_type, _attrs(node)
        where = f"{op} at node {node.name or '(unnamed)'} (index {index})"
        names = [n for n in node.input if n]
        if op in ("Conv", "BatchNormalization", "Gemm") or (op == "MatMul" and names[1] in consts):
            key = self._key(node.name or f"{op.lower()}{index}", op)
            self.layers[key] = _layer(op, attrs, [consts.get(n) for n in names[1:]], where)
            return _Step(op, (names[0],), node.output[0], layer=key)
        if op in ("Clip", "Reshape", "ReduceMean") and len(names) > 1:  # operands as inputs
            attrs = {**attrs, **_operand_attrs(op, names[1:], consts, where)}
            names = names[:1]
        data = tuple(self._tensor(n, consts) for n in names)
        fn = _operator(op, attrs, where)
        if isinstance(fn, nn.Module):
            key = self._key(node.name or f"{op.lower()}{index}", op, self.ops)
            self.ops[key] = fn
            return _Step(op, data[:1], node.output[0], op_module=key)
        return _Step(op, data, node.output[0], fn=fn)

    def _key(self, name: str, op: str, into: nn.ModuleDict | None = None) -> str:
        """A readable, unique layer name from the node's: PyTorch's exporter names a node by
        its module scopes ("/features/features.1/conv/conv.0/Conv" -> "features_1_conv_0")."""
        parts = [p for p in name.strip("/").split("/") if p and p != op]
        parts = [p for p, nxt in zip(parts, [*parts[1:], ""][: len(parts)], strict=True)
                 if not nxt.startswith(p + ".")]  # fmt: skip
        key = re.sub(r"[^0-9A-Za-z_]", "_", "_".join(parts)).strip("_") or op.lower()
        key = key if not key[0].isdigit() else f"n{key}"
        taken = self.layers if into is None else into
        while key in taken:
            key += "_"
        return key

    def _tensor(self, name: str, consts: dict[str, np.ndarray]) -> str:
        """`name` as an input of a function: constants become buffers (moved with the module)."""
        if name in consts and name not in self._buffers_of:
            buf = f"const{len(self._buffers_of)}"
            self.register_buffer(buf, torch.from_numpy(np.array(consts[name])))
            self._buffers_of[name] = buf
        return name


def load_onnx_module(path: str | Path) -> OnnxModule:
    """The ONNX file `path` as an eval-mode `OnnxModule`; CompressError when it cannot be read
    or uses what the rebuild does not cover."""
    from codesign.tvm_backend.frontend import read_onnx

    return OnnxModule(read_onnx(path, CompressError), label=Path(path).name).eval()


def _refuse_unsupported(graph: Any, label: str) -> None:
    bad = [(n.op_type, n.name, i) for i, n in enumerate(graph.node) if n.op_type not in OPS]
    if bad:
        from codesign.tvm_backend.frontend import describe_nodes

        raise CompressError(
            f"{label}: codesign compress cannot rebuild {describe_nodes(bad)} in PyTorch for pruning "
            f"(it covers {', '.join(sorted(OPS))}). Simplify the graph first (python -m onnxsim "
            "in.onnx out.onnx folds shape computations), or give the PyTorch model as "
            "'module:factory' with --weights; `codesign compile` takes the file as it is"
        )


def _array(tensor: Any) -> np.ndarray:
    from onnx import numpy_helper

    return np.array(numpy_helper.to_array(tensor))


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _refuse(where: str, why: str) -> CompressError:
    return CompressError(
        f"{where}: {why}; codesign compress cannot rebuild it for pruning (give the PyTorch "
        "model as 'module:factory' with --weights instead)"
    )


def _pads(attrs: dict[str, Any], where: str) -> tuple[int, int]:
    """(top, left) of a 2-D operator's symmetric padding."""
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        raise _refuse(where, f"auto_pad {attrs['auto_pad']!r}")
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    if len(pads) != 4 or pads[:2] != pads[2:]:
        raise _refuse(where, f"asymmetric padding {pads}")
    return pads[0], pads[1]


def _layer(op: str, attrs: dict[str, Any], params: list[Any], where: str) -> nn.Module:
    """The nn.Module of a Conv / BatchNormalization / Gemm / MatMul node with its weights."""
    if any(p is None for p in params):
        raise _refuse(where, "its weights are computed in the graph, not stored")
    if op == "Conv":
        w = params[0]
        if w.ndim != 4:
            raise _refuse(where, f"a {w.ndim - 2}-D convolution (2-D are covered)")
        conv = nn.Conv2d(w.shape[1] * int(attrs.get("group", 1)), w.shape[0], w.shape[2:],
                         stride=tuple(attrs.get("strides", (1, 1))), padding=_pads(attrs, where),
                         dilation=tuple(attrs.get("dilations", (1, 1))),
                         groups=int(attrs.get("group", 1)), bias=len(params) > 1)  # fmt: skip
        return _loaded(conv, params)
    if op == "BatchNormalization":
        scale, bias, mean, var = params
        bn = nn.BatchNorm2d(scale.shape[0], eps=float(attrs.get("epsilon", 1e-5)),
                            momentum=1.0 - float(attrs.get("momentum", 0.9)))  # fmt: skip
        with torch.no_grad():
            for buffer, value in ((bn.running_mean, mean), (bn.running_var, var)):
                assert buffer is not None  # track_running_stats
                buffer.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
        return _loaded(bn, [scale, bias])
    if op == "Gemm":
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA"):
            raise _refuse(where, "a Gemm with alpha, beta or transA")
        w = params[0] if attrs.get("transB") else params[0].T
        return _loaded(nn.Linear(w.shape[1], w.shape[0], bias=len(params) > 1), [w, *params[1:]])
    w = params[0].T  # MatMul by a constant (K, N): a Linear without bias
    if w.ndim != 2:
        raise _refuse(where, f"a MatMul by a {w.ndim}-D constant")
    return _loaded(nn.Linear(w.shape[1], w.shape[0], bias=False), [w])


def _loaded(layer: nn.Module, params: list[np.ndarray]) -> nn.Module:
    with torch.no_grad():
        for p, value in zip(layer.parameters(), params, strict=False):
            p.copy_(
                torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).reshape(p.shape)
            )
    return layer


def _operand_attrs(
    op: str, names: list[str], consts: dict[str, np.ndarray], where: str
) -> dict[str, Any]:
    """The constant operands of Clip (min, max), Reshape (shape) and ReduceMean (axes) as
    attributes, as older opsets had them."""
    if any(n not in consts for n in names):
        raise _refuse(where, "an operand computed in the graph (only constants are covered)")
    values = [consts[n] for n in names]
    if op == "Clip":
        return dict(zip(("min", "max"), (float(v) for v in values), strict=False))
    key = "shape" if op == "Reshape" else "axes"
    return {key: [int(v) for v in values[0].reshape(-1)]}


def _operator(op: str, attrs: dict[str, Any], where: str) -> nn.Module | Callable[..., Any]:
    """The node as a parameterless module (operators with attributes: FX-based importers such
    as TVM's read a module's attributes, but not every keyword of a functional call; TVM 0.27
    dropped max_pool2d's stride and padding keywords) or a function of its inputs."""
    if op in _BINARY:
        return _BINARY[op]
    if op == "Concat":
        return partial(_concat, dim=int(attrs["axis"]))
    simple = {"Relu": nn.ReLU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh, "HardSwish": nn.Hardswish,
              "Identity": nn.Identity, "Dropout": nn.Identity}  # fmt: skip
    if op in simple:
        return simple[op]()
    if op == "LeakyRelu":
        return nn.LeakyReLU(float(attrs.get("alpha", 0.01)))
    if op == "Clip":
        lo, hi = float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))
        if (lo, hi) in ((0.0, 6.0), (0.0, np.inf)):  # what the fused epilogues recognise
            return nn.ReLU6() if hi == 6.0 else nn.ReLU()
        return _Clamp(lo, hi)
    if op == "HardSigmoid":
        return _HardSigmoid(float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5)))
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return nn.AdaptiveAvgPool2d(1) if op == "GlobalAveragePool" else nn.AdaptiveMaxPool2d(1)
    if op in ("AveragePool", "MaxPool"):
        kh, kw = (int(k) for k in attrs["kernel_shape"])
        sh, sw = (int(v) for v in attrs.get("strides", (kh, kw)))
        kernel, stride = (kh, kw), (sh, sw)
        ceil = bool(attrs.get("ceil_mode", 0))
        if op == "MaxPool":
            if any(d != 1 for d in attrs.get("dilations", (1, 1))):
                raise _refuse(where, "a dilated MaxPool")
            return nn.MaxPool2d(kernel, stride, _pads(attrs, where), ceil_mode=ceil)
        return nn.AvgPool2d(kernel, stride, _pads(attrs, where), ceil_mode=ceil,
                            count_include_pad=bool(attrs.get("count_include_pad", 0)))  # fmt: skip
    if op == "Flatten":
        if int(attrs.get("axis", 1)) != 1:
            raise _refuse(where, f"Flatten at axis {attrs['axis']} (axis 1 is covered)")
        return nn.Flatten(1)
    if op == "Reshape":
        shape = attrs.get("shape", [])
        if len(shape) != 2 or shape[0] not in (0, 1, -1):
            raise _refuse(where, f"a Reshape to {shape} (only flattening to (N, -1) is covered)")
        return nn.Flatten(1)
    if op == "ReduceMean":
        return _Mean(tuple(int(a) for a in attrs.get("axes", (2, 3))),
                     bool(attrs.get("keepdims", 1)))  # fmt: skip
    raise _refuse(where, "an operator without a PyTorch rebuild")  # pragma: no cover - OPS


class _Clamp(nn.Module):
    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = (None if np.isinf(lo) else lo), (None if np.isinf(hi) else hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


class _HardSigmoid(nn.Module):
    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.alpha + self.beta, 0.0, 1.0)


class _Mean(nn.Module):
    def __init__(self, dims: tuple[int, ...], keepdim: bool) -> None:
        super().__init__()
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean(x, self.dims, self.keepdim)


def _concat(*xs: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat(xs, dim=dim)
