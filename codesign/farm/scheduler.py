"""The farm scheduler: measurement jobs spread over the RPC servers of their keys, fault-tolerant.

    FarmScheduler(config).run(jobs, on_result) -> SchedulerReport

* `jobs` is any iterable (a generator that compiles lazily is fine: it is pulled only as
  capacity frees up). Each job names its tracker and key; several keys run side by side.
* Capacity per key = servers registered for it on the tracker, minus quarantined ones. The first
  job of a key with no registered server raises NoServerError at once (TVM would wait forever).
* Every job runs in a worker child process (codesign.farm.worker). Tracker requests are bounded
  (`timeouts.request`); once the tracker assigns a server the job has `timeouts.job` seconds,
  then the worker's process tree is killed by PID.
* Errors are classified: retryable ones (server shut down, connection reset or refused, session
  timeout, deadline, no free server) are retried, on another server when there is one, up to
  `retries.attempts` tries; others (load or numerics errors) become a failed Measurement at once.
  While the tracker is unreachable nothing is dispatched; after `timeouts.tracker_wait` s the run
  stops with FarmError (results already delivered are kept).
* A server accumulating `retries.quarantine_after` consecutive failures is quarantined for
  `timeouts.quarantine` s (a deadline, i.e. a hang, quarantines at once): it gets no jobs, and a
  `quarantine` event in state_dir/events.jsonl makes the supervisor restart it.
* `on_result` is called in the caller's thread as each job finishes, exactly once per job, so
  results can be committed as they arrive (a crash loses only the jobs in flight).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from codesign.errors import FarmError
from codesign.farm.config import FarmConfig, load_config
from codesign.farm.procs import Proc, append_event, no_torch_path, read_json
from codesign.farm.tracker import Summary, TrackerClient, TrackerUnavailable, parse_addr
from codesign.farm.worker import WorkerLimits
from codesign.measurement import Measurement

RETRYABLE = (
    "kShutdown",
    "Connection reset",
    "connection reset",
    "Connection refused",
    "RPCSessionTimeoutError",
    "session has expired",
    "SockChannel",
    "Broken pipe",
    "only quarantined",
    "closed the connection",
    "cannot find server that matches",  # connected after the server renewed its match key
)


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    key: str
    tracker: str  # HOST:PORT
    payload: Any  # codesign.tvm_backend.runner.RemoteJob


@dataclass(frozen=True, slots=True)
class JobResult:
    job: Job
    measurement: Measurement
    server: str  # host:port of the server that produced it ("" if none did)
    attempts: int
    errors: tuple[str, ...] = ()
    output: Any = field(default=None, compare=False, hash=False)


@dataclass
class SchedulerReport:
    jobs: int = 0
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    deadlines: int = 0
    quarantined: list[str] = field(default_factory=list)
    per_server: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)


def classify(err_type: str, message: str) -> str:
    """'tracker' (wait for it), 'retry' (another server may succeed) or 'fatal'."""
    if err_type == "TrackerUnavailable":
        return "tracker"
    if err_type == "RequestTimeout":
        return "retry"
    text = f"{err_type}: {message}"
    return "retry" if any(s in text for s in RETRYABLE) else "fatal"


def key_is_emulated(cfg: FarmConfig, tracker: str, key: str) -> bool:
    """Whether the servers of `key` on `tracker` are emulators, per the local farm's records."""
    state = read_json(cfg.state_dir / "state.json")
    if state and state.get("tracker", {}).get("addr") == tracker:
        return any(s["key"] == key and s.get("emulated") for s in state.get("servers", []))
    group = cfg.group(key)
    return bool(group and group.emulated and cfg.tracker == tracker)


@dataclass
class _Pending:
    job: Job
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    servers: list[str] = field(default_factory=list)  # servers it failed on


@dataclass
class _Worker:
    popen: subprocess.Popen
    conn: Connection
    proc: Proc
    state: str = "starting"  # starting | idle | busy
    task: _Pending | None = None
    server: str = ""
    deadline: float = 0.0

    def kill(self, grace: float = 0.0) -> None:
        """Stop the worker: with `grace`, let an idle one exit on EOF first; then SIGKILL."""
        self.conn.close()
        if grace:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        self.proc.kill_tree(timeout=5.0)
        self.popen.wait(timeout=5.0)


class FarmScheduler:
    def __init__(self, config: FarmConfig | None = None, *, max_workers: int = 8) -> None:
        self.cfg = config or load_config()
        self.max_workers = max_workers
        self.failures: dict[str, int] = {}  # consecutive failures per server
        self.quarantine: dict[str, float] = {}  # server -> until
        self.summaries: dict[str, Summary] = {}
        self.down_since: dict[str, float] = {}  # tracker -> first failed summary
        self.starved_since: dict[tuple[str, str], float] = {}
        self.checked: set[tuple[str, str]] = set()
        self.report = SchedulerReport()
        t = self.cfg.timeouts
        self.limits = WorkerLimits(t.socket, t.request, t.session)

    # ------------------------------------------------------------------ run
    def run(self, jobs: Iterable[Job], on_result: Callable[[JobResult], None]) -> SchedulerReport:
        it = iter(jobs)
        queue: deque[_Pending] = deque()
        workers: list[_Worker] = []
        exhausted = False
        last_refresh = 0.0
        try:
            while True:
                while not exhausted and len(queue) < self._capacity_total(queue) + 1:
                    try:
                        job = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    self.check(job.tracker, job.key)
                    queue.append(_Pending(job))
                    self.report.jobs += 1
                busy = [w for w in workers if w.state == "busy"]
                if exhausted and not queue and not busy:
                    return self.report
                if time.monotonic() - last_refresh > 1.0:
                    self._refresh(
                        {p.job.tracker for p in queue}
                        | {w.task.job.tracker for w in busy if w.task}
                    )
                    last_refresh = time.monotonic()
                self._scale(workers, queue)
                self._dispatch(workers, queue)
                self._poll(workers, queue, on_result)
        finally:
            for w in workers:
                w.kill(grace=2.0 if w.state == "idle" else 0.0)

    # ------------------------------------------------------------------ capacity
    def check(self, tracker: str, key: str) -> None:
        """NoServerError / TrackerUnavailable at once if `key` has no server on `tracker`."""
        if (tracker, key) in self.checked:
            return
        client = TrackerClient(*parse_addr(tracker), self.cfg.timeouts.socket)
        client.check_key(key)
        self.summaries[tracker] = client.summary()
        self.checked.add((tracker, key))

    def _refresh(self, trackers: set[str]) -> None:
        now = time.monotonic()
        for tr in trackers:
            try:
                self.summaries[tr] = TrackerClient(
                    *parse_addr(tr), self.cfg.timeouts.socket
                ).summary()
                if tr in self.down_since:
                    self._event("recovered", f"tracker {tr} answers again")
                    del self.down_since[tr]
            except (TrackerUnavailable, FarmError) as err:
                since = self.down_since.setdefault(tr, now)
                if since == now:
                    self._event("failure", f"tracker {tr} lost: {err}")
                if now - since > self.cfg.timeouts.tracker_wait:
                    raise FarmError(
                        f"tracker {tr} unreachable for {now - since:.0f} s (limit "
                        f"{self.cfg.timeouts.tracker_wait:g} s); results so far are kept, re-run "
                        "to resume once the farm is back (`codesign farm status`)"
                    ) from None
        for addr, until in list(self.quarantine.items()):
            if until < now:  # probation: one more failure quarantines it again
                del self.quarantine[addr]
                self.failures[addr] = self.cfg.retries.quarantine_after - 1

    def _capacity(self, tracker: str, key: str) -> int:
        if tracker in self.down_since or tracker not in self.summaries:
            return 0
        servers = self.summaries[tracker].servers_of(key)
        n = sum(1 for s in servers if s.addr not in self.quarantine)
        now = time.monotonic()
        if n == 0:
            since = self.starved_since.setdefault((tracker, key), now)
            if now - since > self.cfg.timeouts.tracker_wait:
                raise FarmError(
                    f"no usable server of key {key!r} on {tracker} for {now - since:.0f} s "
                    f"(quarantined: {sorted(self.quarantine) or 'none'}); results so far are "
                    "kept, re-run to resume"
                )
        else:
            self.starved_since.pop((tracker, key), None)
        return min(n, self.max_workers)

    def _capacity_total(self, queue: deque[_Pending]) -> int:
        pairs = {(p.job.tracker, p.job.key) for p in queue} or set(self.checked)
        return sum(self._capacity(t, k) for t, k in pairs)

    def _scale(self, workers: list[_Worker], queue: deque[_Pending]) -> None:
        busy = [w for w in workers if w.state == "busy"]
        pairs = {(p.job.tracker, p.job.key) for p in queue}
        wanted = min(len(queue), sum(self._capacity(t, k) for t, k in pairs)) + len(busy)
        while len(workers) < min(wanted, self.max_workers):
            workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        import os
        import socket

        parent, child = socket.socketpair()
        log = self.cfg.state_dir / "logs" / "workers.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [no_torch_path(self.cfg.state_dir), env.get("PYTHONPATH")])
        )
        with log.open("ab") as fh:
            popen = subprocess.Popen(
                [sys.executable, "-m", "codesign.farm.worker", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        child.close()
        return _Worker(popen, Connection(parent.detach()), Proc.of(popen.pid))

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, workers: list[_Worker], queue: deque[_Pending]) -> None:
        t = self.cfg.timeouts
        for w in workers:
            if w.state != "idle" or not queue:
                continue
            for i, p in enumerate(queue):
                tr, key = p.job.tracker, p.job.key
                in_use = sum(
                    1
                    for x in workers
                    if x.state == "busy"
                    and x.task is not None
                    and (x.task.job.tracker, x.task.job.key) == (tr, key)
                )
                cap = self._capacity(tr, key)
                if in_use >= cap:
                    continue
                avoid = set(self.quarantine)
                if cap > len(set(p.servers)):
                    avoid |= set(p.servers)  # retry elsewhere when another server exists
                del queue[i]
                w.conn.send(("job", p.job.id, p.job.payload, tr, key, self.limits, tuple(avoid)))
                w.state, w.task, w.server = "busy", p, ""
                w.deadline = (
                    time.monotonic()
                    + t.socket * (2 + len(avoid))
                    + t.request * (1 + len(avoid))
                    + 5
                )
                break

    def _poll(self, workers: list[_Worker], queue: deque[_Pending], on_result: Callable) -> None:
        live = [w for w in workers if w.state in ("starting", "busy")]
        ready = wait([w.conn for w in live], timeout=0.2) if live else []
        if not live:
            time.sleep(0.2)
        for w in live:
            if w.conn in ready:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    self._lost(w, workers, queue, on_result, "worker process died")
                    continue
                self._message(w, msg, queue, on_result)
            elif w.state == "busy" and time.monotonic() > w.deadline:
                assert w.task is not None  # a busy worker has a task
                self.report.deadlines += 1
                where = f"on server {w.server}" if w.server else "waiting for the tracker"
                self._lost(
                    w,
                    workers,
                    queue,
                    on_result,
                    f"deadline: job {w.task.job.id} stuck {where}",
                    hang=True,
                )
            elif w.state == "starting" and w.popen.poll() is not None:
                self._lost(w, workers, queue, on_result, "worker failed to start (see workers.log)")

    def _message(self, w: _Worker, msg: tuple, queue: deque[_Pending], on_result: Callable) -> None:
        kind = msg[0]
        if kind == "ready":
            w.state = "idle"
        elif kind == "assigned":
            w.server, w.deadline = msg[2], time.monotonic() + self.cfg.timeouts.job
        elif kind == "done":
            p, result = w.task, msg[2]
            assert p is not None  # a result comes from a busy worker
            self.failures[w.server] = 0
            self.report.per_server[w.server] = self.report.per_server.get(w.server, 0) + 1
            self._finish(p, result.measurement, w.server, on_result, result.output)
            w.state, w.task = "idle", None
        elif kind == "error":
            p, err_type, message = w.task, msg[2], msg[3]
            assert p is not None  # an error comes from a busy worker
            w.state, w.task = "idle", None
            self._failed(
                p, w.server, f"{err_type}: {message}", classify(err_type, message), queue, on_result
            )

    def _lost(self, w, workers, queue, on_result, why: str, hang: bool = False) -> None:  # noqa: ANN001
        workers.remove(w)
        w.kill()
        if w.task is not None:
            self._failed(w.task, w.server, why, "retry", queue, on_result, hang=hang)

    def _failed(
        self, p: _Pending, server: str, why: str, kind: str, queue, on_result, hang: bool = False
    ) -> None:  # noqa: ANN001
        p.errors.append(f"{server or '-'}: {why}"[:500])
        if kind == "fatal":
            self._finish(p, Measurement.failed(why), server, on_result)
            return
        if kind == "tracker":
            queue.appendleft(p)  # not the job's fault; bounded by tracker_wait in _refresh
            self.down_since.setdefault(p.job.tracker, time.monotonic())
            return
        if server:
            p.servers.append(server)
            self._server_failed(server, p.job.key, why, hang)
        p.attempts += 1
        if p.attempts >= self.cfg.retries.attempts:
            msg = f"gave up after {p.attempts} attempts: " + " | ".join(p.errors)
            self._finish(p, Measurement.failed(msg), server, on_result)
            return
        self.report.retries += 1
        queue.appendleft(p)

    def _server_failed(self, server: str, key: str, why: str, hang: bool) -> None:
        q = self.cfg.retries.quarantine_after
        self.failures[server] = self.failures.get(server, 0) + (q if hang else 1)
        self._event("failure", f"{server} ({key}): {why}", {"server": server, "key": key})
        if self.failures[server] >= q and server not in self.quarantine:
            self.quarantine[server] = time.monotonic() + self.cfg.timeouts.quarantine
            self.report.quarantined.append(server)
            port = int(server.rpartition(":")[2])
            self._event(
                "quarantine",
                f"{server} ({key}) after: {why}",
                {"server": server, "key": key, "port": port},
            )

    def _finish(
        self, p: _Pending, m: Measurement, server: str, on_result: Callable, output: Any = None
    ) -> None:
        if m.ok:
            self.report.succeeded += 1
        else:
            self.report.failed += 1
        on_result(JobResult(p.job, m, server, p.attempts + 1, tuple(p.errors), output))

    def _event(self, kind: str, message: str, extra: dict[str, Any] | None = None) -> None:
        self.report.events.append(f"{kind}: {message}")
        with contextlib.suppress(OSError):
            append_event(
                self.cfg.state_dir, kind, message, {"source": "scheduler", **(extra or {})}
            )
