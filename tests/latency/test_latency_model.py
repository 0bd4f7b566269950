"""The latency model: LUT sum + XGBoost residual, on real measurements of the tiny space."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from latency_fixtures import NETS  # noqa: E402  (the `measured` fixture: conftest.py)

from codesign.blocks import BlockSpec
from codesign.latency.fit import fit_latency_model, held_out
from codesign.latency.model import LatencyModel, LatencyModelError
from codesign.latency.networks import measure_networks, sample_archs
from codesign.lut import LatencyTable
from codesign.lut_build import build_lut
from codesign.measurement import Measurement, MeasureProtocol
from codesign.tvm_backend.runner import Runner, run_steady


def test_network_measurement_is_resumable(measured, tiny, x86) -> None:
    db, archs = measured
    with LatencyTable(db) as t:  # rows measured under a load spike are measured again
        steady = sum(
            t.get_network(x86.key, a.encode(), "untuned").measurement.steady(0.05)
            for a in archs[:3]
        )
    rep = measure_networks(
        tiny,
        x86,
        db,
        archs[:3],
        protocol=MeasureProtocol(repeat=5, min_repeat_ms=5),
        progress=False,
    )
    assert (rep.measured, rep.reused) == (3 - steady, steady)
    with LatencyTable(db) as t:
        nets = t.networks(x86.key, "untuned")
    assert {e.key for e in nets} >= {a.encode() for a in archs}
    assert all(e.ok and e.median_ms > 0 for e in nets)


class _Scripted(Runner):
    """A device whose runs return the given measurements in turn (a load spike on demand)."""

    def __init__(self, *measurements: Measurement) -> None:
        self.todo = list(measurements)
        self.calls = 0

    def run(self, built, protocol) -> Measurement:
        self.calls += 1
        return self.todo.pop(0)


def _ms(*samples_ms: float) -> Measurement:
    return Measurement.from_samples([s / 1e3 for s in samples_ms])


def test_unsteady_runs_are_repeated_and_the_steadiest_kept() -> None:
    spike, calm = _ms(1.0, 1.0, 2.5, 1.0), _ms(1.0, 1.01, 0.99, 1.0)
    r = _Scripted(spike, calm, spike)
    assert run_steady(r, None, MeasureProtocol()) == calm and r.calls == 2
    worse = _ms(1.0, 3.0, 1.0, 1.0)
    r = _Scripted(spike, worse, worse)
    assert run_steady(r, None, MeasureProtocol(), tries=3) == spike and r.calls == 3
    r = _Scripted(Measurement.failed("device lost"), calm)
    assert run_steady(r, None, MeasureProtocol()).error == "device lost" and r.calls == 1


@pytest.mark.network
def test_network_measured_under_load_is_measured_again(tmp_path, tiny, x86) -> None:
    db = tmp_path / "lut.sqlite"
    proto = MeasureProtocol(repeat=5, min_repeat_ms=5)
    arch = sample_archs(tiny, 1, seed=3)
    # every round shared the CPU (the runner's converged=False), in all three tries, in the
    # two later passes (proto.passes = 3) and in the three extra passes a module never seen
    # quiet gets
    spike = Measurement.from_samples([1e-4, 2e-4, 3e-4, 1.5e-4, 2.5e-4], converged=False)
    runner = _Scripted(*[spike] * 8)
    rep = measure_networks(tiny, x86, db, arch, protocol=proto, runner=runner, progress=False)
    assert runner.calls == 8
    assert rep.measured == 1
    rep = measure_networks(tiny, x86, db, arch, protocol=proto, progress=False)
    assert (rep.measured, rep.reused) == (1, 0)
    with LatencyTable(db) as t:
        assert t.get_network(x86.key, arch[0].encode(), "untuned").measurement != spike


def test_lut_only_model(measured, tiny, x86) -> None:
    db, archs = measured
    m = LatencyModel.from_lut(db, tiny, x86)
    assert m.mode == "untuned"
    arch = archs[0]
    lut_sum = sum(m.block_ms(b) for b in tiny.arch_blocks(arch))
    assert m.lut_sum(arch) == pytest.approx(lut_sum)
    assert m.predict(arch) == pytest.approx(lut_sum)  # no residual yet
    assert np.allclose(m.predict_many(archs[:3]), [m.lut_sum(a) for a in archs[:3]])


def test_expected_is_differentiable_and_matches_lut_sum(measured, tiny, x86) -> None:
    db, archs = measured
    m = LatencyModel.from_lut(db, tiny, x86)
    arch = archs[1]
    one_hot = [
        torch.tensor([1.0 if c == t else 0.0 for c in layer.candidates])
        for layer, t in zip(tiny.layers(), arch.choices, strict=True)
    ]
    assert float(m.expected(one_hot)) == pytest.approx(m.lut_sum(arch), rel=1e-6)
    logits = [torch.zeros(len(layer.candidates), requires_grad=True) for layer in tiny.layers()]
    e = m.expected([torch.softmax(lg, -1) for lg in logits])
    e.backward()
    # d E / d logit points to the slower ops: the slowest candidate gets the largest gradient
    for lg, table in zip(logits, m.layer_tables(), strict=True):
        assert int(torch.argmax(lg.grad)) == int(np.argmax(table))
    with pytest.raises(LatencyModelError, match="probability vectors"):
        m.expected(one_hot[:-1])


def test_fit_save_load_and_provenance_refusal(measured, tiny, x86, tmp_path: Path) -> None:
    db, archs = measured
    model, report = fit_latency_model(db, tiny, x86, test_fraction=0.3, seed=0, allow_noisy=True)
    assert report.n_train + report.n_test == NETS
    # the residual form with the lowest cross-validated error wins, "none" (LUT sum) included
    assert set(report.cv_rmspe) == {"diff", "logratio", "ridge", "none"}
    assert report.cv_rmspe[report.form] == min(report.cv_rmspe.values())
    assert (model.residual is None) == (report.form in ("none", "ridge"))
    assert set(report.test) == {"lut_only", "flops_linear", "lut_xgb"}
    for res in report.test.values():
        assert 0 <= res["within5"] <= res["within10"] <= 1 and res["rmspe"] >= 0
    path = model.save(tmp_path / "model.json")
    again = LatencyModel.load(path, db)
    assert again.predict(archs[2]) == pytest.approx(model.predict(archs[2]))
    _, meas, preds = held_out(again, db)
    assert len(meas) == report.n_test and set(preds) == {"lut_only", "flops_linear", "lut_xgb"}
    # the LUT changes under the model: loading against it is refused, the snapshot still works
    copy = tmp_path / "snap.sqlite"
    with LatencyTable(db) as src:
        src.con.execute("VACUUM INTO ?", (str(copy),))
    with LatencyTable(copy) as t:
        e = t.entries(x86.key, "untuned")[0]
        t.put(x86.key, e.key, "untuned", Measurement.from_samples([1.0]), e.provenance)
    with pytest.raises(LatencyModelError, match="different LUT state"):
        LatencyModel.load(path, copy)
    assert LatencyModel.load(path).predict(archs[2]) == pytest.approx(model.predict(archs[2]))


def test_missing_blocks_policies(measured, tiny, x86) -> None:
    db, _ = measured
    pruned = BlockSpec("mb", 5, 16, 16, 1, 7, 7, mid=40)  # a shape the space never produces
    with pytest.raises(LatencyModelError, match="no LUT entry"):
        LatencyModel.from_lut(db, tiny, x86, missing="error").block_ms(pruned)
    predicted = LatencyModel.from_lut(db, tiny, x86, missing="predict").block_ms(pruned)
    assert 0 < predicted < 10
    m = LatencyModel.from_lut(db, tiny, x86, missing="measure")
    measured_ms = m.block_ms(pruned)
    with LatencyTable(db) as t:
        entry = t.get(x86.key, pruned, "untuned")
    assert entry is not None and entry.median_ms == pytest.approx(measured_ms)
    net = list(tiny.arch_blocks(tiny.uniform("k5e3")))
    net[3] = pruned
    assert m.predict_blocks(net) > 0


def test_incomplete_lut_is_refused(tmp_path: Path, tiny, x86) -> None:
    db = tmp_path / "partial.sqlite"
    build_lut(
        tiny, x86, db, blocks=tiny.blocks()[:2], protocol=MeasureProtocol.quick(), progress=False
    )
    with pytest.raises(LatencyModelError, match="lacks 37 of 39 blocks"):
        LatencyModel.from_lut(db, tiny, x86)


def test_cli_fit_eval_predict(measured, tmp_path: Path, x86) -> None:
    db, archs = measured
    with LatencyTable(db) as t:  # rows measured under a load spike are measured again
        steady = sum(
            t.get_network(x86.key, a.encode(), "untuned").measurement.steady(0.05) for a in archs
        )
    cli = ["latency"]  # in this process (tests/cli_helpers.py)
    out = tmp_path / "m.json"
    r = run_cli(
        *cli,
        "fit",
        "--db",
        str(db),
        "--space",
        "tiny",
        "--target",
        "x86",
        "--networks",
        str(NETS),
        "--out",
        str(out),
        "--no-progress",
        "--repeat",
        "5",
        "--min-repeat-ms",
        "5",
        "--allow-noisy",  # a loaded test host may record a large noise floor
    )
    assert r.returncode == 0, r.stderr
    assert f"{NETS - steady} measured, {steady} reused" in r.stdout and "lut_xgb" in r.stdout
    r = run_cli(*cli, "eval", "--model", str(out), "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert Path(res["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli(*cli, "predict", "--model", str(out), archs[0].encode())
    assert r.returncode == 0 and "ms" in r.stdout
    bad = run_cli(*cli, "predict", "--model", str(out), "tiny:k9e9")
    assert bad.returncode == 2 and "k9e9" in bad.stderr


def test_sampled_architectures_are_distinct_and_seeded(tiny) -> None:
    a, b = sample_archs(tiny, 30, seed=3), sample_archs(tiny, 30, seed=3)
    assert a == b and len({x.encode() for x in a}) == 30
    assert sample_archs(tiny, 30, seed=4) != a
    # the first sample is the space's own draw from the seeded generator; all decode back
    assert a[0] == tiny.sample(random.Random(3))
    assert all(tiny.decode(x.encode()) == x for x in a)
