"""The device farm on this machine: throughput, RPC overhead, and recovery from faults.

    python benchmarks/farm.py --quick     # 8 blocks, 2 rounds, short faults (~4 min)
    python benchmarks/farm.py             # all 39 tiny blocks, default protocol, 5 rounds

All servers run on 127.0.0.1 (this 2-core box: the servers, the compiler and the measured code
share the cores, so 2 servers cannot double throughput here; a real farm has one board each).
Reports, measured in one run:
  * LUT entries per minute: local single-process build, farm with 1 server, farm with 2 servers;
  * time_evaluator medians over RPC vs local for the same library (interleaved rounds; they
    should agree within 2%), and the wall-clock cost of one farm job vs one local run;
  * time to recover from injected faults: a killed server, a frozen server (SIGSTOP, found by
    the job deadline), a tracker crash, and a tracker outage longer than the servers' reconnect
    window (supervisor paused meanwhile).
Writes benchmarks/results/farm.json (farm_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402

from codesign.farm.config import FarmConfig, Retries, ServerGroup, Timeouts  # noqa: E402
from codesign.farm.measure import FarmSpec  # noqa: E402
from codesign.farm.procs import Proc  # noqa: E402
from codesign.farm.supervisor import read_state, start_farm, stop_farm  # noqa: E402
from codesign.lut_build import build_lut  # noqa: E402
from codesign.measurement import MeasureProtocol  # noqa: E402
from codesign.search.space import get_space  # noqa: E402
from codesign.targets import parse_target  # noqa: E402


def free_base(n: int) -> int:
    for _ in range(200):
        base = random.randrange(20000, 60000)
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def make_cfg(root: Path, name: str, servers: int, window: float, job: float) -> FarmConfig:
    base = free_base(servers + 1)
    return FarmConfig(
        tracker_port=base,
        state_dir=root / name,
        servers=(ServerGroup("x86", servers, base + 1, threads=1),),
        timeouts=Timeouts(
            socket=3,
            request=30,
            job=job,
            session=60,
            health_interval=0.5,
            register=60,
            tracker_wait=180,
            server_tracker_retry=window,
            quarantine=600,
        ),
        retries=Retries(attempts=3, quarantine_after=2, max_restarts=10),
    )


def healthy(cfg: FarmConfig) -> bool:
    st = read_state(cfg.state_dir)
    return (
        bool(st)
        and st["tracker"]["health"] == "healthy"
        and all(s["health"] == "healthy" for s in st["servers"])
    )


def server(cfg: FarmConfig, name: str) -> Proc:
    st = read_state(cfg.state_dir)
    return Proc.from_dict(next(s for s in st["servers"] if s["name"] == name)["proc"])


def wait(cond, timeout: float) -> float:  # noqa: ANN001
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return time.time() - t0
        time.sleep(0.05)
    return float("nan")


def throughput(space, target, blocks, proto, root: Path) -> dict:  # noqa: ANN001
    out = {}
    t0 = time.time()
    r = build_lut(space, target, root / "local.sqlite", protocol=proto, blocks=blocks)
    out["local"] = {"seconds": round(time.time() - t0, 1), "measured": r.measured}
    for n in (1, 2):
        cfg = make_cfg(root, f"tp{n}", n, 60.0, 120.0)
        start_farm(cfg)
        try:
            t0 = time.time()
            r = build_lut(
                space,
                target,
                root / f"farm{n}.sqlite",
                protocol=proto,
                blocks=blocks,
                farm=FarmSpec(cfg.tracker, "x86", cfg),
            )
            out[f"farm_{n}_servers"] = {
                "seconds": round(time.time() - t0, 1),
                "measured": r.measured,
                "per_server": r.farm.get("per_server"),
            }
        finally:
            stop_farm(cfg.state_dir)
    for v in out.values():
        v["entries_per_minute"] = round(60 * v["measured"] / max(v["seconds"], 1e-9), 1)
    out["speedup_2_vs_1_servers"] = round(
        out["farm_2_servers"]["entries_per_minute"] / out["farm_1_servers"]["entries_per_minute"], 3
    )
    return out


def overhead(space, target, n_blocks: int, rounds: int, root: Path) -> dict:  # noqa: ANN001
    from codesign.tvm_backend.build import compile_module
    from codesign.tvm_backend.lower import lower_block
    from codesign.tvm_backend.runner import LocalRunner, RPCRunner

    proto = MeasureProtocol(repeat=10, number=1, min_repeat_ms=100)
    cfg = make_cfg(root, "overhead", 1, 60.0, 120.0)
    start_farm(cfg)
    rows = []
    try:
        rpc, local = RPCRunner(cfg.tracker, "x86", config=cfg), LocalRunner()
        picks = [lay.block("k5e6") for lay in space.layers()[:n_blocks]]
        for spec in picks:
            built = compile_module(lower_block(spec), target)
            r_ms, l_ms, r_wall, l_wall = [], [], [], []
            for _ in range(rounds):
                t0 = time.time()
                r_ms.append(rpc.run(built, proto).median_ms)
                r_wall.append(time.time() - t0)
                t0 = time.time()
                l_ms.append(local.run(built, proto).median_ms)
                l_wall.append(time.time() - t0)
            rm, lm = statistics.median(r_ms), statistics.median(l_ms)
            rows.append(
                {
                    "block": spec.key,
                    "rpc_median_ms": round(rm, 5),
                    "local_median_ms": round(lm, 5),
                    "rpc_over_local": round(rm / lm, 4),
                    "within_2pct": abs(rm / lm - 1) <= 0.02,
                    "job_wall_s": round(statistics.median(r_wall), 2),
                    "local_wall_s": round(statistics.median(l_wall), 2),
                }
            )
    finally:
        stop_farm(cfg.state_dir)
    ratios = [r["rpc_over_local"] for r in rows]
    return {
        "protocol": proto.to_dict(),
        "rounds": rounds,
        "blocks": rows,
        "median_ratio": round(statistics.median(ratios), 4),
        "all_within_2pct": all(r["within_2pct"] for r in rows),
        "median_job_overhead_s": round(
            statistics.median(r["job_wall_s"] - r["local_wall_s"] for r in rows), 2
        ),
    }


def faults(space, target, blocks, root: Path, window: float) -> dict:  # noqa: ANN001
    proto = MeasureProtocol(repeat=3, number=1, min_repeat_ms=100)
    out = {"server_tracker_retry_s": window}
    cfg = make_cfg(root, "faults", 2, window, 6.0)
    start_farm(cfg)
    try:
        victim = server(cfg, "x86-1")
        t0 = time.time()
        victim.kill_tree()
        wait(lambda: server(cfg, "x86-1") != victim and healthy(cfg), 120)
        out["killed_server_back_healthy_s"] = round(time.time() - t0, 2)
        # frozen server during a build: the deadline finds it, another server takes the job
        import threading

        victim = server(cfg, "x86-0")
        frozen = {}

        def freeze() -> None:
            if math.isnan(wait(lambda: len(victim.tree()) >= 3, 120)):
                return
            for p in victim.tree():
                p.suspend()
            frozen["t"] = time.time()

        th = threading.Thread(target=freeze, daemon=True)
        th.start()
        t0 = time.time()
        r = build_lut(
            space,
            target,
            root / "faults.sqlite",
            protocol=proto,
            blocks=blocks,
            farm=FarmSpec(cfg.tracker, "x86", cfg),
            progress=False,
        )
        th.join(5)
        build_s = time.time() - t0
        back = wait(lambda: server(cfg, "x86-0") != victim and healthy(cfg), 120)
        out["frozen_server"] = {
            "job_deadline_s": cfg.timeouts.job,
            "build_seconds": round(build_s, 1),
            "deadlines": r.farm["deadlines"],
            "quarantined": r.farm["quarantined"],
            "measured": r.measured,
            "failed": len(r.failed),
            "replaced_healthy_after_freeze_s": round(time.time() - frozen["t"], 2)
            if "t" in frozen and not math.isnan(back)
            else None,
        }
        # tracker crash (supervisor running): restart, servers re-register by themselves
        tr = Proc.from_dict(read_state(cfg.state_dir)["tracker"]["proc"])
        tr.kill_tree()
        time.sleep(0.2)
        out["tracker_crash_back_healthy_s"] = round(
            0.2
            + wait(
                lambda: (
                    read_state(cfg.state_dir)["tracker"]["proc"]["pid"] != tr.pid and healthy(cfg)
                ),
                120,
            ),
            2,
        )
        # outage longer than the servers' window: supervisor paused, tracker down window+5 s
        sup = Proc.from_dict(read_state(cfg.state_dir)["supervisor"])
        tr = Proc.from_dict(read_state(cfg.state_dir)["tracker"]["proc"])
        os.kill(sup.pid, signal.SIGSTOP)
        tr.kill_tree()
        time.sleep(window + 5)
        os.kill(sup.pid, signal.SIGCONT)
        time.sleep(0.2)
        out["long_outage"] = {
            "outage_s": window + 5,
            "farm_healthy_after_supervisor_resumed_s": round(
                0.2
                + wait(
                    lambda: (
                        read_state(cfg.state_dir)["tracker"]["proc"]["pid"] != tr.pid
                        and healthy(cfg)
                    ),
                    180,
                ),
                2,
            ),
        }
    finally:
        stop_farm(cfg.state_dir)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 blocks, 2 rounds, short faults")
    ap.add_argument("--window", type=float, default=None, help="servers' reconnect window (s)")
    args = ap.parse_args()
    # the farm's servers run one TVM thread each: measure with the target that says so
    space, target = get_space("tiny"), parse_target("x86:threads=1")
    blocks = space.blocks()[:8] if args.quick else space.blocks()
    proto = MeasureProtocol(repeat=3, min_repeat_ms=20) if args.quick else MeasureProtocol()
    window = args.window or (5.0 if args.quick else 60.0)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="codesign-farm-bench-") as tmp:
        root = Path(tmp)
        print(f"throughput: {len(blocks)} blocks", flush=True)
        tp = throughput(space, target, blocks, proto, root)
        print(f"  {tp}", flush=True)
        print("RPC vs local", flush=True)
        ov = overhead(space, target, 2 if args.quick else 4, 2 if args.quick else 5, root)
        print(
            f"  median ratio {ov['median_ratio']}, within 2%: {ov['all_within_2pct']}", flush=True
        )
        print("faults", flush=True)
        fl = faults(space, target, blocks[:6], root, window)
        print(f"  {fl}", flush=True)
    result = {
        "space": space.name,
        "target": target.key,
        "blocks": len(blocks),
        "protocol": proto.to_dict(),
        "machine": info,
        "throughput": tp,
        "rpc_vs_local": ov,
        "recovery": fl,
    }
    write_result("farm_quick" if args.quick else "farm", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
