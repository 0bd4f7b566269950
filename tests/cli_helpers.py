"""Run the `codesign` CLI in this process: no new interpreter paying the torch + TVM import.

`run_cli("lut", "show", "--db", path)` calls `codesign.cli.main.main(argv)` and returns its exit
code and what it printed. Tests keep a subprocess only where they need one (signals, a fresh
process, an isolated environment) and say why there.
"""

from __future__ import annotations

import contextlib
import io
import os
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
def _environment(env: Mapping[str, str | None]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
        stack.enter_context(_environment(env or {}))
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
