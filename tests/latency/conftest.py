"""Fixtures of the latency tests: one set of measured networks shared by every test file."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency_fixtures import NETS  # noqa: E402


@pytest.fixture(scope="session")
def measured(tmp_path_factory, tiny_lut, tiny, x86):
    """A full untuned tiny LUT and NETS measured networks (quick protocol), built once."""
    from codesign.latency.networks import measure_networks, sample_archs
    from codesign.measurement import MeasureProtocol

    db = tmp_path_factory.mktemp("latency") / "lut.sqlite"
    shutil.copy(tiny_lut, db)
    proto = MeasureProtocol(repeat=5, min_repeat_ms=5)
    archs = sample_archs(tiny, NETS, seed=0)
    rep = measure_networks(tiny, x86, db, archs, protocol=proto, progress=False)
    assert rep.measured == NETS and not rep.failed
    return db, archs
