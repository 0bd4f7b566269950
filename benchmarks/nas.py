"""Hardware-aware search vs MobileNetV2-style baselines on x86 (tiny space, mnist5k).

    python benchmarks/nas.py --quick   # 1 search epoch, 1 retrain epoch (exercises everything)
    python benchmarks/nas.py           # 10 search epochs (2 warm-up), 10 retrain epochs

1. Untuned LUTs of the tiny space for x86 (all cores) and x86:threads=1.
2. Baselines: uniform k3e6 networks at width multipliers 0.5/0.75/1.0/1.25 (spaces tiny-w0.5 ..),
   trained with the same recipe as the searched nets' retraining, measured through TVM.
3. Three latency targets on x86 (fractions of the measured width-1.0 baseline): ProxylessNAS
   search -> derive -> measure -> retrain (`codesign.search.run.run_search_job`, resumable).
4. Front and speedup: a searched net is on the front when no baseline measured at or below its
   latency is more accurate; speedup at equal accuracy = the measured ms of the nearest baseline
   of equal or lower accuracy over the searched net's.
5. Specialization: the same search (middle fraction, same budget) for x86:threads=1; both nets
   are measured on both targets; is each fastest on its own target?
Writes benchmarks/results/nas.json (nas_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402

from codesign.data import load_dataset  # noqa: E402
from codesign.measurement import MeasureProtocol  # noqa: E402
from codesign.search.hardware import ensure_lut, measure_arch  # noqa: E402
from codesign.search.run import SearchJob, SearchSettings, run_search_job  # noqa: E402
from codesign.search.space import get_space  # noqa: E402
from codesign.search.strategies import retrain  # noqa: E402
from codesign.targets import parse_target  # noqa: E402


def front_and_speedup(searched: dict, baselines: list[dict]) -> tuple[bool, float | None, dict]:
    faster = [b for b in baselines if b["measured_ms"] <= searched["measured_ms"]]
    on_front = all(b["acc"] <= searched["acc"] for b in faster)
    weaker = [b for b in baselines if b["acc"] <= searched["acc"]]
    if not weaker:
        return on_front, None, {}
    nearest = max(weaker, key=lambda b: (b["acc"], -b["measured_ms"]))
    return on_front, nearest["measured_ms"] / searched["measured_ms"], nearest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--epochs", type=int, default=None, help="search epochs (10; quick 1)")
    ap.add_argument("--retrain-epochs", type=int, default=None, help="(10; quick 1)")
    ap.add_argument("--fractions", type=float, nargs=3, default=(0.2, 0.3, 0.45))
    ap.add_argument("--widths", type=float, nargs="+", default=(0.5, 0.75, 1.0, 1.25))
    ap.add_argument("--loss", choices=("mul", "add", "hinge"), default="mul")
    ap.add_argument("--out", default="out/bench/nas", help="work directory (resumable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    quick = args.quick
    epochs = args.epochs or (1 if quick else 10)
    retrain_epochs = args.retrain_epochs or (1 if quick else 10)
    repeat, min_ms = (5, 20) if quick else (10, 50)
    protocol = MeasureProtocol(repeat=repeat, min_repeat_ms=min_ms)
    work = Path(args.out + ("_quick" if quick else ""))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "lut.sqlite"
    space = get_space("tiny")
    host = parse_target("x86").threads  # all cores; named explicitly from here on
    main_t = parse_target(f"x86:threads={host}")
    other_t = parse_target("x86:threads=1" if host > 1 else "x86:threads=2")
    info = machine()
    t_lut = time.time()
    for t in (main_t, other_t):
        ensure_lut(space, t, db, protocol, True)
    t_lut = time.time() - t_lut

    def job(target, ms: float) -> SearchJob:
        return SearchJob(
            space="tiny",
            target=target.spec,
            latency_ms=round(ms, 4),
            dataset=args.dataset,
            db=str(db),
            settings=SearchSettings(
                epochs=epochs,
                retrain_epochs=retrain_epochs,
                loss=args.loss,
                repeat=repeat,
                min_repeat_ms=min_ms,
                seed=args.seed,
            ),
        )

    # ---------------------------------------------------------------- baselines
    baselines = []
    recipe = job(main_t, 1.0)  # the retraining recipe of every searched net
    for w in args.widths:
        bspace = get_space("tiny" if w == 1.0 else f"tiny-w{w:g}")
        arch = bspace.uniform("k3e6")
        data = load_dataset(args.dataset, bspace.input_shape, seed=args.seed)
        bdir = work / f"baseline-w{w:g}"
        bdir.mkdir(exist_ok=True)
        t0 = time.time()
        _, trained = retrain(recipe.settings, bspace, arch, data, bdir, True)
        ms = {
            t.key: measure_arch(bspace, arch, t, protocol, seed=args.seed).median_ms
            for t in (main_t, other_t)
        }
        baselines.append(
            {
                "width": w,
                "arch": arch.encode(),
                "acc": trained["accuracy"],
                "measured_ms": ms[main_t.key],
                "measured_ms_other_target": ms[other_t.key],
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(f"baseline w{w:g}: {trained['accuracy']:.2f}% {ms[main_t.key]:.4f} ms", flush=True)
    ref = next(b for b in baselines if b["width"] == 1.0) if 1.0 in args.widths else baselines[-1]

    # ---------------------------------------------------------------- searched nets
    targets = []
    for i, frac in enumerate(args.fractions):
        t_ms = frac * ref["measured_ms"]
        rep = run_search_job(job(main_t, t_ms), work / f"target{i}-{main_t.key}")
        searched = {
            "acc": rep["accuracy"],
            "predicted_ms": rep["predicted_ms"],
            "measured_ms": rep["measured_ms"],
            "arch": rep["arch"],
        }
        on_front, speedup, nearest = front_and_speedup(searched, baselines)
        targets.append(
            {
                "latency_ms": rep["latency_target_ms"],
                "fraction_of_w1_baseline": frac,
                "searched": searched,
                "target_met": rep["target_met"],
                "on_front": on_front,
                "speedup_at_equal_accuracy": speedup,
                "nearest_baseline": nearest.get("width"),
                "search_seconds": rep["seconds"]["search"] + rep["seconds"]["derive_and_measure"],
                "retrain_seconds": rep["seconds"]["retrain"],
            }
        )
        print(f"target {t_ms:.4f} ms: {searched} on front {on_front}, speedup {speedup}")

    # ---------------------------------------------------------------- specialization
    mid = args.fractions[1]
    ref_other = ref["measured_ms_other_target"]
    rep_other = run_search_job(job(other_t, mid * ref_other), work / f"target1-{other_t.key}")
    rep_main = run_search_job(job(main_t, mid * ref["measured_ms"]), work / f"target1-{main_t.key}")
    nets = {main_t.key: rep_main, other_t.key: rep_other}
    matrix = {}
    for searched_for, rep in nets.items():
        arch = space.decode(rep["arch"])
        matrix[searched_for] = {
            t.key: measure_arch(space, arch, t, protocol, seed=args.seed).median_ms
            for t in (main_t, other_t)
        }
    same = len({r["arch"] for r in nets.values()}) == 1
    # with one architecture for both targets "fastest" would only compare measurement noise
    own = None if same else {k: matrix[k][k] <= min(matrix[o][k] for o in matrix) for k in matrix}
    speedups = [t["speedup_at_equal_accuracy"] for t in targets]
    result = {
        "space": space.name,
        "dataset": args.dataset,
        "target": main_t.key,
        "quick": quick,
        "epochs": {"search": epochs, "retrain": retrain_epochs},
        "targets": targets,
        "baselines": baselines,
        "speedup_at_equal_accuracy": min(speedups) if None not in speedups else None,
        "all_targets_on_front": all(t["on_front"] for t in targets),
        "all_targets_met": all(t["target_met"] for t in targets),
        "specialization": {
            "targets": [main_t.key, other_t.key],
            "archs": {k: r["arch"] for k, r in nets.items()},
            "acc": {k: r["accuracy"] for k, r in nets.items()},
            "measured_ms": matrix,  # searched-for target -> measured-on target -> ms
            "same_arch": same,
            "fastest_on_own_target": own,
        },
        "search_seconds": round(sum(t["search_seconds"] for t in targets), 1),
        "retrain_seconds": round(sum(t["retrain_seconds"] for t in targets), 1),
        "lut_seconds": round(t_lut, 1),
        "protocol": protocol.to_dict(),
        "machine": info,
    }
    write_result("nas_quick" if quick else "nas", result)
    print(
        f"on front at every target: {result['all_targets_on_front']}; speedup at equal accuracy "
        f"(min over targets): {result['speedup_at_equal_accuracy']}; specialization: {own}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
