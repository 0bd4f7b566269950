"""The archive: a flat tar (gzip-compressed when the name ends in .gz/.tgz) of regular files.

Writing is deterministic (sorted members, fixed owner, mode and time) and atomic (a temporary
file renamed into place), so an interrupted compile never leaves a half-written artifact and an
existing file at the output path is replaced only by a complete one. Reading checks the
container before any content is trusted: a flat list of regular files with safe, unique names,
every member fully present, the tar end-of-archive marker in place, and the size a whole number
of tar records (tar writers pad to 10 KiB records), so a plain tar cut anywhere, even in its
trailing padding, is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from codesign.artifact.manifest import MANIFEST, MEMBER_NAME, manifest_digest, parse_manifest
from codesign.errors import ArtifactError, ArtifactIntegrityError

_BLOCK = 512
MAX_MEMBER_BYTES = 2 << 30


def is_gzip_name(path: str | Path) -> bool:
    return str(path).endswith((".gz", ".tgz"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal_manifest(manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    """The manifest with `files` (hash and size of every member) and its own digest filled in,
    validated by the reader's schema."""
    data = {k: v for k, v in manifest.items() if k != "digest"}
    data["files"] = {
        name: {"sha256": sha256(blob), "size": len(blob)} for name, blob in sorted(files.items())
    }
    data["digest"] = manifest_digest(data)
    parse_manifest(data)
    return data


def write_archive(
    path: str | Path, manifest: Mapping[str, Any], files: Mapping[str, bytes]
) -> dict[str, Any]:
    """Write manifest.json plus `files` to `path` atomically; returns the sealed manifest."""
    path = Path(path)
    for name in files:
        if not MEMBER_NAME.fullmatch(name) or name == MANIFEST:
            raise ArtifactError(f"invalid archive member name {name!r}")
    sealed = seal_manifest(manifest, files)
    members = {MANIFEST: (json.dumps(sealed, indent=2, sort_keys=True) + "\n").encode()}
    members.update(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            if is_gzip_name(path):
                with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                    _write_tar(gz, members)
            else:
                _write_tar(raw, members)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sealed


def _write_tar(fileobj: Any, members: Mapping[str, bytes]) -> None:
    order = [MANIFEST, *sorted(n for n in members if n != MANIFEST)]
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in order:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))


def _damaged(path: Path, why: str) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(
        f"{path} is not a complete codesign artifact ({why}); it may be truncated or corrupted. "
        "Copy it again from its source or rebuild it with `codesign compile`."
    )


def read_archive(path: str | Path) -> dict[str, bytes]:
    """All members of the archive at `path` by name, after the container checks above."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist; build one with `codesign compile`")
    if not path.is_file():
        raise ArtifactError(f"artifact {path} is not a file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise _damaged(path, f"gzip stream: {err}") from None
    if len(raw) < 2 * _BLOCK:
        raise _damaged(path, f"only {len(raw)} bytes")
    if len(raw) % _BLOCK:  # any blocking factor (`tar -b 1` writes 512-byte records)
        raise _damaged(
            path, f"{len(raw)} bytes is not a whole number of tar records (512-byte blocks)"
        )
    out: dict[str, bytes] = {}
    end = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for info in tar:
                name = info.name
                if not info.isreg():
                    raise _damaged(path, f"member {name!r} is not a regular file")
                if not MEMBER_NAME.fullmatch(name):
                    raise _damaged(path, f"unsafe member name {name!r}")
                if name in out:
                    raise _damaged(path, f"member {name!r} appears twice")
                if info.size > MAX_MEMBER_BYTES:
                    raise _damaged(path, f"member {name!r} is {info.size} bytes")
                fh = tar.extractfile(info)
                blob = fh.read() if fh is not None else b""
                if len(blob) != info.size:
                    raise _damaged(path, f"member {name!r} is cut short")
                out[name] = blob
                end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
    except tarfile.TarError as err:
        raise _damaged(path, f"tar: {err}") from None
    if not out:
        raise _damaged(path, "no members")
    trailer = raw[end : end + 2 * _BLOCK]
    if len(trailer) < 2 * _BLOCK or trailer.count(0) != len(trailer):
        raise _damaged(path, "the tar end-of-archive marker is missing")
    return out
