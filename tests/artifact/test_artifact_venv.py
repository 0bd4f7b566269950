"""The README's recipe loads an artifact in a fresh virtual environment with only TVM installed.

Creates a new venv, installs exactly apache-tvm, apache-tvm-ffi and numpy (from PyPI, or from
the wheel directory in CODESIGN_WHEELHOUSE without an index), checks that neither torch nor
codesign is importable there, and runs the recipe copied verbatim from README.md on an x86
artifact, in TVM's runtime-only mode; a truncated archive, an input of the wrong shape and
an edited manifest (its digest no longer matches) are refused in one line, without a traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codesign.artifact.verify import verify_artifact

REPO = Path(__file__).resolve().parents[2]
PINS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy"]
_RECIPE = re.compile(r"<!-- recipe:start -->\s*```python\n(.*?)```\s*<!-- recipe:end -->", re.S)
_OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")


def readme_recipe() -> str:
    found = _RECIPE.search((REPO / "README.md").read_text())
    assert found, "README.md has no <!-- recipe:start --> python block"
    return found.group(1)


def test_readme_recipe_runs_with_only_tvm(x86_artifact: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS]
    wheels = os.environ.get("CODESIGN_WHEELHOUSE")
    if wheels:
        cmd += ["--no-index", "--find-links", wheels]
    pip = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if pip.returncode != 0 and any(s in pip.stderr for s in _OFFLINE):
        pytest.skip("PyPI is unreachable; set CODESIGN_WHEELHOUSE to a directory of the wheels")
    assert pip.returncode == 0, pip.stderr[-3000:]
    installed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, env=env
    )
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert {"apache-tvm", "apache-tvm-ffi", "numpy"} <= names
    assert not names & {"torch", "codesign", "onnx", "onnxruntime"}, names

    script = tmp_path / "load_artifact.py"
    script.write_text(readme_recipe())
    art = verify_artifact(x86_artifact)
    x = np.load(io.BytesIO(art.files["sample_input.npy"]))
    expected = np.load(io.BytesIO(art.files["sample_output.npy"]))
    np.save(tmp_path / "input.npy", x)
    probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('codesign'))"
    isolated = subprocess.run(
        [str(py), "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert isolated.stdout.split() == ["None", "None"], isolated.stdout + isolated.stderr
    run = subprocess.run(
        [str(py), "-I", str(script), str(x86_artifact), str(tmp_path / "input.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**env, "TVM_USE_RUNTIME_LIB": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
    logits = np.asarray(json.loads(lines["logits"]), dtype=np.float32)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert lines["class"] == art.manifest.classes[int(expected.argmax())]

    # refusals: one line naming the problem, never a traceback
    def refused(archive: Path, npy: Path) -> str:
        out = subprocess.run(
            [str(py), "-I", str(script), str(archive), str(npy)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**env, "TVM_USE_RUNTIME_LIB": "1"},
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        return out.stderr

    data = x86_artifact.read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    err = refused(tmp_path / "truncated.tar", tmp_path / "input.npy")
    assert "not a complete codesign artifact" in err
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5), np.float32))
    err = refused(x86_artifact, tmp_path / "wrong.npy")
    assert "has shape (3, 5); the model takes" in err
    tampered = _with_member(data, "manifest.json", _edit_classes)
    (tmp_path / "tampered.tar").write_bytes(tampered)
    err = refused(tmp_path / "tampered.tar", tmp_path / "input.npy")
    assert "manifest.json does not match its digest" in err


def _edit_classes(raw: bytes) -> bytes:
    manifest = json.loads(raw)
    manifest["classes"][0] = "edited"
    return json.dumps(manifest, indent=1).encode()


def _with_member(archive: bytes, name: str, edit) -> bytes:  # noqa: ANN001
    """The archive with one member's bytes passed through edit (hashes left as they were)."""
    import tarfile

    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive)) as src,
        tarfile.open(fileobj=out, mode="w") as dst,
    ):
        for info in src.getmembers():
            body = src.extractfile(info).read() if info.isfile() else None
            if info.name == name:
                body = edit(body)
                info.size = len(body)
            dst.addfile(info, io.BytesIO(body) if body is not None else None)
    return out.getvalue()
