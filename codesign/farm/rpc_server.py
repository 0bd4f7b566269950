"""TVM's RPC server with a configurable tracker-reconnect window.

    python -m codesign.farm.rpc_server --host 127.0.0.1 --port 9100 --tracker 127.0.0.1:9190 \
        --key x86 [--retry-window 60]

Same server as `python -m tvm.exec.rpc_server` (listening process -> popen_worker -> one child
per session). The only difference: after losing the tracker, TVM's server retries for a fixed
60 s and then stays up unregistered for good (docs/tvm-guide.md §2); `--retry-window` sets that
window, so the supervisor's recovery from long tracker outages can be tested in seconds.
"""

from __future__ import annotations

import argparse
import functools
import logging


def _set_retry_window(window: float) -> None:
    """Runs inside the server's popen_worker, which owns the tracker connection."""
    from tvm.rpc import base

    base.connect_with_retry.__defaults__ = (window, max(0.5, min(5.0, window / 3)))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tracker", required=True, help="HOST:PORT")
    ap.add_argument("--key", required=True)
    ap.add_argument("--retry-window", type=float, default=60.0)
    ap.add_argument("--load-library", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    from tvm import rpc

    host, _, port = args.tracker.rpartition(":")
    server = rpc.Server(
        args.host,
        args.port,
        args.port + 1,
        tracker_addr=(host, int(port)),
        key=args.key,
        load_library=args.load_library,
        server_init_callback=functools.partial(_set_retry_window, args.retry_window),
    )
    server.proc.join()


if __name__ == "__main__":
    main()
