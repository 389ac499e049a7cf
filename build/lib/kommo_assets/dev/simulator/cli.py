"""Command line entry point: serve a simulated Kommo account until SIGTERM/SIGINT.

Prints exactly one line on stdout once it accepts connections::

    KOMMO_SIMULATOR_READY base_url=http://127.0.0.1:8765

The token is never printed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .dataset import MAX_LEADS, SimulatorConfig
from .server import KommoSimulator


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kommo_assets.dev.simulator", description=__doc__.splitlines()[0])
    p.add_argument("--leads", type=int, default=2000, help=f"number of leads (0..{MAX_LEADS}, default 2000)")
    p.add_argument("--seed", type=int, default=1, help="dataset seed (default 1)")
    p.add_argument("--year", type=int, default=2025, help="year that holds ~80%% of the leads (default 2025)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port, 0 for any free port (default 8765)")
    p.add_argument("--token", default="simulator-token", help="accepted bearer token")
    p.add_argument("--rps", type=float, default=7.0, help="rate limit in requests/s, 0 disables (default 7)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every API request")
    p.add_argument("--ban-after", type=int, default=None, help="403 for everything after this many 429s")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = SimulatorConfig(
            leads=args.leads, seed=args.seed, token=args.token, rate_limit_rps=args.rps,
            latency_ms=args.latency_ms, ban_after_violations=args.ban_after, year=args.year,
            host=args.host, port=args.port,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sim = KommoSimulator(config, verbose=args.verbose)
    try:
        sim.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"KOMMO_SIMULATOR_READY base_url={sim.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0
