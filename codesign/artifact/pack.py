"""`compile_artifact`: model directory -> verified, self-describing archive for one target.

    load DIR (model.json + weights.pt)
    lower (torch.export -> Relax, BN folded, weights bound as constants)
    [tune the network's tasks into a LUT file's tuning database]  --tune-trials N
    [then more trials on the tasks that dominate its time]         --focus-trials M
    apply the LUT file's tuning records                           --tuning-db PATH
    compile_module (the one compile recipe) and export the library (cross-compiled for ARM)
    on the target (local, or an RPC session for remote targets):
        equality with PyTorch on validation inputs (refuses to write on mismatch)
        accuracy on the validation split, latency with a MeasureProtocol
    write model.tar: model.so, sample_input.npy, sample_output.npy, manifest.json

Weights are embedded in the library as constants: the LUT was measured that way, constant
folding at compile time lets layout transforms pre-transform them, and one file is simpler to
ship. The consequence: new weights need a recompile.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codesign.artifact.checks import (
    check_equality,
    check_inputs,
    compiled_accuracy,
    validation_dataset,
)
from codesign.artifact.executor import Executor, LocalExecutor
from codesign.artifact.manifest import FORMAT, LIBRARY, WEIGHTS_NOTE, expected_machine
from codesign.artifact.tuning import tune_for_artifact
from codesign.artifact.verify import Artifact, verify_artifact
from codesign.errors import ArtifactError
from codesign.measurement import Measurement, MeasureProtocol
from codesign.targets import Target, parse_target


@dataclass(frozen=True)
class CompileOptions:
    """How `compile_artifact` tunes, checks and measures.

    tune_trials: MetaSchedule trials per unique task of the network (0: no tuning);
    focus_trials: extra trials, split over the tasks in proportion to their estimated share
        of the network's time (`tvm_backend.tuning.tune_focused`);
    tuning_db: the LUT file whose records are applied (and tuned into with tune_trials; by
        default: this CPU's tuning cache, `codesign.paths.tuning_cache`);
    check_inputs: validation inputs for the equality check;
    val_limit: validation images for the accuracy (None: all; 0: skip accuracy);
    device_check: run the checks and the timing on the target device (for remote targets
        over RPC); False runs the checks on a host build of the same Relax module and records
        no latency;
    emulated: whether the remote device is an emulator (recorded; None: unknown).
    """

    tune_trials: int = 0
    focus_trials: int = 0
    tuning_db: Path | None = None
    protocol: MeasureProtocol = MeasureProtocol()
    check_inputs: int = 8
    val_limit: int | None = None
    seed: int = 0
    device_check: bool = True
    rpc_timeout_s: float = 60.0
    emulated: bool | None = None
    progress: bool = True


@dataclass(frozen=True)
class CompileReport:
    artifact: Artifact
    seconds: dict[str, float]

    @property
    def path(self) -> Path:
        return self.artifact.path


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[compile] {msg}", file=sys.stderr, flush=True)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def build_sections(target: Target) -> dict[str, Any]:
    """The manifest's sections that say what built the library: the target (with the machine
    it runs on), TVM and the compile recipe, and where the weights are."""
    import tvm
    import tvm_ffi

    from codesign.tvm_backend.build import PIPELINE

    return {
        "target": {**target.to_dict(), "machine": expected_machine(target.tvm_dict)},
        "tvm": {
            "version": tvm.__version__,
            "ffi_version": tvm_ffi.__version__,
            "pipeline": PIPELINE,
        },
        "weights": {"storage": "embedded", "note": WEIGHTS_NOTE},
    }


def latency_record(m: Any, opts: CompileOptions, target: Target, executor: Any) -> dict[str, Any]:
    """The manifest's latency section: an artifact's timing on `executor` (ArtifactError when
    the timing failed)."""
    if not m.ok:
        raise ArtifactError(f"timing on {executor.where} failed: {m.error}")
    return {
        "median_ms": m.median_ms,
        "mean_ms": m.mean_ms,
        "std_ms": m.std_ms,
        "min_ms": m.min_ms,
        "max_ms": m.max_ms,
        "repeats": m.repeats,
        "samples_ms": list(m.samples_ms),
        "protocol": opts.protocol.to_dict(),
        "method": "TVM time_evaluator on the shipped library, batch 1; median of `repeat` "
        "samples, each the mean of >= `number` runs lasting >= `min_repeat_ms`, after one "
        "warm-up run",
        "measured_on": executor.where,
        "threads": target.threads,
        "emulated": executor.emulated,
        "host": socket.gethostname(),
    }


def _executor(
    target: Target, lowered: Any, library: Path, tmp: Path, opts: CompileOptions
) -> tuple[Executor, contextlib.ExitStack, bool]:
    """Where the checks run: the target itself, or a host build when the device is not used;
    the flag says whether it is the target device (only then is the latency measured)."""
    stack = contextlib.ExitStack()
    if target.is_remote and opts.device_check:
        from dataclasses import replace

        from codesign.artifact.remote import RemoteExecutor
        from codesign.tvm_backend.runner import Where

        where = replace(Where.of_target(target), request_timeout_s=opts.rpc_timeout_s)
        ex = RemoteExecutor(
            where.session(),
            library,
            threads=target.threads,
            emulated=opts.emulated,
            where=where.describe(),
        )
        return stack.enter_context(ex), stack, True
    if target.is_remote or (target.device == "cuda" and not opts.device_check):
        from codesign.tvm_backend.build import compile_module

        host = parse_target("x86")  # checks outputs only: nothing is timed on it
        path = compile_module(lowered, host).export(tmp / "host-substitute.so")
        ex = LocalExecutor(path, machine=expected_machine(host.tvm_dict), threads=host.threads)
        ex.where = f"host substitute ({host.key} build of the same Relax module; device not used)"
        return stack.enter_context(ex), stack, False
    ex = LocalExecutor(
        library,
        machine=expected_machine(target.tvm_dict),
        device=target.device,
        threads=target.threads,
    )
    return stack.enter_context(ex), stack, True


def _input_info(meta: Any, input_shape: tuple[int, ...], name: str) -> dict[str, Any]:
    ds = meta.dataset
    classes = list(ds.classes) if ds else [str(i) for i in range(meta.blocks[-1].cout)]
    prep = None
    if ds is not None:
        prep = {
            "color": "L" if input_shape[1] == 1 else "RGB",
            "mean": list(ds.mean),
            "std": list(ds.std),
            "layout": "NCHW",
            "resize": "bilinear",
            "pixel_range": [0.0, 255.0],
        }
    return {
        "inputs": [
            {"name": name, "shape": list(input_shape), "dtype": "float32", "layout": "NCHW"}
        ],
        "outputs": [{"name": "logits", "shape": [1, len(classes)], "dtype": "float32"}],
        "classes": classes,
        "preprocessing": prep,
    }


def _lower_quantized(
    qnet: Any, meta: Any, target: Target, input_shape: tuple[int, ...], label: str
) -> Any:
    """A quantised model directory's network, lowered with its integer blocks for `target`."""
    from codesign.compression.quant.fakequant import export_params
    from codesign.compression.quant.policy import PolicyError, QuantPolicy
    from codesign.tvm_backend.precision import precision_menu
    from codesign.tvm_backend.quantize import lower_quantized

    if tuple(input_shape) != tuple(meta.blocks[0].input_shape):
        raise ArtifactError(
            f"{label}: the dataset's input {input_shape} differs from the first block's "
            f"{meta.blocks[0].input_shape}; a quantised network is lowered at its block shapes"
        )
    menu = precision_menu(target)
    try:
        QuantPolicy.from_dict(meta.policies["quantization"]).check_menu(menu)
    except PolicyError as err:
        raise ArtifactError(
            f"{label} was quantised for another target: {err}. Quantise the float model for "
            f"{target.key} with `codesign quantize`"
        ) from None
    return lower_quantized(meta.blocks, export_params(qnet), menu, label=meta.arch or label)


def compile_artifact(
    model_dir: str | Path,
    target: str | Target,
    out: str | Path,
    options: CompileOptions | None = None,
) -> CompileReport:
    """Compile the model in `model_dir` for `target` into the archive `out` (see module doc)."""
    if Path(out).is_dir():  # refused before minutes of compiling, not after
        raise ArtifactError(
            f"output {out} is a directory; give the archive's file name, e.g. {Path(out) / 'model.tar'}"
        )
    import tvm

    from codesign import __version__
    from codesign.model_dir import load_model
    from codesign.tvm_backend.build import compile_module, prepare
    from codesign.tvm_backend.lower import lower_module

    opts = options or CompileOptions()
    target, out = parse_target(target), Path(out)
    if target.device == "cuda" and opts.device_check and not tvm.cuda(0).exist:
        raise ArtifactError(
            f"no CUDA device on this machine to check and time the {target.key} build; compile "
            "with --no-device (outputs checked on a host build of the same module, no latency "
            "recorded), or run on a machine with the GPU"
        )
    if min(opts.tune_trials, opts.focus_trials) < 0 or opts.check_inputs < 1:
        raise ArtifactError("--tune-trials and --focus-trials must be >= 0, --check-inputs >= 1")
    seconds: dict[str, float] = {}
    t_all = time.time()
    net, meta = load_model(model_dir)
    precisions = sorted({b.precision for b in meta.blocks})
    input_shape = (1, *meta.dataset.input_shape) if meta.dataset else net.input_shape
    _log(opts.progress, f"lowering {meta.arch or model_dir} at {input_shape} for {target.key}")
    t0 = time.time()
    if meta.quantized:
        lowered = _lower_quantized(net, meta, target, input_shape, str(model_dir))
    else:
        lowered = lower_module(net, input_shape, label=meta.arch or str(model_dir))
    fused = prepare(lowered.mod)
    seconds["lower"] = time.time() - t0
    database, tuning = tune_for_artifact(fused, target, out, opts)
    t0 = time.time()
    try:
        built = compile_module(lowered, target, database, fused=fused)
    finally:
        if database is not None:
            database.close()
    seconds["compile"] = time.time() - t0
    with tempfile.TemporaryDirectory(prefix="codesign-compile-") as tmpdir:
        tmp = Path(tmpdir)
        library = built.export(tmp / LIBRARY)
        data = None
        if meta.dataset is not None and opts.val_limit != 0:
            data = validation_dataset(meta.dataset)
        inputs = check_inputs(data, input_shape, opts.check_inputs, opts.seed)
        executor, stack, on_device = _executor(target, lowered, library, tmp, opts)
        with stack:
            _log(opts.progress, f"checking on {executor.where}")
            t0 = time.time()
            equality, outs = check_equality(executor, net, inputs, precisions)
            accuracy = (
                compiled_accuracy(executor, net, data, opts.val_limit, opts.progress)
                if data is not None
                else None
            )
            seconds["check"] = time.time() - t0
            latency, note = None, None
            if not on_device:
                note = f"not measured: the {target.key} device was not used (--no-device)"
            else:
                t0 = time.time()
                # a pool of `passes` runs, as the LUT's modules are (a slow phase of the host
                # lasts seconds: one run can fall in it whole)
                runs = [
                    executor.time(inputs[0], opts.protocol) for _ in range(opts.protocol.passes)
                ]
                m = Measurement.pool(runs)
                seconds["measure"] = time.time() - t0
                latency = latency_record(m, opts, target, executor)
        files = {
            LIBRARY: library.read_bytes(),
            "sample_input.npy": _npy(inputs[0]),
            "sample_output.npy": _npy(outs[0].astype("float32")),
        }
    weights = Path(model_dir) / "weights.pt"
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "codesign_version": __version__,
        "library": LIBRARY,
        **_input_info(meta, input_shape, lowered.mod["main"].params[0].name),
        **build_sections(target),
        "model": {
            "arch": meta.arch,
            "space": meta.space,
            "blocks": [b.key for b in meta.blocks],
            "policies": {"quantization": None, "pruning": None, **meta.policies},
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "dataset": meta.dataset.to_dict() if meta.dataset else None,
            "recorded_accuracy": meta.accuracy,
        },
        "tuning": tuning,
        "latency": latency,
        "accuracy": accuracy,
        "equality": equality,
        "samples": {"input": "sample_input.npy", "output": "sample_output.npy"},
    }
    if latency is None:
        manifest["latency_note"] = note
    from codesign.artifact.archive import write_archive

    write_archive(out, manifest, files)
    seconds["total"] = time.time() - t_all
    _log(opts.progress, f"wrote {out}")
    return CompileReport(verify_artifact(out), seconds)
