"""TVM's runtime thread pool holds as many threads as the target says it is measured with.

TVM sizes the pool once, when it first runs, from TVM_NUM_THREADS, or else from half the CPUs
on x86; importing codesign sizes it to the CPUs the process may use, and a pool smaller than a
target's threads is refused instead of measuring on fewer threads than recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from codesign.targets import host_threads

_PROBE = (
    "import codesign, tvm\n"
    "from codesign.targets import host_threads\n"
    "print(tvm.get_global_func('runtime.NumThreads')(), host_threads())\n"
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**clean, **env},
    )  # fmt: skip


def test_importing_codesign_sizes_the_pool_to_this_process_cpus() -> None:
    out = _python(_PROBE)
    assert out.returncode == 0, out.stderr
    pool, cpus = map(int, out.stdout.split())
    assert pool == cpus == host_threads()


def test_a_pool_size_the_user_chose_is_kept() -> None:
    out = _python(_PROBE, TVM_NUM_THREADS="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "1"


@pytest.mark.skipif(host_threads() < 2, reason="needs two CPUs")
def test_a_pool_smaller_than_the_target_is_refused_with_what_to_do() -> None:
    code = (
        "from codesign.errors import TargetError\n"
        "from codesign.tvm_backend.runner import set_threads\n"
        "set_threads(1)\n"
        "try:\n"
        "    set_threads(2)\n"
        "except TargetError as err:\n"
        "    print('refused:', err)\n"
    )
    out = _python(code, TVM_NUM_THREADS="1")
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "TVM_NUM_THREADS=2" in out.stdout, out.stdout
