"""`compile_model`: an ONNX file or a PyTorch model -> the same verified artifact.

import (codesign.tvm_backend.frontend: operator check, Relax frontend, NHWC, weights bound)
[tune its tasks into the tuning database]            tune_trials / focus_trials / tuning_db
compile_module (analytic schedules + tuning records) and export the library
on the target: equality with the original model (ONNX Runtime or PyTorch) on the given
    inputs and seeded random ones (refuses to write on mismatch), latency with a
    MeasureProtocol, and per call from Python beside ONNX Runtime and OpenVINO
write the archive: model.so, sample input/output, manifest.json (input spec, preprocessing,
    source file digest, operator summary, peers)
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codesign.artifact.checks import check_inputs, equality_report, tolerance_for
from codesign.artifact.manifest import FORMAT, LIBRARY
from codesign.artifact.pack import (
    CompileOptions,
    _executor,
    _log,
    _npy,
    build_sections,
    latency_record,
)
from codesign.artifact.verify import Artifact, verify_artifact
from codesign.errors import ArtifactError, EqualityError, InputError
from codesign.measurement import MeasureProtocol
from codesign.targets import Target, parse_target


@dataclass(frozen=True)
class Preprocess:
    """Raw image -> input, for models that do not carry it: x = (pixel * scale - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0 / 255.0
    color: str = "RGB"

    def to_manifest(self) -> dict[str, Any]:
        return {
            "color": self.color,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW",
            "resize": "bilinear",
            "pixel_range": [0.0, 255.0 * self.scale],
            "scale": self.scale,
        }


@dataclass(frozen=True)
class ImportReport:
    """What `compile_model` wrote and measured."""

    artifact: Artifact
    source: str
    max_abs_diff: float
    latency_ms: float | None
    per_call_ms: dict[str, float]  # "codesign", "onnxruntime", "openvino" (those that ran)
    peers_missing: dict[str, str]
    seconds: dict[str, float]

    @property
    def path(self) -> Path:
        return self.artifact.path


def compile_model(
    model: Any,
    *,
    out: str | os.PathLike[str],
    target: str | Target = "x86",
    input_shape: Sequence[int] | None = None,
    input_dtype: str | None = None,
    input_layout: str | None = None,
    weights: str | Path | None = None,
    preprocess: Preprocess | None = None,
    inputs: Sequence[np.ndarray] = (),
    options: CompileOptions | None = None,
    peers: bool = True,
) -> ImportReport:
    """Compile an ONNX file, a .pt2 ExportedProgram, 'module:factory' (+ `weights`), a
    torch.nn.Module or an ExportedProgram into the verified archive `out` for `target`.

    `inputs` are checked besides `options.check_inputs` seeded random ones; `peers` times ONNX
    Runtime and OpenVINO beside the compiled library (CPU targets on this machine)."""
    from codesign.tvm_backend.frontend import import_model

    out = Path(out)
    if out.is_dir():
        raise ArtifactError(f"output {out} is a directory; give the archive's file name")
    opts = options or CompileOptions()
    target = parse_target(target)
    t_all, seconds = time.time(), {}
    label = str(model) if isinstance(model, str | Path) else type(model).__name__
    _log(opts.progress, f"importing {label} for {target.key}")
    imported = import_model(model, input_shape=input_shape, input_dtype=input_dtype,
                            input_layout=input_layout, weights=weights)  # fmt: skip
    seconds["import"] = time.time() - t_all
    checks = _check_inputs(imported.input, inputs, opts)
    if preprocess is not None:
        _check_preprocess(preprocess, imported.input)
    artifact, facts = _build_and_pack(imported, target, out, opts, checks, preprocess, peers)
    seconds.update(facts.pop("seconds"))
    seconds["total"] = time.time() - t_all
    _log(opts.progress, f"wrote {out}")
    return ImportReport(artifact=artifact, source=imported.source, seconds=seconds, **facts)


def _check_inputs(spec: Any, given: Sequence[np.ndarray], opts: CompileOptions) -> list[np.ndarray]:
    """The given inputs (shape and dtype checked, batch 1) and seeded random ones."""
    out = []
    for i, x in enumerate(given):
        x = np.asarray(x)
        if x.shape == spec.shape[1:]:
            x = x[None]
        if x.shape != spec.shape or x.dtype != np.dtype(spec.dtype):
            raise InputError(
                f"check input {i} is {x.dtype} {x.shape}; the model takes {spec.dtype} "
                f"{spec.shape}: save it with that shape and dtype (numpy.save)"
            )
        out.append(np.ascontiguousarray(x))
    rng = np.random.default_rng(opts.seed)
    out += [rng.standard_normal(spec.shape).astype(spec.dtype) for _ in range(opts.check_inputs)]
    return out


def _check_preprocess(prep: Preprocess, spec: Any) -> None:
    if spec.layout != "NCHW" or len(spec.shape) != 4:
        raise InputError(
            f"preprocessing (mean/std/scale) applies to NCHW image inputs; this input is "
            f"{spec.layout} {spec.shape}: drop --mean/--std/--scale and feed preprocessed arrays"
        )
    channels = spec.shape[1]
    if len(prep.mean) != channels or len(prep.std) != channels or min(prep.std) <= 0:
        raise InputError(
            f"--mean and --std need {channels} values each (one per input channel), std > 0"
        )
    if prep.color not in ("L", "RGB") or (channels == 1) != (prep.color == "L"):
        raise InputError(
            f"a {channels}-channel input needs color {'L' if channels == 1 else 'RGB'}"
        )


def compare(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray], where: str, against: str,
            precisions: Sequence[str] = ("fp32",)) -> dict[str, Any]:  # fmt: skip
    """The equality section (checks.py's tolerance of the loosest of `precisions`);
    EqualityError if they differ."""
    precision, rtol, atol = tolerance_for(precisions)
    out = np.concatenate([np.asarray(o, np.float64).reshape(1, -1) for o in outs])
    ref = np.concatenate([np.asarray(r, np.float64).reshape(1, -1) for r in refs])
    if out.shape != ref.shape:
        raise EqualityError(f"compiled output shape {out.shape} != {against} {ref.shape}")
    report = equality_report(out, ref, (precision, rtol, atol), len(outs), where)
    report["reference"] = against
    scale = report["output_scale"]
    if not report["ok"]:
        raise EqualityError(
            f"the compiled model's outputs differ from {against}'s on {len(outs)} inputs: max "
            f"abs error {report['max_abs_err']:.3g} exceeds the {precision} tolerance (rtol {rtol:g}, "
            f"atol {atol:g} x {scale:.3g}); nothing was written. This is a compiler or frontend "
            "bug: report it with the model file"
        )
    return report


def _peers(imported: Any, executor: Any, x: np.ndarray, threads: int, tmp: Path,
           protocol: MeasureProtocol) -> dict[str, Any]:  # fmt: skip
    """Per-call ms from Python of the compiled library and of ONNX Runtime and OpenVINO on the
    same ONNX model (the given file, or the torch model exported), same threads and input."""
    from codesign.peers import export_onnx, python_ms, time_onnx

    timing = {"repeat": protocol.repeat, "min_repeat_ms": protocol.min_repeat_ms}
    path = imported.onnx_path
    if path is None:
        try:
            path = export_onnx(imported.torch_module, imported.input.shape, tmp / "peer.onnx")
        except Exception as err:  # noqa: BLE001 - a model the ONNX exporter refuses
            why = f"ONNX export failed: {type(err).__name__}: {err}"[:200]
            return {"per_call_ms": {"codesign": round(python_ms(lambda: executor.run(x),
                    **timing), 5)}, "missing": {"onnxruntime": why, "openvino": why}}  # fmt: skip
    peers = time_onnx(path, x, threads, **timing)
    missing = peers.pop("missing")
    peers["codesign"] = round(python_ms(lambda: executor.run(x), **timing), 5)
    return {"per_call_ms": peers, "missing": missing}


def _build_and_pack(imported: Any, target: Target, out: Path, opts: CompileOptions,
                    inputs: list[np.ndarray], prep: Preprocess | None, peers: bool
                    ) -> tuple[Artifact, dict[str, Any]]:  # fmt: skip
    from codesign.artifact.tuning import tune_for_artifact
    from codesign.tvm_backend.build import compile_module, prepare

    lowered = imported.lowered()
    t0 = time.time()
    fused = prepare(lowered.mod)
    database, tuning = tune_for_artifact(fused, target, out, opts)
    try:
        built = compile_module(lowered, target, database, fused=fused)
    finally:
        if database is not None:
            database.close()
    seconds = {"compile": time.time() - t0}
    return _pack(imported, built, lowered, target, out, opts, inputs, prep, peers,
                 tuning=tuning, seconds=seconds)  # fmt: skip


def ship_built(
    built: Any,
    *,
    reference: Any,
    out: str | os.PathLike[str],
    target: Target,
    label: str,
    precisions: Sequence[str],
    policy: str | None = None,
    data: Any = None,
    options: CompileOptions | None = None,
) -> ImportReport:
    """Ship a module compiled elsewhere (HAQ's mixed-precision network of a user's model) as
    the same verified archive: outputs checked against `reference` (its fake-quant PyTorch
    twin, the tolerance of the loosest of `precisions`) on the first validation images of
    `data` (as the project's quantized artifacts are: activation ranges are calibrated on
    images, and normal noise leaves them; None: seeded noise), latency measured. Local CPU
    targets only: a remote or GPU target would need the module lowered again for a host
    check."""
    from codesign.artifact.tuning import untuned_section
    from codesign.tvm_backend.frontend import Imported, InputSpec

    if target.is_remote or target.device != "cpu":
        raise ArtifactError(
            f"a pre-built module ships only for local CPU targets, not {target.key}"
        )
    opts = options or CompileOptions()
    t_all, out = time.time(), Path(out)
    spec = InputSpec("input", tuple(built.input_shape), built.input_dtype, "NCHW")
    source = Imported(mod=None, input=spec, source="torch", ops=(), label=label,
                      reference=reference)  # fmt: skip
    checks = check_inputs(data, spec.shape, opts.check_inputs, opts.seed)
    artifact, facts = _pack(source, built, None, target, out, opts, checks, None, False,
                            tuning=untuned_section(target, opts), seconds={}, precisions=precisions,
                            policy=policy)  # fmt: skip
    seconds = {**facts.pop("seconds"), "total": time.time() - t_all}
    return ImportReport(artifact=artifact, source="torch", seconds=seconds, **facts)


def _pack(imported: Any, built: Any, lowered: Any, target: Target, out: Path,
          opts: CompileOptions, inputs: list[np.ndarray], prep: Preprocess | None, peers: bool,
          *, tuning: Any, seconds: dict[str, float], precisions: Sequence[str] = ("fp32",),
          policy: str | None = None) -> tuple[Artifact, dict[str, Any]]:  # fmt: skip
    """Check `built` against `imported.reference` on `inputs` on the target, measure it and
    write the archive (`lowered`: for a host-substitute check when the device is not used)."""
    from codesign import __version__
    from codesign.artifact.archive import write_archive

    against = "ONNX Runtime" if imported.source == "onnx" else "PyTorch"
    peer_info: dict[str, Any] = {"per_call_ms": {}, "missing": {}}
    with tempfile.TemporaryDirectory(prefix="codesign-import-") as tmpdir:
        tmp = Path(tmpdir)
        library = built.export(tmp / LIBRARY)
        executor, stack, on_device = _executor(target, lowered, library, tmp, opts)
        with stack:
            _log(opts.progress, f"checking against {against} on {executor.where}")
            t0 = time.time()
            outs = [executor.run(x) for x in inputs]
            equality = compare(outs, [imported.reference(x) for x in inputs], executor.where,
                               against, precisions)  # fmt: skip
            seconds["check"] = time.time() - t0
            latency = None
            if on_device:
                t0 = time.time()
                latency = latency_record(
                    executor.time(inputs[0], opts.protocol), opts, target, executor
                )
                if peers and target.device == "cpu" and not target.is_remote:
                    _log(opts.progress, "timing ONNX Runtime and OpenVINO beside it")
                    peer_info = _peers(imported, executor, inputs[0], target.threads, tmp,
                                       opts.protocol)  # fmt: skip
                seconds["measure"] = time.time() - t0
        files = {
            LIBRARY: library.read_bytes(),
            "sample_input.npy": _npy(inputs[0]),
            "sample_output.npy": _npy(np.asarray(outs[0])),
        }
    out_shape = [int(d) for d in np.asarray(outs[0]).shape]
    classes = [str(i) for i in range(out_shape[1])] if len(out_shape) == 2 else []
    spec = imported.input
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "codesign_version": __version__,
        "library": LIBRARY,
        "inputs": [
            {
                "name": spec.name,
                "shape": list(spec.shape),
                "dtype": spec.dtype,
                **({"layout": spec.layout} if spec.layout else {}),
            }
        ],  # fmt: skip
        "outputs": [
            {"name": "output", "shape": out_shape, "dtype": str(np.asarray(outs[0]).dtype)}
        ],
        "classes": classes,
        "preprocessing": prep.to_manifest() if prep else None,
        **build_sections(target),
        "model": {
            "arch": None,
            "source": imported.source,
            "label": imported.label,
            "source_sha256": imported.source_sha256,
            "blocks": [],
            "ops": dict(imported.ops),
            "policies": {"quantization": policy, "pruning": None},
            "weights_sha256": imported.source_sha256,
            "dataset": None,
        },
        "tuning": tuning,
        "latency": latency,
        "accuracy": None,
        "equality": equality,
        "peers": peer_info,
        "samples": {"input": "sample_input.npy", "output": "sample_output.npy"},
    }
    if latency is None:
        manifest["latency_note"] = f"not measured: the {target.key} device was not used"
    write_archive(out, manifest, files)
    facts = {
        "max_abs_diff": equality["max_abs_err"],
        "latency_ms": latency["median_ms"] if latency else None,
        "per_call_ms": peer_info["per_call_ms"],
        "peers_missing": peer_info["missing"],
        "seconds": seconds,
    }
    return verify_artifact(out), facts
