"""Compilation: one recipe, used for LUT blocks, measured networks and shipped artifacts alike.

    Relax IRModule --zero pipeline--> fused module (one PrimFunc per fused op = tuning tasks)
                   --MetaScheduleApplyDatabase (tuned builds)--> scheduled PrimFuncs
                   --[cuda: DLight default schedules for what is left]--> tvm.compile

`PIPELINE` names this recipe; it is part of every measurement's provenance, so changing the
recipe invalidates measurements taken with another one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codesign.errors import BuildError
from codesign.targets import Target

PIPELINE = "relax-zero-nchw/1"


def prepare(mod: Any) -> Any:
    """Legalize, fold constants and fuse: the module whose PrimFuncs are the tuning tasks."""
    from tvm import relax

    return relax.get_pipeline("zero")(mod)


def apply_database(fused: Any, target: Target, database: Any) -> Any:
    """Replace every PrimFunc that has a tuning record for `target` by its best schedule."""
    from tvm import relax

    with target.tvm_target(), database:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)


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
        if database is not None:
            fused = apply_database(fused, target, database)
        if target.name == "cuda":
            fused = _gpu_default_schedules(fused, tvm_target)
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
        list(lowered.params),
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
