"""Timing on RPC servers reached through a tracker (boards of a device farm).

    RPCRunner(tracker, key).run(built, protocol) -> Measurement     (or Where.rpc(...).runner())

The module is exported as a shared library (`Built.export`: cross-compiled for ARM), uploaded,
loaded and timed by `time_evaluator` *on the server* (only the result crosses the wire, so RPC
timings match local ones). Every measurement runs as a job of the farm scheduler: a child
process with a deadline, bounded tracker requests, retries on another server for retryable
errors (server killed, connection reset, session timeout, deadline), quarantine of failing
servers. `measure_session` is the part that runs in that child, on an open RPC session.

If the module's output is a tuple the VM result is an opaque RPCObjectRef over RPC, so the
stateful API (`set_input` / `invoke_stateful` / `get_outputs`) is used instead.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codesign.measurement import Measurement, MeasureProtocol
from codesign.tvm_backend.build import Built
from codesign.tvm_backend.runner.base import Runner
from codesign.tvm_backend.runner.threads import size_thread_pool
from codesign.tvm_backend.runner.timing import random_input, time_vm


@dataclass(frozen=True, slots=True)
class RemoteJob:
    """Everything a worker needs to measure one exported library (no TVM objects: picklable)."""

    lib_path: str
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    params_path: str = ""  # .npz with arrays p0, p1, ... passed after the input
    device: str = "cpu"
    threads: int = 1
    protocol: MeasureProtocol = field(default_factory=MeasureProtocol)
    seed: int = 0
    fetch_output: bool = False  # also return the output of one run (for correctness checks)
    input_path: str = ""  # .npy input instead of a seeded random one


@dataclass(frozen=True, slots=True)
class RemoteResult:
    measurement: Measurement
    output: Any = field(default=None, compare=False, hash=False)  # numpy array when fetched


def prepare_job(
    built: Built,
    protocol: MeasureProtocol,
    workdir: str | Path,
    *,
    seed: int = 0,
    fetch_output: bool = False,
    input_array: np.ndarray | None = None,
) -> RemoteJob:
    """Export `built` (and its runtime params) into `workdir` as a RemoteJob."""
    workdir = Path(workdir)
    name = (built.label or "module").replace("/", "_").replace(":", "_")
    lib = built.export(workdir / f"{name}.so")
    params_path = input_path = ""
    if built.params:
        params_path = str(workdir / f"{name}.params.npz")
        arrays: dict[str, Any] = {f"p{i}": np.asarray(p) for i, p in enumerate(built.params)}
        np.savez(params_path, **arrays)
    if input_array is not None:
        input_path = str(workdir / f"{name}.input.npy")
        np.save(input_path, np.ascontiguousarray(input_array))
    return RemoteJob(
        str(lib),
        tuple(built.input_shape),
        built.input_dtype,
        params_path,
        built.target.device,
        built.target.threads,
        protocol,
        seed,
        fetch_output,
        input_path,
    )


def measure_session(remote: Any, job: RemoteJob) -> RemoteResult:
    """Upload, load and time `job` on an open RPC session. Raises on RPC/device errors."""
    import tvm
    from tvm import relax

    remote.upload(job.lib_path)
    rexec = remote.load_module(os.path.basename(job.lib_path))
    cpu = job.device == "cpu"
    dev = remote.cuda(0) if job.device == "cuda" else remote.cpu(0)
    if cpu:
        size_thread_pool(remote.get_function, job.threads, "the RPC server")
    vm = relax.VirtualMachine(rexec, dev)
    x = np.load(job.input_path) if job.input_path else None
    if x is None:
        x = random_input(job.input_shape, job.input_dtype, job.seed)
    args = [tvm.runtime.tensor(x, dev)]
    if job.params_path:
        with np.load(job.params_path) as npz:
            args += [tvm.runtime.tensor(npz[f"p{i}"], dev) for i in range(len(npz.files))]
    out = vm["main"](*args)
    if isinstance(out, tvm.runtime.Tensor):
        output = out.numpy() if job.fetch_output else None
        m = time_vm(vm, dev, args, job.protocol, cpu=cpu)
    else:  # a tuple: opaque over RPC, use the stateful API
        vm.set_input("main", *args)
        vm.invoke_stateful("main")
        output = vm.get_outputs("main")[0].numpy() if job.fetch_output else None
        m = time_vm(vm, dev, args, job.protocol, cpu=cpu, stateful=True)
    return RemoteResult(m, output)


class RPCRunner(Runner):
    """Times modules on the servers of `key` registered on `tracker` (HOST:PORT).

    Each `run` is one farm job (child process, deadline, retries; see codesign.farm.scheduler).
    `emulated=None` asks the local farm's state whether `key` is an emulator.
    """

    def __init__(
        self,
        tracker: str,
        key: str,
        *,
        config: Any = None,  # codesign.farm.config.FarmConfig (timeouts, retries)
        emulated: bool | None = None,
        seed: int = 0,
    ) -> None:
        from codesign.farm.config import load_config
        from codesign.farm.scheduler import key_is_emulated

        self.tracker, self.key, self.seed = tracker, key, seed
        self.config = config or load_config()
        self._emulated = (
            key_is_emulated(self.config, tracker, key) if emulated is None else emulated
        )
        self.last_server = ""

    @property
    def emulated(self) -> bool:
        return self._emulated

    def run(self, built: Built, protocol: MeasureProtocol) -> Measurement:
        return self.run_checked(built, protocol).measurement

    def run_checked(
        self,
        built: Built,
        protocol: MeasureProtocol,
        *,
        input_array: np.ndarray | None = None,
    ) -> RemoteResult:
        """Measure and also fetch the output of one run (to compare with a reference)."""
        from codesign.farm.scheduler import FarmScheduler, Job

        with tempfile.TemporaryDirectory(prefix="codesign-rpc-") as tmp:
            try:
                job = prepare_job(
                    built, protocol, tmp, seed=self.seed, fetch_output=True, input_array=input_array
                )
            except Exception as err:  # export/cross-compile failure: a failed measurement
                return RemoteResult(Measurement.failed(f"{type(err).__name__}: {err}"))
            results = []
            FarmScheduler(self.config).run(
                [Job(built.label or "module", self.key, self.tracker, job)], results.append
            )
        r = results[0]
        self.last_server = r.server
        return RemoteResult(r.measurement, r.output)
