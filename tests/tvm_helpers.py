"""Helpers for the lowering tests: run a compiled module on this CPU."""

from __future__ import annotations

import numpy as np


def run_built(built, x: np.ndarray) -> np.ndarray:
    """`main` of a `Built` module on the CPU, with its runtime weights after the input."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(built.executable, dev)
    args = [tvm.runtime.tensor(x, dev)] + [tvm.runtime.tensor(p, dev) for p in built.params]
    return vm["main"](*args).numpy()
