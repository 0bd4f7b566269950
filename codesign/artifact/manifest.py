"""`manifest.json`: what an artifact holds, how to feed it, and what was measured.

The manifest is the artifact's self-description. `parse_manifest` validates a decoded JSON
object against the schema below and returns a `Manifest`; the packer builds its manifest through
the same function, so a writer cannot produce what a reader refuses.

    format            "codesign-artifact/1"
    digest            sha256 of the canonical JSON of every other field (detects edits)
    library           file name of the compiled library inside the archive
    files             {name: {sha256, size}} for every archive member except manifest.json
    inputs, outputs   [{name, shape, dtype, layout?}]
    classes           class names, in output order
    preprocessing     raw image -> input: color, resize, pixel_range, mean/std, layout (or null)
    target            spec, key, name, tvm (target JSON), device, threads, machine (ELF), ...
    tvm               version, ffi_version, pipeline (the compile recipe)
    weights           storage ("embedded") and what that means
    model             arch string, space, blocks, policies, weights_sha256, dataset; imported
                      models (source "onnx" / "torch"): no blocks, source_sha256, ops
    tuning            mode, database, database_digest, trials, seconds, task coverage
    latency           median/mean/std/min/max ms, protocol, where it was measured (or null)
    accuracy          top-1 of the compiled module on the validation split (or null)
    equality          compiled vs PyTorch outputs: inputs, max error, tolerance, where checked
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from codesign.errors import ManifestError

FORMAT = "codesign-artifact/1"
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS_NOTE = (
    "weights are embedded in the library as constants (folded at compile time, which lets the "
    "compiler pre-transform them); new weights need a recompile with `codesign compile`"
)

# ELF e_machine values of the architectures a TVM library can be built for.
ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv64"}
_TRIPLE_PREFIX = {
    "x86_64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv7": "arm",
    "arm": "arm",
    "riscv64": "riscv64",
}
_HEX64 = re.compile(r"[0-9a-f]{64}")
MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")
IMPORTED_SOURCES = ("onnx", "torch")  # model.source of models compiled from a file or module


def host_machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def expected_machine(tvm_target: Mapping[str, Any]) -> str:
    """The ELF architecture a library compiled for this TVM target dict must have."""
    triple = str(tvm_target.get("mtriple") or "")
    if not triple:
        return host_machine()  # no triple: LLVM compiles for the compiling host
    arch = triple.split("-", 1)[0]
    for prefix, machine in _TRIPLE_PREFIX.items():
        if arch.startswith(prefix):
            return machine
    return arch


def canonical_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def manifest_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its `digest` field."""
    body = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.layout:
            d["layout"] = self.layout
        return d


@dataclass(frozen=True, slots=True)
class Preprocessing:
    """Raw image -> network input: convert to `color`, resize (bilinear) to the input's HxW,
    scale to `pixel_range`, subtract `mean` and divide by `std` per channel, lay out as
    `layout`."""

    color: str  # "L" (grey) or "RGB"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    resize: str = "bilinear"
    pixel_range: tuple[float, float] = (0.0, 255.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "color": self.color,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
            "resize": self.resize,
            "pixel_range": list(self.pixel_range),
        }


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The validated core of a manifest; `data` keeps the whole JSON object as read."""

    library: str
    machine: str
    target_spec: str
    target_key: str
    target_json: str
    device: str
    threads: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    classes: tuple[str, ...]
    preprocessing: Preprocessing | None
    files: tuple[FileEntry, ...]
    tvm_version: str
    digest: str
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self.data))

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def latency_ms(self) -> float | None:
        lat = self.data.get("latency")
        return float(lat["median_ms"]) if lat else None

    @property
    def accuracy(self) -> float | None:
        acc = self.data.get("accuracy")
        return float(acc["top1"]) if acc else None

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)


# --- validation ---------------------------------------------------------------------------


def _fail(path: str, what: str) -> ManifestError:
    return ManifestError(
        f"{MANIFEST}: {path} {what}; the artifact is damaged or was not written by "
        "`codesign compile` (rebuild it)"
    )


def _get(
    d: Mapping[str, Any], key: str, path: str, kinds: tuple[type, ...], nullable: bool = False
) -> Any:  # one of `kinds` (or None when nullable): checked at run time
    if key not in d:
        raise _fail(f"{path}.{key}" if path else key, "is missing")
    v = d[key]
    if v is None and nullable:
        return None
    if isinstance(v, bool) and bool not in kinds:
        raise _fail(f"{path}.{key}" if path else key, f"must be {_kind_names(kinds)}, not bool")
    if not isinstance(v, kinds):
        raise _fail(
            f"{path}.{key}" if path else key,
            f"must be {_kind_names(kinds)}, got {type(v).__name__}",
        )
    return v


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
    names.update({float: "a number", bool: "true/false"})
    return " or ".join(names.get(k, k.__name__) for k in kinds)


_NUM = (int, float)


def _numbers(v: Any, path: str, n: int | None = None, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(v, list) or not all(
        isinstance(x, _NUM) and not isinstance(x, bool) for x in v
    ):
        raise _fail(path, "must be a list of numbers")
    if n is not None and len(v) != n:
        raise _fail(path, f"must have {n} values, has {len(v)}")
    if positive and any(x <= 0 for x in v):
        raise _fail(path, "must hold positive numbers")
    return tuple(float(x) for x in v)


def _tensor(d: Any, path: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise _fail(path, "must be an object")
    name = _get(d, "name", path, (str,))
    shape = _get(d, "shape", path, (list,))
    if not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise _fail(f"{path}.shape", "must be a non-empty list of positive integers")
    dtype = _get(d, "dtype", path, (str,))
    if dtype not in DTYPES:
        raise _fail(f"{path}.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    layout = d.get("layout")
    if layout is not None and not isinstance(layout, str):
        raise _fail(f"{path}.layout", "must be a string")
    return TensorSpec(name, tuple(shape), dtype, layout)


def _tensors(d: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
    items = _get(d, key, "", (list,))
    if not items:
        raise _fail(key, "must list at least one tensor")
    return tuple(_tensor(t, f"{key}[{i}]") for i, t in enumerate(items))


def _preprocessing(d: Any, channels: int) -> Preprocessing | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail("preprocessing", "must be an object or null")
    p = "preprocessing"
    color = _get(d, "color", p, (str,))
    if color not in ("L", "RGB"):
        raise _fail(f"{p}.color", f"must be 'L' or 'RGB', got {color!r}")
    mean = _numbers(_get(d, "mean", p, (list,)), f"{p}.mean", channels)
    std = _numbers(_get(d, "std", p, (list,)), f"{p}.std", channels, positive=True)
    layout = _get(d, "layout", p, (str,))
    if layout != "NCHW":
        raise _fail(f"{p}.layout", f"must be 'NCHW', got {layout!r}")
    rng = _numbers(_get(d, "pixel_range", p, (list,)), f"{p}.pixel_range", 2)
    return Preprocessing(color, mean, std, layout, _get(d, "resize", p, (str,)), (rng[0], rng[1]))


def _files(d: Mapping[str, Any]) -> tuple[FileEntry, ...]:
    files = _get(d, "files", "", (dict,))
    out = []
    for name, entry in sorted(files.items()):
        if not MEMBER_NAME.fullmatch(name) or name == MANIFEST:
            raise _fail(f"files[{name!r}]", "is not a valid archive member name")
        if not isinstance(entry, dict):
            raise _fail(f"files[{name!r}]", "must be an object")
        digest = _get(entry, "sha256", f"files[{name!r}]", (str,))
        if not _HEX64.fullmatch(digest):
            raise _fail(f"files[{name!r}].sha256", "must be 64 lowercase hex digits")
        size = _get(entry, "size", f"files[{name!r}]", (int,))
        if size < 0:
            raise _fail(f"files[{name!r}].size", "must be >= 0")
        out.append(FileEntry(name, digest, size))
    return tuple(out)


def _sections(d: Mapping[str, Any]) -> None:
    """Descriptive sections: checked for presence and type of the fields tools rely on."""
    for key in ("created", "codesign_version"):
        _get(d, key, "", (str,))
    tvm = _get(d, "tvm", "", (dict,))
    for key in ("version", "ffi_version", "pipeline"):
        _get(tvm, key, "tvm", (str,))
    weights = _get(d, "weights", "", (dict,))
    if _get(weights, "storage", "weights", (str,)) != "embedded":
        raise _fail("weights.storage", "must be 'embedded'")
    model = _get(d, "model", "", (dict,))
    _get(model, "arch", "model", (str,), nullable=True)
    blocks = _get(model, "blocks", "model", (list,))
    imported = model.get("source") in IMPORTED_SOURCES  # no blocks: not from a search space
    if (not blocks and not imported) or not all(isinstance(b, str) for b in blocks):
        raise _fail("model.blocks", "must be a non-empty list of block keys")
    _get(model, "policies", "model", (dict,))
    tuning = _get(d, "tuning", "", (dict,))
    if _get(tuning, "mode", "tuning", (str,)) not in ("untuned", "tuned"):
        raise _fail("tuning.mode", "must be 'untuned' or 'tuned'")
    _get(tuning, "database_digest", "tuning", (str,), nullable=True)
    _get(tuning, "trials_per_task", "tuning", (int,))
    _get(tuning, "seconds", "tuning", _NUM)
    lat = _get(d, "latency", "", (dict,), nullable=True)
    if lat is not None:
        for key in ("median_ms", "mean_ms", "std_ms", "min_ms", "max_ms"):
            _get(lat, key, "latency", _NUM)
        _get(lat, "protocol", "latency", (dict,))
        _get(lat, "measured_on", "latency", (str,))
    else:
        _get(d, "latency_note", "", (str,))
    acc = _get(d, "accuracy", "", (dict,), nullable=True)
    if acc is not None:
        _get(acc, "top1", "accuracy", _NUM)
        _get(acc, "n", "accuracy", (int,))
    eq = _get(d, "equality", "", (dict,))
    if _get(eq, "ok", "equality", (bool,)) is not True:
        raise _fail("equality.ok", "must be true (the packer never ships a failed check)")
    for key in ("max_abs_err", "rtol", "atol"):
        _get(eq, key, "equality", _NUM)
    _get(eq, "n_inputs", "equality", (int,))
    _get(eq, "checked_on", "equality", (str,))


def parse_manifest(data: Any) -> Manifest:
    """Validate a decoded manifest.json; raises ManifestError naming the first bad field."""
    if not isinstance(data, dict):
        raise _fail("the top level", "must be a JSON object")
    fmt = _get(data, "format", "", (str,))
    if fmt != FORMAT:
        raise ManifestError(
            f"{MANIFEST}: format {fmt!r} is not {FORMAT!r}; this codesign cannot read it "
            "(recompile the model with this version, or upgrade codesign)"
        )
    digest = _get(data, "digest", "", (str,))
    if not _HEX64.fullmatch(digest):
        raise _fail("digest", "must be 64 lowercase hex digits")
    try:
        actual = manifest_digest(data)
    except ValueError as err:  # NaN or infinity
        raise _fail("a value", f"is not valid JSON ({err})") from None
    if actual != digest:
        raise ManifestError(
            f"{MANIFEST} was modified after packing (its digest does not match its content); "
            "do not edit artifacts by hand: rebuild it with `codesign compile`"
        )
    inputs, outputs = _tensors(data, "inputs"), _tensors(data, "outputs")
    classes = _get(data, "classes", "", (list,))
    if not all(isinstance(c, str) for c in classes):
        raise _fail("classes", "must be a list of strings")
    channels = inputs[0].shape[1] if len(inputs[0].shape) == 4 else 0
    prep = _preprocessing(data.get("preprocessing"), channels)
    target = _get(data, "target", "", (dict,))
    tvm_target = _get(target, "tvm", "target", (dict,))
    machine = _get(target, "machine", "target", (str,))
    if machine not in ELF_MACHINES.values():
        raise _fail("target.machine", f"must be one of {', '.join(ELF_MACHINES.values())}")
    if tvm_target.get("mtriple") and expected_machine(tvm_target) != machine:
        raise _fail(
            "target.machine", f"is {machine} but the target triple is {tvm_target['mtriple']}"
        )
    device = _get(target, "device", "target", (str,))
    if device not in ("cpu", "cuda"):
        raise _fail("target.device", f"must be 'cpu' or 'cuda', got {device!r}")
    threads = _get(target, "threads", "target", (int,))
    if threads < 1:
        raise _fail("target.threads", "must be >= 1")
    files = _files(data)
    library = _get(data, "library", "", (str,))
    if library not in {f.name for f in files}:
        raise _fail("library", f"names {library!r}, which is not listed in files")
    _sections(data)
    return Manifest(
        library=library,
        machine=machine,
        target_spec=_get(target, "spec", "target", (str,)),
        target_key=_get(target, "key", "target", (str,)),
        target_json=canonical_json(tvm_target),
        device=device,
        threads=threads,
        inputs=inputs,
        outputs=outputs,
        classes=tuple(classes),
        preprocessing=prep,
        files=files,
        tvm_version=data["tvm"]["version"],
        digest=digest,
        data=copy.deepcopy(data),
    )
