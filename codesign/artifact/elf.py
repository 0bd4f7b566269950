"""Read the architecture of a shared library from its ELF header (no external tools)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from codesign.artifact.manifest import ELF_MACHINES
from codesign.errors import ArtifactIntegrityError

_MAGIC = b"\x7fELF"
_ET_DYN = 3


@dataclass(frozen=True, slots=True)
class ElfInfo:
    machine: str  # "x86_64", "aarch64", ... or "unknown(<e_machine>)"
    bits: int  # 32 or 64
    little_endian: bool
    shared: bool  # e_type == ET_DYN


def elf_info(data: bytes, name: str = "library") -> ElfInfo:
    """Parse the ELF identification and header fields that say where the code runs."""
    if len(data) < 20 or data[:4] != _MAGIC:
        raise ArtifactIntegrityError(
            f"{name} is not an ELF shared library (bad magic); the artifact is damaged: rebuild it"
        )
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise ArtifactIntegrityError(f"{name} has a malformed ELF header; rebuild the artifact")
    order = "<" if ei_data == 1 else ">"
    e_type, e_machine = struct.unpack_from(order + "HH", data, 16)
    return ElfInfo(
        machine=ELF_MACHINES.get(e_machine, f"unknown({e_machine})"),
        bits=32 if ei_class == 1 else 64,
        little_endian=ei_data == 1,
        shared=e_type == _ET_DYN,
    )
