"""What the per-instance metrics cost: a stage latency observation, with and without
the trace-id exemplar, next to the plain histogram observe the services already did.

`python -m tests.bench metrics`: N observations per round inside an active span (as
in the scheduler and forwarder); the fastest round of each (the machine is shared).
Per routed image the services make four stage observations plus a few counter
increments, against ~6 ms of CPU per image (docs/benchmarks.md, "placement").
"""

from __future__ import annotations

import time

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Histogram

from shared.events import utcnow
from shared.metrics import Stage, observe, reason_label, seconds_since, stage_histogram

N = 100_000
ROUNDS = 5


def main(argv: list[str]) -> int:
    registry = CollectorRegistry()
    plain = Histogram("bench_plain_seconds", "baseline", ["node"], registry=registry).labels("node1")
    stage = stage_histogram(registry, [Stage.RECEIVED_TO_PLACED], ["node1"]).labels(Stage.RECEIVED_TO_PLACED, "node1")
    occurred = utcnow()
    cases = {
        "Histogram.observe (before)": lambda: plain.observe(0.012),
        "observe + exemplar (trace id)": lambda: observe(stage, 0.012),
        "seconds_since + observe + exemplar": lambda: observe(stage, seconds_since(occurred)),
        "reason_label (free text -> label)": lambda: reason_label("association rejected after 5 deliveries"),
    }
    tracer = TracerProvider().get_tracer("bench")
    best = {name: float("inf") for name in cases}
    with tracer.start_as_current_span("bench"):
        for _ in range(ROUNDS):
            for name, case in cases.items():
                started = time.perf_counter()
                for _ in range(N):
                    case()
                best[name] = min(best[name], (time.perf_counter() - started) / N)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    for name, seconds in best.items():
        print(f"{name:<36} {seconds * 1e6:6.2f} us/call (best of {ROUNDS} x {N:,}; load {load})")
    return 0
