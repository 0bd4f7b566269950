"""Shared fixtures. Tests use real TVM builds with tiny budgets, real SQLite files in tmp dirs."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

# A test run must not depend on (or overwrite) the user's own LUTs or environment.
os.environ.setdefault("TVM_NUM_THREADS", "2")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture
def lut_path(tmp_path: Path) -> Path:
    return tmp_path / "lut.sqlite"


@pytest.fixture(scope="session")
def tiny():
    from codesign.search.space import get_space

    return get_space("tiny")


@pytest.fixture(scope="session")
def x86():
    from codesign.targets import parse_target

    return parse_target("x86")


@pytest.fixture(scope="session")
def quick():
    from codesign.measurement import MeasureProtocol

    return MeasureProtocol.quick()


@pytest.fixture
def farm_factory(tmp_path: Path):
    """Start real farms (tracker + servers + supervisor on 127.0.0.1, free ports); always stopped
    afterwards, and every recorded process tree killed by PID."""
    from codesign.farm.supervisor import start_farm, stop_farm

    started = []

    def start(cfg):
        started.append(cfg)
        start_farm(cfg)
        return cfg

    yield start
    for cfg in started:
        stop_farm(cfg.state_dir)
