"""What every service's main shares: signals, tracing, the bus, metrics, ordered cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import uvloop
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from shared.bus import Bus
from shared.config import Config
from shared.fsmode import private_umask
from shared.metrics import Check, ConsumerGauges, serve
from shared.otlpmetrics import start_export
from shared.telemetry import setup_logging, setup_tracing

log = logging.getLogger(__name__)

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a service's main on uvloop.

    Every service is a loop of small socket reads and writes (NATS, DICOM,
    HTTP); libuv's loop and transports spend less CPU on each than asyncio's
    selector loop written in Python (docs/benchmarks.md, "placement").
    Files are created owner-only from here on (shared.fsmode).
    """
    private_umask()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def stop_on_signals() -> asyncio.Event:
    """An Event set by SIGTERM or SIGINT; call from inside the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_or_stop(stop: asyncio.Event, timeout: float) -> bool:
    """Sleep up to ``timeout`` unless stopped first; True when stopped."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout)
    return stop.is_set()


@dataclass
class Service:
    name: str
    cfg: Config
    stop: asyncio.Event
    stack: contextlib.AsyncExitStack
    bus: Bus
    registry: CollectorRegistry
    provider: TracerProvider

    @property
    def tracer(self) -> trace.Tracer:
        return self.provider.get_tracer(f"switchyard.{self.name}")

    def serve_metrics(
        self,
        port: int,
        consumers: Callable[[], int] | int = 0,
        followers: int = 0,
        checks: tuple[Check, ...] = (),
    ) -> None:
        """Start /metrics, /healthz and /readyz last (the stack and tests wait for /metrics).

        /readyz: connected to NATS, at least ``consumers`` durables bound (and
        none unbound), at least ``followers`` ordered readers of the log
        running, and every extra check (ingest: the blob store takes writes).
        Consumer lag of the durables is exported from here too.
        """
        bus = self.bus
        want = consumers if callable(consumers) else (lambda: consumers)
        ready: list[Check] = [("nats", lambda: bool(bus.nc.is_connected))]
        ready.append(("consumers", lambda: bus.ready() and sum(bus.consumers.values()) >= want()))
        ready.append(("log followers", lambda: bus.followers >= followers))
        ready.extend(checks)
        server = serve(self.registry, self.cfg.telemetry.metrics_host, port, ready)
        self.stack.callback(server.shutdown)
        lag = asyncio.create_task(ConsumerGauges(self.registry).run(bus, self.stop), name="consumer-lag")
        self.stack.callback(lag.cancel)


async def run_until_stopped(stop: asyncio.Event, tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for the stop signal; a task that ends early stops the service loudly.

    A worker that dies silently (an unexpected exception held in its task) would
    leave a process that looks healthy and does nothing; exiting non-zero lets
    the supervisor restart it.
    """
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    failed = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    if failed:
        raise failed[0]
    early = [t.get_name() for t in tasks if t in done]
    if early and stopper not in done:
        raise RuntimeError(f"task(s) ended before the stop signal: {', '.join(early)}")


@contextlib.asynccontextmanager
async def running_service(name: str, cfg: Config, identity: str | None = None) -> AsyncIterator[Service]:
    """Logging, stop-on-signal, tracing and a connected bus with its streams checked.

    Resources registered on ``service.stack`` are released in reverse order on
    exit; the bus drains last but one, before tracing flushes. ``identity``: the
    NATS identity (default ``name``; extra ingest workers are still "ingest").
    """
    setup_logging(name, cfg.telemetry.log_level, cfg.telemetry.log_format)
    stop = stop_on_signals()
    async with contextlib.AsyncExitStack() as stack:
        provider = setup_tracing(name, cfg.telemetry)
        stack.callback(provider.shutdown)
        bus = await Bus.connect(cfg.nats, f"switchyard-{name}", stop, identity=identity or name)
        stack.push_async_callback(bus.close)
        if bus.authenticated:
            await bus.check_streams()  # declared by the admin (`switchyard nats init`)
        else:
            await bus.ensure_streams()  # dev mode only: nobody else to declare them
        registry = CollectorRegistry()
        bus.export_connected(registry)
        if pusher := start_export(name, cfg.telemetry, registry):
            stack.callback(pusher.shutdown)  # before the bus drains: the last export sees the final counts
        yield Service(name, cfg, stop, stack, bus, registry, provider)
        log.info("stopping")
