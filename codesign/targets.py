"""Hardware targets: a TVM target plus how to reach the device that runs it.

A target is named by a short spec string, `NAME[:opt=value,...]`:

    x86                       this machine's CPU, mcpu detected (e.g. znver2), all cores
    x86:threads=1             ... measured with one runtime thread
    x86:mcpu=skylake-avx512   ... for a named CPU (override the detection)
    cuda                      a CUDA GPU; arch detected with nvidia-smi, else sm_80
    cuda:arch=sm_90
    arm                       a 64-bit ARM board reached through an RPC tracker (key arm64)
    arm:key=rpi4,tracker=10.0.0.5:9190,mcpu=cortex-a72,threads=4

`{"kind":"llvm"}` alone compiles for generic x86-64 (SSE only) and the wheel's LLVM rejects
`mcpu=native`, so the x86 target always names a CPU. Override detection for a whole run with
the environment variable CODESIGN_X86_MCPU.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codesign.errors import TargetError

KNOWN = ("x86", "cuda", "arm")
_OPTIONS = {
    "x86": ("mcpu", "threads"),
    "cuda": ("arch",),
    "arm": ("key", "tracker", "mcpu", "threads", "cc"),
}


@dataclass(frozen=True, slots=True)
class Target:
    """A named target. `tvm_json` is the TVM target dict as canonical JSON (hashable)."""

    name: str
    tvm_json: str
    device: str  # "cpu" or "cuda" (device type on the machine that runs the code)
    threads: int
    rpc_key: str | None = None
    tracker: str | None = None  # "host:port" of the RPC tracker that serves rpc_key
    cross_cc: str | None = None  # cross compiler used to link exported libraries
    options: tuple[tuple[str, str], ...] = field(default=())

    @property
    def tvm_dict(self) -> dict[str, Any]:
        return json.loads(self.tvm_json)

    @property
    def spec(self) -> str:
        """The spec string that recreates this target."""
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)

    @property
    def key(self) -> str:
        """Stable identity used to key measurements: what was compiled, for what, how many threads."""
        d = self.tvm_dict
        if self.name == "x86":
            return f"x86-{d.get('mcpu', 'generic')}-t{self.threads}"
        if self.name == "cuda":
            return f"cuda-{d.get('arch', 'unknown')}"
        return f"arm-{d.get('mcpu', 'generic')}-t{self.threads}-{self.rpc_key}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.tvm_json.encode()).hexdigest()[:16]

    @property
    def is_remote(self) -> bool:
        return self.rpc_key is not None

    def tvm_target(self) -> Any:
        import tvm

        return tvm.target.Target(self.tvm_dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "key": self.key,
            "tvm": self.tvm_dict,
            "device": self.device,
            "threads": self.threads,
            "rpc_key": self.rpc_key,
            "tracker": self.tracker,
            "cross_cc": self.cross_cc,
        }


def _canonical(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=1)
def host_cpu() -> str:
    """The host CPU name as LLVM knows it (e.g. 'znver2', 'sapphirerapids'), checked against the
    features /proc/cpuinfo reports (`codesign.host_cpu`: hypervisors can report a stand-in model).

    Detecting it loads TVM (seconds), so the answer is cached on disk, keyed by the CPU's
    identity in /proc/cpuinfo, the TVM version and the candidate list (see `_host_cpu_cache`)."""
    env = os.environ.get("CODESIGN_X86_MCPU")
    if env:
        return env
    cache, key = _host_cpu_cache()
    if cache is not None:
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key and isinstance(stored.get("cpu"), str):
                return stored["cpu"]
        except (OSError, ValueError, AttributeError):
            pass
    cpu = _detect_host_cpu()
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "cpu": cpu}))
            tmp.replace(cache)
        except OSError:
            pass
    return cpu


def _detect_host_cpu() -> str:
    from tvm.target import codegen

    from codesign.host_cpu import CANDIDATES, best_cpu, host_features, vendor

    cpu = str(codegen.llvm_get_system_cpu())
    cpu = cpu if cpu and cpu != "generic" else "x86-64-v2"
    return best_cpu(cpu, host_features(), CANDIDATES[vendor(cpu)])


def _host_cpu_cache() -> tuple[Path | None, str]:
    """Where the detected host CPU is cached (None: not cacheable here) and the key it is valid
    for: the first CPU's vendor, family, model, name and flags, the TVM version, the candidates.
    CODESIGN_CACHE_DIR overrides the directory ($XDG_CACHE_HOME/codesign, ~/.cache/codesign)."""
    import importlib.metadata

    from codesign.host_cpu import CANDIDATES, KEY_FEATURES

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, ""
    ident = []
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block only
        name = line.partition(":")[0].strip()
        if name in ("vendor_id", "cpu family", "model", "model name", "flags"):
            ident.append(line)
    try:
        tvm_version = importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return None, ""
    key = hashlib.sha256(
        json.dumps([ident, tvm_version, CANDIDATES, KEY_FEATURES], sort_keys=True).encode()
    ).hexdigest()[:32]
    from codesign.paths import cache_dir

    return cache_dir() / "host_cpu.json", key


def _cuda_arch() -> str:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            if out:
                return "sm_" + out[0].replace(".", "")
        except (subprocess.SubprocessError, OSError):
            pass
    return "sm_80"


# CUDA compute capabilities of real GPUs (nvcc's -arch names; "a" = arch-specific features).
CUDA_ARCHS = (
    "sm_50", "sm_52", "sm_53", "sm_60", "sm_61", "sm_62", "sm_70", "sm_72", "sm_75", "sm_80",
    "sm_86", "sm_87", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_100a", "sm_101", "sm_101a",
    "sm_103", "sm_103a", "sm_110", "sm_110a", "sm_120", "sm_120a", "sm_121", "sm_121a",
)  # fmt: skip

_TRIPLES = {"x86": None, "arm": "aarch64-linux-gnu"}


@functools.cache
def llvm_cpus(name: str) -> tuple[str, ...]:
    """CPU names this TVM's LLVM accepts for target `name` ('x86' or 'arm'); () if unknown."""
    import tvm
    from tvm.target import codegen

    d: dict[str, Any] = {"kind": "llvm"}
    if _TRIPLES[name]:
        d["mtriple"] = _TRIPLES[name]
    try:
        return tuple(sorted(str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target(d))))
    except Exception:  # noqa: BLE001 - a TVM without LLVM: nothing to check against
        return ()


def _check_mcpu(name: str, mcpu: str) -> None:
    """Refuse an mcpu LLVM does not know (LLVM itself only warns and compiles generic code)."""
    cpus = llvm_cpus(name)
    if not cpus or mcpu in cpus:
        return
    close = difflib.get_close_matches(mcpu, cpus, n=4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TargetError(
        f"mcpu={mcpu!r} is not a CPU LLVM knows for {name}; {hint}list the valid names with "
        f"`codesign targets --cpus {name}`"
    )


def _positive_int(name: str, value: str) -> int:
    if not re.fullmatch(r"[1-9]\d*", value):
        raise TargetError(f"target option {name}={value!r} must be a positive integer")
    return int(value)


def parse_target(spec: str | Target) -> Target:
    """Resolve a target spec string (see the module docstring) to a Target."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise TargetError(f"empty target; choose one of {', '.join(KNOWN)}")
    name, _, rest = spec.strip().partition(":")
    if name not in KNOWN:
        raise TargetError(
            f"unknown target {name!r}; known targets: {', '.join(KNOWN)} "
            "(run `codesign targets` to see them with their TVM target JSON)"
        )
    opts: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq or not v:
            raise TargetError(f"target option {item!r} in {spec!r} must look like key=value")
        if k not in _OPTIONS[name]:
            raise TargetError(
                f"target {name!r} has no option {k!r}; its options are {', '.join(_OPTIONS[name])}"
            )
        opts[k] = v
    options = tuple(sorted(opts.items()))
    if name == "x86":
        threads = _positive_int("threads", opts["threads"]) if "threads" in opts else host_threads()
        if "mcpu" in opts:
            _check_mcpu("x86", opts["mcpu"])
        d = {"kind": "llvm", "mcpu": opts.get("mcpu") or host_cpu(), "num-cores": threads}
        return Target("x86", _canonical(d), "cpu", threads, options=options)
    if name == "cuda":
        arch = opts.get("arch") or _cuda_arch()
        if not re.fullmatch(r"sm_\d+[a-z]?", arch):
            raise TargetError(f"cuda arch {arch!r} must look like sm_80")
        if "arch" in opts and arch not in CUDA_ARCHS:
            raise TargetError(
                f"cuda arch {arch!r} is not a real GPU architecture; known: {', '.join(CUDA_ARCHS)} "
                "(`nvidia-smi --query-gpu=compute_cap --format=csv` gives a GPU's, e.g. 8.6 = sm_86)"
            )
        d = {"kind": "cuda", "arch": arch}
        return Target("cuda", _canonical(d), "cuda", 1, options=options)
    threads = _positive_int("threads", opts["threads"]) if "threads" in opts else 4
    d = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": threads}
    if "mcpu" in opts:
        _check_mcpu("arm", opts["mcpu"])
        d["mcpu"] = opts["mcpu"]
    tracker = opts.get("tracker", "127.0.0.1:9190")
    if not re.fullmatch(r"[\w.-]+:\d+", tracker):
        raise TargetError(f"tracker {tracker!r} must look like HOST:PORT")
    if not 1 <= int(tracker.rpartition(":")[2]) <= 65535:
        raise TargetError(f"tracker {tracker!r}: the port must be between 1 and 65535")
    return Target(
        "arm",
        _canonical(d),
        "cpu",
        threads,
        rpc_key=opts.get("key", "arm64"),
        tracker=tracker,
        cross_cc=opts.get("cc", "aarch64-linux-gnu-gcc"),
        options=options,
    )


@functools.cache
def host_threads() -> int:
    """CPUs this process may use, read once (TVM's thread pool later pins threads)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def known_targets() -> list[Target]:
    """The default target of every known name, resolved on this machine."""
    return [parse_target(n) for n in KNOWN]
