"""Processes by PID: start in a new session, identify by (pid, start time), kill whole trees.

A PID alone can be recycled; `Proc` also records the process start time, so a state file read
by another process (`codesign farm status/down`) never signals a stranger that reuses the PID.
The start time is counted from boot (Linux: /proc/PID/stat), not read off the wall clock:
psutil's `create_time()` adds the *current* boot time, which moves whenever the wall clock is
stepped (NTP, a VM resumed from a pause), and a farm that trusted it took its live servers for
dead, restarted them onto their own busy ports and lost track of the originals.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def start_time(pid: int) -> float:
    """When `pid` started, in seconds: from boot on Linux (immune to wall-clock steps), psutil's
    create_time elsewhere. Raises psutil.NoSuchProcess if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None
    except OSError:
        return psutil.Process(pid).create_time()
    # fields after the command name, which may itself hold spaces and parentheses
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) / _CLOCK_TICKS  # field 22 of proc(5): starttime, in clock ticks


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    started: float  # see `start_time`

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, start_time(pid))

    def handle(self) -> psutil.Process | None:
        """The live process, or None if it exited (or the PID now belongs to another one)."""
        try:
            p = psutil.Process(self.pid)
            if abs(start_time(self.pid) - self.started) > 0.05:
                return None
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    @property
    def alive(self) -> bool:
        return self.handle() is not None

    def tree(self) -> list[psutil.Process]:
        p = self.handle()
        if p is None:
            return []
        try:
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return [p]

    def kill_tree(self, timeout: float = 10.0) -> int:
        """SIGKILL this process and all its descendants; returns how many were signalled."""
        return kill_all(self.tree(), timeout)

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Proc | None:
        if not d or "started" not in d:  # none, or written by an older codesign: unknown
            return None
        return cls(int(d["pid"]), float(d["started"]))


def kill_all(procs: Sequence[psutil.Process], timeout: float = 10.0) -> int:
    """SIGKILL every process in `procs` (stopped ones too) and wait for them to go."""
    n = 0
    for p in procs:
        try:
            p.kill()
            n += 1
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs), timeout=timeout)
    return n


def spawn(
    argv: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Proc]:
    """Start `argv` in its own session (immune to the caller's Ctrl-C), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        fh.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    try:
        return popen, Proc.of(popen.pid)
    except psutil.NoSuchProcess:  # exited at once; still give the caller something to reap
        return popen, Proc(popen.pid, 0.0)


def no_torch_path(state_dir: Path) -> str:
    """A directory whose `torch` package fails to import, for PYTHONPATH of farm processes.

    tvm_ffi imports torch if it can (~2 s per process, twice per RPC server: the server and its
    popen_worker); trackers, servers and measurement workers never use it.
    """
    from codesign.tvm_backend.workers import no_torch_dir

    return no_torch_dir(state_dir / "no-torch")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: readers in other processes never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def append_event(
    state_dir: Path, kind: str, message: str, extra: dict[str, Any] | None = None
) -> None:
    """Append one event line to `state_dir/events.jsonl` (failures, restarts, quarantines)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "kind": kind, "message": message, **(extra or {})})
    with (state_dir / "events.jsonl").open("a") as fh:
        fh.write(line + "\n")


def read_events(state_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events appended since byte `offset`, and the new offset."""
    path = state_dir / "events.jsonl"
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1  # ignore a line being written
    events = []
    for raw in data[:end].splitlines():
        try:
            events.append(json.loads(raw))
        except ValueError:
            continue
    return events, offset + end
