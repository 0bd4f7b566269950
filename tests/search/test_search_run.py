"""Search strategies on a real LUT of the tiny space: evolution under a hard latency constraint,
seeded determinism and resumption of the ProxylessNAS search, and `codesign search` end to end."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from cli_helpers import CliResult, run_cli

from codesign.data import load_dataset
from codesign.latency.model import LatencyModel
from codesign.search.evolution import EvolutionConfig, SupernetScorer, evolve
from codesign.search.objective import LatencyObjective, SearchError
from codesign.search.proxyless import ProxylessConfig, ProxylessSearch, derive_arch
from codesign.search.run import search_split
from codesign.search.supernet import Supernet


@pytest.fixture(scope="module")
def lut(tmp_path_factory, tiny_lut) -> Path:
    """A complete untuned LUT of the tiny space on this CPU (this module's copy)."""
    db = tmp_path_factory.mktemp("nas") / "lut.sqlite"
    shutil.copy(tiny_lut, db)
    return db


@pytest.fixture(scope="module")
def model(lut, tiny, x86) -> LatencyModel:
    return LatencyModel.from_lut(lut, tiny, x86)


@pytest.fixture(scope="module")
def digits(tiny):
    torch.set_num_threads(1)
    return search_split(load_dataset("digits", tiny.input_shape), seed=0)


def _budget(model: LatencyModel, tiny) -> float:
    """Halfway between the fastest and the uniform-k3e6 network."""
    lo = model.predict(tiny.uniform("skip"))  # k3e3 where a layer cannot be skipped
    return 0.5 * (lo + model.predict(tiny.uniform("k3e6")))


def test_evolution_never_crosses_the_latency_constraint(model, tiny, tmp_path: Path) -> None:
    budget = _budget(model, tiny)
    scored: list[float] = []

    def slow_is_good(arch) -> float:  # without the constraint this would pick the slowest net
        ms = model.predict(arch)
        scored.append(ms)
        return ms

    cfg = EvolutionConfig(population=12, generations=8, parents=4, mutations=6, crossovers=6)
    out = evolve(
        tiny, model, budget, slow_is_good, cfg, checkpoint=tmp_path / "evo.json", progress=False
    )
    assert scored and max(scored) <= budget
    assert out.predicted_ms <= budget and out.score == pytest.approx(out.predicted_ms)
    # it pushed up against the constraint: better than its initial population (how close it
    # gets depends on the measured LUT, so 85% of the budget also counts)
    assert out.score > out.history[0]["best_score"] or out.predicted_ms > 0.85 * budget
    assert all(h["best_predicted_ms"] <= budget for h in out.history)
    assert [h["best_score"] for h in out.history] == sorted(h["best_score"] for h in out.history)
    # seeded and resumable: a second call reads the finished state, a fresh run repeats it
    again = evolve(
        tiny, model, budget, slow_is_good, cfg, checkpoint=tmp_path / "evo.json", progress=False
    )
    fresh = evolve(tiny, model, budget, slow_is_good, cfg, progress=False)
    assert again.arch == out.arch == fresh.arch
    with pytest.raises(SearchError, match="other settings"):
        evolve(
            tiny,
            model,
            budget * 2,
            slow_is_good,
            cfg,
            checkpoint=tmp_path / "evo.json",
            progress=False,
        )
    with pytest.raises(SearchError, match="raise the latency target"):
        evolve(tiny, model, 1e-4, slow_is_good, cfg, progress=False)


def test_evolution_with_supernet_scores(model, tiny, digits) -> None:
    budget = _budget(model, tiny)
    scorer = SupernetScorer(Supernet(tiny, seed=0), digits, eval_images=128, bn_batches=2)
    cfg = EvolutionConfig(population=4, generations=2, parents=2, mutations=2, crossovers=2)
    out = evolve(tiny, model, budget, scorer, cfg, progress=False)
    assert 0.0 <= out.score <= 100.0 and out.predicted_ms <= budget
    assert all(model.predict(tiny.decode(a)) <= budget for a in out.scores)


def _search(tiny, digits, model, seed: int, epochs: int = 2, **kw) -> ProxylessSearch:
    cfg = ProxylessConfig(epochs=epochs, warmup_epochs=epochs - 1, seed=seed, eval_images=64, **kw)
    objective = LatencyObjective(_budget(model, tiny), form="mul")
    return ProxylessSearch(Supernet(tiny, seed=seed), digits, model, objective, cfg)


def test_proxyless_search_is_seeded_and_resumable(tiny, digits, model, tmp_path: Path) -> None:
    whole = _search(tiny, digits, model, 0)
    out_a = whole.run(progress=False)
    assert any(abs(p - 1 / len(row)) > 1e-3 for row in out_a.probs for p in row)  # alphas moved
    # a second run, interrupted after one epoch and resumed from its checkpoint: identical
    ckpt = tmp_path / "search.pt"
    first = _search(tiny, digits, model, 0)
    first.run(ckpt, progress=False, until_epoch=1)
    after_one = {k: v.clone() for k, v in first.supernet.state_dict().items()}
    resumed = _search(tiny, digits, model, 0)
    out_b = resumed.run(ckpt, progress=False)
    assert out_b.arch == out_a.arch and out_b.probs == out_a.probs
    sa, sb = whole.supernet.state_dict(), resumed.supernet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["epoch"] for h in out_b.history] == [1, 2]
    with pytest.raises(SearchError, match="other settings"):
        _search(tiny, digits, model, 1).run(ckpt, progress=False)
    # another seed: other weights after the same epoch
    other = _search(tiny, digits, model, 1)
    other.run(progress=False, until_epoch=1)
    so = other.supernet.state_dict()
    assert not all(torch.equal(so[k], after_one[k]) for k in so)
    # derivation respects a reachable budget: halfway between the searched net and the
    # fastest net the greedy derivation reaches (budget 0: every saving taken)
    _, floor = derive_arch(tiny, out_a.probs, model, 0.0)
    assert floor <= model.predict(out_a.arch)
    budget = floor + 0.5 * (model.predict(out_a.arch) - floor)
    arch, ms = derive_arch(tiny, out_a.probs, model, budget)
    assert ms <= budget and ms == pytest.approx(model.predict(arch))


def test_a_missed_target_tightens_below_the_missed_prediction() -> None:
    from codesign.search.strategies import next_budget

    # predicted 0.16 ms under a 0.66 ms budget, measured 0.9 ms: the next budget must exclude it
    assert next_budget(0.66, 0.16, 0.66, 0.9) < 0.16 * 0.66 / 0.9 + 1e-12
    assert next_budget(0.5, 0.6, 0.5, 0.55) == pytest.approx(0.5 * 0.5 / 0.55 * 0.98)


def test_reinforce_search_runs(tiny, digits, model) -> None:
    s = _search(tiny, digits, model, 0, epochs=1, estimator="reinforce", reinforce_samples=2)
    out = s.run(progress=False)
    assert s.baseline is not None and out.history[-1]["phase"] == "search"
    assert any(abs(p - 1 / len(row)) > 1e-3 for row in out.probs for p in row)


def _cli(*args: str) -> CliResult:
    return run_cli(*args)


def test_cli_search_end_to_end(lut, model, tiny, tmp_path: Path) -> None:
    from codesign.model_dir import load_model

    db = tmp_path / "lut.sqlite"
    shutil.copy(lut, db)
    with sqlite3.connect(db) as con:  # two blocks missing: the search measures them first
        (n,) = con.execute("SELECT count(*) FROM entries").fetchone()
        con.execute(
            "DELETE FROM entries WHERE block IN (SELECT block FROM entries ORDER BY block LIMIT 2)"
        )
    target = f"{1.5 * model.predict(tiny.uniform('k3e6')):.3f}"
    out = tmp_path / "run"
    args = [
        "search", "--space", "tiny", "--target", "x86", "--latency-ms", target,
        "--dataset", "digits", "--out", str(out), "--db", str(db), "--epochs", "1",
        "--repeat", "3", "--min-repeat-ms", "5", "--torch-threads", "1",
    ]  # fmt: skip
    res = _cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lacks 2 blocks" in res.stderr and "search (binary)" in res.stderr
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM entries").fetchone()[0] == n
    report = json.loads((out / "report.json").read_text())
    arch = tiny.decode(report["arch"])
    assert json.loads((out / "arch.json").read_text())["arch"] == arch.encode()
    assert report["target_met"] == (report["measured_ms"] <= float(target))
    assert report["measured_ms"] > 0 and report["predicted_ms"] <= float(target)
    assert report["accuracy"] > 10.0 and report["seconds"]["search"] > 0
    net, meta = load_model(out)
    assert meta.arch == arch.encode() and meta.accuracy == report["accuracy"]
    assert meta.extra["measured_ms"] == report["measured_ms"]
    # re-running the same command resumes: everything is done, nothing is redone
    again = _cli(*args, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["arch"] == arch.encode()
    # other settings in the same directory are refused and nothing is touched
    before = (out / "report.json").read_bytes()
    bad = _cli(*[a if a != "1" else "2" for a in args])
    assert bad.returncode == 2 and "other settings (epochs)" in bad.stderr
    assert (out / "report.json").read_bytes() == before


def test_cli_refuses_an_unreachable_target(lut, tmp_path: Path) -> None:
    db = tmp_path / "lut.sqlite"
    shutil.copy(lut, db)
    res = _cli(
        "search", "--space", "tiny", "--target", "x86", "--latency-ms", "0.002",
        "--dataset", "digits", "--out", str(tmp_path / "o"), "--db", str(db),
    )  # fmt: skip
    assert res.returncode == 2 and "below the fastest network" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow  # ~15-20 s; evolution runs by default in test_evolution_never_crosses_the_latency_constraint
def test_evolution_strategy_end_to_end(lut, model, tiny, tmp_path: Path) -> None:
    from codesign.search.run import SearchJob, SearchSettings, run_search_job

    target = round(0.8 * model.predict(tiny.uniform("k3e6")), 4)
    job = SearchJob(
        space="tiny",
        target="x86",
        latency_ms=target,
        dataset="digits",
        db=str(lut),
        settings=SearchSettings(
            strategy="evolution",
            epochs=1,
            population=6,
            generations=2,
            repeat=3,
            min_repeat_ms=5,
        ),
    )
    report = run_search_job(job, tmp_path / "evo", progress=False)
    assert report["strategy"] == "evolution" and report["predicted_ms"] <= target
    evo = report["history"]["search"]["evolution"]
    assert len(evo) == 2 and all(h["best_predicted_ms"] <= target for h in evo)
    assert (tmp_path / "evo" / "evolution.json").exists() and (
        tmp_path / "evo" / "weights.pt"
    ).exists()


def test_search_arch_python_entry_point(lut, model, tiny, tmp_path: Path) -> None:
    """The pipeline's entry: objects in, the Arch and a JSON-able report out, resumable."""
    from codesign.arch import Arch
    from codesign.search.run import SearchSettings, search_arch

    data = load_dataset("digits", tiny.input_shape)
    budget = round(1.2 * model.predict(tiny.uniform("k3e6")), 4)
    settings = SearchSettings(epochs=1, retrain_epochs=0, repeat=3, min_repeat_ms=5)
    out = tmp_path / "s"
    res = search_arch(tiny, model, data, budget, out, settings=settings, progress=False)
    assert isinstance(res.arch, Arch) and res.arch.space == "tiny" and res.accuracy is None
    assert res.predicted_ms <= budget and res.predicted_ms == pytest.approx(model.predict(res.arch))
    assert res.measured_ms > 0 and res.target_met == (res.measured_ms <= budget)
    assert json.loads(json.dumps(res.report))["arch"] == res.arch.encode()
    assert (out / "arch.json").exists() and not (out / "weights.pt").exists()
    # the model as a file + its LUT: the same inputs, so the finished search is returned
    path = model.save(tmp_path / "model.json")
    again = search_arch(tiny, path, data, budget, out, settings=settings, lut=lut, progress=False)
    assert again == res
    with pytest.raises(SearchError, match=r"other settings \(latency_ms\)"):
        search_arch(tiny, model, data, 2 * budget, out, settings=settings, progress=False)
    with pytest.raises(SearchError, match="not 'tiny-w0.5'"):
        from codesign.search.space import get_space

        search_arch(get_space("tiny-w0.5"), model, data, budget, tmp_path / "o", progress=False)
