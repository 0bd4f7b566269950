"""Latency modelling: LUT sum + learned residual, validated on measured whole networks."""

from codesign.latency.model import LatencyModel, LatencyModelError

__all__ = ["LatencyModel", "LatencyModelError"]
