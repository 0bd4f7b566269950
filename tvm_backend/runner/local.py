"""Timing on this machine's CPU (or GPU for cuda targets) with the target's runtime threads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from codesign.measurement import Measurement, MeasureProtocol
from codesign.tvm_backend.runner.base import Runner
from codesign.tvm_backend.runner.threads import affinity_kept, set_threads
from codesign.tvm_backend.runner.timing import random_input, time_vm

if TYPE_CHECKING:
    from codesign.tvm_backend.build import Built


class LocalRunner(Runner):
    """Runs on this machine's CPU (or GPU for cuda targets) with `threads` runtime threads."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def run(self, built: Built, protocol: MeasureProtocol) -> Measurement:
        with affinity_kept():
            return self._run(built, protocol)

    def _run(self, built: Built, protocol: MeasureProtocol) -> Measurement:
        import tvm
        from tvm import relax

        cpu, cuda = built.target.device == "cpu", built.target.device == "cuda"
        if cpu:
            set_threads(built.target.threads)  # a misconfigured pool raises: nothing to record
        try:
            dev = tvm.cuda(0) if cuda else tvm.cpu(0)
            if cuda and not dev.exist:
                return Measurement.failed("no CUDA device on this machine")
            vm = relax.VirtualMachine(built.executable, dev)
            x = random_input(built.input_shape, built.input_dtype, self.seed)
            args = [tvm.runtime.tensor(x, dev)]
            args += [tvm.runtime.tensor(p, dev) for p in built.params]
            return time_vm(vm, dev, args, protocol, cpu=cpu)
        except Exception as err:  # device-side failure: report, do not raise
            return Measurement.failed(f"{type(err).__name__}: {err}")
