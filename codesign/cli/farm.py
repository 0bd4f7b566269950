"""`codesign farm up|status|down` and `codesign farm arm-emulator setup|up|down`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    farm = sub.add_parser(
        "farm", help="run a supervised TVM RPC device farm (tracker + servers) on this machine"
    )
    fsub = farm.add_subparsers(dest="farm_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="farm.toml (default: built-in defaults)")
        p.add_argument("--state-dir", default=None, help="PIDs, logs and events of the farm")

    p = fsub.add_parser(
        "up",
        help="start the tracker, the servers and their supervisor (no --config: tracker "
        "127.0.0.1:9190 and one server of key 'local' on port 9100 running this machine's "
        "artifacts with its CPUs as threads)",
    )
    common(p)
    p.set_defaults(func=_up)
    p = fsub.add_parser("status", help="keys, free/pending, per-server health, recent failures")
    common(p)
    p.add_argument("--tracker", default=None, help="query this tracker HOST:PORT instead")
    p.add_argument("--events", type=int, default=8, help="recent events to show (default 8)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)
    p = fsub.add_parser("down", help="stop the supervisor and kill every farm process by PID")
    common(p)
    p.set_defaults(func=_down)

    arm = fsub.add_parser("arm-emulator", help="an emulated arm64 board (qemu-user chroot)")
    asub = arm.add_subparsers(dest="arm_command", metavar="ACTION", required=True)
    for name, helptext, func in (
        ("setup", "build the arm64 chroot only (idempotent, resumable)", _arm_setup),
        ("up", "build the chroot if needed and add an arm64 server to the farm", _arm_up),
        ("down", "remove the emulated server from the running farm", _arm_down),
    ):
        p = asub.add_parser(name, help=helptext)
        common(p)
        p.add_argument("--key", default="arm64", help="RPC key of the emulated board")
        p.add_argument("--port", type=int, default=9170, help="server port (default 9170)")
        p.add_argument("--threads", type=int, default=1, help="TVM_NUM_THREADS (default 1)")
        p.add_argument("--rootfs", default=None, help="chroot directory (default: cache dir)")
        p.set_defaults(func=func)


def _config(args: argparse.Namespace):  # noqa: ANN202
    from codesign.cli.argtypes import check_text_file
    from codesign.farm.config import load_config

    check_text_file(args.config, "farm config")
    return load_config(args.config, state_dir=args.state_dir)


def _up(args: argparse.Namespace) -> int:
    from codesign.farm.supervisor import start_farm

    cfg = _config(args)
    t0 = time.time()
    print(f"starting farm: tracker {cfg.tracker}, state in {cfg.state_dir}", file=sys.stderr)
    start_farm(cfg)
    print(f"farm up in {time.time() - t0:.1f} s", file=sys.stderr)
    return _print_status(cfg.state_dir, None, 5, False)


def _down(args: argparse.Namespace) -> int:
    from codesign.farm.supervisor import stop_farm

    cfg = _config(args)
    killed = stop_farm(cfg.state_dir)
    print(f"farm in {cfg.state_dir} stopped ({killed} leftover process trees killed)")
    return 0


def _status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    return _print_status(cfg.state_dir, args.tracker, args.events, args.json)


def _print_status(state_dir: Path, tracker: str | None, n_events: int, as_json: bool) -> int:
    from codesign.errors import FarmError
    from codesign.farm.procs import Proc, read_events
    from codesign.farm.supervisor import read_state, supervisor_proc
    from codesign.farm.tracker import TrackerClient

    state = read_state(state_dir)
    running = supervisor_proc(state_dir) is not None
    addr = tracker or (state["tracker"]["addr"] if state else None)
    if addr is None:
        raise FarmError(f"no farm state in {state_dir}; start one with `codesign farm up`")
    try:
        summary = TrackerClient.at(addr, 3.0).summary()
        keys = [summary.status(k) for k in summary.key_names()]
        tracker_ok = True
    except FarmError as err:
        keys, tracker_ok = [], False
        print(f"tracker {addr}: {err}", file=sys.stderr)
    events = read_events(state_dir)[0][-n_events:] if n_events else []
    if as_json:
        out = {
            "tracker": addr,
            "tracker_ok": tracker_ok,
            "supervisor_running": running,
            "keys": [_kdict(k) for k in keys],
            "servers": state["servers"] if state and not tracker else [],
            "events": events,
        }
        print(json.dumps(out, indent=2))
        return 0 if tracker_ok else 1
    sup = "running" if running else "not running"
    print(f"tracker {addr}: {'answers' if tracker_ok else 'DOWN'}; supervisor {sup}")
    if keys:
        w = max(len(k.key) for k in keys)
        print(f"  {'key':<{w}}  total  free  pending")
        for k in keys:
            print(f"  {k.key:<{w}}  {k.total:>5}  {k.free:>4}  {k.pending:>7}")
    if state and not tracker:
        print(
            f"  {'server':<12} {'key':<8} {'port':>6} {'pid':>8} {'health':<13} {'probe':>8} "
            "restarts"
        )
        for s in state["servers"]:
            proc = Proc.from_dict(s.get("proc"))
            pid = proc.pid if proc and proc.alive else "-"
            emu = " (emulated)" if s.get("emulated") else ""
            probe = f"{s['probe_ms']:.0f} ms" if s.get("probe_ms") else "-"
            print(
                f"  {s['name']:<12} {s['key']:<8} {s['port']:>6} {pid!s:>8} "
                f"{s['health']:<13} {probe:>8} {s['restarts']}{emu}"
            )
    if events:
        print("recent events:")
        for e in events:
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            print(f"  {when} {e['kind']:<10} {e['message'][:150]}")
    return 0 if tracker_ok else 1


def _kdict(k: object) -> dict:
    return {f: getattr(k, f) for f in ("key", "total", "free", "pending")}


def _rootfs(args: argparse.Namespace):  # noqa: ANN202
    from codesign.farm.arm_emulator import ArmRootfs

    return ArmRootfs(Path(args.rootfs)) if args.rootfs else ArmRootfs()


def _arm_setup(args: argparse.Namespace) -> int:
    from codesign.farm.arm_emulator import ensure_rootfs

    t0 = time.time()
    root = ensure_rootfs(_rootfs(args), log=lambda m: print(m, file=sys.stderr))
    print(f"arm64 chroot ready at {root} ({time.time() - t0:.0f} s)")
    return 0


def _arm_up(args: argparse.Namespace) -> int:
    from codesign.errors import FarmError
    from codesign.farm.arm_emulator import DEFAULT_ROOT, ensure_rootfs
    from codesign.farm.config import ServerGroup, load_config
    from codesign.farm.supervisor import start_farm, supervisor_proc, wait_ready, write_config

    spec = _rootfs(args)
    if spec.root != DEFAULT_ROOT:
        raise FarmError("the supervisor uses the default rootfs; set CODESIGN_ARM_ROOTFS instead")
    ensure_rootfs(spec, log=lambda m: print(m, file=sys.stderr))
    group = ServerGroup(args.key, 1, args.port, args.threads, emulator="arm64")
    if supervisor_proc(_config(args).state_dir):
        from codesign.farm.config import FarmConfig
        from codesign.farm.procs import read_json

        d = read_json(_config(args).state_dir / "config.json")
        assert d is not None  # the running supervisor's farm wrote it
        cfg = FarmConfig.from_dict(d).with_group(group)
        write_config(cfg)
        wait_ready(cfg, keys=(args.key,))
    else:
        from codesign.cli.argtypes import check_text_file

        check_text_file(args.config, "farm config")
        base = load_config(args.config, state_dir=args.state_dir)
        if args.config is None:  # only the emulator, not the default x86 server
            base = base.with_servers(())
        cfg = base.with_group(group)
        start_farm(cfg)
    print(f"emulated arm64 server {args.key!r} registered on {cfg.tracker}", file=sys.stderr)
    return _print_status(cfg.state_dir, None, 3, False)


def _arm_down(args: argparse.Namespace) -> int:
    from codesign.errors import FarmError
    from codesign.farm.config import FarmConfig
    from codesign.farm.procs import read_json
    from codesign.farm.supervisor import supervisor_proc, write_config

    state_dir = _config(args).state_dir
    d = read_json(state_dir / "config.json")
    if d is None or not supervisor_proc(state_dir):
        raise FarmError(f"no farm is running from {state_dir}")
    cfg = FarmConfig.from_dict(d)
    write_config(cfg.with_servers(tuple(g for g in cfg.servers if g.key != args.key)))
    print(f"server group {args.key!r} removed; the supervisor stops it within a few seconds")
    return 0
