"""codesign: hardware-aware co-design of neural networks on Apache TVM.

Measure candidate blocks with TVM into a latency table, model whole-network latency, search and
compress under a latency budget, and ship the compiled network as a verified artifact.

Light imports only here: TVM and torch load when a function needs them.
"""

from codesign.arch import Arch
from codesign.blocks import BlockSpec
from codesign.errors import (
    ArchError,
    BlockSpecError,
    BuildError,
    CodesignError,
    CorruptLUTError,
    LUTError,
    MeasurementError,
    SpaceError,
    TargetError,
    TuningError,
)
from codesign.lut import LatencyTable
from codesign.measurement import Measurement, MeasureProtocol, Provenance
from codesign.search.space import SearchSpace, get_space, list_spaces
from codesign.targets import Target, parse_target

__version__ = "0.1.0"

__all__ = [
    "Arch",
    "ArchError",
    "BlockSpec",
    "BlockSpecError",
    "BuildError",
    "CodesignError",
    "CorruptLUTError",
    "LUTError",
    "LatencyTable",
    "MeasureProtocol",
    "Measurement",
    "MeasurementError",
    "Provenance",
    "SearchSpace",
    "SpaceError",
    "Target",
    "TargetError",
    "TuningError",
    "get_space",
    "list_spaces",
    "parse_target",
]
