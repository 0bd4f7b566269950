"""Fuzzing the CLI with bad invocations: every one is refused with exit code 2 and a message,
never a traceback, before any slow work, and no file given to it is changed.

Each generated invocation carries at least one fault that the CLI checks before it loads a
model, compiles or measures (a bad count, an unknown option, a malformed target spec or
architecture string, a missing, empty, binary or garbage file, a directory where a file goes),
so every example is fast."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codesign.cli.main import main

BAD_TARGETS = (
    "x86:mcpu=",
    "cuda:arch=sm_1",
    "cuda:arch=sm_999",
    "arm:tracker=h:0",
    "arm:tracker=h:99999",
    "arm:tracker=:9190",
    "x86:threads=0",
    "x86:threads=x",
    "x86:bogus=1",
    "zz",
    "",
)
GOOD_TARGETS = ("x86", "x86:threads=1", "cuda", "arm")
BAD_ARCHS = ("tiny:", "tiny:zz", "nope:k3e3", ":::", "tiny:k3e3-k3e3", "tiny:k9e9-k3e3-k3e3")
BAD_COUNTS = ("0", "-1", "x", "1.5", "", "1e3", "--")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Bad file arguments: empty, binary, garbage text, a directory, a missing path."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").write_bytes(b"")
    (root / "junk.bin").write_bytes(b"\x00\xff\xfe garbage \x89PNG")
    (root / "garbage.txt").write_text("{{ not toml = or json [\n")
    (root / "truncated.tar").write_bytes(b"ustar" + b"\x00" * 300)
    (root / "adir").mkdir()
    return {
        "empty": str(root / "empty"),
        "junk": str(root / "junk.bin"),
        "text": str(root / "garbage.txt"),
        "tar": str(root / "truncated.tar"),
        "dir": str(root / "adir"),
        "missing": str(root / "no-such-file"),
    }


def _pick(*names: str):  # noqa: ANN202
    return st.sampled_from(names)


def _invocations(f: dict[str, str]) -> st.SearchStrategy[list[str]]:
    """Each strategy yields argv lists that are refused before any heavy work."""
    any_file = _pick(*f.values())
    not_db = _pick(f["junk"], f["text"], f["tar"], f["dir"])  # an empty/missing --db is new
    target = st.sampled_from(BAD_TARGETS + GOOD_TARGETS)
    bad_target = st.sampled_from(BAD_TARGETS)
    count = st.sampled_from(BAD_COUNTS)
    cmds = [
        st.tuples(any_file, any_file).map(lambda t: ["run", t[0], "--input", t[1]]),
        st.tuples(any_file, count).map(lambda t: ["run", t[0], "--input", t[0], "--top", t[1]]),
        any_file.map(lambda a: ["verify", a]),
        st.tuples(any_file, target, any_file).map(
            lambda t: ["compile", "--model", t[0], "--target", t[1], "--out", t[2]]
        ),
        st.tuples(bad_target, count).map(
            lambda t: [
                "compile",
                "--model",
                "m",
                "--target",
                t[0],
                "--out",
                "o.tar",
                "--repeat",
                t[1],
            ]
        ),  # fmt: skip
        st.tuples(_pick("tiny", "nope", ""), target, not_db).map(
            lambda t: ["lut", "build", "--space", t[0], "--target", t[1], "--db", t[2]]
        ),
        st.tuples(bad_target, _pick("--repeat", "--trials", "--limit"), count).map(
            lambda t: [
                "lut",
                "build",
                "--space",
                "tiny",
                "--target",
                t[0],
                "--db",
                f["dir"],
                t[1],
                t[2],
            ]
        ),  # fmt: skip
        _pick(f["junk"], f["text"], f["tar"], f["dir"], f["missing"], f["empty"]).map(
            lambda d: ["lut", "show", "--db", d]
        ),
        st.sampled_from((*BAD_ARCHS, f["empty"], f["junk"], f["text"], f["dir"])).map(
            lambda a: ["netconfig", a]
        ),
        _pick(*BAD_ARCHS).map(lambda a: ["netconfig", a, "--space", "tiny"]),
        _pick(f["junk"], f["text"], f["dir"], f["missing"], f["tar"]).map(
            lambda c: ["pipeline", "--config", c]
        ),
        _pick(f["empty"], f["junk"], f["text"]).map(
            lambda c: ["pipeline", "--config", c, "--out", f["junk"]]
        ),
        st.tuples(any_file, _pick("k3e3", "tiny:k3e3", *BAD_ARCHS)).map(
            lambda t: ["latency", "predict", "--model", t[0], t[1]]
        ),
        any_file.map(lambda m: ["latency", "eval", "--model", m]),
        st.tuples(_pick("--networks", "--repeat"), count).map(
            lambda t: [
                "latency",
                "fit",
                "--db",
                f["junk"],
                "--space",
                "tiny",
                "--target",
                "x86",
                "--out",
                f["dir"],
                "--networks",
                "3",
                t[0],
                t[1],
            ]
        ),  # fmt: skip
        st.tuples(bad_target, bad_target).map(lambda t: ["targets", t[0], t[1]]),
        st.tuples(target, _pick(f["junk"], f["text"], f["tar"])).map(
            lambda t: [
                "search",
                "--space",
                "tiny",
                "--target",
                t[0],
                "--latency-ms",
                "1",
                "--out",
                t[1],
            ]
        ),  # fmt: skip
        st.tuples(bad_target, _pick("--epochs", "--batch-size", "--repeat"), count).map(
            lambda t: [
                "search",
                "--space",
                "tiny",
                "--target",
                t[0],
                "--latency-ms",
                "1",
                "--out",
                f["dir"],
                t[1],
                t[2],
            ]
        ),  # fmt: skip
        _pick(f["junk"], f["text"], f["dir"], f["missing"]).map(
            lambda c: ["farm", "status", "--config", c]
        ),
        st.tuples(any_file, _pick("0", "-1", "x", "inf", "nan")).map(
            lambda t: [
                "prune",
                "--model",
                t[0],
                "--target",
                "x86",
                "--latency-ms",
                t[1],
                "--dataset",
                "digits",
                "--out",
                f["dir"],
            ]
        ),  # fmt: skip
        st.tuples(any_file, bad_target).map(
            lambda t: [
                "quantize",
                "--model",
                t[0],
                "--target",
                t[1],
                "--latency-ms",
                "1",
                "--dataset",
                "digits",
                "--out",
                f["dir"],
            ]
        ),  # fmt: skip
    ]
    base = st.one_of(cmds)
    unknown = st.from_regex(r"--[a-z]{1,8}(-[a-z]{1,5})?", fullmatch=True).filter(
        lambda o: o not in ("--help", "--version")
    )
    # sometimes add an unknown option (argparse refuses it whatever else is wrong)
    return st.one_of(
        base, st.tuples(base, unknown, st.integers(0, 20)).map(
            lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2]:] if t[2] > 0 else t[0] + [t[1]]
        )
    )  # fmt: skip


def _digest(paths: list[Path]) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in paths
        if p.exists()
    }


def test_bad_invocations_exit_2_without_a_traceback(files: dict[str, str]) -> None:
    root = Path(files["dir"]).parent
    seen: list[list[str]] = []

    @settings(
        max_examples=240,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(_invocations(files))
    def check(argv: list[str]) -> None:
        before = _digest(sorted(root.iterdir()))
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code
        text = err.getvalue()
        assert rc == 2, (argv, rc, text, out.getvalue())
        assert "Traceback" not in text, (argv, text)
        assert text.strip(), argv  # says why
        assert _digest(sorted(root.iterdir())) == before, argv  # nothing written or changed
        assert list(Path(files["dir"]).iterdir()) == [], argv
        seen.append(argv)

    check()
    assert len(seen) >= 200
