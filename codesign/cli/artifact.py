"""`codesign compile | verify | run`: build, check and run shipped artifacts."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from codesign.cli.argtypes import add_rpc_timeout, non_negative_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile a model directory, an ONNX file or a PyTorch model into a verified "
        "artifact (.tar) for a target",
        description="Compile DIR (model.json + weights.pt), an .onnx file, a .pt2 ExportedProgram "
        "(torch.export.save) or 'module:factory' (+ --weights state_dict.pt) for a target with "
        "the one compile recipe, check the compiled outputs against PyTorch (ONNX Runtime for "
        "ONNX), measure latency on the target (imported models: beside ONNX Runtime and "
        "OpenVINO), and write one archive: the library (weights embedded), sample input/output "
        "and manifest.json with sha256 of every file.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory (model.json + weights.pt), .onnx file, .pt2 file, or "
        "'module:factory' (a function returning a torch.nn.Module)",
    )
    p.add_argument("--target", required=True, help="target spec (see `codesign targets`)")
    p.add_argument("--out", required=True, help="archive to write (.tar, or .tar.gz/.tgz)")
    p.add_argument(
        "--tune-trials",
        type=non_negative_int,
        default=0,
        help="MetaSchedule trials per unique task of the network (default 0: no tuning); "
        "records go to --tuning-db, else to this CPU's tuning cache (~/.cache/codesign/tuning/, "
        "CODESIGN_CACHE_DIR overrides), so a task tuned once is never tuned again",
    )
    p.add_argument(
        "--focus-trials",
        type=non_negative_int,
        default=0,
        help="extra trials after --tune-trials, split over the tasks in proportion to their "
        "estimated share of the network's time (the few kernels that dominate it)",
    )
    p.add_argument(
        "--tuning-db",
        default=None,
        help="LUT file whose tuning records are applied: the artifact uses exactly the "
        "records the LUT was measured with",
    )
    p.add_argument("--repeat", type=positive_int, default=10, help="timed samples (default 10)")
    p.add_argument(
        "--min-repeat-ms", type=non_negative_int, default=50, help="ms per sample (default 50)"
    )
    p.add_argument(
        "--check-inputs",
        type=positive_int,
        default=8,
        help="validation inputs for the equality check with PyTorch (default 8)",
    )
    p.add_argument(
        "--val-limit",
        type=non_negative_int,
        default=None,
        help="validation images for the accuracy (default: all; 0: skip the accuracy)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for tuning and random inputs")
    p.add_argument(
        "--no-device",
        action="store_true",
        help="remote/GPU targets: do not use the device; check on a host build of the same "
        "module and record no latency",
    )
    p.add_argument(
        "--emulated",
        action="store_true",
        help="record that the remote device is an emulator (its timing is not real)",
    )
    add_rpc_timeout(p)
    _import_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress output")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_compile)

    p = sub.add_parser(
        "verify",
        help="check an artifact: hashes, manifest schema, library architecture",
    )
    p.add_argument("artifact", help="archive written by `codesign compile`")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "run",
        help="run an artifact on an input, locally or on an RPC device; print top classes",
    )
    p.add_argument("artifact", help="archive written by `codesign compile`")
    p.add_argument(
        "--input",
        required=True,
        help=".npy (preprocessed input, (C,H,W) or (N,C,H,W)) or an image file",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--rpc-key", default=None, help="run on an RPC server of this key")
    p.add_argument("--tracker", default=None, help="RPC tracker HOST:PORT")
    add_rpc_timeout(p)
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="TVM threads to run with, locally or on the RPC server (default: the artifact's "
        "target threads); a server runs at most its TVM_NUM_THREADS",
    )
    p.add_argument("--top", type=positive_int, default=5, help="classes to print (default 5)")
    p.add_argument("--repeat", type=positive_int, default=10, help="timed samples (default 10)")
    p.add_argument(
        "--min-repeat-ms", type=non_negative_int, default=50, help="ms per sample (default 50)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1x3x224x224") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: dimensions must be positive integers")
    return dims


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not numbers like 0.485,0.456,0.406"
        ) from None


def _import_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("imported models (.onnx, .pt2, module:factory)")
    g.add_argument("--weights", default=None, help="state_dict (.pt) for a module:factory model")
    g.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="input shape, e.g. 1x3x224x224: needed where the model has dynamic dimensions or "
        "carries no shape (module:factory)",
    )
    g.add_argument("--input-dtype", default=None, help="input dtype (default: the model's)")
    g.add_argument("--input-layout", default=None, help="input layout (default NCHW for 4-d)")
    g.add_argument(
        "--mean", type=_floats, default=None, help="per-channel mean, e.g. 0.485,0.456,0.406"
    )
    g.add_argument(
        "--std", type=_floats, default=None, help="per-channel std, e.g. 0.229,0.224,0.225"
    )
    g.add_argument(
        "--scale",
        type=float,
        default=1 / 255,
        help="pixel scale before mean/std: x = (pixel * scale - mean) / std (default 1/255)",
    )
    g.add_argument(
        "--check-input",
        action="append",
        default=[],
        metavar="NPY",
        help="an input (.npy) to check against the original model besides the random ones "
        "(repeatable)",
    )
    g.add_argument(
        "--no-peers", action="store_true", help="do not time ONNX Runtime and OpenVINO beside it"
    )


def _ms(value: Any) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4g} ms"


def _summary(m: Any, path: str) -> list[str]:
    d = m.data
    lat, acc, eq, tun = d.get("latency"), d.get("accuracy"), d["equality"], d["tuning"]
    lines = [
        f"{path}: {d['model'].get('arch') or d['model'].get('label') or 'network'} for {m.target_key} "
        f"({m.machine} library, TVM {m.tvm_version}), input {m.input.name} "
        f"{list(m.input.shape)} {m.input.dtype}, {len(m.classes)} classes",
    ]
    if lat:
        p = lat["protocol"]
        lines.append(
            f"  latency {_ms(lat['median_ms'])} median of {p['repeat']} samples "
            f"(>= {p['min_repeat_ms']} ms each) on {lat['measured_on']}"
            + (" [emulated]" if lat.get("emulated") else "")
        )
    else:
        lines.append(f"  latency: {d.get('latency_note')}")
    if acc:
        lines.append(
            f"  accuracy {acc['top1']:.2f}% on {acc['n']} {acc['dataset']} validation images "
            f"(PyTorch {acc['torch_top1']:.2f}%)"
        )
    lines.append(
        f"  equal to {eq.get('reference', 'PyTorch')} on {eq['n_inputs']} inputs: max abs error {eq['max_abs_err']:.3g} "
        f"({eq['precision']} tolerance rtol {eq['rtol']:g}, atol {eq['atol']:g}) on "
        f"{eq['checked_on']}"
    )
    per_call = (d.get("peers") or {}).get("per_call_ms") or {}
    if per_call:
        ours = per_call.get("codesign")
        lines.append(
            "  per call from Python: "
            + ", ".join(
                f"{k} {_ms(v)}"
                + (f" (codesign/{k} {ours / v:.2f}x)" if ours and k != "codesign" else "")
                for k, v in per_call.items()
            )
        )
    if tun["mode"] == "tuned":
        lines.append(
            f"  tuned: {tun.get('tasks_with_records')}/{tun.get('unique_tasks')} tasks with "
            f"records from {tun['database']} (digest {tun['database_digest']}), "
            f"{tun['trials_per_task']} trials/task, {tun['seconds']:.1f} s"
        )
    else:
        lines.append("  untuned (default schedules)")
    return lines


def _check_out(out: str) -> None:
    """Refuse an --out that cannot be written, before minutes of compiling."""
    from codesign.errors import ArtifactError

    path = Path(out)
    if path.is_dir():
        raise ArtifactError(
            f"--out {out} is a directory; give the archive's file name, e.g. {path / 'model.tar'}"
        )


def _check_input(text: str) -> None:
    """Refuse an input file that cannot be read, in milliseconds (before TVM is imported)."""
    from codesign.artifact.predictor import IMAGE_SUFFIXES
    from codesign.errors import InputError

    path = Path(text)
    if not path.exists():
        raise InputError(f"input file {text} does not exist")
    if not path.is_file():
        raise InputError(f"input {text} is not a file; give a .npy array or an image file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        try:
            np.load(path, allow_pickle=False)
        except (EOFError, OSError, ValueError) as err:
            why = "empty file" if path.stat().st_size == 0 else f"{type(err).__name__}: {err}"
            raise InputError(
                f"{text} is not a readable .npy array ({why}); write one with numpy.save"
            ) from None
    elif suffix in IMAGE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a damaged file
            raise InputError(
                f"{text} is not a readable image ({type(err).__name__}: {err}); give a valid "
                "image file or a preprocessed .npy array"
            ) from None
    else:
        raise InputError(
            f"{text}: give a .npy array (preprocessed input) or an image "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )


def _compile(args: argparse.Namespace) -> int:
    from codesign.artifact.pack import CompileOptions, compile_artifact
    from codesign.errors import ArtifactError
    from codesign.measurement import MeasureProtocol

    _check_out(args.out)

    if min(args.tune_trials, args.focus_trials, args.min_repeat_ms) < 0 or args.repeat < 1:
        raise ArtifactError(
            "--tune-trials, --focus-trials, --repeat and --min-repeat-ms must be >= 0 (repeat >= 1)"
        )
    opts = CompileOptions(
        check_inputs=args.check_inputs,
        tune_trials=args.tune_trials,
        focus_trials=args.focus_trials,
        tuning_db=Path(args.tuning_db) if args.tuning_db else None,
        protocol=MeasureProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms),
        val_limit=args.val_limit,
        seed=args.seed,
        device_check=not args.no_device,
        rpc_timeout_s=args.rpc_timeout,
        emulated=True if args.emulated else None,
        progress=not args.no_progress,
    )
    if Path(args.model).is_dir():
        report = compile_artifact(args.model, args.target, args.out, opts)
    else:
        report = _compile_imported(args, opts)
    m = report.artifact.manifest
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
    else:
        size = report.path.stat().st_size
        print(f"wrote {report.path} ({size / 1024:.0f} KiB) in {report.seconds['total']:.1f} s")
        print("\n".join(_summary(m, str(report.path))))
    return 0


def _compile_imported(args: argparse.Namespace, opts: Any) -> Any:
    """An .onnx / .pt2 / module:factory model: checked inputs read here, the rest in
    codesign.artifact.imported.compile_model."""
    import numpy as np

    from codesign.artifact.imported import Preprocess, compile_model
    from codesign.errors import InputError

    prep = None
    if (args.mean is None) != (args.std is None):
        raise InputError("give --mean and --std together (one value per input channel)")
    if args.mean is not None:
        prep = Preprocess(mean=args.mean, std=args.std, scale=args.scale,
                          color="L" if len(args.mean) == 1 else "RGB")  # fmt: skip
    inputs = []
    for path in args.check_input:
        _check_input(path)
        inputs.append(np.load(path, allow_pickle=False))
    return compile_model(
        args.model,
        out=args.out,
        target=args.target,
        input_shape=args.input_shape,
        input_dtype=args.input_dtype,
        input_layout=args.input_layout,
        weights=args.weights,
        preprocess=prep,
        inputs=inputs,
        options=opts,
        peers=not args.no_peers,
    )


def _verify(args: argparse.Namespace) -> int:
    from codesign.artifact.verify import verify_artifact

    art = verify_artifact(args.artifact)
    m = art.manifest
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    print(f"OK {args.artifact}: {len(m.files)} files match their sha256; manifest valid")
    print(
        f"   library {m.library} is an ELF {art.elf.bits}-bit {m.machine} shared object, "
        f"as target {m.target_spec} needs"
    )
    print("\n".join(_summary(m, args.artifact)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from codesign.artifact.predictor import load, read_input
    from codesign.artifact.verify import verify_artifact
    from codesign.errors import ArtifactError
    from codesign.measurement import MeasureProtocol

    _check_input(args.input)
    session = None
    where_remote = args.rpc_key or args.tracker
    if where_remote:
        from codesign.artifact.remote import request_session

        target = verify_artifact(args.artifact).manifest.data["target"]
        key = args.rpc_key or target.get("rpc_key")
        tracker = args.tracker or target.get("tracker")
        if not key or not tracker:
            raise ArtifactError("remote runs need both --rpc-key KEY and --tracker HOST:PORT")
        session = request_session(tracker, key, timeout_s=args.rpc_timeout)
        where_remote = f"rpc key {key} via tracker {tracker}"
    protocol = MeasureProtocol(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    with load(args.artifact, args.device, session=session, threads=args.threads) as predictor:
        x = predictor.check_input(read_input(args.input, predictor))
        top = predictor.classify(x, top=args.top)
        m = predictor.time(protocol)
        where = where_remote or predictor.executor.where
    if args.json:
        print(
            json.dumps(
                {
                    "top": [[{"class": c, "probability": p} for c, p in row] for row in top],
                    "latency_ms": None if not m.ok else m.median_ms,
                    "latency_error": m.error,
                    "protocol": protocol.to_dict(),
                    "device": where,
                },
                indent=2,
            )
        )
        return 0 if m.ok else 1
    for i, row in enumerate(top):
        head = f"input {i}: " if len(top) > 1 else ""
        print(head + ", ".join(f"{c} {p:.3f}" for c, p in row))
    if m.ok:
        print(f"latency {_ms(m.median_ms)} (median of {m.repeats}, batch 1) on {where}")
        return 0
    print(f"latency: timing failed on {where}: {m.error}")
    return 1
