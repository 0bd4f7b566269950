"""Constant folding whose kernels are compiled once per process, not once per weight.

Relax's `FoldConstant` computes every constant subexpression of a module (the weight layout
transforms: OIHW -> OHWI at lowering, the tiled layouts of scheduled kernels at pre-packing)
by building its PrimFunc with LLVM through TVM's global `tirx.build`, one build (~30 ms) per
transform. The blocks of a LUT and the networks made of them repeat the same transforms (same
shapes), so a process compiling them rebuilt the same kernels hundreds of times: on the EMR
guest, `prepare` took 2.3 s and `prepack_weights` 2.0 s of a `tiny` network's 7 s compile.

`memoized_builds()` puts a bounded memo in front of `tirx.build` while it is active: a PrimFunc
module structurally equal to one built before, for the same target and pipeline, gets the
runtime module built then. The folded values are what the same kernel computes, so modules
compile to the same code (tests/tvm_backend/test_folding.py). Measured there: 0.4-0.6 s for
each of the two steps once the first network is compiled.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MAX_MODULES = 2048  # built kernels kept (each a few KB of machine code)

_lock = threading.RLock()
_depth = 0
_memo: OrderedDict[tuple[int, str, str], tuple[Any, Any]] = OrderedDict()
_counts = {"hits": 0, "builds": 0}


@dataclass(frozen=True, slots=True)
class FoldStats:
    """Folding kernels answered from the memo (`hits`) and built (`builds`) in this process."""

    hits: int
    builds: int


def fold_stats() -> FoldStats:
    with _lock:
        return FoldStats(**_counts)


def _python_build() -> Any:
    return importlib.import_module("tvm.tirx.build").build


def _memoized(mod: Any, target: Any = None, pipeline: Any = "default") -> Any:
    import tvm
    import tvm_ffi

    module = mod if isinstance(mod, tvm.IRModule) else tvm.IRModule.from_expr(mod)
    key = (tvm_ffi.structural_hash(module), str(target), str(pipeline))
    with _lock:
        hit = _memo.get(key)
        if hit is not None and tvm_ffi.structural_equal(hit[0], module):
            _memo.move_to_end(key)
            _counts["hits"] += 1
            return hit[1]
    built = _python_build()(mod, target, pipeline)
    with _lock:
        _memo[key] = (module, built)
        _counts["builds"] += 1
        while len(_memo) > MAX_MODULES:
            _memo.popitem(last=False)
    return built


@contextlib.contextmanager
def memoized_builds() -> Iterator[None]:
    """While active (re-entrant), TVM's `tirx.build` answers repeated kernels from the memo;
    TVM's own builder is registered again on exit."""
    import tvm

    global _depth
    with _lock:
        if _depth == 0:
            tvm.register_global_func("tirx.build", _memoized, override=True)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                tvm.register_global_func("tirx.build", _python_build(), override=True)
