"""An emulated arm64 board: a Debian chroot run under qemu-user, with a TVM RPC server in it.

    ensure_rootfs(spec)   idempotent, resumable setup (docs/tvm-guide.md §3):
        binfmt     register qemu-aarch64 with binfmt_misc (F flag: nothing copied into the chroot)
        stage1     debootstrap --foreign --arch=arm64 --variant=minbase --include=python3
        stage2     /debootstrap/debootstrap --second-stage inside the chroot, under qemu (~3 min)
        wheels     the aarch64 TVM wheels installed with the *host's* pip (--platform, --target):
                   nothing runs pip under emulation
        trim       drop libtvm_compiler.so, tvm/3rdparty and the apt cache (runtime-only TVM)
    server_command(spec, ...)   the argv of an RPC server inside the chroot

Stages 1-2 build in `<root>.partial` and the directory is renamed when the second stage
succeeds, so an interrupted bootstrap restarts cleanly; later steps leave a stamp file each.
Emulated timings are ~30x slower than a real core and do not rank schedules like one: use the
emulator to check that cross-compiled code loads and computes correctly, never to tune.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from codesign.errors import FarmError

DEFAULT_ROOT = Path(
    os.environ.get("CODESIGN_ARM_ROOTFS", Path.home() / ".cache" / "codesign" / "arm64-rootfs")
)
PACKAGES = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "cloudpickle", "psutil")
SITE = "/opt/tvm-site"  # inside the chroot
RUNTIME_EXTRA = f"{SITE}/tvm/lib/libtvm_runtime_extra.so"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
APT_HINT = (
    "install the host tools first (Debian/Ubuntu, as root): apt-get install -y "
    "qemu-user-static debootstrap binfmt-support gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
)


@dataclass(frozen=True, slots=True)
class ArmRootfs:
    """Where the arm64 chroot lives and what goes into it."""

    root: Path = DEFAULT_ROOT
    suite: str = "bookworm"  # its python3 is 3.11: the wheels below are cp311
    mirror: str = ""  # empty: the first Debian URI of this machine's apt sources
    python_version: str = "3.11"
    packages: tuple[str, ...] = PACKAGES

    @property
    def partial(self) -> Path:
        return self.root.with_name(self.root.name + ".partial")

    def stamp(self, step: str) -> Path:
        return self.root / f".codesign-{step}"

    @property
    def ready(self) -> bool:
        return self.stamp("trim").exists()


def missing_tools() -> list[str]:
    tools = ("debootstrap", "qemu-aarch64-static", "chroot", "mount")
    return [t for t in tools if shutil.which(t) is None]


def ensure_binfmt() -> None:
    """Register qemu-aarch64 with binfmt_misc (no systemd here to do it at install time)."""
    entry = BINFMT / "qemu-aarch64"
    if entry.exists():
        return
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], "mount binfmt_misc")
    if entry.exists():
        return
    conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
    if not conf.exists():
        raise FarmError(f"{conf} is missing, so arm64 binaries cannot run here; {APT_HINT}")
    try:
        (BINFMT / "register").write_text(conf.read_text().strip() + "\n")
    except OSError as err:
        raise FarmError(
            f"cannot register qemu-aarch64 with binfmt_misc ({err}); this needs root and a "
            "writable /proc/sys/fs/binfmt_misc (a privileged container)"
        ) from None


def debian_mirror() -> str:
    """The first Debian archive URI in this machine's apt sources."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for uri in re.findall(r"(?:URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            if "security" not in uri and uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def ensure_rootfs(spec: ArmRootfs, log: Callable[[str], None] = print) -> Path:
    """Build (or finish building) the arm64 chroot. Idempotent; returns the root directory."""
    if spec.ready:
        ensure_binfmt()
        return spec.root
    missing = missing_tools()
    if missing:
        raise FarmError(f"missing {', '.join(missing)}; {APT_HINT}")
    if os.geteuid() != 0:
        raise FarmError("building the arm64 chroot needs root (debootstrap, chroot, mount)")
    ensure_binfmt()
    if not spec.root.exists():
        _bootstrap(spec, log)
    if not spec.stamp("wheels").exists():
        log(f"arm64: installing {' '.join(spec.packages)} with the host's pip")
        target = spec.root / SITE.lstrip("/")
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-cache-dir",
                "--target",
                str(tmp),
                "--platform",
                "manylinux_2_28_aarch64",
                "--only-binary=:all:",
                "--python-version",
                spec.python_version,
                "--implementation",
                "cp",
                *spec.packages,
            ],
            "pip install the aarch64 wheels",
        )
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        spec.stamp("wheels").touch()
    if not spec.stamp("trim").exists():
        site = spec.root / SITE.lstrip("/")
        (site / "tvm" / "lib" / "libtvm_compiler.so").unlink(missing_ok=True)
        shutil.rmtree(site / "tvm" / "3rdparty", ignore_errors=True)
        shutil.rmtree(spec.root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        spec.stamp("trim").touch()
    log(f"arm64: rootfs ready at {spec.root}")
    return spec.root


def _bootstrap(spec: ArmRootfs, log: Callable[[str], None]) -> None:
    part = spec.partial
    if part.exists() and not (part / ".codesign-stage1").exists():
        shutil.rmtree(part)  # an interrupted first stage: start over
    if not part.exists():
        mirror = spec.mirror or debian_mirror()
        log(f"arm64: debootstrap stage 1 ({spec.suite} from {mirror}) into {part}")
        part.parent.mkdir(parents=True, exist_ok=True)
        _run(
            [
                "debootstrap",
                "--arch=arm64",
                "--foreign",
                "--variant=minbase",
                "--include=python3",
                spec.suite,
                str(part),
                mirror,
            ],
            "debootstrap (first stage)",
        )
        (part / ".codesign-stage1").touch()
    log("arm64: debootstrap stage 2 under qemu (about 3 minutes)")
    try:
        _run(["chroot", str(part), "/debootstrap/debootstrap", "--second-stage"], "stage 2")
    except FarmError:
        unmount_proc(part)
        shutil.rmtree(part, ignore_errors=True)  # not resumable half-way: the next run restarts
        raise
    unmount_proc(part)
    part.rename(spec.root)


def mount_proc(root: Path) -> None:
    """Mount /proc inside the chroot (psutil and the RPC server's session kill need it)."""
    target = root / "proc"
    if _mounted(target):
        return
    target.mkdir(exist_ok=True)
    _run(["mount", "-t", "proc", "proc", str(target)], f"mount proc in {root}")


def unmount_proc(root: Path) -> None:
    target = root / "proc"
    if _mounted(target):
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True, timeout=30)


def _mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[1] == real for line in lines if len(line.split()) > 1)


def server_command(
    spec: ArmRootfs, *, host: str, port: int, tracker: str, key: str, threads: int
) -> list[str]:
    """argv of a runtime-only TVM RPC server inside the chroot (shares the host's network)."""
    return [
        "chroot",
        str(spec.root),
        "env",
        f"PYTHONPATH={SITE}",
        "TVM_USE_RUNTIME_LIB=1",
        f"TVM_NUM_THREADS={threads}",
        "HOME=/root",
        "/usr/bin/python3",
        "-m",
        "tvm.exec.rpc_server",
        "--host",
        host,
        "--port",
        str(port),
        "--port-end",
        str(port + 1),
        "--tracker",
        tracker,
        "--key",
        key,
        "--load-library",
        RUNTIME_EXTRA,
    ]


def _run(cmd: list[str], what: str, timeout: float = 1800) -> None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FarmError(f"{what} took over {timeout:.0f} s and was stopped; run it again") from None
    except OSError as err:
        raise FarmError(f"{what} could not start ({err}); {APT_HINT}") from None
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-8:]
        raise FarmError(f"{what} failed (exit {out.returncode}):\n  " + "\n  ".join(tail))
