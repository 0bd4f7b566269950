"""Run the `codesign` CLI in this process: no new interpreter paying the torch + TVM import.

`run_cli("lut", "show", "--db", path)` calls `codesign.cli.main.main(argv)` and returns its exit
code and what it printed. Tests keep a subprocess only where they need one (signals, a fresh
process, an isolated environment) and say why there.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CliResult:
    """What one CLI call returned and printed (named like subprocess.CompletedProcess)."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _isolated(env: Mapping[str, str | None]) -> Iterator[None]:
    """Apply `env` for the call; afterwards the environment and torch's thread count are as
    before (a command's `--torch-threads 1` must not slow down the tests after it)."""
    before = dict(os.environ)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)
        torch = sys.modules.get("torch")
        if torch is not None and threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def run_cli(
    *argv: str | Path,
    env: Mapping[str, str | None] | None = None,
    cwd: str | Path | None = None,
) -> CliResult:
    """`codesign *argv` in this process. `env` sets (None: unsets) variables for the call only;
    `cwd` runs it from another directory. argparse's exits (usage errors, --help, --version) come
    back as their exit code, like any other."""
    from codesign.cli.main import main

    args = tuple(str(a) for a in argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_isolated(env or {}))
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=err)
    return CliResult(args, int(code), out.getvalue(), err.getvalue())


def run_cli_process(
    *argv: str | Path, timeout: float = 900, env: Mapping[str, str] | None = None
) -> CliResult:
    """`codesign *argv` in a fresh interpreter (pays the torch + TVM import, seconds). Only for
    tests that need one; the caller says why (signals, a fresh process, an isolated
    environment, or MetaSchedule tuning: a second tuning run in one pytest process trips over
    pytest's log capture handlers)."""
    args = tuple(str(a) for a in argv)
    proc = subprocess.run(
        [sys.executable, "-m", "codesign.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    return CliResult(args, proc.returncode, proc.stdout, proc.stderr)
