"""argparse value types: a wrong number is refused while parsing, with the option's usage."""

from __future__ import annotations

import argparse


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer (give {low} or more)"
        ) from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give {low} or more")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts such as --repeat)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (trial counts, milliseconds)."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A number > 0 (timeouts, latency targets)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not allowed: give a number > 0")
    return value


def add_rpc_timeout(p: argparse.ArgumentParser, default: float | None = 60.0) -> None:
    """The one `--rpc-timeout` option of every command that talks to RPC servers: the seconds
    each RPC phase may take (getting a server, connecting, uploading, running, timing), so a
    frozen or unreachable server ends in an error, never a hang."""
    unset = "" if default is not None else " (default: the farm's timeouts)"
    p.add_argument(
        "--rpc-timeout",
        type=positive_float,
        default=default,
        metavar="SECONDS",
        help="seconds each RPC phase may take: getting a server, connecting, uploading, "
        f"running, timing; a frozen server ends in an error, not a hang{unset}",
    )


def check_text_file(path: str | None, what: str) -> None:
    """Refuses (one line, before any work) a file argument that is a directory or not
    UTF-8 text, e.g. a binary file given as a JSON or TOML file. A missing file is left to
    the reader, which names what to create."""
    import os

    from codesign.errors import CodesignError

    if path is None or not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise CodesignError(f"{what} {path} is a directory; give a file")
    try:
        with open(path, encoding="utf-8") as fh:
            fh.read()
    except UnicodeDecodeError as err:
        raise CodesignError(
            f"{what} {path} is not a text file (byte {err.start} is not UTF-8)"
        ) from None
    except OSError as err:
        raise CodesignError(f"cannot read {what} {path}: {err.strerror}") from None


def check_out_dir(path: str, option: str = "--out") -> None:
    """Refuses an output directory path that exists as something other than a directory."""
    import os

    from codesign.errors import CodesignError

    if os.path.exists(path) and not os.path.isdir(path):
        raise CodesignError(f"{option} {path} exists and is not a directory; give a directory")
