"""Any CNN as prunable groups of layers: the pieces `own.py` searches over (what they cost:
`own_latency.py`).

OwnGraph.build(model, input_shape)
    layers  every Conv2d / Linear with its shapes and the epilogue TVM fuses into it
            (BatchNorm folded; ReLU, ReLU6, a residual add, add + ReLU), from a forward
            pass with hooks and a torch.fx trace (no trace: no epilogue)
    units   torch-pruning's dependency-graph groups (`get_all_groups`): channels that must
            be pruned together (residual adds, depthwise convs, concatenations), each with
            the layers whose outputs and inputs it shrinks; the classifier is left alone
graph.specs(counts)   the layer shapes after keeping `counts[unit]` channels (no pruning)
graph.prune(counts)   a pruned copy (torch-pruning, L2 group magnitude)
LayerSpec             one kernel's shapes, its LUT key and a module that runs it alone
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from codesign.compression.amc.policy import PruneError
from codesign.lut import layer_key

EPILOGUES = ("", "relu", "relu6", "add", "add_relu")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One conv / linear kernel as TVM runs it inside the network (batch 1)."""

    op: str  # "conv" | "linear"
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    h: int = 1  # input height / width (1 for linear)
    w: int = 1
    epilogue: str = ""
    nhwc_in: bool = True  # inside the network convs read NHWC; the first reads the NCHW image

    @property
    def key(self) -> str:
        """`lut.layer_key` with this layer's epilogue and input layout as the variant."""
        if self.op == "linear":
            return layer_key("linear", self.input_shape, out=self.cout,
                             variant=self.epilogue or "none")  # fmt: skip
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        square = kh == kw and sh == sw and ph == pw
        variant = f"{self.epilogue or 'none'}-{'nhwc' if self.nhwc_in else 'nchw'}"
        if not square:
            variant += f"-k{kh}x{kw}s{sh}x{sw}p{ph}x{pw}"
        return layer_key("conv2d", self.input_shape, out=self.cout, kernel=kh, stride=sh,
                         padding=ph, groups=self.groups, variant=variant)  # fmt: skip

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.cin) if self.op == "linear" else (1, self.cin, self.h, self.w)

    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (self.h + 2 * ph - kh) // sh + 1, (self.w + 2 * pw - kw) // sw + 1

    def macs(self) -> int:
        oh, ow = self.out_hw()
        return self.cout * oh * ow * (self.cin // self.groups) * self.kernel[0] * self.kernel[1]

    def weight_count(self) -> int:
        return self.cout * (self.cin // self.groups) * self.kernel[0] * self.kernel[1]

    def with_channels(self, cin: int, cout: int) -> LayerSpec:
        groups = self.groups
        if self.groups > 1 and self.groups == self.cin == self.cout:  # depthwise: one width
            cin = cout = groups = cout if cout != self.cout else cin
        return LayerSpec(self.op, cin, cout, self.kernel, self.stride, self.padding, groups,
                         self.h, self.w, self.epilogue, self.nhwc_in)  # fmt: skip

    def module(self) -> nn.Module:
        """The kernel as a module: conv/linear with bias, then the epilogue (a residual add
        reads a constant of the output's shape: TVM fuses it the same way)."""
        return _LayerModule(self)


class _LayerModule(nn.Module):
    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.epilogue = spec.epilogue
        if spec.op == "linear":
            self.op: nn.Module = nn.Linear(spec.cin, spec.cout)
            out_shape: tuple[int, ...] = (1, spec.cout)
        else:
            self.op = nn.Conv2d(spec.cin, spec.cout, spec.kernel, spec.stride, spec.padding,
                                groups=spec.groups)  # fmt: skip
            out_shape = (1, spec.cout, *spec.out_hw())
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.op.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.register_buffer("residual", torch.randn(out_shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x)
        if self.epilogue.startswith("add"):
            y = y + self.residual
        if self.epilogue in ("relu", "add_relu"):
            y = torch.relu(y)
        elif self.epilogue == "relu6":
            y = torch.clamp(y, 0.0, 6.0)
        return y


# ---------------------------------------------------------------- graph analysis
_RELU = {F.relu, torch.relu, "relu", "relu_"}
_RELU6 = {F.relu6, "relu6"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}


def _epilogues(model: nn.Module) -> dict[str, str]:
    """{layer name: fused epilogue} from a torch.fx trace ({} when the model does not trace)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable models get no epilogues, nothing else
        return {}
    mods = dict(gm.named_modules())

    def target(n: torch.fx.Node) -> Any:
        if n.op == "call_module":
            return type(mods[str(n.target)])
        return n.target if n.op in ("call_function", "call_method") else None

    def act(n: torch.fx.Node) -> str:
        t = target(n)
        if t in (nn.ReLU,) or t in _RELU:
            return "relu"
        if t in (nn.ReLU6,) or t in _RELU6:
            return "relu6"
        return ""

    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(mods[str(n.target)], nn.Conv2d | nn.Linear):
            continue
        cur, users = n, list(n.users)
        if len(users) == 1 and target(users[0]) in (nn.BatchNorm2d, nn.BatchNorm1d):
            cur = users[0]
            users = list(cur.users)
        epi = ""
        if len(users) == 1:
            epi = act(users[0])
            if not epi and target(users[0]) in _ADD:
                after = list(users[0].users)
                epi = "add_relu" if len(after) == 1 and act(after[0]) == "relu" else "add"
        out[str(n.target)] = epi
    return out


@dataclass(frozen=True, slots=True)
class Unit:
    """A dependency group: `channels` coupled channels, kept or dropped together."""

    name: str  # the group's root layer
    channels: int
    outs: tuple[str, ...]  # layers whose output channels it prunes
    ins: tuple[str, ...]  # layers whose input channels it prunes


_OUT = ("prune_out_channels", "prune_conv_out_channels", "prune_linear_out_channels")
_IN = ("prune_in_channels", "prune_conv_in_channels", "prune_linear_in_channels")


def _handler_name(h: Any) -> str:
    return str(getattr(h, "__name__", None) or getattr(getattr(h, "__func__", None), "__name__", h))


@dataclass(frozen=True)
class OwnGraph:
    model: nn.Module
    input_shape: tuple[int, ...]
    layers: dict[str, LayerSpec]  # in execution order
    units: tuple[Unit, ...]
    head: str

    @classmethod
    def build(cls, model: nn.Module, input_shape: Sequence[int]) -> OwnGraph:
        import torch_pruning as tp

        model = model.eval()
        shape = tuple(int(s) for s in input_shape)
        layers = layer_specs(model, shape)
        if not layers:
            raise PruneError("the model has no Conv2d or Linear layer to prune")
        head = list(layers)[-1]
        mods = dict(model.named_modules())
        names = {m: n for n, m in mods.items()}
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(shape))
        units = []
        for group in dg.get_all_groups(ignored_layers=[mods[head]],
                                       root_module_types=[nn.Conv2d, nn.Linear]):  # fmt: skip
            root = group[0].dep.target.module
            outs, ins = [], []
            for item in group:
                n, h = names.get(item.dep.target.module), _handler_name(item.dep.handler)
                if n in layers and h in _OUT:
                    outs.append(n)
                elif n in layers and h in _IN:
                    ins.append(n)
            if names.get(root) not in layers or head in outs:
                continue
            units.append(Unit(names[root], layers[names[root]].cout,
                              tuple(dict.fromkeys(outs)), tuple(dict.fromkeys(ins))))  # fmt: skip
        if not units:
            raise PruneError("torch-pruning found no prunable channel group in the model")
        order = {n: i for i, n in enumerate(layers)}
        units.sort(key=lambda u: order[u.name])
        return cls(model, shape, layers, tuple(units), head)

    def specs(self, counts: dict[str, int]) -> tuple[LayerSpec, ...]:
        """Layer shapes with `counts[unit]` channels kept (absent units: all)."""
        cout = {n: s.cout for n, s in self.layers.items()}
        cin = {n: s.cin for n, s in self.layers.items()}
        for u in self.units:
            k = counts.get(u.name, u.channels)
            for n in u.outs:
                cout[n] = k
            for n in u.ins:
                cin[n] = k
        return tuple(s.with_channels(cin[n], cout[n]) for n, s in self.layers.items())

    def prune(self, counts: dict[str, int]) -> nn.Module:
        """A copy with the `counts[unit]` channels of largest L2 group magnitude kept."""
        import torch_pruning as tp

        model = copy.deepcopy(self.model).eval()
        mods = dict(model.named_modules())
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(self.input_shape)
        )
        imp = tp.importance.GroupMagnitudeImportance(p=2)
        for u in self.units:
            k = counts.get(u.name, u.channels)
            if k >= u.channels:
                continue
            if k < 1:
                raise PruneError(f"unit {u.name}: at least one channel must be kept, got {k}")
            pruner = dg.get_pruner_of_module(mods[u.name])
            if pruner is None:
                raise PruneError(f"torch-pruning has no pruner for {u.name}")
            fn = pruner.prune_out_channels
            scores = imp(dg.get_pruning_group(mods[u.name], fn, list(range(u.channels))))
            if scores is None:
                raise PruneError(f"no magnitude importance for the group of {u.name}")
            drop = torch.argsort(scores)[: u.channels - k].tolist()
            dg.get_pruning_group(mods[u.name], fn, sorted(drop)).prune()
        return model


def layer_specs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerSpec]:
    """{name: LayerSpec} of every Conv2d / Linear, in execution order (one forward pass)."""
    epilogues = _epilogues(model)
    found: dict[str, LayerSpec] = {}
    x = torch.zeros(input_shape)

    def hook(name: str) -> Any:
        def record(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            if name in found:
                return
            inp = args[0]
            if isinstance(mod, nn.Linear):
                found[name] = LayerSpec("linear", mod.in_features, mod.out_features,
                                        epilogue=epilogues.get(name, ""), nhwc_in=False)  # fmt: skip
                return
            assert isinstance(mod, nn.Conv2d)
            epi = epilogues.get(name, "")
            found[name] = LayerSpec(
                "conv", mod.in_channels, mod.out_channels, _pair(mod.kernel_size),
                _pair(mod.stride), _pair(mod.padding), mod.groups, int(inp.shape[2]),
                int(inp.shape[3]), epi, nhwc_in=inp is not x,
            )  # fmt: skip

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]  # fmt: skip
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return found
