"""Compiled, verified, self-describing artifacts (`codesign.artifact`).

manifest   manifest.json schema, validation and digest
archive    deterministic, atomic tar writing; integrity-checked reading
elf        library architecture from the ELF header
verify     verify_artifact: container, manifest, hashes, architecture
checks     compile-time equality with PyTorch and accuracy of the compiled module
pack       compile_artifact: model directory -> archive
executor   running a library locally; remote: on an RPC session (bounded tracker request)
predictor  load(path, device=...) -> Predictor

Importing this package loads neither TVM nor torch.
"""

from codesign.artifact.manifest import FORMAT, Manifest, parse_manifest
from codesign.artifact.pack import CompileOptions, CompileReport, compile_artifact
from codesign.artifact.predictor import Predictor, load
from codesign.artifact.verify import Artifact, verify_artifact

__all__ = [
    "FORMAT",
    "Artifact",
    "CompileOptions",
    "CompileReport",
    "Manifest",
    "Predictor",
    "compile_artifact",
    "load",
    "parse_manifest",
    "verify_artifact",
]
