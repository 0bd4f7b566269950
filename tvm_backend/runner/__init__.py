"""The runner role: time any compiled module (LUT block, network, artifact library, quantized
network) on a device chosen by one value, `Where`.

base      `Runner` (run(built, protocol) -> Measurement) and `Where` (local, or tracker + key)
timing    the one `time_evaluator` loop (`time_vm`), `run_steady`, `LaterPasses`, `measure_in_passes`, seeded inputs
threads   the TVM runtime thread pool: sizing, checking, keeping the caller's CPU mask
local     `LocalRunner`: this machine
rpc       `RPCRunner`: RPC servers through the farm scheduler; `measure_session` on a session
noise     the host's noise floor: the repeat spread of one module (recorded with every LUT)

Everything is re-exported here: `from codesign.tvm_backend.runner import LocalRunner`.
"""

from codesign.tvm_backend.runner.base import Runner, Where
from codesign.tvm_backend.runner.local import LocalRunner
from codesign.tvm_backend.runner.noise import relative_spread, repeat_spread
from codesign.tvm_backend.runner.rpc import (
    RemoteJob,
    RemoteResult,
    RPCRunner,
    measure_session,
    prepare_job,
)
from codesign.tvm_backend.runner.threads import (
    affinity_kept,
    check_thread_pool,
    set_threads,
    size_thread_pool,
)
from codesign.tvm_backend.runner.timing import (
    FLUSH,
    STEADY_CV,
    LaterPasses,
    measure_in_passes,
    random_input,
    run_delay_s,
    run_steady,
    time_vm,
)

__all__ = [
    "FLUSH",
    "STEADY_CV",
    "LocalRunner",
    "RPCRunner",
    "RemoteJob",
    "RemoteResult",
    "Runner",
    "LaterPasses",
    "Where",
    "affinity_kept",
    "check_thread_pool",
    "measure_session",
    "prepare_job",
    "random_input",
    "relative_spread",
    "repeat_spread",
    "run_delay_s",
    "measure_in_passes",
    "run_steady",
    "set_threads",
    "size_thread_pool",
    "time_vm",
]
