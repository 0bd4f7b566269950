"""Ordinary mistakes are refused at once with a one-line message and exit code 2, never a
traceback, and before any slow work (TVM import, compiling, measuring)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from codesign.cli.main import main


def _main(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of the CLI run in this process (argparse exits are caught)."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def _image_folder(root: Path, n: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_run_refuses_an_empty_npy_input(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    for name in ("empty.npy", "junk.npy"):
        rc, err = _main(capsys, "run", str(tmp_path / "m.tar"), "--input", str(tmp_path / name))
        assert rc == 2, err
        assert f"{name} is not a readable .npy array" in err and "numpy.save" in err
        assert "Traceback" not in err
    rc, err = _main(capsys, "run", "m.tar", "--input", str(tmp_path / "empty.npy"))
    assert "empty file" in err


def test_run_refuses_a_damaged_image_input(tmp_path: Path, capsys) -> None:
    (tmp_path / "x.png").write_text("hello")
    rc, err = _main(capsys, "run", str(tmp_path / "m.tar"), "--input", str(tmp_path / "x.png"))
    assert rc == 2 and "x.png is not a readable image" in err


def test_run_refuses_a_missing_input_without_importing_tvm(tmp_path: Path) -> None:
    code = (
        "import sys; from codesign.cli.main import main; "
        f"rc = main(['run', {str(tmp_path / 'm.tar')!r}, '--input', 'missing.png']); "
        "print(rc, 'tvm' in sys.modules, 'torch' in sys.modules)"
    )
    t0 = time.monotonic()
    # a fresh process: the test checks that TVM and torch were never imported
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.stdout.split() == ["2", "False", "False"], out.stderr
    assert "input file missing.png does not exist" in out.stderr
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "m.tar", "--input", "x.npy", "--repeat", "0"],
        ["lut", "build", "--space", "tiny", "--target", "x86", "--db", "X", "--repeat", "0"],
        ["lut", "build", "--space", "tiny", "--target", "x86", "--db", "X", "--repeat", "two"],
        ["compile", "--model", "M", "--target", "x86", "--out", "o.tar", "--repeat", "-3"],
        ["lut", "build", "--space", "tiny", "--target", "x86", "--db", "X", "--trials", "-1"],
        ["run", "m.tar", "--input", "x.npy", "--rpc-timeout", "0"],
    ],
)
def test_counts_out_of_range_are_refused_by_the_parser(argv: list[str], capsys) -> None:
    rc, err = _main(capsys, *argv)
    assert rc == 2 and "error: argument --" in err and "Traceback" not in err
    assert "give 1 or more" in err or "give 0 or more" in err or "> 0" in err


def test_compile_refuses_an_existing_directory_as_out_before_compiling(
    tiny, tmp_path: Path, capsys
) -> None:
    from codesign.model_dir import ModelDir, save_model
    from codesign.modules import build_network

    arch = tiny.uniform("k3e3")
    net = build_network(tiny, arch, seed=0)
    save_model(tmp_path / "m", net, ModelDir(tuple(net.specs), arch=arch.encode(), space="tiny"))
    (tmp_path / "out").mkdir()
    t0 = time.monotonic()
    rc, err = _main(
        capsys, "compile", "--model", str(tmp_path / "m"), "--target", "x86",
        "--out", str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    assert rc == 2 and "is a directory" in err and "model.tar" in err
    assert time.monotonic() - t0 < 5
    assert list((tmp_path / "out").iterdir()) == []


def test_a_non_image_file_in_a_class_folder_is_named(tmp_path: Path) -> None:
    from codesign.data import DatasetError, load_dataset

    root = _image_folder(tmp_path / "imgs")
    (root / "a" / "0.png").write_text("not an image")  # the very first file read
    with pytest.raises(DatasetError, match=r"cannot read image .*a/0\.png"):
        load_dataset(str(root), (3, 8, 8))
    (root / "a" / "0.png").unlink()
    (root / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a later, truncated one
    with pytest.raises(DatasetError, match=r"b/3\.png"):
        load_dataset(str(root), (3, 8, 8))


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("x86:mcpu=notacpu", "codesign targets --cpus x86"),
        ("x86:mcpu=znver33", "did you mean znver3"),
        ("arm:mcpu=cortex-a999", "codesign targets --cpus arm"),
        ("cuda:arch=sm_999", "not a real GPU architecture"),
        ("arm:tracker=127.0.0.1:99999", "between 1 and 65535"),
        ("arm:tracker=127.0.0.1:0", "between 1 and 65535"),
    ],
)
def test_target_typos_are_refused(spec: str, msg: str) -> None:
    from codesign.errors import TargetError
    from codesign.targets import parse_target

    with pytest.raises(TargetError, match=msg):
        parse_target(spec)


def test_valid_target_options_still_parse(capsys) -> None:
    from codesign.targets import parse_target

    assert parse_target("x86:mcpu=skylake-avx512").tvm_dict["mcpu"] == "skylake-avx512"
    assert parse_target("arm:mcpu=cortex-a72,tracker=h:65535").tracker == "h:65535"
    assert parse_target("cuda:arch=sm_86").key == "cuda-sm_86"
    assert main(["targets", "--cpus", "x86"]) == 0
    assert "znver3" in capsys.readouterr().out.split()
    assert main(["targets", "--cpus", "arm"]) == 0
    assert "cortex-a72" in capsys.readouterr().out.split()


def test_compile_for_cuda_without_a_gpu_advises_no_device(tmp_path: Path, capsys) -> None:
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA device")
    (tmp_path / "m").mkdir()  # a model directory: the target is checked before its files
    rc, err = _main(
        capsys, "compile", "--model", str(tmp_path / "m"), "--target", "cuda:arch=sm_80",
        "--out", str(tmp_path / "m.tar"), "--no-progress",
    )  # fmt: skip
    assert rc == 2 and "--no-device" in err and "no CUDA device" in err


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"search": {"baselines": ["k9e9"]}}, r"baselines 'k9e9' are not operations.*k3e3"),
        ({"search": {"epochs": 0}}, r"search\.epochs must be >= 1"),
        ({"search": {"epochs": "six"}}, r"\[search\] epochs must be an integer, got 'six'"),
        ({"search": {"epochs": 2.5}}, r"\[search\] epochs must be an integer"),
        ({"lut": {"repeat": True}}, r"\[lut\] repeat must be an integer"),
        ({"target": {"latency_ms": "fast"}}, r"\[target\] latency_ms must be a number"),
        ({"search": {"baselines": [3]}}, r"\[search\] baselines must be a list of strings"),
        ({"task": {"dataset": "no/such/dir"}}, r"dataset 'no/such/dir' is not one of"),
        ({"target": {"targets": ["x86:mcpu=notacpu"]}}, r"\[target\] targets: mcpu='notacpu'"),
    ],
)
def test_pipeline_config_is_validated_whole(data: dict, match: str) -> None:
    from codesign.pipeline.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict(data)


def test_pipeline_config_dataset_folder_needs_two_classes(tmp_path: Path) -> None:
    from codesign.pipeline.config import ConfigError, from_dict

    (tmp_path / "only").mkdir()
    with pytest.raises(ConfigError, match="at least two class sub-folders"):
        from_dict({"task": {"dataset": str(tmp_path)}})
    (tmp_path / "other").mkdir()
    assert from_dict({"task": {"dataset": str(tmp_path)}}).task.dataset == str(tmp_path)


def test_pipeline_refuses_a_bad_config_within_two_seconds(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[search]\nepochs = "six"\n')
    t0 = time.monotonic()
    # a fresh process: the time limit includes starting the command
    out = subprocess.run(
        [sys.executable, "-m", "codesign.cli.main", "pipeline", "--config", str(cfg), "--out",
         str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "epochs must be an integer" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
    assert time.monotonic() - t0 < 2.5


def _rows(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM entries").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigint_to_the_process_alone_stops_lut_build_and_keeps_rows(tmp_path: Path) -> None:
    import signal

    db = tmp_path / "lut.sqlite"
    argv = ["lut", "build", "--space", "tiny", "--target", "x86", "--db", str(db)]
    # a process of its own: the test sends it SIGINT
    proc = subprocess.Popen(
        [sys.executable, "-m", "codesign.cli.main", *argv, "--no-progress",
         "--repeat", "3", "--min-repeat-ms", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _rows(db) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        assert _rows(db) >= 1, "no row stored within 120 s"
        proc.send_signal(signal.SIGINT)  # this PID only, not its process group
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    import sqlite3

    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT count(*) FROM entries").fetchone()[0]
    assert rows >= 1
    assert rows < 39  # stopped, not run to completion


def test_a_swallowed_interrupt_still_stops_the_process(tmp_path: Path) -> None:
    """A library that catches KeyboardInterrupt and goes on (TVM's FFI turns it into an error)
    cannot keep the command running: the process exits 130 within the grace period."""
    import signal

    code = (
        "import sys, time\n"
        "from codesign import interrupt\n"
        "with interrupt.handling():\n"
        "    ready = False\n"
        "    while True:\n"
        "        try:\n"  # 'ready' inside the try: the signal may land right after it
        "            if not ready:\n"
        "                ready = print('ready', flush=True) or True\n"
        "            time.sleep(0.05)\n"
        "        except KeyboardInterrupt:\n"
        "            pass\n"
    )
    env = {**__import__("os").environ, "CODESIGN_INTERRUPT_GRACE_S": "1"}
    # a process of its own: the test sends it SIGINT
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130 and "interrupted; still running 1 s after the signal" in err


def test_targets_and_help_answer_without_loading_tvm_or_torch(tmp_path: Path, monkeypatch) -> None:
    """`codesign targets` reads the detected host CPU from its cache (written by the first
    detection) instead of loading TVM and torch (4-12 s)."""
    import json
    import os

    from codesign.targets import _host_cpu_cache

    monkeypatch.setenv("CODESIGN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CODESIGN_X86_MCPU", raising=False)
    env = dict(os.environ)
    path, key = _host_cpu_cache()
    assert path == tmp_path / "host_cpu.json"
    path.write_text(json.dumps({"key": key, "cpu": "x86-64-v3"}))
    code = (
        "import sys, json; from codesign.cli.main import main\n"
        "for argv in (['targets', '--json'], ['spaces'], ['--help'], ['verify', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps(['tvm' in sys.modules, 'torch' in sys.modules]), file=sys.stderr)\n"
    )
    t0 = time.monotonic()
    # a fresh process: the test checks that TVM and torch were never imported
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert time.monotonic() - t0 < 3, out.stderr
    assert json.loads(out.stderr.strip().splitlines()[-1]) == [False, False], out.stderr
    assert '"mcpu": "x86-64-v3"' in out.stdout
    # a cache of another machine or TVM version is not used
    path.write_text(json.dumps({"key": "other", "cpu": "x86-64-v3"}))
    from codesign.targets import host_cpu

    cpu = host_cpu.__wrapped__()  # not this process's cached answer: reads the file
    assert json.loads(path.read_text()) == {"key": key, "cpu": cpu}


def test_archive_reader_accepts_any_tar_blocking_factor(tmp_path: Path) -> None:
    """An intact archive repacked with `tar -b 1` (512-byte records, not 10 KiB) is read; cut
    ones are still refused."""
    import shutil

    from codesign.artifact.archive import read_archive
    from codesign.errors import ArtifactIntegrityError

    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    src = tmp_path / "src"
    src.mkdir()
    files = {"manifest.json": b'{"a": 1}\n', "lib.so": bytes(range(256)) * 7}
    for name, blob in files.items():
        (src / name).write_bytes(blob)
    tar = tmp_path / "m.tar"
    subprocess.run(
        ["tar", "-b", "1", "--format=ustar", "-cf", str(tar), "-C", str(src), *files],
        check=True, timeout=30,
    )  # fmt: skip
    raw = tar.read_bytes()
    assert len(raw) % 512 == 0 and len(raw) % 10240 != 0
    assert read_archive(tar) == files
    for cut in (raw[:-512], raw[:-1024], raw[:1536]):
        tar.write_bytes(cut)
        with pytest.raises(ArtifactIntegrityError, match="truncated"):
            read_archive(tar)


def test_netconfig_arch_string_without_its_space_says_what_is_valid(capsys) -> None:
    rc, err = _main(capsys, "netconfig", "k3e6-k5e3_k7e6-skip_k3e3-k3e3")
    assert rc == 2 and "No such file" not in err
    assert "an architecture string starts with its space" in err
    assert "tiny:k3e6-k5e3_k7e6-skip_k3e3-k3e3" in err and "--space" in err
    assert main(["netconfig", "k3e6-k5e3_k7e6-skip_k3e3-k3e3", "--space", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == "tiny:k3e6-k5e3_k7e6-skip_k3e3-k3e3"


def test_help_shows_defaults(capsys) -> None:
    for argv, shown in (
        (["search", "--help"], ("default: proxyless", "default: 32", "default: 0")),
        (["lut", "build", "--help"], ("default 10", "default: 0")),
        (["run", "--help"], ("default: 60.0",)),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capsys.readouterr().out.split())
        for text in shown:
            assert text in out, (argv, text)
