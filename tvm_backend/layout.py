"""Data layout of convolutions: NHWC activations and OHWI weights, whatever the importer emits.

PyTorch (and so torch.export) computes in NCHW. MetaSchedule's x86 rules vectorise the
innermost loop, which in NCHW is the image width — short in late stages and strided for the
weights; in NHWC it is the channel axis: a 1x1 convolution becomes a GEMM over channels and a
depthwise convolution vectorises across channels. Converting the layout before fusion keeps
every convolution's epilogue (bias, ReLU6, residual add) in the same fused kernel.

    clip -> maximum/minimum   Relax's ConvertLayout knows no layout rule for `clip` (ReLU6);
                              left alone, it would be wrapped in transposes and split out of
                              the convolution's kernel. ONNX's Clip arrives already lowered
                              (`call_tir` of TOPI's maximum / minimum): `te_clips_as_ops` turns
                              those back into the Relax ops (MobileNetV2 from ONNX spent 4.5 of
                              16.6 ms in transpose-clip-transpose kernels)
    ConvertLayout             conv2d to NHWC/OHWI; elementwise ops, mean, pooling follow;
                              constant weights are transposed once by FoldConstant
    cancel transposes         permute_dims(permute_dims(x, a), b) with b after a the identity is x:
                              a module that takes and returns NHWC has no transposes left

Networks keep their NCHW interface (one transpose of the input image, none at the output of
the classifier); blocks measured for the latency table take and return NHWC (see
`codesign.tvm_backend.lower.lower_block`), as they run inside a converted network.
"""

from __future__ import annotations

from typing import Any

CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "OHWI"]}
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


def nhwc_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An NCHW shape in NHWC order."""
    return tuple(shape[i] for i in NCHW_TO_NHWC)


def to_nhwc(mod: Any) -> Any:
    """`mod` with every conv2d in NHWC/OHWI and no transposes that undo each other."""
    from tvm import relax

    mod = _rewrite(mod, _clip_as_max_min)
    mod = relax.transform.ConvertLayout(CONV_LAYOUT)(mod)
    for rule in (_cancel_transposes, _transposed_add, _cancel_transposes, _identity_transposes):
        mod = _rewrite(mod, rule)
    return mod


def nhwc_interface(mod: Any, *, nhwc_in: bool, nhwc_out: bool) -> Any:
    """`mod` whose `main` takes its first input and/or returns its (4-d) output in NHWC instead
    of NCHW: a block as it runs inside a converted network, without boundary transposes once
    `to_nhwc` has run."""
    from tvm import relax

    old = mod["main"]
    x = old.params[0]
    shape = tuple(int(d) for d in x.ty.shape)
    params = [
        relax.Var(x.name, relax.TensorType(nhwc_shape(shape) if nhwc_in else shape, x.ty.dtype))
    ]
    params += [relax.Var(p.name, p.ty) for p in old.params[1:]]
    inner = mod.clone()
    del inner["main"]
    bb = relax.BlockBuilder(inner)
    nchw = bb.add_func(old.without_attr("global_symbol"), "main_nchw")
    with bb.function("main", params, attrs=dict(old.attrs or {})):
        with bb.dataflow():
            y = params[0]
            if nhwc_in:
                y = bb.emit(relax.op.permute_dims(y, NHWC_TO_NCHW))
            y = bb.emit(relax.Call(nchw, [y, *params[1:]]))
            if nhwc_out and y.ty.ndim == 4:
                y = bb.emit(relax.op.permute_dims(y, NCHW_TO_NHWC))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return relax.transform.InlinePrivateFunctions()(bb.get())  # and drops main_nchw


def _rewrite(mod: Any, rule: Any) -> Any:
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    pattern, fn = rule()
    out = mod.clone()  # the caller's module is left as it was
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            out[gv] = rewrite_call(pattern, fn, func)
    return out


def te_clips_as_ops(mod: Any) -> Any:
    """`mod` with every `call_tir` of a TOPI maximum / minimum against a scalar constant (how
    TVM's ONNX frontend emits Clip) replaced by `relax.op.maximum` / `minimum`, which
    ConvertLayout moves to NHWC and fusion keeps in the convolution's kernel."""
    from tvm import relax

    mod = relax.transform.FoldConstant()(mod)  # the bounds: where(isnan(c), inf, c) -> c
    return relax.transform.DeadCodeElimination()(_rewrite(mod, _te_max_min))


def _te_max_min() -> tuple[Any, Any]:
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    func, args = wildcard(), wildcard()
    ops = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    def fn(expr: Any, matched: dict[Any, Any]) -> Any:
        gv, tup = matched[func], matched[args]
        name = gv.name_hint.rstrip("0123456789_") if isinstance(gv, relax.GlobalVar) else ""
        fields = tup.fields if isinstance(tup, relax.Tuple) else []
        if name not in ops or len(fields) != 2 or not _scalar_constant(fields[1]):
            return expr
        return ops[name](fields[0], fields[1])

    return is_op("relax.call_tir")(func, args), fn


def _scalar_constant(expr: Any) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.expr.Constant) and expr.ty.ndim == 0


def _clip_as_max_min() -> tuple[Any, Any]:
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    x, lo, hi = wildcard(), wildcard(), wildcard()

    def fn(expr: Any, matched: dict[Any, Any]) -> Any:
        dtype = matched[x].ty.dtype
        low = relax.const(_number(matched[lo]), dtype)
        high = relax.const(_number(matched[hi]), dtype)
        return relax.op.minimum(relax.op.maximum(matched[x], low), high)

    return is_op("relax.clip")(x, lo, hi), fn


def _number(expr: Any) -> float:
    """The value of a PrimValue(FloatImm) / FloatImm argument."""
    while hasattr(expr, "value"):
        expr = expr.value
    return float(expr)


def _cancel_transposes() -> tuple[Any, Any]:
    from tvm.relax.dpl import is_op, wildcard

    x = wildcard()
    inner = is_op("relax.permute_dims")(x)
    outer = is_op("relax.permute_dims")(inner)

    def fn(expr: Any, matched: dict[Any, Any]) -> Any:
        undone = _undoes(_axes(expr, matched[inner]), _axes(matched[inner], matched[x]))
        return matched[x] if undone else expr

    return outer, fn


def _identity_transposes() -> tuple[Any, Any]:
    from tvm.relax.dpl import is_op, wildcard

    x = wildcard()
    perm = is_op("relax.permute_dims")(x)

    def fn(expr: Any, matched: dict[Any, Any]) -> Any:
        axes = _axes(expr, matched[x])
        return matched[x] if axes is not None and _undoes(axes, list(range(len(axes)))) else expr

    return perm, fn


def _transposed_add() -> tuple[Any, Any]:
    """permute_dims(add(permute_dims(a, p), permute_dims(b, p)), q), q undoing p: add(a, b).

    ConvertLayout leaves a residual add in the layout of its first operand; where that is the
    NCHW view of an NHWC input, this takes the add back to NHWC."""
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    a, b = wildcard(), wildcard()
    pa, pb = is_op("relax.permute_dims")(a), is_op("relax.permute_dims")(b)
    add = is_op("relax.add")(pa, pb)
    outer = is_op("relax.permute_dims")(add)

    def fn(expr: Any, matched: dict[Any, Any]) -> Any:
        p, p2 = _axes(matched[pa], matched[a]), _axes(matched[pb], matched[b])
        if p != p2 or not _undoes(_axes(expr, matched[add]), p):
            return expr
        return relax.op.add(matched[a], matched[b])

    return outer, fn


def _undoes(outer: list[int] | None, inner: list[int] | None) -> bool:
    """Whether permute_dims(permute_dims(x, inner), outer) is x (both axes known)."""
    if outer is None or inner is None or len(outer) != len(inner):
        return False
    return [inner[i] for i in outer] == list(range(len(inner)))


def _axes(call: Any, arg: Any) -> list[int] | None:
    axes = call.attrs.axes
    if axes is None:  # default: reverse
        ndim = arg.ty.ndim
        return list(range(ndim))[::-1] if ndim >= 0 else None
    return [int(a) for a in axes]
