"""The runner package: `Where` (one spelling of where to measure), the timing protocol on a
loaded machine, the noise floor recorded with a LUT."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from functools import partial

import pytest

from codesign.errors import TargetError
from codesign.measurement import Measurement, MeasureProtocol, quiet_samples
from codesign.tvm_backend.runner import (
    STEADY_CV,
    LaterPasses,
    LocalRunner,
    RPCRunner,
    Where,
    measure_in_passes,
    relative_spread,
    run_delay_s,
)

_BUSY = (
    "import time\nend = time.time() + {s}\nn = 0\nwhile time.time() < end:\n    n += 1\nprint(n)\n"
)


def _busy(seconds: float, count: int) -> list[subprocess.Popen[str]]:
    """`count` processes spinning for `seconds` each; they end by themselves."""
    code = _BUSY.format(s=seconds)
    return [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


def _spun(procs: list[subprocess.Popen[str]]) -> int:
    return sum(int(p.communicate(timeout=60)[0]) for p in procs)


def test_where_is_one_value_the_other_spellings_come_from(x86) -> None:
    assert Where.local().is_local and Where.of_target(x86) == Where.local()
    assert isinstance(Where.local().runner(seed=3), LocalRunner)
    rpc = Where.rpc("127.0.0.1:9190", "arm64", session_timeout_s=30)
    assert rpc.describe() == "rpc key arm64 via tracker 127.0.0.1:9190"
    farm = rpc.farm(emulated=True)
    assert (farm.tracker, farm.key, farm.emulated) == ("127.0.0.1:9190", "arm64", True)
    assert isinstance(rpc.runner(emulated=True), RPCRunner)
    from codesign.targets import parse_target

    arm = parse_target("arm:key=rpi4,tracker=10.0.0.5:9190")
    assert Where.of_target(arm) == Where.rpc("10.0.0.5:9190", "rpi4")
    with pytest.raises(TargetError, match="both an RPC tracker and a key"):
        Where(tracker="127.0.0.1:9190")
    with pytest.raises(TargetError, match="HOST:PORT"):
        Where.rpc("nohost", "k")
    with pytest.raises(TargetError, match="needs an RPC tracker"):
        Where.local().session()


def test_quiet_samples_are_the_hosts_fast_state() -> None:
    # a slow phase of the host (1.4x) covering most windows of a measurement, and one window
    # spoiled further: the plain median follows the phase, the quiet median does not
    windows = [1.0, 1.02, 1.4, 1.41, 1.39, 1.4, 2.5, 1.42, 0.99, 1.4, 1.01, 1.4]
    kept = quiet_samples(windows)
    assert kept == [1.0, 1.02, 0.99, 1.01]
    assert quiet_samples([]) == [] and quiet_samples([3.0]) == [3.0]
    # the floor is the 10th percentile: one odd low window does not set it (and stays in)
    assert quiet_samples([0.2] + [1.0] * 9 + [1.3] * 10) == [0.2] + [1.0] * 9


def test_pooled_measurements_and_the_later_passes() -> None:
    slow = Measurement.from_samples([1.4e-3, 1.41e-3, 1.39e-3, 1.4e-3])
    fast = Measurement.from_samples([1.0e-3, 1.01e-3, 0.99e-3, 1.0e-3])
    pool = Measurement.pool
    assert pool([slow, fast]).median_ms == pytest.approx(1.0, rel=0.01)
    assert pool([fast, slow]) == pool([slow, fast])
    loaded = Measurement.from_samples([0.5e-3] * 4, converged=False)
    assert pool([slow, loaded]) == slow  # a side that never had a quiet CPU does not count
    both = pool([loaded, loaded])
    assert not both.converged and both.repeats == 8
    assert pool([slow, Measurement.failed("lost")]) == slow
    assert pool([slow, slow, fast]).median_ms == pytest.approx(1.0, rel=0.01)
    # one fast run of 7, with fewer windows than the slow ones (under a tenth of them): still
    # the fast state
    many = Measurement.from_samples([1.4e-3, 1.41e-3, 1.39e-3] * 10)
    assert pool([many] * 6 + [fast]).median_ms == pytest.approx(1.0, rel=0.01)
    assert not pool([Measurement.failed("a"), Measurement.failed("b")]).ok

    class Script(LocalRunner):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def run(self, built, protocol) -> Measurement:  # noqa: ANN001
            self.calls.append(built)
            return fast

    runner, stored = Script(), {}
    later = LaterPasses(runner, MeasureProtocol(repeat=3, min_repeat_ms=5, passes=3), keep=2)
    for name in "abc":  # (a quiet host: no run slow, the protocol's passes only)
        later.add(name, fast, lambda m, name=name: stored.__setitem__(name, m))
    # bounded: `keep` modules waiting get their passes, interleaved (a chunk of the batch)
    assert runner.calls == ["a", "b", "a", "b"] and len(later) == 2
    later.add("failed", Measurement.failed("x"), stored.__setitem__)  # nothing to pool
    later.run()
    assert runner.calls == ["a", "b", "a", "b", "c", "c"] and len(later) == 0
    assert {k: round(v.median_ms, 3) for k, v in stored.items()} == {"a": 1.0, "b": 1.0, "c": 1.0}
    # modules to compare alternate: a slow phase hits both, not one of them
    runner.calls.clear()
    pair = measure_in_passes(runner, ["x", "y"], MeasureProtocol(passes=3))
    assert runner.calls == ["x", "y"] * 3 and [m.median_ms for m in pair] == [1.0, 1.0]
    one = LaterPasses(runner, MeasureProtocol(passes=1))
    one.add("d", slow, stored.__setitem__)
    one.run()
    assert len(one) == 0 and runner.calls[-1] == "y"  # one pass: measured once, nothing more


def test_a_batch_whose_runs_often_fall_in_slow_phases_gets_more_passes(monkeypatch) -> None:
    from codesign.tvm_backend.runner import timing
    from codesign.tvm_backend.runner.timing import MISS, passes_for, slow_share

    assert passes_for(0.0, 3) == 3 and passes_for(1 / 3, 3) == 3  # (1/3) ** 3 < 5%
    assert passes_for(0.5, 3) == 5 and passes_for(0.6, 3) == 6 and passes_for(0.9, 3) == 6
    assert 0.6 ** passes_for(0.6, 3) <= MISS < 0.6 ** (passes_for(0.6, 3) - 1)
    fast = Measurement.from_samples([1.0e-3] * 4)
    slow = Measurement.from_samples([1.45e-3] * 4)
    # modules of 3 runs with 1 and 2 slow ones: the chance is n2 / (n1 + n2) (all-slow and
    # all-fast modules look alike and say nothing)
    batch = [[fast, slow, slow], [fast, fast, slow], [slow, fast, slow], [fast] * 3, [slow] * 3]
    assert slow_share(batch) == pytest.approx(2 / 3, abs=0.01)
    assert slow_share([[fast] * 3, [slow] * 3]) == 0.0

    class Host(LocalRunner):
        """A noisy hour: 60% of the runs slow (seeded)."""

        def __init__(self) -> None:
            self.n, self.rng = 0, random.Random(0)

        def run(self, built, protocol) -> Measurement:  # noqa: ANN001
            self.n += 1
            return slow if self.rng.random() < 0.6 else fast

    def measure() -> tuple[LaterPasses, int, int]:
        host, first = Host(), random.Random(1)
        later, stored = LaterPasses(host, MeasureProtocol(passes=3)), {}
        for i in range(40):
            later.add(i, slow if first.random() < 0.6 else fast, partial(stored.__setitem__, i))
        later.run()
        return later, host.n, sum(m.median_ms > 1.2 for m in stored.values())

    later, runs, left_slow = measure()
    assert 0.45 <= later.slow_share <= 0.75
    assert later.passes == passes_for(later.slow_share, 3) == 6
    assert runs == 40 * (later.passes - 1)  # the first runs were the caller's
    # modules whose every run was slow: about MISS of them, against a fifth with 3 passes
    monkeypatch.setattr(timing, "passes_for", lambda share, passes: passes)
    _, runs3, left_slow3 = measure()
    assert runs3 == 40 * 2 and left_slow <= 40 * 2 * MISS < left_slow3


def test_modules_never_seen_quiet_get_extra_passes_bounded() -> None:
    quiet = Measurement.from_samples([1.0e-3] * 4)
    marked = Measurement.from_samples([1.4e-3] * 4, converged=False)  # a slow phase around it

    class Script(LocalRunner):
        def __init__(self, answers: dict[str, list[Measurement]]) -> None:
            self.answers, self.calls = answers, []

        def run(self, built, protocol) -> Measurement:  # noqa: ANN001
            self.calls.append(built)
            return self.answers[built].pop(0) if self.answers[built] else marked

    # "a": quiet in its third extra run; "b": never quiet, at most `passes` extra runs
    runner = Script({"a": [marked, marked, marked, quiet], "b": [], "c": [quiet, quiet]})
    later, stored = LaterPasses(runner, MeasureProtocol(passes=3)), {}
    for name in "abc":
        later.add(name, marked, lambda m, name=name: stored.__setitem__(name, m))
    later.run()
    assert runner.calls.count("c") == 2  # one of its runs was quiet: its passes only
    assert runner.calls.count("a") == 4 and stored["a"].converged
    assert stored["a"].median_ms == pytest.approx(1.0)
    assert runner.calls.count("b") == 2 + 3 and not stored["b"].converged


def test_protocols_stored_before_passes_read_as_two_passes() -> None:
    old = MeasureProtocol().to_dict()
    del old["passes"]
    assert MeasureProtocol.from_dict(old).passes == 2
    assert MeasureProtocol.from_dict(MeasureProtocol().to_dict()) == MeasureProtocol()
    with pytest.raises(ValueError):
        MeasureProtocol(passes=0)


def test_median_error_and_spread_statistics() -> None:
    calm = Measurement.from_samples([1e-3] * 30)
    assert calm.median_error == 0 and calm.steady(STEADY_CV)
    # a shared host: windows spread ~10% for good, but 100 of them pin the median down
    noisy = Measurement.from_samples([(1 + 0.3 * ((i * 7) % 11) / 10) * 1e-3 for i in range(100)])
    assert noisy.cv > STEADY_CV and noisy.median_error < STEADY_CV and noisy.steady(STEADY_CV)
    few = Measurement.from_samples([x / 1e3 for x in noisy.samples_ms[:8]])
    assert not Measurement.from_samples([1e-3, 1e-3, 3e-3, 1e-3]).steady(STEADY_CV)
    assert few.median_error > noisy.median_error and not few.steady(STEADY_CV)
    given_up = Measurement.from_samples([1e-3] * 30, converged=False)
    assert not given_up.steady(STEADY_CV)
    assert relative_spread([1.0, 1.0, 1.0]) == 0
    assert relative_spread([1.0, 2.0, 3.0]) == pytest.approx(1.6 / 2.0)


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="needs Linux schedstat")
def test_run_delay_sees_other_processes_on_our_cores() -> None:
    """The protocol's interference detector: threads waiting for a CPU show up as run delay."""
    procs = _busy(2.0, len(os.sched_getaffinity(0)) + 1)
    time.sleep(0.3)
    waited, t0 = run_delay_s(), time.perf_counter()
    while time.perf_counter() - t0 < 0.5:  # compete for a CPU
        pass
    delay, wall = run_delay_s() - waited, time.perf_counter() - t0
    assert _spun(procs) > 0
    assert delay > 0.05 * wall, (delay, wall)


def test_loaded_machine_gives_the_unloaded_median_or_says_it_did_not_converge(x86) -> None:
    """Busy processes on every core beside the measurement: the protocol's median stays
    within 40% of the unloaded one, or the measurement says it did not converge (never a
    steady-looking wrong number)."""
    from codesign.blocks import BlockSpec
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.lower import lower_block

    built = compile_module(lower_block(BlockSpec.from_key("mb_k3_e6_i24_o24_s1_h7_w7")), x86)
    runner, proto = LocalRunner(), MeasureProtocol(repeat=10, min_repeat_ms=10)
    quiet = runner.run(built, proto)
    if not quiet.steady(STEADY_CV):
        pytest.skip("the machine is busy already: no unloaded reference to compare with")
    procs = _busy(4.0, len(os.sched_getaffinity(0)))
    time.sleep(0.2)
    loaded = runner.run(built, proto)
    assert _spun(procs) > 0
    assert loaded.ok
    # 40%: a busy loop on every vCPU slows even the rounds in which no thread of ours waited
    # for a CPU (shared core resources of the host; 28% seen on the EMR guest); a scheduler
    # tick lost per parallel loop is 2-100x, which this still tells apart
    close = loaded.median_ms == pytest.approx(quiet.median_ms, rel=0.4)
    assert close or not loaded.steady(STEADY_CV), (quiet.median_ms, loaded)


@pytest.mark.network
def test_lut_records_the_noise_floor_once(lut_path, tiny, x86, quick) -> None:
    """Once per LUT file, target and protocol: one network of the space measured repeatedly
    (a whole-space build does it by default; a build of chosen blocks when asked)."""
    from codesign.lut import LatencyTable
    from codesign.lut_build import build_lut

    blocks = tiny.blocks()[:1]
    with LatencyTable(lut_path) as t:
        assert t.noise_floor is None
    kw = {"protocol": quick, "blocks": blocks, "progress": False, "noise_floor": True}
    r1 = build_lut(tiny, x86, lut_path, **kw)
    assert r1.noise_floor is not None and r1.noise_floor >= 0
    with LatencyTable(lut_path) as t:
        assert t.noise_floor == r1.noise_floor
        info = t.noise_floor_info()
    assert info is not None and info["target"] == x86.key and len(info["samples_ms"]) >= 5
    # each value pooled over as many passes as the batch was measured in
    assert info["protocol"]["passes"] == max(quick.passes, r1.passes or 0)
    r2 = build_lut(tiny, x86, lut_path, **kw)
    assert r2.noise_floor is None and "noise_floor" not in r2.seconds  # kept, not measured
    with LatencyTable(lut_path) as t:
        assert t.noise_floor == r1.noise_floor
