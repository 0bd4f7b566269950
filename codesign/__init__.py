"""codesign: hardware-aware co-design of neural networks on Apache TVM.

Measure candidate blocks with TVM into a latency table, model whole-network latency, search and
compress under a latency budget, and ship the compiled network as a verified artifact.

Light imports only here: TVM and torch load when a function needs them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from codesign.arch import Arch
from codesign.blocks import BlockSpec
from codesign.errors import (
    ArchError,
    ArtifactError,
    ArtifactIntegrityError,
    BlockSpecError,
    BuildError,
    CodesignError,
    CompressError,
    CorruptLUTError,
    EqualityError,
    InputError,
    LUTError,
    ManifestError,
    MeasurementError,
    RemoteError,
    SpaceError,
    TargetError,
    TuningError,
)
from codesign.lut import LatencyTable
from codesign.measurement import Measurement, MeasureProtocol, Provenance
from codesign.search.space import SearchSpace, get_space, list_spaces
from codesign.targets import Target, host_threads, parse_target

# TVM sizes its runtime thread pool once, when it first runs a kernel, from TVM_NUM_THREADS, or
# else from half the CPUs on x86 (it assumes hyper-threads): one thread on a 2-vCPU machine,
# and the pool cannot grow later. Targets default to every CPU this process may use, so the pool
# is sized to match unless the user chose a size (runner.set_threads checks what it got).
os.environ.setdefault("TVM_NUM_THREADS", str(host_threads()))

if TYPE_CHECKING:
    from codesign.artifact.imported import ImportReport
    from codesign.artifact.predictor import Predictor

__version__ = "0.1.0"


def load(
    path: str | os.PathLike[str],
    device: str = "cpu",
    *,
    session: Any = None,
    threads: int | None = None,
) -> Predictor:
    """Verify a compiled artifact (`codesign compile`) and load it as a callable predictor.

    `device` is 'cpu', 'cuda' or 'cuda:N'; with an RPC `session` the library runs on that
    remote device. See codesign.artifact.predictor. TVM is imported only when this is called.
    """
    from codesign.artifact.predictor import load as _load

    return _load(os.fspath(path), device, session=session, threads=threads)


def compile_model(model: Any, *, out: str | os.PathLike[str], **kwargs: Any) -> ImportReport:
    """Compile an ONNX file, a .pt2 ExportedProgram, 'module:factory' (+ weights=), a
    torch.nn.Module or an ExportedProgram into a verified artifact at `out`; keywords as
    codesign.artifact.imported.compile_model (target, input_shape, preprocess, options, ...).
    TVM is imported only when this is called."""
    from codesign.artifact.imported import compile_model as _compile_model

    return _compile_model(model, out=out, **kwargs)


def compress(model: Any, *, settings: Any, progress: bool = True, **kwargs: Any) -> Any:
    """Prune, quantize and compile your own trained CNN under a latency budget measured with
    TVM (`codesign compress`): `settings` is a codesign.compression.compress.CompressSettings;
    returns its frozen CompressReport (accuracy and latency after each step). Torch and TVM
    are imported only when this is called."""
    from codesign.compression.compress import compress as _compress

    return _compress(model, settings=settings, progress=progress, **kwargs)


__all__ = [
    "Arch",
    "ArchError",
    "ArtifactError",
    "ArtifactIntegrityError",
    "BlockSpec",
    "BlockSpecError",
    "BuildError",
    "CodesignError",
    "CompressError",
    "CorruptLUTError",
    "EqualityError",
    "InputError",
    "LUTError",
    "LatencyTable",
    "ManifestError",
    "MeasureProtocol",
    "Measurement",
    "MeasurementError",
    "Provenance",
    "RemoteError",
    "SearchSpace",
    "SpaceError",
    "Target",
    "TargetError",
    "TuningError",
    "compile_model",
    "compress",
    "get_space",
    "list_spaces",
    "load",
    "parse_target",
]
