"""Which LLVM CPU name describes this machine: the detected name, checked against the features
the CPU actually reports.

LLVM names the host from its CPUID family/model. Under a hypervisor the model can be a stand-in
(seen here: a KVM guest reporting model 167, "rocketlake", with Sapphire Rapids' AVX-512 FP16,
AMX and AVX-VNNI), so the detected name can lack features the CPU has — and then fp16 is not on
the precision menu and LLVM never emits those instructions — or, when a hypervisor hides some,
name features the CPU lacks. `best_cpu` keeps the detected name unless another CPU of the same
vendor has strictly more of the key ISA features while having none the host lacks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# ISA features that change code generation or the precision menu (LLVM spelling).
KEY_FEATURES = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16",
    "avx512fp16", "avx512ifma", "avx512vbmi", "avxvnni", "amx-int8", "amx-bf16", "amx-fp16",
)  # fmt: skip

# /proc/cpuinfo flag -> LLVM feature name, where they differ.
_CPUINFO = {
    "avx512_vnni": "avx512vnni",
    "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16",
    "avx_vnni": "avxvnni",
    "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
    "amx_fp16": "amx-fp16",
}

# Candidates per vendor, oldest first (ties go to the older, more conservative name).
CANDIDATES = {
    "intel": (
        "haswell", "broadwell", "skylake", "skylake-avx512", "cascadelake", "cooperlake",
        "icelake-server", "rocketlake", "tigerlake", "alderlake", "sapphirerapids",
        "emeraldrapids", "graniterapids",
    ),
    "amd": ("znver1", "znver2", "znver3", "znver4", "znver5"),
}  # fmt: skip


def host_features(cpuinfo: str | None = None) -> frozenset[str] | None:
    """Key features from /proc/cpuinfo's first `flags` line; None where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = line.partition(":")[2].split()
            return frozenset(_CPUINFO.get(f, f) for f in flags) & frozenset(KEY_FEATURES)
    return None


def cpu_features(mcpu: str) -> frozenset[str]:
    """Key features LLVM enables for `mcpu` (empty for a name this LLVM does not know)."""
    import tvm
    from tvm.target import codegen

    try:
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        return frozenset(codegen.llvm_get_cpu_features(target)) & frozenset(KEY_FEATURES)
    except Exception:  # noqa: BLE001 - an unknown CPU name is simply not a candidate
        return frozenset()


def best_cpu(
    detected: str, host: frozenset[str] | None, candidates: Iterable[str], features=cpu_features
) -> str:
    """`detected`, or the candidate with the most key features that are all on the host."""
    if host is None:
        return detected
    det = features(detected)
    best, best_n = (detected, len(det)) if det <= host else ("", -1)
    for cpu in candidates:
        f = features(cpu)
        if f and f <= host and len(f) > best_n:
            best, best_n = cpu, len(f)
    return best or detected


def vendor(detected: str) -> str:
    return "amd" if detected.startswith(("znver", "bdver", "btver")) else "intel"


def machine_facts() -> dict[str, object]:
    """The host as measurements record it: CPU model name, CPUs this process may use, load
    average (1, 5, 15 min)."""
    import os
    from pathlib import Path

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    return {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "loadavg": load}
