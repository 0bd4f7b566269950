"""Cached, resumable pipeline stages.

A stage is a function of its inputs (a JSON-able dict: the config sections it reads and the
digests of the upstream outputs it uses) that writes into its own work directory and returns a
JSON-able dict of outputs. Its record, DIR/stages/<name>.json, holds the inputs' digest:
re-running skips a stage whose digest matches a completed record; a stage whose inputs changed
is re-run (its work directory cleared), and since downstream inputs include upstream outputs,
everything that depends on it is re-run too. A stage interrupted half-way keeps its work
directory, so stages that checkpoint (LUT rows, training epochs) resume where they stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    inputs_digest: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    completed: bool
    seconds: float
    finished_at: str = ""


class StageRunner:
    """Runs named stages under `out_dir/stages`, skipping those already done with the same inputs."""

    def __init__(
        self,
        out_dir: str | Path,
        log: Callable[[str], None] | None = None,
        total: int | None = None,
    ) -> None:
        self.out = Path(out_dir)
        self.total = total
        self.root = self.out / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.stop_requested = False

    def record(self, name: str) -> StageRecord | None:
        path = self.root / f"{name}.json"
        if not path.exists():
            return None
        try:
            return StageRecord(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None  # a damaged record only means the stage runs again

    def workdir(self, name: str) -> Path:
        return self.root / name

    def run(
        self, name: str, inputs: dict[str, Any], fn: Callable[[Path], dict[str, Any]]
    ) -> dict[str, Any]:
        digest = digest_of(inputs)
        n = len(self.ran) + len(self.skipped) + 1
        name_shown = f"{n}/{self.total} {name}" if self.total else name
        rec = self.record(name)
        work = self.workdir(name)
        if rec is not None and rec.completed and rec.inputs_digest == digest:
            self.log(f"[{name_shown}] up to date (inputs {digest}), skipped")
            self.skipped.append(name)
            return rec.outputs
        if rec is not None and rec.inputs_digest != digest and work.exists():
            self.log(
                f"[{name_shown}] inputs changed ({rec.inputs_digest} -> {digest}): starting over"
            )
            shutil.rmtree(work)
        elif work.exists():
            self.log(f"[{name_shown}] resuming")
        else:
            self.log(f"[{name_shown}] running")
        work.mkdir(parents=True, exist_ok=True)
        self._write(StageRecord(name, digest, inputs, {}, False, 0.0))
        t0 = time.time()
        try:
            outputs = fn(work)
        except Exception:
            if self.stop_requested:  # the interrupt surfaced as another error (TVM turns a
                raise KeyboardInterrupt from None  # KeyboardInterrupt in compilation into its own)
            raise
        seconds = time.time() - t0
        self._write(
            StageRecord(
                name, digest, inputs, outputs, True, seconds, time.strftime("%Y-%m-%dT%H:%M:%S")
            )
        )
        self.log(f"[{name_shown}] done in {seconds:.0f} s")
        self.ran.append(name)
        if self.stop_requested:  # the interrupt was swallowed inside the stage: stop here
            raise KeyboardInterrupt
        return outputs

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """Ctrl-C / SIGTERM stop the run at once as usual, and at the latest when the running
        stage ends (some libraries swallow KeyboardInterrupt, e.g. inside torch.export)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            self.stop_requested = True
            before = previous[signal.Signals(signum)]
            if callable(before):
                before(signum, frame)
            else:
                raise KeyboardInterrupt

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, before in previous.items():
                signal.signal(sig, before)

    def _write(self, rec: StageRecord) -> None:
        path = self.root / f"{rec.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(rec), indent=2, default=str))
        tmp.replace(path)
