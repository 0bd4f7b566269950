"""Artifacts: compile a trained network, verify it, refuse tampering, run it, check its numbers.

Real TVM builds of a tiny network trained on `digits` (fixtures in conftest.py).
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import CliResult, run_cli, run_cli_process

import codesign
from codesign.artifact.archive import read_archive, sha256, write_archive
from codesign.artifact.manifest import MANIFEST, manifest_digest
from codesign.artifact.verify import verify_artifact
from codesign.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    EqualityError,
    InputError,
    ManifestError,
)
from codesign.measurement import MeasureProtocol
from codesign.targets import parse_target


def cli(*args: str) -> CliResult:
    return run_cli(*args)


def cli_tuning(*args: str, timeout: float = 900) -> CliResult:
    """A CLI call that tunes: in its own process (see run_cli_process)."""
    return run_cli_process(*args, timeout=timeout)


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    """A tar written by the standard library, not by codesign: how a tamperer would do it."""
    with tarfile.open(path, "w") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def resealed(manifest: dict) -> bytes:
    """Manifest JSON with a recomputed digest: valid integrity, so the schema check must catch."""
    manifest["digest"] = manifest_digest(manifest)
    return json.dumps(manifest).encode()


def test_import_loads_neither_tvm_nor_torch() -> None:
    code = "import sys, codesign, codesign.artifact; print(sorted({'tvm', 'torch'} & set(sys.modules)))"
    # a fresh process: this one imported both long ago
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert callable(codesign.load)


# --- compile ------------------------------------------------------------------------------


def test_compile_writes_a_complete_manifest(x86_artifact: Path, trained_model_dir: Path) -> None:
    from codesign.model_dir import load_model
    from codesign.targets import parse_target

    art = verify_artifact(x86_artifact)
    m, d = art.manifest, art.manifest.data
    _, meta = load_model(trained_model_dir)
    assert m.input.shape == (1, 1, 28, 28) and m.input.dtype == "float32"
    assert m.outputs[0].shape == (1, 10) and m.classes == tuple(str(i) for i in range(10))
    assert m.preprocessing.mean == meta.dataset.mean and m.preprocessing.std == meta.dataset.std
    assert m.target_json == parse_target("x86").tvm_json and m.machine == "x86_64"
    assert d["tvm"]["version"].startswith("0.27") and d["tvm"]["pipeline"]
    assert d["model"]["arch"] == meta.arch and d["model"]["policies"] == {
        "quantization": None,
        "pruning": None,
    }
    assert d["model"]["weights_sha256"] == sha256((trained_model_dir / "weights.pt").read_bytes())
    assert d["weights"]["storage"] == "embedded" and "recompile" in d["weights"]["note"]
    lat = d["latency"]
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"] < 100
    assert lat["protocol"] == MeasureProtocol.quick().to_dict()
    assert lat["threads"] == parse_target("x86").threads and lat["emulated"] is False
    # accuracy of the compiled module on the whole validation split agrees with PyTorch's
    acc = d["accuracy"]
    assert acc["n"] == meta.dataset.n_val == 359
    assert acc["top1"] > 20 and abs(acc["top1"] - acc["torch_top1"]) <= 100 * 2 / acc["n"]
    eq = d["equality"]
    assert eq["ok"] and eq["n_inputs"] == 8 and eq["max_abs_err"] < 1e-4
    # every file is hashed, and the hashes are those of the archive's members
    files = members(x86_artifact)
    assert set(files) == {MANIFEST, "model.so", "sample_input.npy", "sample_output.npy"}
    assert {f.name: f.sha256 for f in m.files} == {
        n: sha256(b) for n, b in files.items() if n != MANIFEST
    }


def test_archive_is_deterministic_and_gzip_round_trips(x86_artifact: Path, tmp_path: Path) -> None:
    art = verify_artifact(x86_artifact)
    files = {k: v for k, v in art.files.items() if k != MANIFEST}
    a = write_archive(tmp_path / "a.tar", art.manifest.to_dict(), files)
    write_archive(tmp_path / "b.tar", art.manifest.to_dict(), files)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a["digest"] == art.manifest.digest
    write_archive(tmp_path / "c.tar.gz", art.manifest.to_dict(), files)
    assert (tmp_path / "c.tar.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert verify_artifact(tmp_path / "c.tar.gz").manifest == art.manifest


# --- verify: tampering and truncation ------------------------------------------------------


def _flip_library(f: dict) -> None:
    lib = bytearray(f["model.so"])
    lib[len(lib) // 2] ^= 0xFF
    f["model.so"] = bytes(lib)


def _edit_mean(f: dict) -> None:
    m = json.loads(f[MANIFEST])
    m["preprocessing"]["mean"][0] += 1.0
    f[MANIFEST] = json.dumps(m).encode()


def _bad_shape(f: dict) -> None:
    m = json.loads(f[MANIFEST])
    m["inputs"][0]["shape"] = [1, "one", 28, 28]
    f[MANIFEST] = resealed(m)


def _no_latency_field(f: dict) -> None:
    m = json.loads(f[MANIFEST])
    del m["latency"]["median_ms"]
    f[MANIFEST] = resealed(m)


def _future_format(f: dict) -> None:
    m = json.loads(f[MANIFEST])
    m["format"] = "codesign-artifact/99"
    f[MANIFEST] = resealed(m)


TAMPER = {
    "library byte flipped": (_flip_library, ArtifactIntegrityError, "does not match its sha256"),
    "library cut short": (
        lambda f: f.update({"model.so": f["model.so"][:-100]}),
        ArtifactIntegrityError,
        "the manifest says",
    ),
    "manifest value edited": (_edit_mean, ManifestError, "modified after packing"),
    "file added": (
        lambda f: f.update({"extra.txt": b"hello"}),
        ArtifactIntegrityError,
        "extra.txt, not listed",
    ),
    "file removed": (
        lambda f: f.pop("sample_output.npy"),
        ArtifactIntegrityError,
        "missing sample_output.npy",
    ),
    "manifest removed": (lambda f: f.pop(MANIFEST), ArtifactIntegrityError, "no manifest.json"),
    "manifest not json": (
        lambda f: f.update({MANIFEST: b"{not json"}),
        ManifestError,
        "not valid JSON",
    ),
    "bad schema": (_bad_shape, ManifestError, r"inputs\[0\]\.shape"),
    "missing field": (_no_latency_field, ManifestError, r"latency\.median_ms is missing"),
    "future format": (_future_format, ManifestError, "cannot read it"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_artifact_is_refused(case: str, x86_artifact: Path, tmp_path: Path) -> None:
    change, error, message = TAMPER[case]
    files = members(x86_artifact)
    change(files)
    bad = write_tar(tmp_path / "bad.tar", files)
    before = bad.read_bytes()
    with pytest.raises(error, match=message):
        verify_artifact(bad)
    with pytest.raises(ArtifactError, match=message):  # loading verifies first
        codesign.load(bad)
    assert bad.read_bytes() == before, "verify must never modify the artifact"


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:1000], "truncated"),
        (lambda b: b[:-1], "not a whole number of tar records"),
        (lambda b: b[:-10240], "truncated"),
        (lambda b: b"", "only 0 bytes"),
        (lambda b: b"\x00" * 20480, "no members"),
        (lambda b: bytes(range(256)) * 80, "truncated"),
    ],
)
def test_truncated_or_foreign_file_is_refused(
    cut, message: str, x86_artifact: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(cut(x86_artifact.read_bytes()))
    with pytest.raises(ArtifactIntegrityError, match=message):
        verify_artifact(bad)


def test_truncated_gzip_is_refused(x86_artifact: Path, tmp_path: Path) -> None:
    art = verify_artifact(x86_artifact)
    gz = tmp_path / "m.tgz"
    write_archive(gz, art.manifest.to_dict(), {k: v for k, v in art.files.items() if k != MANIFEST})
    gz.write_bytes(gz.read_bytes()[:-50])
    with pytest.raises(ArtifactIntegrityError, match="gzip stream"):
        read_archive(gz)


def test_library_of_the_wrong_architecture_is_refused(x86_artifact: Path, tmp_path: Path) -> None:
    """A consistently sealed archive whose manifest says aarch64 but holds an x86-64 library."""
    from codesign.targets import parse_target

    art = verify_artifact(x86_artifact)
    manifest = art.manifest.to_dict()
    manifest["target"] = {**parse_target("arm").to_dict(), "machine": "aarch64"}
    files = {k: v for k, v in art.files.items() if k != MANIFEST}
    write_archive(tmp_path / "arm.tar", manifest, files)
    with pytest.raises(ArtifactIntegrityError, match="built for x86_64 .* needs aarch64"):
        verify_artifact(tmp_path / "arm.tar")
    # the manifest itself must be consistent: an aarch64 triple with an x86_64 machine
    manifest["target"]["machine"] = "x86_64"
    with pytest.raises(ManifestError, match="target triple is aarch64"):
        write_archive(tmp_path / "never.tar", manifest, files)
    assert not (tmp_path / "never.tar").exists()


def test_cli_verify_reports_ok_and_refuses_tampering(x86_artifact: Path, tmp_path: Path) -> None:
    out = cli("verify", str(x86_artifact))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "x86_64 shared object" in out.stdout
    files = members(x86_artifact)
    _flip_library(files)
    out = cli("verify", str(write_tar(tmp_path / "bad.tar", files)))
    assert out.returncode == 2 and "does not match its sha256" in out.stderr
    assert "Traceback" not in out.stderr


# --- run: predictor, inputs, equality -----------------------------------------------------


def test_predictor_equals_pytorch_and_sample(x86_artifact: Path, trained_model_dir: Path) -> None:
    from codesign.artifact.checks import validation_dataset
    from codesign.model_dir import load_model

    net, meta = load_model(trained_model_dir)
    x, _ = next(validation_dataset(meta.dataset).batches("val", 6))
    with torch.no_grad():
        ref = net(x).numpy()
    with codesign.load(x86_artifact) as predict:
        got = predict(x.numpy())  # a batch of 6 runs the batch-1 library 6 times
        assert got.shape == (6, 10)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
        one = predict(x[0].numpy())  # (C,H,W)
        np.testing.assert_allclose(one, got[:1], rtol=1e-6, atol=1e-7)
        top = predict.classify(x.numpy(), top=3)
        assert [row[0][0] for row in top] == [str(i) for i in ref.argmax(1)]
        assert all(r[0][1] >= r[1][1] >= r[2][1] for r in top)
        files = predict.artifact.files
        sample_in = np.load(io.BytesIO(files["sample_input.npy"]))
        sample_out = np.load(io.BytesIO(files["sample_output.npy"]))
        np.testing.assert_allclose(predict(sample_in), sample_out, rtol=1e-6, atol=1e-7)
        m = predict.time()
        assert m.ok and m.median_ms > 0


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((1, 3, 28, 28), np.float32), r"shape \(1, 3, 28, 28\).*expects \(1, 1, 28, 28\)"),
        (np.zeros((28, 28), np.float32), r"shape \(28, 28\)"),
        (np.zeros((1, 1, 28, 28), np.float64), "dtype float64, the artifact expects float32"),
        (np.zeros((1, 1, 28, 28), np.uint8), "dtype uint8"),
        ([[0.0]], "must be a numpy array"),
    ],
)
def test_wrong_input_is_refused(x, message: str, x86_artifact: Path) -> None:
    with codesign.load(x86_artifact) as predict, pytest.raises(InputError, match=message):
        predict(x)


def test_loading_and_running_keep_the_callers_cpu_mask(x86_artifact: Path) -> None:
    """TVM's thread-pool setup pins its caller to one core; the threads PyTorch or ONNX Runtime
    start afterwards would inherit that core. Loading, running and timing leave the mask alone."""
    import os

    before = os.sched_getaffinity(0)
    with codesign.load(x86_artifact) as predict:
        predict(np.zeros((1, 1, 28, 28), np.float32))
        predict.time()
        assert os.sched_getaffinity(0) == before


def test_cli_run_npy_image_and_bad_input(
    x86_artifact: Path, trained_model_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from codesign.artifact.checks import validation_dataset
    from codesign.model_dir import load_model

    _, meta = load_model(trained_model_dir)
    data = validation_dataset(meta.dataset)
    raw = data.x_val[:4].numpy()  # native 8x8 pixels in 0..255
    with codesign.load(x86_artifact) as predict:
        for i in range(4):
            png = tmp_path / f"digit{i}.png"
            Image.fromarray(raw[i, 0].round().astype(np.uint8), "L").save(png)
            via_image = predict.preprocess(png)
            via_dataset = data.transform(data.x_val[i : i + 1]).numpy()
            assert via_image.shape == (1, 1, 28, 28)
            assert np.abs(via_image - via_dataset).max() < 0.05  # PIL vs torch resampling
    np.save(tmp_path / "x.npy", via_dataset[0])
    for inp in ("x.npy", "digit3.png"):
        out = cli("run", str(x86_artifact), "--input", str(tmp_path / inp), "--repeat", "2")
        assert out.returncode == 0, out.stderr
        assert "latency" in out.stdout and "ms" in out.stdout
    out = cli("run", str(x86_artifact), "--input", str(tmp_path / "x.npy"), "--json", "--top", "2")
    report = json.loads(out.stdout)
    assert len(report["top"][0]) == 2 and report["latency_ms"] > 0
    np.save(tmp_path / "bad.npy", np.zeros((3, 28, 28), np.float32))
    out = cli("run", str(x86_artifact), "--input", str(tmp_path / "bad.npy"))
    assert out.returncode == 2 and "expects (1, 1, 28, 28)" in out.stderr
    assert "Traceback" not in out.stderr


def test_equality_check_catches_a_different_model(
    x86_artifact: Path, trained_model_dir: Path
) -> None:
    """The compile-time check compares real outputs: a slightly changed model must fail it."""
    from codesign.artifact.checks import check_equality, check_inputs, validation_dataset
    from codesign.artifact.executor import LocalExecutor
    from codesign.model_dir import load_model

    net, meta = load_model(trained_model_dir)
    inputs = check_inputs(validation_dataset(meta.dataset), (1, 1, 28, 28), 4, 0)
    art = verify_artifact(x86_artifact)
    workdir = art.extract()
    with LocalExecutor(workdir / "model.so", machine="x86_64") as ex:
        report, _ = check_equality(ex, net, inputs, ["fp32"])
        assert report["ok"] and report["top1_agreement"] == 1.0
        changed = copy.deepcopy(net)
        with torch.no_grad():
            changed[-1].classifier.bias += 0.01
        with pytest.raises(EqualityError, match="differ from PyTorch"):
            check_equality(ex, changed, inputs, ["fp32"])


# --- ARM: cross-compiled, verified as aarch64 -----------------------------------------------


def test_arm_artifact_is_aarch64(trained_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64 cross compiler not installed (make toolchains)")
    out = tmp_path / "arm.tar"
    res = cli(
        "compile",
        "--model",
        str(trained_model_dir),
        "--target",
        "arm",
        "--out",
        str(out),
        "--no-device",
        "--val-limit",
        "40",
        "--check-inputs",
        "3",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    assert "not measured" in res.stdout
    art = verify_artifact(out)
    assert art.elf.machine == "aarch64" and art.manifest.machine == "aarch64"
    d = art.manifest.data
    assert d["target"]["tvm"]["mtriple"].startswith("aarch64")
    assert d["latency"] is None and "not measured" in d["latency_note"]
    assert d["equality"]["ok"] and d["equality"]["checked_on"].startswith("host substitute")
    assert d["accuracy"]["n"] == 40
    with pytest.raises(ArtifactError, match="built for aarch64"):
        codesign.load(out)


def test_garbage_after_the_last_member_is_refused(x86_artifact: Path, tmp_path: Path) -> None:
    """tarfile stops silently at a non-header block; the end-of-archive check does not."""
    raw = bytearray(x86_artifact.read_bytes())
    with tarfile.open(x86_artifact) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    raw[end : end + 1024] = b"\xff" * 1024
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ArtifactIntegrityError, match="end-of-archive marker is missing"):
        verify_artifact(bad)


# --- tuning records: the LUT's, applied to the network ------------------------------------


@pytest.mark.slow  # ~50 s; tuned artifacts: this and test_cli_compile_tunes_the_network in `make test-all`
def test_compile_applies_the_lut_tuning_records(
    trained_model_dir: Path, tmp_path: Path, quick
) -> None:
    """`--tuning-db LUT`: the artifact is compiled with the LUT's own tuning records."""
    from codesign.artifact.pack import CompileOptions, compile_artifact
    from codesign.targets import parse_target

    # the user's flow: a tuned LUT of the space's first block (the network's stem), then the
    # network compiled with its records. Tuning runs in a subprocess: a second
    # MetaSchedule run in one pytest process trips over pytest's log capture handlers.
    lut = tmp_path / "lut.sqlite"
    args = ["lut", "build", "--space", "tiny", "--target", "x86", "--db", str(lut)]
    args += ["--trials", "2", "--limit", "1", "--repeat", "3", "--min-repeat-ms", "5"]
    built = cli_tuning(*args, "--no-progress", "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["valid_records"] > 0
    opts = CompileOptions(
        tuning_db=lut, protocol=quick, val_limit=30, check_inputs=2, progress=False
    )
    art = compile_artifact(trained_model_dir, "x86", tmp_path / "tuned.tar", opts).artifact
    tuning = art.manifest.data["tuning"]
    assert tuning["mode"] == "tuned" and tuning["database"] == "lut.sqlite"
    assert 1 <= tuning["tasks_with_records"] < tuning["unique_tasks"]
    assert re.fullmatch(r"[0-9a-f]{16}", tuning["database_digest"])
    assert tuning["target_key"] == parse_target("x86").key
    assert art.manifest.data["equality"]["ok"]  # the tuned schedules are checked too
    # records of another target key do not apply: a clear error, nothing written
    with pytest.raises(ArtifactError, match=r"no tuning record .* records for: x86-"):
        compile_artifact(trained_model_dir, "x86:threads=1", tmp_path / "t1.tar", opts)
    assert not (tmp_path / "t1.tar").exists()
    missing = CompileOptions(tuning_db=tmp_path / "nope.sqlite", progress=False)
    with pytest.raises(ArtifactError, match="does not exist"):
        compile_artifact(trained_model_dir, "x86", tmp_path / "t2.tar", missing)


@pytest.mark.slow
def test_cli_compile_tunes_the_network(trained_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tuned.tar.gz"
    args = ["compile", "--model", str(trained_model_dir), "--target", "x86", "--out", str(out)]
    args += ["--tune-trials", "2", "--focus-trials", "64", "--val-limit", "30", "--repeat", "3"]
    res = cli_tuning(*args, "--no-progress", "--json", timeout=1800)
    assert res.returncode == 0, res.stderr
    tuning = json.loads(res.stdout)["tuning"]
    assert tuning["mode"] == "tuned" and tuning["trials_per_task"] == 2
    assert tuning["focus_trials"] == 64 and tuning["trials_done"] >= 2 * tuning["unique_tasks"]
    assert tuning["tasks_with_records"] == tuning["unique_tasks"] and tuning["seconds"] > 0
    assert verify_artifact(out).manifest.data["tuning"] == tuning
    cache = Path(os.environ["CODESIGN_CACHE_DIR"]) / "tuning" / f"{parse_target('x86').key}.sqlite"
    assert cache.exists()  # no --tuning-db: this CPU's tuning cache
    args[args.index(str(out))] = str(tmp_path / "again.tar")
    again = cli_tuning(*args, "--no-progress", "--json", timeout=600)
    assert again.returncode == 0, again.stderr
    warm = json.loads(again.stdout)["tuning"]
    assert warm["tuned_tasks"] == 0 and warm["focus_tuned_tasks"] == 0  # a task tuned once


@pytest.mark.slow
def test_tuning_cache_tunes_a_task_once(
    trained_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Without --tuning-db, records go to this CPU's tuning cache; a second compile of the same
    network (into another archive) finds every task tuned and tunes nothing."""
    monkeypatch.setenv("CODESIGN_CACHE_DIR", str(tmp_path / "cache"))
    args = ["compile", "--model", str(trained_model_dir), "--target", "x86", "--tune-trials", "1"]
    args += ["--val-limit", "10", "--repeat", "3", "--min-repeat-ms", "5", "--no-progress"]
    first = cli_tuning(*args, "--out", str(tmp_path / "a.tar"), "--json")
    assert first.returncode == 0, first.stderr
    cold = json.loads(first.stdout)["tuning"]
    cache = tmp_path / "cache" / "tuning" / f"{parse_target('x86').key}.sqlite"
    assert cache.exists() and cold["tuned_tasks"] == cold["unique_tasks"] > 0
    again = cli_tuning(*args, "--out", str(tmp_path / "b.tar"), "--json")
    assert again.returncode == 0, again.stderr
    warm = json.loads(again.stdout)["tuning"]
    assert warm["tuned_tasks"] == 0 and warm["database_digest"] == cold["database_digest"]
