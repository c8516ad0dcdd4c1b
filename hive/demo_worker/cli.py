"""The command line: ``python -m hive.demo_worker --port P --model M [options]``.

A bad argument is argparse's usage error (exit code 2); otherwise the exit code is the worker's:
0 after a clean stop (or, with ``--child-exit-seconds``, when its child died), 1 when the port
cannot be bound, 3 after ``--fail-after``.
"""

from __future__ import annotations

import argparse
import asyncio

from hive.demo_worker.engine_core import EngineCore
from hive.demo_worker.server import EXIT_SIMULATED_FAILURE, DemoWorker, Options


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative number")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 1 and 65535")
    return value


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m hive.demo_worker",
        description="A real HTTP model server with a fake model: hive's demo backend.",
    )
    parser.add_argument("--port", type=port_number, required=True, help="port to listen on")
    parser.add_argument("--model", required=True, help="model name it answers as")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--load-seconds",
        type=non_negative,
        default=0.0,
        metavar="S",
        help="seconds before /health turns 200 (the port listens meanwhile)",
    )
    parser.add_argument(
        "--listen-after-load",
        action="store_true",
        help="bind the port only once loaded, as vLLM does (while the port is taken by "
        "another process, try again every 0.2 s rather than exit)",
    )
    parser.add_argument(
        "--latency-ms",
        type=non_negative,
        default=0.0,
        metavar="L",
        help="milliseconds each generation takes",
    )
    parser.add_argument(
        "--fail-after",
        type=non_negative,
        default=None,
        metavar="S",
        help=f"exit with code {EXIT_SIMULATED_FAILURE} after S seconds (a simulated crash)",
    )
    parser.add_argument(
        "--no-heartbeat", action="store_true", help="do not heartbeat, even if HIVE_URL is set"
    )
    parser.add_argument(
        "--role",
        choices=("regular", "prefill", "decode"),
        default="regular",
        help="its part in a router's prefill/decode disaggregation",
    )
    parser.add_argument(
        "--bootstrap-port",
        type=port_number,
        default=None,
        metavar="P",
        help="a prefill worker's bootstrap port (it listens there)",
    )
    parser.add_argument(
        "--health-status",
        type=int,
        default=200,
        metavar="CODE",
        help="the HTTP status /health answers once loaded (default 200)",
    )
    parser.add_argument(
        "--health-waits-for-idle",
        action="store_true",
        help="/health answers only once no generation runs (like an engine's model lock)",
    )
    parser.add_argument(
        "--child-exit-seconds",
        type=non_negative,
        default=None,
        metavar="S",
        help="run a child process (like vLLM's EngineCore) that takes S seconds to exit on "
        "SIGTERM; when it dies, the worker exits with code 0, as vLLM does",
    )
    parser.add_argument(
        "--stall-after",
        type=non_negative,
        default=None,
        metavar="S",
        help="S seconds after loading, freeze every generation for good while /health still "
        "answers (a stuck engine; its /metrics counters stop)",
    )
    args = parser.parse_args(argv)
    if args.bootstrap_port is not None and args.role != "prefill":
        parser.error("--bootstrap-port is for --role prefill only")
    return Options(
        host=args.host,
        port=args.port,
        model=args.model,
        load_seconds=args.load_seconds,
        listen_after_load=args.listen_after_load,
        latency_ms=args.latency_ms,
        fail_after=args.fail_after,
        heartbeat=not args.no_heartbeat,
        role=args.role,
        bootstrap_port=args.bootstrap_port,
        health_status=args.health_status,
        health_waits_for_idle=args.health_waits_for_idle,
        child_exit_seconds=args.child_exit_seconds,
        stall_after=args.stall_after,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)

    async def serve() -> int:
        worker = DemoWorker(options)
        if options.child_exit_seconds is None:
            return await worker.run()
        core = EngineCore(options.child_exit_seconds)
        await core.start()
        died = asyncio.create_task(core.died())
        died.add_done_callback(lambda _: worker.stopping.set())
        try:
            return await worker.run()
        finally:
            died.cancel()
            await core.stop()

    return asyncio.run(serve())
