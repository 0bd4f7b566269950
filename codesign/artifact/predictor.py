"""`codesign.load(path, device=...)`: a verified artifact as a callable predictor.

    predict = codesign.load("model.tar")            # verifies, then loads the library
    logits = predict(x)                             # x: (C,H,W), (1,C,H,W) or (N,C,H,W) float32
    predict.classify(x, top=5)                      # [[(class name, probability), ...], ...]
    predict.preprocess(image)                       # raw HxW[xC] pixels -> network input
    predict.time()                                  # Measurement with the manifest's protocol

Inputs are checked against the manifest before they reach TVM: a wrong shape or dtype raises
InputError saying what was expected. The library was compiled for batch 1; a batch of N runs it
N times.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from codesign.artifact.executor import Executor, LocalExecutor
from codesign.artifact.manifest import Manifest, Preprocessing
from codesign.artifact.verify import Artifact, verify_artifact
from codesign.errors import InputError
from codesign.measurement import Measurement, MeasureProtocol

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff")


class Predictor:
    """A loaded artifact. Call it with an input array; close it (or use `with`) when done."""

    def __init__(self, artifact: Artifact, executor: Executor, workdir: Path | None) -> None:
        self.artifact = artifact
        self.executor = executor
        self._workdir = workdir
        spec = artifact.manifest.input  # the per-call fast path: an exact (1, ...) array
        self._exact = (tuple(spec.shape), np.dtype(spec.dtype))

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    def check_input(self, x: Any) -> np.ndarray:
        """`x` as an (N, *input shape[1:]) array of the input dtype, or InputError."""
        spec = self.manifest.input
        want = tuple(spec.shape)
        if not isinstance(x, np.ndarray):
            if hasattr(x, "detach"):  # a torch tensor
                x = x.detach().cpu().numpy()
            else:
                raise InputError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.dtype(spec.dtype):
            raise InputError(
                f"input {spec.name!r} has dtype {x.dtype}, the artifact expects {spec.dtype}; "
                f"convert it (x.astype('{spec.dtype}')) after preprocessing"
            )
        if x.shape == want[1:]:
            x = x[None]
        if x.ndim != len(want) or x.shape[1:] != want[1:] or x.shape[0] < 1:
            pretty = "x".join(map(str, want[1:]))
            raise InputError(
                f"input {spec.name!r} has shape {tuple(x.shape)}, the artifact expects "
                f"{want} (or (N, {', '.join(map(str, want[1:]))}) for a batch, or {pretty} for "
                f"one image), layout {spec.layout or 'NCHW'}"
            )
        return np.ascontiguousarray(x)

    def __call__(self, x: Any) -> np.ndarray:
        """Outputs (logits) for each input of the batch, stacked: (N, classes)."""
        if type(x) is np.ndarray and (x.shape, x.dtype) == self._exact and x.flags.c_contiguous:
            return self.executor.run(x)  # what check_input would pass unchanged
        x = self.check_input(x)
        if len(x) == 1:
            return self.executor.run(x)
        return np.concatenate([self.executor.run(x[i : i + 1]) for i in range(len(x))])

    def classify(self, x: Any, top: int = 5) -> list[list[tuple[str, float]]]:
        """The `top` classes and softmax probabilities for each input."""
        logits = self(x).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        names = self.classes
        out = []
        for row in probs:
            order = np.argsort(-row)[: max(1, top)]
            out.append([(names[i] if i < len(names) else str(i), float(row[i])) for i in order])
        return out

    def preprocess(self, image: Any) -> np.ndarray:
        """A raw image (path, PIL image, or HxW / HxWxC uint8-range array) -> (1,C,H,W) input."""
        prep = self.manifest.preprocessing
        if prep is None:
            raise InputError(
                "this artifact records no preprocessing (its model had no dataset); give an "
                "already preprocessed .npy input"
            )
        return preprocess_image(image, prep, self.manifest.input.shape)

    def time(self, protocol: MeasureProtocol | None = None) -> Measurement:
        """Latency of one batch-1 run on this predictor's device."""
        protocol = protocol or _manifest_protocol(self.manifest)
        x = np.zeros(self.manifest.input.shape, dtype=self.manifest.input.dtype)
        return self.executor.time(x, protocol)

    def close(self) -> None:
        self.executor.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Predictor({self.artifact.path.name}: {m.data['model'].get('arch')}, "
            f"input {m.input.shape} {m.input.dtype}, {len(m.classes)} classes, "
            f"on {self.executor.where})"
        )


def _manifest_protocol(m: Manifest) -> MeasureProtocol:
    lat = m.data.get("latency")
    return MeasureProtocol.from_dict(lat["protocol"]) if lat else MeasureProtocol()


def preprocess_image(image: Any, prep: Preprocessing, shape: tuple[int, ...]) -> np.ndarray:
    """Convert, resize (bilinear), normalise and lay out one image as the manifest says."""
    from PIL import Image

    if isinstance(image, str | Path):
        try:
            image = Image.open(image)
        except OSError as err:
            raise InputError(f"cannot read image {image}: {err}") from None
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)  # CHW -> HWC
        arr = np.squeeze(np.clip(arr, 0, 255).astype(np.uint8))
        image = Image.fromarray(arr)
    if not hasattr(image, "convert"):
        raise InputError(f"cannot use {type(image).__name__} as an image")
    _, c, h, w = shape
    img = image.convert(prep.color).resize((w, h), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    lo, hi = prep.pixel_range
    a = a * ((hi - lo) / 255.0) + lo
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((a - mean) / std).astype(np.float32)[None]


def read_input(path: str | Path, predictor: Predictor) -> np.ndarray:
    """A .npy file (an already preprocessed input) or an image file (preprocessed here)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"{path} is not a readable .npy array: {err}") from None
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return predictor.preprocess(path)
    raise InputError(
        f"{path}: give a .npy array (preprocessed input) or an image ({', '.join(IMAGE_SUFFIXES)})"
    )


def load(
    path: str | Path,
    device: str = "cpu",
    *,
    session: Any = None,
    threads: int | None = None,
) -> Predictor:
    """Verify the artifact at `path` and load it on `device` ('cpu', 'cuda', 'cuda:N').

    With an RPC `session` (see codesign.artifact.remote.request_session) the library runs on
    that remote device instead. `threads` defaults to the manifest's target threads.
    """
    artifact = verify_artifact(path)
    m = artifact.manifest
    workdir = artifact.extract()
    threads = threads or m.threads
    try:
        if session is not None:
            from codesign.artifact.remote import RemoteExecutor

            executor: Executor = RemoteExecutor(
                session, workdir / m.library, device=device, threads=threads
            )
        else:
            executor = LocalExecutor(
                workdir / m.library, machine=m.machine, device=device, threads=threads
            )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Predictor(artifact, executor, workdir)
