"""Measure whole networks on a target, with the LUT's protocol, into the LUT's `networks` table.

A network is lowered and compiled exactly like the blocks of its LUT (same recipe, same tuning
records for tuned mode: its tasks are the blocks' tasks; any task the records lack is tuned
with the same budget first). Rows are committed one by one, so an interrupted run resumes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codesign.arch import Arch
from codesign.lut import LatencyTable
from codesign.lut_build import provenance_for
from codesign.measurement import Measurement, MeasureProtocol
from codesign.search.space import SearchSpace, get_space
from codesign.targets import Target, parse_target

if TYPE_CHECKING:
    from codesign.modules import Network
    from codesign.tvm_backend.database import SQLiteDatabase
    from codesign.tvm_backend.runner import Runner


@dataclass
class NetworkReport:
    requested: int
    measured: int = 0
    reused: int = 0
    failed: list[str] = field(default_factory=list)
    tuned_tasks: int = 0
    seconds: float = 0.0
    # passes the batch was measured in, and the share of its runs in slow phases of the host
    # that set them (codesign.tvm_backend.runner.LaterPasses); None: nothing measured again
    passes: int | None = None
    slow_share: float | None = None


def prepare_network(
    net: Network,
    target: Target,
    *,
    label: str = "network",
    database: SQLiteDatabase | None = None,
    trials: int = 0,
    seed: int = 0,
) -> tuple[Any, Any, str]:
    """Lower and fuse a whole network, tune the tasks `database` lacks (`trials` each) and
    return (lowered, fused, tuning digest): everything a measurement's provenance needs,
    without the (slow) final compile."""
    from codesign.tvm_backend.build import prepare
    from codesign.tvm_backend.lower import lower_module

    low = lower_module(net, net.input_shape, label=label)
    fused = prepare(low.mod)
    digest = ""
    if database is not None:
        from codesign.tvm_backend.tuning import tune_missing

        digest = tune_missing(fused, target, database, trials=trials, seed=seed, label=label)
    return low, fused, digest


def compile_network(
    net: Network,
    target: Target,
    *,
    label: str = "network",
    database: SQLiteDatabase | None = None,
    trials: int = 0,
    seed: int = 0,
) -> tuple[Any, str]:
    """Lower + compile a whole network with the LUT's recipe; returns (Built, tuning digest).

    `net` is any `Network` (an architecture's, `build_network(space, arch)`, or one with
    block shapes no architecture string describes, such as a pruned one). With a tuning
    `database`, its records are applied; tasks they lack are tuned first with `trials` each.
    """
    from codesign.tvm_backend.build import compile_module

    low, fused, digest = prepare_network(
        net, target, label=label, database=database, trials=trials, seed=seed
    )
    return compile_module(low, target, database, fused=fused), digest


def compile_like_lut(
    net: Network,
    target: Target,
    *,
    db: str | Path | None,
    mode: str,
    trials: int = 0,
    label: str = "network",
    seed: int = 0,
) -> Any:
    """`net` compiled the way a LUT's networks are measured: the one recipe, and for a tuned
    LUT (`mode`) the tuning records of its file `db` (tasks they lack tuned first with `trials`
    each). Returns the Built module."""
    database = None
    if mode == "tuned" and db is not None:
        from codesign.tvm_backend.database import open_tuning_database

        database = open_tuning_database(db, target.key)
    try:
        built, _ = compile_network(
            net, target, label=label, database=database,
            trials=trials if database is not None else 0, seed=seed,
        )  # fmt: skip
    finally:
        if database is not None:
            database.close()
    return built


def measure_networks(
    space: str | SearchSpace,
    target: str | Target,
    db: str | Path,
    archs: Sequence[Arch],
    *,
    mode: str = "untuned",
    trials: int = 0,
    protocol: MeasureProtocol | None = None,
    seed: int = 0,
    runner: Runner | None = None,
    progress: bool = True,
) -> NetworkReport:
    """Measure `archs` whole; valid rows (same provenance, steady samples) are reused, not
    re-measured. A run whose samples spread (another process took the CPU) is repeated."""
    from tqdm import tqdm

    from codesign.modules import build_network
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.runner import STEADY_CV, LaterPasses, Where, run_steady

    space, target = get_space(space), parse_target(target)
    protocol = protocol or MeasureProtocol()
    runner = runner or Where.of_target(target).runner(seed=seed)  # a remote target: its servers
    report = NetworkReport(len(archs))
    t0 = time.time()
    database = None
    if mode == "tuned":
        from codesign.tvm_backend.database import open_tuning_database

        database = open_tuning_database(db, target.key)
    table = LatencyTable(db)
    later = LaterPasses(runner, protocol)
    try:
        bar = tqdm(
            archs,
            desc=f"networks {mode}",
            unit="net",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for arch in bar:
            space.validate(arch)
            key = arch.encode()
            old = table.get_network(target.key, key, mode)
            if old is not None and not old.measurement.steady(STEADY_CV):
                old = None  # failed, or measured under load: measure again
            if old is not None and mode == "untuned":
                prov = provenance_for(target, tuned=False, tuning_digest="", protocol=protocol)
                if old.provenance.digest == prov.digest:
                    report.reused += 1
                    continue
            net = build_network(space, arch, seed=seed)
            low, fused, digest = prepare_network(
                net, target, label=key, database=database, trials=trials, seed=seed
            )
            prov = provenance_for(
                target,
                tuned=mode == "tuned",
                tuning_digest=digest,
                protocol=protocol,
                emulated=bool(getattr(runner, "emulated", False)),
            )
            if old is not None and old.provenance.digest == prov.digest:
                report.reused += 1
                continue
            built = compile_module(low, target, database, fused=fused)
            m: Measurement = run_steady(runner, built, protocol)
            table.put_network(target.key, key, mode, m, prov, tuning_digest=digest)
            later.add(built, m, partial(table.put_network, target.key, key, mode,
                                        provenance=prov, tuning_digest=digest))  # fmt: skip
            if m.ok:
                report.measured += 1
                bar.set_postfix_str(f"{m.median_ms:.3f} ms")
            else:
                report.failed.append(f"{key}: {m.error}")
        later.run()
        report.passes, report.slow_share = later.passes, later.slow_share
    finally:
        table.close()
        report.seconds = time.time() - t0
    return report


def sample_archs(space: SearchSpace, n: int, seed: int) -> list[Arch]:
    """`n` distinct architectures: uniform random samples from a seeded generator."""
    import random

    rng = random.Random(seed)
    seen: dict[str, Arch] = {}
    tries = 0
    while len(seen) < min(n, space.size()) and tries < 100 * n:
        arch = space.sample(rng)
        seen.setdefault(arch.encode(), arch)
        tries += 1
    return list(seen.values())
