"""AMC search on a real (small) LUT: the latency constraint, seeding, resuming, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from cli_helpers import run_cli

import codesign
from codesign.artifact.verify import verify_artifact
from codesign.compression.amc.env import AMCConfig, AMCEnv, allowed_counts, reachable_ms
from codesign.compression.amc.policy import PruneError, PrunePolicy, structure
from codesign.compression.amc.search import amc_search
from codesign.compression.ddpg import DDPGConfig
from codesign.data import load_dataset
from codesign.latency.model import LatencyModel
from codesign.lut import LatencyTable
from codesign.lut_build import build_lut
from codesign.measurement import MeasureProtocol
from codesign.model_dir import ModelDir, load_model, save_model
from codesign.modules import build_network
from codesign.search.space import get_space
from codesign.train import TrainConfig, train

# every test prunes, fine-tunes and measures a network trained by the module fixture
pytestmark = pytest.mark.network


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small forward passes: one thread (a 2-thread pool on a busy 2-core host is ~20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, x86):
    """A 9-block space (tiny layout, k3e3 only), its measured LUT, a model trained on digits."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("amc")
    space = replace(get_space("tiny"), name="tiny-amc-test", kernels=(3,), allow_skip=False)
    space = replace(space, expansions=(3,))
    db = root / "lut.sqlite"
    rep = build_lut(space, x86, db, protocol=MeasureProtocol.quick(), progress=False)
    assert rep.measured == len(space.blocks()) == 9 and not rep.failed
    model_json = LatencyModel.from_lut(db, space, x86).save(root / "latency.json")
    arch = space.uniform("k3e3")
    net = build_network(space, arch, seed=0)
    data = load_dataset("digits", space.input_shape)
    train(net, data, TrainConfig(epochs=2, lr=0.05), progress=False)
    model_dir = save_model(
        root / "model",
        net,
        ModelDir(blocks=net.specs, arch=arch.encode(), space=space.name, dataset=data.info),
    )
    return {"root": root, "db": db, "latency": model_json, "model": model_dir, "data": data}


def budget_at(setup, frac: float, config: AMCConfig, missing: str = "predict") -> float:
    """A budget `frac` of the way from the smallest latency pruning reaches to the unpruned
    one (with scheduled kernels a small network's floor is 0.6-0.8x of it, host-dependent)."""
    net, _ = load_model(setup["model"])
    lat = LatencyModel.load(setup["latency"], setup["db"], missing=missing)
    floor, base = reachable_ms(net, setup["data"], lat, config)
    return floor + frac * (base - floor)


def env_for(setup, budget_frac: float, config: AMCConfig, missing: str = "predict") -> AMCEnv:
    net, _ = load_model(setup["model"])
    lat = LatencyModel.load(setup["latency"], setup["db"], missing=missing)
    return AMCEnv(net, setup["data"], lat, budget_at(setup, budget_frac, config, missing), config)


CONFIG = AMCConfig(
    episodes=8, divisor=8, reward_images=300, ddpg=DDPGConfig(hidden=64, warmup_episodes=3)
)


def test_allowed_counts() -> None:
    assert allowed_counts(48, 0.2, 8) == (16, 24, 32, 40, 48)
    assert allowed_counts(8, 0.2, 8) == (8,)
    assert allowed_counts(10, 0.5, 1) == (5, 6, 7, 8, 9, 10)


def test_every_policy_meets_the_budget(setup, tmp_path) -> None:
    env = env_for(setup, 0.6, CONFIG)
    result = amc_search(env, CONFIG, out=tmp_path, progress=False)
    lat = LatencyModel.load(setup["latency"], setup["db"], missing="predict")
    net = env.network
    assert len(result.history) == 8
    for rec in result.history:
        policy = PrunePolicy.decode(rec["policy"])
        specs = env.specs(policy.counts(env.st))
        # checked again with a fresh latency model, not the environment's cache
        assert lat.predict_blocks(specs) == pytest.approx(rec["latency_ms"])
        assert rec["latency_ms"] <= env.budget_ms
        assert 0.0 <= rec["acc"] <= 100.0
    assert result.best["reward"] == max(r["reward"] for r in result.history)
    assert env.base_ms == pytest.approx(lat.predict_blocks(net.specs))
    # an agent asking for "keep everything" at every step is held to the budget too
    env.reset()
    while not env.done:
        env.step(1.0)
    assert env.latency(env.decided) <= env.budget_ms < env.base_ms
    with pytest.raises(PruneError, match="below the smallest latency"):
        AMCEnv(net, setup["data"], lat, 0.99 * budget_at(setup, 0.0, CONFIG), CONFIG)


def test_uniform_baseline_and_rewards(setup) -> None:
    env = env_for(setup, 0.7, CONFIG)
    policy, ratio = env.uniform_policy()
    assert env.latency(policy.counts(env.st)) <= env.budget_ms
    assert ratio < 1.0 and env.latency(env.uniform_counts(round(ratio + 0.01, 6))) > env.budget_ms
    assert len({r for _, r in policy.ratios}) > 1  # one ratio, rounded per unit to allowed widths
    acc = env.score(policy)
    alt = env_for(setup, 0.7, replace(CONFIG, reward="error_log_latency")).score(policy)
    assert alt["acc"] == acc["acc"] and acc["reward"] == pytest.approx(acc["acc"] / 100)
    expected = -(1 - acc["acc"] / 100) * math.log(acc["latency_ms"] * 1000)
    assert alt["reward"] == pytest.approx(expected)
    for bad in ({"lbound": 0.0}, {"reward": "flops"}, {"divisor": 0}):
        with pytest.raises(PruneError):
            replace(CONFIG, **bad)


def test_search_is_seeded_and_resumes_exactly(setup, tmp_path) -> None:
    whole = amc_search(env_for(setup, 0.7, CONFIG), CONFIG, out=tmp_path / "a", progress=False)
    short = replace(CONFIG, episodes=5)
    part = amc_search(env_for(setup, 0.7, short), short, out=tmp_path / "b", progress=False)
    resumed = amc_search(env_for(setup, 0.7, CONFIG), CONFIG, out=tmp_path / "b", progress=False)
    assert (part.resumed_from, resumed.resumed_from) == (0, 5)

    def key(h):
        return [(r["policy"], r["acc"], r["latency_ms"]) for r in h]

    assert key(resumed.history) == key(whole.history)
    assert len({r["policy"] for r in whole.history}) > 1
    lines = (tmp_path / "b" / "episodes.jsonl").read_text().splitlines()
    assert [json.loads(x)["policy"] for x in lines] == [r["policy"] for r in whole.history]
    other = replace(CONFIG, ddpg=replace(CONFIG.ddpg, seed=1))
    diff = amc_search(env_for(setup, 0.7, other), other, progress=False)
    assert key(diff.history) != key(whole.history)
    with pytest.raises(PruneError, match="another model, budget"):
        amc_search(env_for(setup, 0.8, CONFIG), CONFIG, out=tmp_path / "b", progress=False)


def test_missing_blocks_are_measured_into_the_lut(setup, tmp_path, x86) -> None:
    db = tmp_path / "lut.sqlite"
    shutil.copy(setup["db"], db)
    net, _ = load_model(setup["model"])
    lat = LatencyModel.load(setup["latency"], db, missing="measure")
    full_only = replace(CONFIG, lbound=1.0)  # the environment itself needs no new shapes
    env = AMCEnv(net, setup["data"], lat, lat.predict_blocks(net.specs), full_only)
    policy = PrunePolicy.decode("m3=0.5")  # one block changes shape: 16 -> 24 of 48 -> 16
    ms = env.latency(policy.counts(env.st))
    key = env.specs(policy.counts(env.st))[3].key
    assert key == "mb_k3_m24_i16_o16_s1_h7_w7"
    with LatencyTable(db) as t:
        entry = t.get(x86.key, env.specs(policy.counts(env.st))[3], "untuned")
    assert entry is not None and entry.ok and entry.median_ms > 0
    assert ms == pytest.approx(env.base_ms - lat.block_ms(net.specs[3]) + entry.median_ms)


@pytest.mark.slow  # ~25-40 s; by default: test_search_is_seeded_and_resumes_exactly, test_every_policy_meets_the_budget
def test_cli_prunes_fine_tunes_compiles_and_resumes(setup, tmp_path) -> None:
    net, _ = load_model(setup["model"])
    budget = budget_at(setup, 0.4, CONFIG)
    out = tmp_path / "pruned"
    args = [
        "prune",
        "--model", str(setup["model"]),
        "--target", "x86",
        "--latency-ms", f"{budget:.6f}",
        "--dataset", "digits",
        "--out", str(out),
        "--db", str(setup["db"]),
        "--latency-model", str(setup["latency"]),
        "--missing", "predict",
        "--episodes", "3",
        "--warmup", "2",
        "--divisor", "8",
        "--reward-images", "300",
        "--finetune-epochs", "1",
        "--repeat", "3",
        "--min-repeat-ms", "5",
        "--torch-threads", "1",
    ]  # fmt: skip
    run = run_cli(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "measured latency" in run.stdout and "amc search" in run.stderr  # progress bar
    pruned, meta = load_model(out)
    rec = meta.policies["pruning"]
    assert rec["predicted_ms"] <= budget and rec["measured_ms"] > 0 and rec["speedup"] > 0
    assert pruned.specs != net.specs and meta.accuracy == pytest.approx(rec["acc"])
    assert (
        meta.arch is None and meta.extra["pruned_from_arch"] == load_model(setup["model"])[1].arch
    )
    assert PrunePolicy.decode(rec["policy"]).counts(structure(net.specs)) == rec["channels"]
    # the pruned model directory shipped as an artifact: verified, and it runs
    art = verify_artifact(out / "model.tar").manifest.data
    assert art["model"]["blocks"] == [s.key for s in pruned.specs]
    assert art["model"]["policies"]["pruning"]["policy"] == rec["policy"]
    assert art["equality"]["ok"] and art["latency"]["median_ms"] > 0
    assert art["accuracy"]["torch_top1"] == pytest.approx(meta.accuracy)
    x = setup["data"].calibration(2, seed=3)
    with codesign.load(out / "model.tar") as predict, torch.no_grad():
        assert np.allclose(predict(x.numpy()), pruned(x).numpy(), rtol=1e-4, atol=1e-4)
    assert "artifact" in run.stdout and "verify" in run.stdout
    first = (out / "episodes.jsonl").read_text().splitlines()
    # resume: one more episode on top of the three done (not timed, no artifact)
    args[args.index("--episodes") + 1] = "4"
    more = ["--no-measure", "--no-artifact"]
    run = run_cli(*args, *more)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "prune.json").read_text())
    assert report["resumed_from_episode"] == 3 and report["episodes"] == 4
    assert (out / "episodes.jsonl").read_text().splitlines()[:3] == first
    assert "measured_ms" not in report and "artifact" not in report
    assert not (out / "model.tar").exists()  # the first run's archive held other weights
    bad = list(args)
    bad[bad.index("--model") + 1] = str(tmp_path / "nope")
    run = run_cli(*bad)
    assert run.returncode == 2 and "not a codesign model directory" in run.stderr


def test_output_directory_guards(setup, tmp_path) -> None:
    from codesign.compression.amc.pipeline import PruneJob, prune_model

    other = tmp_path / "other"
    shutil.copytree(setup["model"], other)
    before = (other / "model.json").read_text()
    for out, msg in ((other, "did not write"), (setup["model"], "must differ")):
        job = PruneJob(
            model=str(setup["model"]),
            target="x86",
            budget_ms=1.0,
            dataset="digits",
            out=str(out),
            db=str(setup["db"]),
            latency_model=str(setup["latency"]),
        )
        with pytest.raises(PruneError, match=msg):
            prune_model(job, CONFIG, TrainConfig(epochs=0), progress=False)
    assert (other / "model.json").read_text() == before
    assert sorted(p.name for p in other.iterdir()) == ["model.json", "weights.pt"]


def test_a_budget_below_the_floor_is_raised_to_the_floor_as_priced_with_measurements(
    setup, tmp_path
) -> None:
    """The pipeline's prune: a budget under the pruning floor is raised to the floor, priced as
    every candidate is (uncertain ones measured through TVM), so measuring cannot put the floor
    back above the budget."""
    from codesign.compression.amc.pipeline import PruneJob, prune_model

    job = PruneJob(
        model=str(setup["model"]),
        target="x86",
        budget_ms=1e-6,
        dataset="digits",
        out=str(tmp_path / "p"),
        db=str(setup["db"]),
        latency_model=str(setup["latency"]),
        missing="predict",
        measure=False,
        artifact=False,
        protocol=MeasureProtocol.quick(),
        raise_budget_to_floor=True,
        measure_uncertain=2,
    )
    config = replace(CONFIG, episodes=2)
    r = prune_model(job, config, TrainConfig(epochs=0), progress=False)
    counts = r["latency_counts"]
    assert r["budget_ms"] > job.budget_ms and r["predicted_ms"] <= r["budget_ms"] + 1e-9
    assert counts is not None and counts["measured"] <= 2 and sum(counts.values()) > 0
