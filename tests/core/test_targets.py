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


SPR_UNDER_KVM = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 167\n"
    "flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_vnni "
    "avx512_bf16 avx512ifma avx512vbmi avx_vnni amx_bf16 avx512_fp16 amx_tile amx_int8\n"
)


def test_host_cpu_follows_the_features_not_the_model_number() -> None:
    """A KVM guest reporting Rocket Lake's model with Sapphire Rapids' features (this machine's
    case) gets sapphirerapids: LLVM's feature tables decide, so fp16 and AMX are not lost."""
    from codesign.host_cpu import CANDIDATES, best_cpu, cpu_features, host_features

    host = host_features(SPR_UNDER_KVM)
    assert {"avx512fp16", "amx-int8", "avx512vnni"} <= host
    assert "avx512fp16" not in cpu_features("rocketlake")
    assert best_cpu("rocketlake", host, CANDIDATES["intel"]) == "sapphirerapids"
    # graniterapids adds amx-fp16, which this host lacks: never chosen
    assert "amx-fp16" in cpu_features("graniterapids")


def test_host_cpu_keeps_the_detected_name_or_steps_down() -> None:
    from codesign.host_cpu import CANDIDATES, best_cpu, host_features

    zen2 = host_features("flags\t: sse avx avx2 fma f16c\n")
    assert best_cpu("znver2", zen2, CANDIDATES["amd"]) == "znver2"
    # a hypervisor that hides AVX-512 from a Skylake-SP: the detected name would emit it
    hidden = host_features("flags\t: sse avx avx2 fma f16c\n")
    assert best_cpu("skylake-avx512", hidden, CANDIDATES["intel"]) in ("haswell", "broadwell")
    assert best_cpu("znver2", None, CANDIDATES["amd"]) == "znver2"  # no /proc/cpuinfo
    assert host_features("no flags here") is None


def test_x86_target_on_this_host_has_every_feature_the_cpu_reports() -> None:
    from codesign.host_cpu import cpu_features, host_features
    from codesign.targets import host_cpu

    host = host_features()
    if host is None:
        pytest.skip("no /proc/cpuinfo")
    assert cpu_features(host_cpu()) <= host
