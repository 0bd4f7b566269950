"""Importing models from outside the project's search spaces: ONNX files and PyTorch models.

    import_model("net.onnx", input_shape=(1, 3, 224, 224))        ONNX (Relax's from_onnx)
    import_model("net.pt2")                                         torch.export.save file
    import_model("pkg.mod:make_net", weights="w.pt", input_shape=…) factory + state_dict
    import_model(module_or_exported_program, input_shape=…)         in-process objects

Every import checks the operator set up front against what the Relax frontend converts (ONNX:
its convert map; torch: the ExportedProgram importer's convert map, after the same core-ATen
decomposition it runs), so an unsupported operator is refused by name and place instead of
failing deep inside TVM. The lowering then ends like every other one in the project:
`lower.finish_lowering` (NHWC convolutions), weights bound as constants; torch modules go
through `lower.lower_module` itself. The result is an `Imported` value that
`tvm_backend.build.compile_module` compiles with the project's schedules and tuning database.

ONNX inputs with dynamic dimensions need a concrete `input_shape`; an ONNX model is imported
with one input and one output (what a compiled artifact's `main` takes and returns).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codesign.errors import BuildError
from codesign.tvm_backend.layout import te_clips_as_ops
from codesign.tvm_backend.lower import Lowered, finish_lowering, lower_module

Reference = Callable[[np.ndarray], np.ndarray]
_ONNX_DIRECT = {"If", "Constant"}  # handled by the ONNX importer outside its convert map


class ModelImportError(BuildError):
    """A model file or object that cannot be imported as asked (the message says what to do)."""


class UnsupportedOperatorError(ModelImportError):
    """The model uses an operator the Relax frontend does not convert."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str | None = "NCHW"


@dataclass(frozen=True)
class Imported:
    """A model lowered to Relax (weights bound, NHWC convolutions) and how to check it.

    `reference` runs the original model (ONNX Runtime or PyTorch) on one input; `onnx_path` is
    the ONNX file the peers run (the given file, or None: export it from `torch_module`)."""

    mod: Any  # tvm.IRModule
    input: InputSpec
    source: str  # "onnx" | "torch"
    ops: tuple[tuple[str, int], ...]  # operator -> count, most frequent first
    label: str
    source_sha256: str | None = None
    params: tuple[np.ndarray, ...] = ()
    reference: Reference = field(default=lambda x: x, compare=False, repr=False)
    onnx_path: Path | None = None
    torch_module: Any = field(default=None, compare=False, repr=False)

    def lowered(self) -> Lowered:
        return Lowered(self.mod, self.input.shape, self.input.dtype, list(self.params), self.label)


def import_model(
    source: Any,
    *,
    input_shape: Sequence[int] | None = None,
    input_dtype: str | None = None,
    input_layout: str | None = None,
    weights: str | Path | None = None,
) -> Imported:
    """Import an ONNX file, a .pt2 ExportedProgram file, a 'module:factory' spec (with an
    optional state_dict `weights` file), a torch.nn.Module or an ExportedProgram."""
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    torch_source = not (isinstance(source, str | Path) and str(source).lower().endswith(".onnx"))
    if torch_source and input_dtype not in (None, "float32"):
        raise ModelImportError(
            f"PyTorch models are compiled for float32 inputs, not {input_dtype}; drop --input-dtype"
        )
    if shape is not None and (not shape or min(shape) < 1):
        raise ModelImportError(f"input shape {shape} must be positive dimensions, e.g. 1x3x224x224")
    if isinstance(source, str | Path):
        text = str(source)
        path = Path(text)
        if weights is not None and path.suffix.lower() in (".onnx", ".pt2"):
            raise ModelImportError(
                f"{path.name} holds its weights; --weights is for module:factory"
            )
        if path.suffix.lower() == ".onnx":
            return import_onnx(path, input_shape=shape, input_dtype=input_dtype,
                               input_layout=input_layout)  # fmt: skip
        if path.suffix.lower() == ".pt2":
            return _import_pt2(path, shape, input_layout)
        if ":" in text and not path.exists():
            module = load_factory(text, weights)
            return import_torch(module, input_shape=shape, input_layout=input_layout, label=text)
        raise ModelImportError(
            f"{text}: give an .onnx file, a .pt2 file (torch.export.save), 'module:factory' "
            "(with --weights state_dict.pt), or a model directory (model.json + weights.pt)"
        )
    import torch

    if weights is not None:
        raise ModelImportError("weights= is for 'module:factory' models; load them into the module")
    if isinstance(source, torch.export.ExportedProgram):
        return _import_program(source, shape, input_layout, label="ExportedProgram")
    if isinstance(source, torch.nn.Module):
        return import_torch(source, input_shape=shape, input_layout=input_layout)
    raise ModelImportError(
        f"cannot import a {type(source).__name__}; give a path, a torch.nn.Module or a "
        "torch.export.ExportedProgram"
    )


# --- ONNX --------------------------------------------------------------------------------


def onnx_unsupported(model: Any) -> list[tuple[str, str, int]]:
    """(op_type, node name, node index) of every node the Relax ONNX frontend cannot convert."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    return [
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type, n.name, i)
        for i, n in enumerate(model.graph.node)
        if n.domain not in ("", "ai.onnx")
        or (n.op_type not in known and n.op_type not in _ONNX_DIRECT)
    ]


def read_onnx(path: str | Path, error: type[Exception]) -> Any:
    """The ONNX model in `path`; `error` (with what went wrong) when it is missing or unreadable."""
    import onnx

    if not Path(path).is_file():
        raise error(f"ONNX file {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - protobuf raises many types for a bad file
        raise error(f"{path} is not a readable ONNX model ({err})") from None


def describe_nodes(nodes: Sequence[tuple[str, str, int]], most: int = 5) -> str:
    """'Op at node name (index i); ...' of (op, node name, index) triples, for error messages."""
    where = "; ".join(
        f"{op} at node {name or '(unnamed)'} (index {i})" for op, name, i in nodes[:most]
    )
    return where + (f" and {len(nodes) - most} more" if len(nodes) > most else "")


def import_onnx(
    path: str | Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str | None = None,
    input_layout: str | None = None,
) -> Imported:
    import onnx

    path = Path(path)
    model = read_onnx(path, ModelImportError)
    bad = onnx_unsupported(model)
    if bad:
        raise UnsupportedOperatorError(
            f"{path}: TVM's Relax ONNX frontend cannot convert {describe_nodes(bad)}. Replace the "
            "operator in the model (re-export it with supported ops, or decompose it with "
            "onnxsim / a graph rewrite) and compile again"
        )
    graph = model.graph
    init = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in init]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelImportError(
            f"{path} has {len(inputs)} inputs and {len(graph.output)} outputs; codesign compiles "
            "models with one input and one output"
        )
    inp = inputs[0]
    ttype = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in ttype.shape.dim]  # fmt: skip
    shape = _concrete_shape(str(path), inp.name, dims, input_shape)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
    if input_dtype and input_dtype != dtype:
        raise ModelImportError(
            f"{path}: input {inp.name!r} is {dtype} in the model, not {input_dtype}; drop "
            "--input-dtype or give the model's dtype"
        )
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = from_onnx(
                model,  # pyright: ignore[reportArgumentType] - annotated GraphProto, takes a model
                shape_dict={inp.name: list(shape)},
                dtype_dict={inp.name: dtype},
            )
    except Exception as err:
        raise ModelImportError(f"TVM's Relax ONNX frontend failed on {path}: {err}") from err
    mod, _ = finish_lowering(te_clips_as_ops(mod), [])
    ops = collections.Counter(n.op_type for n in graph.node)
    session = _ort_session(path)
    return Imported(
        mod=mod,
        input=InputSpec(inp.name, shape, dtype, _layout(input_layout, shape)),
        source="onnx",
        ops=tuple(ops.most_common()),
        label=path.stem,
        source_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        reference=lambda x: session.run(None, {inp.name: x})[0],
        onnx_path=path,
    )


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact reference
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _concrete_shape(
    where: str, name: str, dims: list[Any], given: tuple[int, ...] | None
) -> tuple[int, ...]:
    """The model's input dims made concrete by `given`, or a clear error naming the option."""
    pretty = "x".join(str(d) for d in dims)
    if given is None:
        if all(isinstance(d, int) for d in dims) and dims:
            return tuple(dims)
        raise ModelImportError(
            f"{where}: input {name!r} has dynamic dimensions ({pretty}); give a concrete shape "
            "with --input-shape, e.g. --input-shape "
            + "x".join(
                str(d) if isinstance(d, int) else ("1" if i == 0 else "N")
                for i, d in enumerate(dims)
            )  # fmt: skip
            + " (compile_model(..., input_shape=...))"
        )
    if dims and (
        len(given) != len(dims)
        or any(isinstance(d, int) and d != g for d, g in zip(dims, given, strict=False))
    ):
        raise ModelImportError(
            f"{where}: --input-shape {'x'.join(map(str, given))} does not fit input {name!r} "
            f"({pretty}); give a shape that agrees with its fixed dimensions"
        )
    return tuple(given)


def _layout(layout: str | None, shape: tuple[int, ...]) -> str | None:
    if layout:
        if len(layout) != len(shape):
            raise ModelImportError(
                f"--input-layout {layout} has {len(layout)} axes, the input {len(shape)}"
            )
        return layout
    return "NCHW" if len(shape) == 4 else None


# --- PyTorch ------------------------------------------------------------------------------


def load_factory(spec: str, weights: str | Path | None) -> Any:
    """'package.module:factory' called with no arguments, then `weights` (a state_dict) loaded."""
    import torch

    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise ModelImportError(
            f"cannot find factory {spec!r} ({err}); give 'importable.module:function' (run from "
            "a directory where the module imports, or put it on PYTHONPATH)"
        ) from None
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise ModelImportError(f"{spec}() returned {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
            module.load_state_dict(
                state.get("state_dict", state) if isinstance(state, dict) else state
            )
        except Exception as err:  # noqa: BLE001 - missing file, wrong keys, pickle errors
            raise ModelImportError(
                f"cannot load weights {weights} into {spec}(): {err}. Give the state_dict saved "
                "with torch.save(model.state_dict(), path) for this factory"
            ) from None
    return module.eval()


def torch_unsupported(program: Any) -> list[tuple[str, str, str]]:
    """(aten op, node name, module path) of every node the Relax ExportedProgram importer has
    no converter for, in the core-ATen decomposition it translates."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = ExportedProgramImporter().convert_map
    bad = []
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target.__name__ not in known:
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else "(top level)"
            bad.append((node.target.__name__, node.name, path or "(top level)"))
    return bad


def _check_torch_ops(program: Any, label: str) -> tuple[tuple[str, int], ...]:
    bad = torch_unsupported(program)
    if bad:
        where = "; ".join(f"{op} at node {name} in module {path}" for op, name, path in bad[:5])
        raise UnsupportedOperatorError(
            f"{label}: TVM's Relax PyTorch frontend cannot convert {where}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + ". Rewrite that part of the model with supported operations and compile again"
        )
    ops = collections.Counter(
        n.target.__name__ for n in program.graph.nodes if n.op == "call_function"
    )
    return tuple(ops.most_common())


def _export(module: Any, shape: tuple[int, ...], label: str) -> Any:
    """`module` (in eval mode already: an exported program's module refuses .eval()) exported
    at `shape` and decomposed to core ATen, as the Relax importer translates it."""
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (torch.zeros(shape),)).run_decompositions()
    except Exception as err:  # noqa: BLE001 - torch.export raises many types
        raise ModelImportError(f"torch.export could not export {label}: {err}") from None


def torch_reference(module: Any) -> Reference:
    """`module`'s output (the first, for a tuple) on one numpy input, without gradients."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        return (out[0] if isinstance(out, tuple | list) else out).numpy()

    return run


def import_torch(
    module: Any,
    *,
    input_shape: tuple[int, ...] | None,
    input_layout: str | None = None,
    label: str | None = None,
) -> Imported:
    """A torch.nn.Module, lowered by `lower.lower_module` after the operator check."""
    label = label or type(module).__name__
    if input_shape is None:
        raise ModelImportError(
            f"{label}: a PyTorch module carries no input shape; give one with --input-shape, "
            "e.g. --input-shape 1x3x224x224 (compile_model(..., input_shape=...))"
        )
    module = module.eval()
    ops = _check_torch_ops(_export(module, input_shape, label), label)
    lowered = lower_module(module, input_shape, label=label)
    return Imported(
        mod=lowered.mod,
        input=InputSpec("x", tuple(input_shape), "float32", _layout(input_layout, input_shape)),
        source="torch",
        ops=ops,
        label=label,
        reference=torch_reference(module),
        torch_module=module,
    )


def _import_pt2(path: Path, shape: tuple[int, ...] | None, layout: str | None) -> Imported:
    import torch

    if not path.is_file():
        raise ModelImportError(f"ExportedProgram file {path} does not exist")
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001
        raise ModelImportError(
            f"{path} is not a torch.export.save file ({err}); save one with "
            "torch.export.save(torch.export.export(model, (x,)), path)"
        ) from None
    imp = _import_program(program, shape, layout, label=path.stem)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return dataclasses.replace(imp, source_sha256=digest)


def _import_program(
    program: Any, shape: tuple[int, ...] | None, layout: str | None, label: str
) -> Imported:
    """An ExportedProgram: its own input shape, or re-exported at `shape` when that differs."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    user = [n for n in program.graph.nodes if n.op == "placeholder"
            and n.name in set(program.graph_signature.user_inputs)]  # fmt: skip
    if len(user) != 1:
        raise ModelImportError(
            f"{label} takes {len(user)} inputs; codesign compiles one-input models"
        )
    val = user[0].meta.get("val")
    dims = [int(d) if isinstance(d, int) else "?" for d in (val.shape if val is not None else [])]
    own = _concrete_shape(label, user[0].name, dims, None) if "?" not in dims else None
    module = program.module()
    if shape is None and own is None:
        _concrete_shape(label, user[0].name, dims, None)  # raises: dynamic dims need a shape
    if own is not None and shape is not None and shape != own:
        raise ModelImportError(
            f"{label} was exported for input {'x'.join(map(str, own))}, not "
            f"{'x'.join(map(str, shape))}: drop --input-shape, or export it again at that shape "
            "(or with dynamic_shapes) with torch.export.export"
        )
    if shape is not None and own is None:  # dynamic dims: made concrete by the given shape
        program = _export(module, shape, label)
    else:
        program = program.run_decompositions()
    shape = shape or own
    assert shape is not None
    ops = _check_torch_ops(program, label)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = from_exported_program(
                program, unwrap_unit_return_tuple=True, run_ep_decomposition=False
            )
    except Exception as err:
        raise ModelImportError(f"TVM's Relax PyTorch frontend failed on {label}: {err}") from err
    mod, _ = finish_lowering(mod, [])
    return Imported(
        mod=mod,
        input=InputSpec(user[0].name, tuple(shape), "float32", _layout(layout, tuple(shape))),
        source="torch",
        ops=ops,
        label=label,
        reference=torch_reference(module),
        torch_module=module,
    )
