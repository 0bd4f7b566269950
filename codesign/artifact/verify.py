"""`verify_artifact`: is this archive exactly what `codesign compile` wrote?

Checks, in order, each failing with a clear error and touching nothing:
1. the container (complete tar, flat regular files; see archive.py);
2. manifest.json present, valid JSON, valid schema, and its own digest matches its content;
3. the members are exactly the manifest's files (none missing, none extra), each with the
   recorded size and sha256;
4. the library is an ELF shared object whose architecture (e_machine) is the manifest's
   target machine, which in turn matches the target's triple.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from codesign.artifact.archive import read_archive, sha256
from codesign.artifact.elf import ElfInfo, elf_info
from codesign.artifact.manifest import MANIFEST, Manifest, parse_manifest
from codesign.errors import ArtifactIntegrityError, ManifestError


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: its manifest and the bytes of every member."""

    path: Path
    manifest: Manifest
    elf: ElfInfo
    files: dict[str, bytes] = field(compare=False, hash=False, repr=False)

    @property
    def library(self) -> bytes:
        return self.files[self.manifest.library]

    def extract(self, directory: str | Path | None = None) -> Path:
        """Write every member (manifest.json included) into `directory` (default: a new
        temporary directory, which the caller removes); returns the directory."""
        out = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="codesign-art-"))
        out.mkdir(parents=True, exist_ok=True)
        for name, blob in self.files.items():
            (out / name).write_bytes(blob)
        return out


def verify_artifact(path: str | Path) -> Artifact:
    """Read and check the artifact at `path` (see module docstring); raises ArtifactError."""
    path = Path(path)
    members = read_archive(path)
    if MANIFEST not in members:
        raise ArtifactIntegrityError(
            f"{path} has no {MANIFEST}; it is not a codesign artifact (build one with "
            "`codesign compile`)"
        )
    try:
        data = json.loads(members[MANIFEST].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: {MANIFEST} is not valid JSON ({err}); rebuild it") from None
    manifest = parse_manifest(data)
    listed = {f.name for f in manifest.files}
    present = set(members) - {MANIFEST}
    if listed - present:
        raise ArtifactIntegrityError(
            f"{path} is missing {', '.join(sorted(listed - present))}, listed in its manifest; "
            "the artifact is incomplete: rebuild it"
        )
    if present - listed:
        raise ArtifactIntegrityError(
            f"{path} holds {', '.join(sorted(present - listed))}, not listed in its manifest; "
            "files were added after packing: rebuild it"
        )
    for f in manifest.files:
        blob = members[f.name]
        if len(blob) != f.size:
            raise ArtifactIntegrityError(
                f"{path}: {f.name} is {len(blob)} bytes, the manifest says {f.size}; "
                "the artifact was modified: rebuild it"
            )
        if sha256(blob) != f.sha256:
            raise ArtifactIntegrityError(
                f"{path}: {f.name} does not match its sha256 in the manifest; the artifact was "
                "modified or corrupted: rebuild it"
            )
    elf = elf_info(members[manifest.library], manifest.library)
    if not elf.shared:
        raise ArtifactIntegrityError(f"{path}: {manifest.library} is not a shared library")
    if elf.machine != manifest.machine:
        raise ArtifactIntegrityError(
            f"{path}: the library is built for {elf.machine} but the manifest's target "
            f"{manifest.target_spec} ({manifest.target_key}) needs {manifest.machine}; "
            "rebuild it for that target"
        )
    return Artifact(path, manifest, elf, members)
