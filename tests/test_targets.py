from __future__ import annotations

import json

import pytest

from codesign.errors import TargetError
from codesign.targets import parse_target


def test_x86_names_a_cpu_and_threads() -> None:
    t = parse_target("x86")
    d = t.tvm_dict
    assert d["kind"] == "llvm" and d["mcpu"] not in ("", "generic", "native")
    assert d["num-cores"] == t.threads >= 1
    assert t.key == f"x86-{d['mcpu']}-t{t.threads}"
    tvm_t = t.tvm_target()  # TVM accepts it
    assert str(tvm_t.attrs["mcpu"]) == d["mcpu"]


def test_options_and_round_trip() -> None:
    t = parse_target("x86:threads=1,mcpu=skylake-avx512")
    assert t.threads == 1 and t.key == "x86-skylake-avx512-t1"
    assert parse_target(t.spec) == t
    arm = parse_target("arm:key=rpi4,tracker=127.0.0.1:9999,threads=4")
    assert arm.is_remote and arm.rpc_key == "rpi4" and arm.tracker == "127.0.0.1:9999"
    assert arm.tvm_dict["mtriple"] == "aarch64-linux-gnu"
    cuda = parse_target("cuda:arch=sm_90")
    assert cuda.tvm_dict == {"kind": "cuda", "arch": "sm_90"}
    json.dumps(cuda.to_dict())


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("tpu", "unknown target 'tpu'; known targets: x86, cuda, arm"),
        ("x86:cores=2", "no option 'cores'"),
        ("x86:threads=0", "positive integer"),
        ("x86:threads", "key=value"),
        ("cuda:arch=volta", "sm_80"),
        ("arm:tracker=nohost", "HOST:PORT"),
        ("", "empty target"),
    ],
)
def test_bad_targets_raise_clear_errors(spec: str, msg: str) -> None:
    with pytest.raises(TargetError, match=msg.replace("(", r"\(")):
        parse_target(spec)
