"""Executors run a compiled library: `run(x) -> y` for one input, `time(x, protocol)`.

`LocalExecutor` loads the library into this process (CPU or CUDA). `RemoteExecutor`
(codesign.artifact.remote) runs it on an RPC server. Both load the exported library file, i.e.
exactly what the artifact ships, never the in-memory compiler output.
"""

from __future__ import annotations

import abc
import threading
from pathlib import Path
from typing import Any

import numpy as np

from codesign.artifact.manifest import host_machine
from codesign.errors import ArtifactError
from codesign.measurement import Measurement, MeasureProtocol
from codesign.tvm_backend.runner import affinity_kept, set_threads, time_vm


class Executor(abc.ABC):
    """Runs one compiled library on one device."""

    where: str = ""  # human-readable description of the device
    emulated: bool | None = False  # None: unknown (an RPC server may be an emulator)

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Output of `main` for one input of the compiled shape and dtype."""

    @abc.abstractmethod
    def time(self, x: np.ndarray, protocol: MeasureProtocol) -> Measurement:
        """Time `main` on the device with TVM's time_evaluator; never raises (see .error)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device resources."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_numpy(value: Any) -> np.ndarray:
    """A VM result as numpy: a tensor, or the single tensor of a 1-tuple."""
    if hasattr(value, "numpy"):
        return value.numpy()
    if isinstance(value, list | tuple) or hasattr(value, "__getitem__"):
        return to_numpy(value[0])
    raise ArtifactError(f"unexpected output of type {type(value).__name__} from the library")


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary (TVM
    takes a DLPack view of nothing less aligned)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def parse_device(device: str) -> tuple[str, int]:
    """'cpu', 'cuda' or 'cuda:N' -> (kind, index)."""
    kind, _, idx = device.partition(":")
    if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()):
        raise ArtifactError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    return kind, int(idx or 0)


class LocalExecutor(Executor):
    """Loads the library file with `tvm.runtime.load_module` into this process."""

    def __init__(
        self,
        library: str | Path,
        *,
        machine: str,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        import tvm
        from tvm import relax

        if machine != host_machine():
            raise ArtifactError(
                f"this library is built for {machine} and cannot load on this {host_machine()} "
                "machine; run it on a device of that kind (`codesign run --rpc-key KEY "
                "--tracker HOST:PORT`, or codesign.artifact.remote.run_on_session)"
            )
        kind, index = parse_device(device)
        self.dev = tvm.cuda(index) if kind == "cuda" else tvm.cpu(index)
        if kind == "cuda" and not self.dev.exist:
            raise ArtifactError(
                "no CUDA device on this machine; load the artifact with device='cpu'"
            )
        if kind == "cpu" and threads:
            set_threads(threads)
        self.kind = kind
        self.threads = threads
        self.where = f"local {kind}:{index} ({host_machine()}, {threads or 'default'} threads)"
        self.emulated = False
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.dev)
        # The hot path of predict(x), measured on a 0.09 ms network: tvm.runtime.tensor(x)
        # cost 37 us and Tensor.numpy() 13 us; a DLPack view of an aligned staging array kept
        # between calls costs 1 us each way. The function is looked up once.
        self._main = self.vm["main"]
        self._stage_array = np.empty(0, np.float32)  # no input has this shape: staged on use
        self._stage_tensor: Any = None
        self._lock = threading.Lock()  # one call at a time: the staging array is shared
        self._pool_started = False

    def _restage(self, x: np.ndarray) -> None:
        import tvm

        self._stage_array = aligned_empty(x.shape, x.dtype)
        self._stage_tensor = tvm.runtime.from_dlpack(self._stage_array)

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.kind != "cpu":
            import tvm

            with affinity_kept():
                return to_numpy(self._main(tvm.runtime.tensor(x, self.dev)))
        with self._lock:
            if self._stage_array.shape != x.shape or self._stage_array.dtype != x.dtype:
                self._restage(x)
            np.copyto(self._stage_array, x)
            if self._pool_started:
                out = self._main(self._stage_tensor)
            else:  # the pool starts on the first call and may pin this thread then, not later
                with affinity_kept():
                    out = self._main(self._stage_tensor)
                self._pool_started = True
            if hasattr(out, "__dlpack__"):
                return np.from_dlpack(out).copy()
            return to_numpy(out)

    def time(self, x: np.ndarray, protocol: MeasureProtocol) -> Measurement:
        with affinity_kept():
            return self._time(x, protocol)

    def _time(self, x: np.ndarray, protocol: MeasureProtocol) -> Measurement:
        import tvm

        try:
            args = [tvm.runtime.tensor(x, self.dev)]
            return time_vm(self.vm, self.dev, args, protocol, cpu=self.kind == "cpu")
        except Exception as err:  # device-side failure: report, do not raise
            return Measurement.failed(f"{type(err).__name__}: {err}")
