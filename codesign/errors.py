"""One exception hierarchy. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class CodesignError(Exception):
    """Base class of every error codesign raises on purpose."""


class ArchError(CodesignError, ValueError):
    """A malformed or invalid architecture string or object."""


class SpaceError(CodesignError, KeyError):
    """An unknown search space name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BlockSpecError(CodesignError, ValueError):
    """A malformed block key or inconsistent block parameters."""


class TargetError(CodesignError, ValueError):
    """An unknown or misconfigured hardware target."""


class LUTError(CodesignError):
    """A latency table that cannot be opened or used as asked."""


class CorruptLUTError(LUTError):
    """The file is not a codesign LUT (foreign, truncated or damaged). It is never overwritten."""


class BuildError(CodesignError):
    """Lowering or compiling a network through TVM failed."""


class MeasurementError(CodesignError):
    """Running a compiled module on a device failed."""


class TuningError(CodesignError):
    """MetaSchedule tuning failed or produced no valid records."""


class FarmError(CodesignError):
    """The RPC device farm (tracker, servers, scheduler) cannot do what was asked."""


class NoServerError(FarmError):
    """No RPC server is registered on the tracker for the requested key."""


class ArtifactError(CodesignError):
    """A compiled artifact that cannot be built, read, verified or run as asked."""


class ArtifactIntegrityError(ArtifactError):
    """The archive is truncated, tampered with or incomplete. It is never modified."""


class ManifestError(ArtifactError, ValueError):
    """manifest.json is missing fields or has values of the wrong type."""


class InputError(ArtifactError, ValueError):
    """An input of the wrong shape, dtype or format for the artifact."""


class EqualityError(ArtifactError):
    """The compiled module's outputs differ from the PyTorch model's beyond the tolerance."""


class RemoteError(ArtifactError):
    """No RPC session could be obtained, or running on the remote device failed."""


class CompressError(CodesignError, ValueError):
    """`codesign compress` cannot run as asked: a model it cannot load or prune, a dataset that
    does not fit the model, or a budget it cannot meet."""
