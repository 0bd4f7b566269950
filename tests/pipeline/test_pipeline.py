"""`codesign pipeline`: configuration, stage caching and invalidation, and one real end-to-end run
on the tiny space (digits, small budgets) that is interrupted and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codesign.errors import BuildError
from codesign.pipeline import STAGES
from codesign.pipeline.cache import StageRunner
from codesign.pipeline.config import ConfigError, PipelineConfig, from_dict, load_config, to_toml


# ------------------------------------------------------------------ configuration
def test_default_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert cfg == PipelineConfig()
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    changed = from_dict({"search": {"baselines": "k5e6"}, "target": {"latency_ms": 0.5}})
    path.write_text(to_toml(changed))
    assert load_config(path) == changed and changed.search.baselines == ("k5e6",)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"serach": {}}, r"unknown section \[serach\]"),
        ({"search": {"epoch": 3}}, r"unknown key\(s\) epoch in \[search\]"),
        ({"compress": {"method": "prune"}}, "none, amc or haq, got 'prune'.*methods ="),
        ({"compress": {"methods": ["amc", "qat"]}}, r"unknown method\(s\) 'qat'; choose from"),
        ({"compress": {"methods": ["none"]}}, r"methods = \[\]"),
        ({"compress": {"methods": ["haq", "amc"]}}, "amc must come before haq"),
        ({"compress": {"methods": ["amc", "amc"]}}, "lists a method twice"),
        ({"compress": {"methods": "amc,haq"}}, "unknown method"),
        ({"latency": {"allow_noisy": 1}}, r"\[latency\] allow_noisy must be true or false"),
        ({"compress": {"methods": 5}}, r"\[compress\] methods must be a list of strings"),
        ({"search": {"baselines": 5}}, r"\[search\] baselines must be a list of strings"),
        ({"compress": {"methods": ["amc"], "method": "amc"}}, "keep only `methods`"),
        ({"compress": {"haq_budget_fraction": 0}}, r"haq_budget_fraction must be in \(0, 1\]"),
        ({"compress": {"haq_episodes": 0}}, r"haq_episodes must be >= 1"),
        ({"target": {"targets": ["x87"]}}, "x87"),
        ({"task": {"space": "nope"}}, "nope"),
        ({"latency": {"networks": 3}}, "at least 8"),
        ({"compile": {"focus_trials": -1}}, r"compile\.focus_trials must be >= 0"),
    ],
)
def test_bad_config_is_a_clear_error(data: dict, match: str) -> None:
    from codesign.errors import CodesignError

    with pytest.raises(CodesignError, match=match):
        from_dict(data)


def test_compress_methods_chain_by_default_and_the_old_key_still_reads(tmp_path: Path) -> None:
    from codesign.pipeline.run import with_overrides

    cfg = load_config(None)
    assert cfg.compress.methods == ("amc", "haq")  # the default ships the quantised network
    assert from_dict({"compress": {"methods": ["haq"]}}).compress.methods == ("haq",)
    assert from_dict({"compress": {"methods": []}}).compress.methods == ()
    for old, new in (("amc", ("amc",)), ("haq", ("haq",)), ("none", ())):
        with pytest.warns(FutureWarning, match=f'method = "{old}" is deprecated'):
            assert from_dict({"compress": {"method": old}}).compress.methods == new
        with pytest.warns(FutureWarning):
            assert with_overrides(cfg, compress={"method": old}).compress.methods == new
    path = tmp_path / "c.toml"
    path.write_text(to_toml(from_dict({"compress": {"methods": []}})))
    assert load_config(path).compress.methods == ()  # an empty list round-trips
    # each step's cache identity holds only its own keys: a HAQ key leaves prune cached
    haq = with_overrides(cfg, compress={"haq_episodes": 9})
    assert haq.compress.amc_keys() == cfg.compress.amc_keys()
    assert haq.compress.haq_keys() != cfg.compress.haq_keys()


def test_shipping_margin_follows_the_noise_floor_within_bounds(tmp_path: Path) -> None:
    from codesign.lut import LatencyTable
    from codesign.pipeline.compress import (
        MAX_GAIN,
        MIN_GAIN,
        held_back,
        measured_faster,
        min_gain,
    )

    db = tmp_path / "lut.sqlite"
    for floor, want in ((None, MIN_GAIN), (0.005, MIN_GAIN), (0.041, 0.041), (0.475, MAX_GAIN)):
        with LatencyTable(db) as table:
            if floor is not None:
                table.set_noise_floor(floor, network="n")
        assert min_gain(db) == pytest.approx(want)
    assert measured_faster(0.85, 1.0, MAX_GAIN) and not measured_faster(0.95, 1.0, MAX_GAIN)
    assert measured_faster(None, 1.0, MAX_GAIN)  # unmeasured: nothing to refuse on
    # faster, and within max_acc_drop points of its input on the same images: it ships
    assert held_back(0.85, 1.0, 0.02, 96.0, 96.9, 1.0) is None
    assert held_back(0.85, 1.0, 0.02, 95.8, 96.9, 1.0) == "accuracy"
    assert held_back(0.99, 1.0, 0.02, 99.0, 96.9, 1.0) == "speed"
    assert held_back(0.85, 1.0, 0.02, None, 96.9, 1.0) is None  # no accuracy: speed decides


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[task\nspace = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# ------------------------------------------------------------------ stage runner
def test_stages_skip_resume_and_invalidate(tmp_path: Path) -> None:
    calls: list[str] = []

    def stage(tag: str):
        def fn(work: Path) -> dict:
            calls.append(tag)
            (work / "partial").write_text(tag)
            return {"value": tag}

        return fn

    r = StageRunner(tmp_path, log=lambda m: None)
    assert r.run("a", {"x": 1}, stage("a1")) == {"value": "a1"}
    r = StageRunner(tmp_path, log=lambda m: None)
    assert r.run("a", {"x": 1}, stage("a2")) == {"value": "a1"}  # same inputs: cached
    assert calls == ["a1"] and r.skipped == ["a"]

    # an interrupted stage keeps its work directory and resumes with the same inputs
    def interrupted(work: Path) -> dict:
        (work / "checkpoint").write_text("epoch 3")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        r.run("b", {"x": 1}, interrupted)
    assert not r.record("b").completed

    def resumed(work: Path) -> dict:
        return {"resumed_from": (work / "checkpoint").read_text()}

    assert r.run("b", {"x": 1}, resumed) == {"resumed_from": "epoch 3"}

    # an interrupt that a library turned into another error still stops the run as one
    def swallowed(work: Path) -> dict:
        r.stop_requested = True  # what the signal handler sets
        raise BuildError("TVM could not compile net for x86: ")

    with pytest.raises(KeyboardInterrupt):
        r.run("c", {"x": 1}, swallowed)
    assert not r.record("c").completed
    r.stop_requested = False

    # changed inputs: the work directory is cleared and the stage runs again
    def fresh(work: Path) -> dict:
        return {"stale_checkpoint": (work / "checkpoint").exists()}

    assert r.run("b", {"x": 2}, fresh) == {"stale_checkpoint": False}
    # a damaged record only means the stage runs again
    (tmp_path / "stages" / "a.json").write_text("{not json")
    assert r.run("a", {"x": 1}, stage("a3")) == {"value": "a3"}


# ------------------------------------------------------------------ end to end
SMALL = """
[task]
dataset = "digits"
[lut]
repeat = 3
min_repeat_ms = 10
[latency]
networks = 8
[search]
epochs = 1
retrain_epochs = 1
baselines = ["k3e3"]
[compress]
methods = []
"""


def _stage_state(out: Path, name: str) -> dict | None:
    path = out / "stages" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ~400 s on 2 cores. The default tier covers its parts: every stage's own end-to-end test (lut
# build, latency fit, search, prune, compile: tests/<part>/) and the stage runner's resume logic
# above (test_stages_skip_resume_and_invalidate).
@pytest.mark.slow
@pytest.mark.network
def test_pipeline_end_to_end_interrupted_and_resumed(tmp_path: Path) -> None:
    """A real run on the tiny space: interrupted (SIGINT) during the search, resumed without
    redoing the LUT and the latency model; a third run has nothing left to do."""
    from codesign.pipeline import run

    cfg_file, out = tmp_path / "small.toml", tmp_path / "out"
    cfg_file.write_text(SMALL)
    cmd = [sys.executable, "-m", "codesign.cli.main", "pipeline", "--config", str(cfg_file)]
    log = tmp_path / "stderr.txt"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),  # a file, not a pipe: a full pipe would block the child
    )
    try:
        deadline = time.time() + 1800  # the LUT and 8 networks: minutes on a busy host
        while _stage_state(out, "search") is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the search stage never started"
            time.sleep(0.5)
        time.sleep(3)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]  # stopped: at once, or when the stage ended
    assert "interrupted" in err.lower(), err[-2000:]
    assert _stage_state(out, "latency")["completed"]
    assert _stage_state(out, "verify") is None
    done = [n for n in STAGES if (_stage_state(out, n) or {}).get("completed")]

    res = run(load_config(cfg_file), out, progress=False)
    assert res.summary["stages"]["skipped"] == done
    assert res.summary["stages"]["ran"] == [n for n in STAGES if n not in done]
    s = res.summary
    assert res.artifact.exists() and s["artifact"]["latency_ms"] > 0
    assert 0 <= s["artifact"]["accuracy"] <= 100
    assert s["verify"]["max_abs_err"] < 1e-3
    assert [p["label"] for p in s["baselines"]] == ["k3e3"]
    assert s["budget"]["smallest_ms"] < s["budget"]["budget_ms"] < s["budget"]["largest_ms"]
    html = res.report_html.read_text()
    assert html.count("data:image/png;base64,") >= 3  # arch, pareto, latency scatter
    assert "http" not in html.replace("http-equiv", "")  # self-contained
    md = res.report_md.read_text()
    assert s["search"]["arch"] in md and "## Provenance" in md

    again = run(load_config(cfg_file), out, progress=False)
    assert again.summary["stages"]["ran"] == []
    assert again.summary["artifact"] == s["artifact"]

    # a changed [compress] section redoes compression and what depends on it, nothing before
    from codesign.pipeline.run import with_overrides

    amc = with_overrides(
        load_config(cfg_file), compress={"methods": ("amc",), "episodes": 2, "finetune_epochs": 1}
    )
    pruned = run(amc, out, progress=False)
    assert pruned.summary["stages"]["ran"] == ["prune", "quantize", "compile", "verify"]
    c = pruned.summary["prune"]
    assert c["method"] == "amc" and c["policy"]
    assert c["report"]["predicted_ms"] <= c["budget_ms"] + 1e-9
    shipped = pruned.summary["artifacts"]["x86"]["manifest"]["model"]
    # the pruned network ships only where it measured faster than the searched one, by more
    # than the noise floor (at least 2%)
    assert c["min_gain"] >= 0.02
    faster = c["after"]["measured_ms"] < c["before"]["measured_ms"] * (1 - c["min_gain"])
    # ... and lost at most [compress] max_acc_drop points on the same validation split
    faster = faster and c["before"]["acc"] - c["after"]["acc"] <= c["max_acc_drop"]
    assert c["shipped"] == ("pruned" if faster else "searched")
    assert (c["held_back_for"] is None) == faster
    pruning = shipped["policies"]["pruning"]
    assert (pruning["policy"] if pruning else None) == (c["policy"] if faster else None)
    assert pruned.report_html.read_text().count("data:image/png;base64,") >= 4  # + policy


CHAIN = SMALL.replace("methods = []", 'methods = ["amc", "haq"]') + (
    "episodes = 2\nfinetune_epochs = 1\nhaq_episodes = 2\nhaq_qat_images = 64\n"
    "haq_val_images = 100\n"
)


@pytest.mark.slow
@pytest.mark.network
def test_chained_pipeline_interrupted_after_prune_resumes_at_quantize(tmp_path: Path) -> None:
    """search -> prune -> quantize -> compile, stopped (SIGINT) once quantize has started: the
    re-run redoes neither search nor prune, finishes quantize and ships the quantised network;
    the report shows accuracy and measured latency after each step."""
    from codesign.pipeline import run

    cfg_file, out = tmp_path / "chain.toml", tmp_path / "out"
    cfg_file.write_text(CHAIN)
    cmd = [sys.executable, "-m", "codesign.cli.main", "pipeline", "--config", str(cfg_file)]
    log = tmp_path / "stderr.txt"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),  # a file, not a pipe: a full pipe would block the child
    )
    try:
        deadline = time.time() + 1800
        while _stage_state(out, "quantize") is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the quantize stage never started"
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert not _stage_state(out, "quantize")["completed"]
    pruned_at = _stage_state(out, "prune")["finished_at"]

    res = run(load_config(cfg_file), out, progress=False)
    s = res.summary
    assert s["stages"]["ran"] == ["quantize", "compile", "verify"]
    assert {"search", "prune"} <= set(s["stages"]["skipped"])
    assert _stage_state(out, "prune")["finished_at"] == pruned_at
    q = s["quantize"]
    assert q["method"] == "haq" and q["policy"] and q["budget_ms"] >= q["budget_asked_ms"]
    # quantize starts from what the prune step ships (the searched network where pruning
    # did not measure faster)
    p = s["prune"]
    assert q["before"] == (p["before"] if p["shipped"] == "searched" else p["after"])
    shipped = s["artifacts"]["x86"]["manifest"]["model"]["policies"]
    assert bool(shipped["pruning"]) == (p["shipped"] == "pruned")
    # the quantised network ships only where it measured faster than the float one (by more
    # than the noise floor, at least 2%)
    assert q["min_gain"] >= 0.02
    faster = q["after"]["measured_ms"] < q["before"]["measured_ms"] * (1 - q["min_gain"])
    # ... and lost at most max_acc_drop points against the float network on the same images
    faster = faster and q["float_acc_same_images"] - q["after"]["acc"] <= q["max_acc_drop"]
    assert q["shipped"] == ("quantized" if faster else "float")
    assert (shipped["quantization"] is not None) == faster
    assert [st["step"] for st in s["compress"]["steps"]] == [
        "search", "prune (amc)", "quantize (haq)"
    ]  # fmt: skip
    assert all(st["measured_ms"] > 0 for st in s["compress"]["steps"])
    assert s["artifact"]["latency_ms"] > 0 and 0 <= s["artifact"]["accuracy"] <= 100
    md = res.report_md.read_text()
    assert "| quantize (haq) |" in md and "| shipped artifact (compiled) |" in md
    assert ("the float network ships" in md) != faster


def test_rpc_timeout_bounds_a_remote_targets_farm_jobs_and_nothing_local() -> None:
    from codesign.pipeline.stages import _bounded, _network_runner
    from codesign.targets import parse_target

    with pytest.raises(ConfigError, match=r"rpc_timeout_s must be positive"):
        from_dict({"target": {"rpc_timeout_s": 0}}).validate()
    local = from_dict({"target": {"rpc_timeout_s": 7.0}})
    assert _bounded(local, "x86") is None  # this machine: no RPC phase to bound
    arm = "arm:key=rpi4,tracker=127.0.0.1:9190"
    remote = from_dict({"target": {"targets": [arm], "rpc_timeout_s": 7.0}})
    farm = _bounded(remote, arm)
    assert farm.timeouts.request == 7.0 and farm.timeouts.job == 28.0
    runner = _network_runner(remote, parse_target(arm))
    assert type(runner).__name__ == "RPCRunner" and runner.config.timeouts.request == 7.0
    assert _bounded(from_dict({"target": {"targets": [arm]}}), arm) is None  # the farm's own
