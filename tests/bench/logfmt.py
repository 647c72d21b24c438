"""What the one log formatter costs per record, next to the format it replaced (logging.basicConfig's).

`python -m tests.bench logfmt`: an INFO record as ingest logs one per stored
instance, formatted N times per round; the fastest round of each (the machine
is shared, the minimum is the least disturbed).
"""

from __future__ import annotations

import logging
import time

from shared.logfmt import SwitchyardFormatter

N = 200_000
ROUNDS = 5


def main(argv: list[str]) -> int:
    baseline = logging.Formatter("%(asctime)s %(levelname)-7s ingest %(name)s: %(message)s")
    formatters = {"basicConfig format (before)": baseline, "SwitchyardFormatter": SwitchyardFormatter("ingest")}
    record = logging.LogRecord(
        "services.ingest.scp",
        logging.INFO,
        __file__,
        1,
        "accepted %s (%d bytes, seq %d)",
        ("2.25.252546991013344611563819217530228800901", 1728, 25),
        None,
    )
    best = {name: float("inf") for name in formatters}
    for _ in range(ROUNDS):
        for name, fmt in formatters.items():
            started = time.perf_counter()
            for _ in range(N):
                fmt.format(record)
            best[name] = min(best[name], (time.perf_counter() - started) / N)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    for name, seconds in best.items():
        print(f"{name:<28} {seconds * 1e6:6.2f} us/record (best of {ROUNDS} x {N:,}; load {load})")
    return 0
