"""Compilation: one recipe, used for LUT blocks, measured networks and shipped artifacts alike.

    Relax IRModule, convolutions in NHWC/OHWI (lowering ends with `layout.to_nhwc`)
                   --zero pipeline--> fused module (one PrimFunc per fused op = tuning tasks)
                   --AttachAttrLayoutFreeBuffers--> weights marked free to change layout
                   --schedules.schedule_kernels--> every PrimFunc scheduled: the tuning
                     database's best record where it has one, the analytic schedule
                     (register tiles from the ISA, no measurement) elsewhere
                   --SplitLayoutRewritePreproc + FoldConstant--> weights pre-packed once, at
                     compile time, into the tiled layout each tuned kernel reads
                   --[cuda: DLight default schedules for what is left]--> tvm.compile

Weight pre-packing is what MetaSchedule's x86 rules (RewriteLayout) are built for: a tuned
convolution reads its weights in loop order instead of striding through OIHW; on one MBConv
block (1x32x28x28, e6, 32 trials/task) it took the tuned module from 0.81 to 0.49 ms.
Weights kept as runtime inputs (cache-flushing measurements) are pre-packed the same way, on
the host, by the module's lifted `main_transform_params`, so both forms run the same kernels.

`PIPELINE` names this recipe; it is part of every measurement's provenance, so changing the
recipe invalidates measurements taken with another one. /8: on AVX-512, dense convolutions with
a kernel window over at most 16 output columns get 8-accumulator register tiles (2x faster:
ResNet-style 3x3 convolutions at 64 px; `seeds.SMALL_OUTPUT_W`). /7: int8 convolutions get
analytic schedules in the tensorizing design space (VNNI / AVX2 dot products; before, the
default space's schedules failed to build and they ran as naive loops, 5-60x slower than
float32) and small int8 / fp16 conversions are vectorised; float32 kernels are unchanged. /6:
the analytic schedules' design spaces are seeded (before, their compute locations were drawn
anew in every process, so one network compiled to different code each time) and timings are
medians of quiet windows measured twice; every LUT, network and artifact is measured again. /5:
kernels without a tuning record get analytic schedules instead of TVM's naive loop nests (the
MobileNetV2-style 224 net went from 850 ms to about 8 ms on 2 cores), so every untuned LUT,
network and artifact is measured again. /4 changed no kernel: before it, TVM's thread pool held
half the CPUs (see codesign/__init__.py), so x86 measurements labelled with the target's threads
ran on fewer; they are taken again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codesign.errors import BuildError
from codesign.targets import Target
from codesign.tvm_backend.folding import memoized_builds
from codesign.tvm_backend.schedules import schedule_kernels

PIPELINE = "relax-zero-nhwc-prepack/8"


def prepare(mod: Any) -> Any:
    """Legalize, fold constants, fuse and mark weights layout-free: the module whose PrimFuncs
    are the tuning tasks."""
    from tvm import relax

    with memoized_builds():  # FoldConstant's kernels: built once per process (folding.py)
        return relax.transform.AttachAttrLayoutFreeBuffers()(relax.get_pipeline("zero")(mod))


def prepack_weights(mod: Any, params: list[Any]) -> tuple[Any, list[Any]]:
    """Move the weight layout rewrites of tuned kernels out of `main` and run them once.

    Constant weights are rewritten by FoldConstant; weights passed as runtime inputs (`params`,
    numpy) by the lifted `main_transform_params`, compiled and run on the host. Returns the
    module and the params `main` now takes."""
    from tvm import relax

    mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    if params and "num_input" in (mod["main"].attrs or {}):
        mod, params = lift_transform_params(mod, params)
    with memoized_builds():
        mod = relax.transform.FoldConstant()(mod)
    return relax.transform.DeadCodeElimination(["main"])(mod), params


def apply_database(fused: Any, target: Target, database: Any) -> Any:
    """Replace every PrimFunc that has a tuning record for `target` by its best schedule."""
    from tvm import relax

    with target.tvm_target(), database:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)


def lift_transform_params(mod: Any, params: list[Any]) -> tuple[Any, list[Any]]:
    """Lift what `main` computes from its weights alone (`num_input` says where they start)
    into `main_transform_params`, run that once on the host and return `main` without it,
    with the weights it now takes (numpy)."""
    import tvm
    from tvm import relax

    name = "main_transform_params"
    mod = relax.transform.LiftTransformParams()(mod)
    if name not in {gv.name_hint for gv in mod.functions}:
        return mod, params
    func = mod[name]
    host = tvm.IRModule({name: func})
    for gv in relax.analysis.all_global_vars(func):  # the kernels it calls, not main's
        host[gv] = mod[gv]
    vm = relax.VirtualMachine(tvm.compile(host, tvm.target.Target("llvm")), tvm.cpu())
    packed = vm[name]([tvm.runtime.tensor(np.ascontiguousarray(p)) for p in params])
    del mod[name]
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    return mod, [np.asarray(t.numpy()) for t in packed]


@dataclass
class Built:
    """A compiled module and how to call it."""

    executable: Any  # relax.VMExecutable
    target: Target
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    params: list[Any] = field(default_factory=list)  # extra runtime inputs (weights), numpy
    label: str = ""
    tuned: bool = False

    def export(self, path: str | Path) -> Path:
        """Write the shared library (cross-compiled with the target's compiler when it has one)."""
        return export_library(self.executable, self.target, path)


def compile_module(
    lowered: Any, target: Target, database: Any | None = None, *, fused: Any | None = None
) -> Built:
    """Compile a `Lowered` module for `target`, applying `database` if given.

    `fused` may pass `prepare(lowered.mod)` when the caller already has it.
    """
    import tvm

    tvm_target = target.tvm_target()
    try:
        if fused is None:
            fused = prepare(lowered.mod)
        params = list(lowered.params)
        if target.name == "cuda":
            if database is not None:
                fused, params = prepack_weights(apply_database(fused, target, database), params)
            fused = _gpu_default_schedules(fused, tvm_target)
        else:
            fused, params = prepack_weights(schedule_kernels(fused, target, database), params)
        executable = tvm.compile(fused, tvm_target)
    except Exception as err:
        raise BuildError(
            f"TVM could not compile {lowered.label or 'module'} for {target.key}: {err}"
        ) from err
    return Built(
        executable,
        target,
        lowered.input_shape,
        lowered.input_dtype,
        params,
        lowered.label,
        tuned=database is not None,
    )


def _gpu_default_schedules(mod: Any, tvm_target: Any) -> Any:
    from tvm.s_tir import dlight as dl

    with tvm_target:
        return dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )(mod)


def export_library(executable: Any, target: Target, path: str | Path) -> Path:
    """Export a compiled module as a shared library loadable by the plain TVM runtime."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if target.cross_cc:
        import shutil

        from tvm.support import cc

        if shutil.which(target.cross_cc) is None:
            raise BuildError(
                f"cross compiler {target.cross_cc!r} for target {target.key} is not installed; "
                "on Debian: apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
            )
        kwargs["fcompile"] = cc.cross_compiler(target.cross_cc)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        executable.export_library(str(tmp), **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
