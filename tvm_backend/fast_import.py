"""Import `tvm.s_tir.tensor_intrin` in seconds rather than a minute.

The main process must import it (the x86/CUDA schedule rules reference its intrinsics). It is
slow because every TVMScript `@prim_func` calls `inspect.stack()`, which resolves the source
module of every outer frame by scanning `sys.modules` (huge once torch is loaded).
`import_intrinsics` imports it with a stack walk that resolves source only where TVMScript
reads it (~50 s -> ~5 s).
"""

from __future__ import annotations

import contextlib
import inspect
import sys


@contextlib.contextmanager
def _shallow_inspect_stack(depth: int = 3):
    """Make `inspect.stack()` compute source context for the innermost `depth` frames only.

    TVMScript's `prim_func` uses the stack for frame objects (closure lookup) and reads the
    source line of frame 2 only (`is_defined_in_class`); the rest of the work is wasted.
    """
    original = inspect.stack

    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frame = sys._getframe(1)
        out: list[inspect.FrameInfo] = []
        while frame is not None:
            if len(out) < depth:
                info = inspect.getframeinfo(frame, context)
                out.append(inspect.FrameInfo(frame, *info, positions=info.positions))
            else:
                code = frame.f_code
                out.append(
                    inspect.FrameInfo(
                        frame, code.co_filename, frame.f_lineno, code.co_name, None, None
                    )
                )
            frame = frame.f_back
        return out

    inspect.stack = stack
    try:
        yield
    finally:
        inspect.stack = original


def import_intrinsics() -> None:
    """Import `tvm.s_tir.tensor_intrin` (needed by the x86/CUDA schedule rules) quickly."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with _shallow_inspect_stack():
        import tvm.s_tir.tensor_intrin  # noqa: F401
