"""Compile-time checks of a compiled network: output equality with PyTorch, and accuracy.

Equality: the compiled library's outputs must equal the PyTorch model's (eval mode, BatchNorm
unfolded: the model as trained) on a batch of validation inputs, within a tolerance chosen by the
network's compute precision and scaled by the output magnitude:

    |y_tvm - y_torch| <= atol * max(1, max|y_torch|) + rtol * |y_torch|   (elementwise)
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from codesign.artifact.executor import Executor
from codesign.errors import ArtifactError, EqualityError

# precision -> (rtol, atol). fp32 kernels reorder reductions (measured max error ~1e-6 of the
# output scale); reduced precisions get the looser bounds their rounding implies.
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-3, 1e-4),
    "fp16": (1e-2, 1e-2),
    "int8": (5e-2, 5e-2),
}
_ORDER = ("fp32", "fp16", "int8")


def tolerance_for(precisions: Iterable[str]) -> tuple[str, float, float]:
    """The loosest tolerance among the blocks' precisions: (precision, rtol, atol)."""
    worst = "fp32"
    for p in precisions:
        if p not in TOLERANCES:
            raise ArtifactError(f"no equality tolerance is defined for precision {p!r}")
        if _ORDER.index(p) > _ORDER.index(worst):
            worst = p
    return (worst, *TOLERANCES[worst])


def validation_dataset(info: Any) -> Any:
    """The model's dataset (validation split as trained), normalised as recorded in the model."""
    from codesign.data import BUILTIN, load_dataset

    name = info.name if info.name in BUILTIN else info.source.split(":", 1)[-1]
    try:
        ds = load_dataset(name, tuple(info.input_shape), seed=info.seed)
    except ArtifactError:
        raise
    except Exception as err:
        raise ArtifactError(
            f"cannot load the model's dataset {info.name!r} ({info.source}) to check the "
            f"compiled network: {err}. Make it available again, or pass --val-limit 0 to check "
            "equality on seeded random inputs and skip the accuracy"
        ) from None
    return dataclasses.replace(ds, info=info)


def check_inputs(data: Any, shape: Sequence[int], n: int, seed: int) -> list[np.ndarray]:
    """`n` batch-1 inputs: the first validation images, or seeded normal noise without data."""
    if data is not None:
        x, _ = next(data.batches("val", n))
        return [x[i : i + 1].numpy().astype("float32") for i in range(len(x))]
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(shape)).astype("float32") for _ in range(n)]


def equality_report(
    out: np.ndarray,
    ref: np.ndarray,
    tolerance: tuple[str, float, float],
    n_inputs: int,
    where: str,
) -> dict[str, Any]:
    """The manifest's equality section for outputs `out` against the reference `ref` (same
    shape) under `tolerance` = (precision, rtol, atol) from `tolerance_for`: `ok` when every
    element is within atol x the output scale + rtol x |ref|."""
    precision, rtol, atol = tolerance
    scale = max(1.0, float(np.abs(ref).max()))
    err = np.abs(out - ref)
    bound = atol * scale + rtol * np.abs(ref)
    return {
        "ok": bool(np.all(err <= bound)),
        "n_inputs": n_inputs,
        "precision": precision,
        "rtol": rtol,
        "atol": atol,
        "output_scale": scale,
        "max_abs_err": float(err.max()),
        "max_err_over_bound": float((err / bound).max()),
        "top1_agreement": float(np.mean(out.argmax(-1) == ref.argmax(-1))),
        "checked_on": where,
    }


def check_equality(
    executor: Executor,
    model: Any,
    inputs: Sequence[np.ndarray],
    precisions: Iterable[str],
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Compare the library with the PyTorch model on `inputs`; EqualityError if they differ."""
    import torch

    precision, rtol, atol = tolerance_for(precisions)
    outs, refs = [], []
    with torch.no_grad():
        for x in inputs:
            outs.append(np.asarray(executor.run(x), dtype=np.float64))
            refs.append(model.eval()(torch.from_numpy(x)).double().numpy())
    out, ref = np.concatenate(outs), np.concatenate(refs)
    if out.shape != ref.shape:
        raise EqualityError(f"compiled output shape {out.shape} != PyTorch {ref.shape}")
    report = equality_report(out, ref, (precision, rtol, atol), len(inputs), executor.where)
    scale = report["output_scale"]
    if not report["ok"]:
        raise EqualityError(
            f"the compiled network's outputs differ from PyTorch's on {len(inputs)} validation "
            f"inputs: max abs error {report['max_abs_err']:.3g} exceeds the {precision} tolerance "
            f"(rtol {rtol:g}, atol {atol:g} x {scale:.3g}); nothing was written. This is a "
            "compiler or lowering bug: report it with the model directory"
        )
    return report, outs


def compiled_accuracy(
    executor: Executor, model: Any, data: Any, limit: int | None, progress: bool
) -> dict[str, Any]:
    """Top-1 accuracy of the compiled library (and of PyTorch on the same images)."""
    from tqdm import tqdm

    from codesign.train import evaluate

    n = data.info.n_val if limit is None else min(limit, data.info.n_val)
    correct = 0
    with tqdm(
        total=n, desc="accuracy", unit="img", disable=not progress, file=sys.stderr, leave=False
    ) as bar:
        for x, y in data.batches("val", 64, limit=n):
            for i in range(len(y)):
                logits = executor.run(x[i : i + 1].numpy().astype("float32"))
                correct += int(int(np.argmax(logits)) == int(y[i]))
                bar.update()
    return {
        "top1": 100.0 * correct / max(n, 1),
        "n": n,
        "split": "val",
        "dataset": data.info.name,
        "torch_top1": evaluate(model, data, limit=n),
        "computed_on": executor.where,
    }
