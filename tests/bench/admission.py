"""Association admission at the DICOM doors: does the per-peer limit cost anything?

Associate + C-ECHO + release, one after another, from pynetdicom against
ingest and the probe's Q/R SCP, with the per-peer limit off (0, the
baseline) and on (4), alternated (off, on, off, on) so machine load hits both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from shared.config import Config, QRPeer
from tests.fixtures.servers import make_stack

CALLING = "BENCHADM"


def _round(port: int, called: str, n: int) -> list[float]:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    times = []
    for _ in range(n):
        started = time.perf_counter()
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise RuntimeError("association refused")
        assoc.send_c_echo()
        assoc.release()
        times.append((time.perf_counter() - started) * 1000)
    return times


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench admission")
    parser.add_argument("--associations", type=int, default=300)
    args = parser.parse_args(argv)
    results: dict[tuple[str, int], list[float]] = {}
    loads = []
    for per_peer in (0, 4, 0, 4):

        def configure(cfg: Config, pp: int = per_peer) -> Config:
            probe = msgspec.structs.replace(
                cfg.probe, qr_peers=[QRPeer(ae=CALLING, host="127.0.0.1")], qr_max_associations_per_peer=pp
            )
            ingest = msgspec.structs.replace(cfg.ingest, max_associations_per_peer=pp)
            return msgspec.structs.replace(cfg, probe=probe, ingest=ingest)

        with tempfile.TemporaryDirectory() as data:
            stack = make_stack(Path(data), [], ("ingest", "probe"), configure)
            try:
                doors = {
                    "ingest": (stack.cfg.ingest.port, stack.cfg.ingest.ae_title),
                    "qr": (stack.cfg.probe.qr_port, stack.cfg.probe.qr_ae_title),
                }
                for door, (port, called) in doors.items():
                    _round(port, called, 20)  # warm-up
                    loads.append(_load())
                    results.setdefault((door, per_peer), []).extend(_round(port, called, args.associations))
            finally:
                stack.close()
    for (door, pp), times in sorted(results.items()):
        times.sort()
        print(
            f"{door:6s} per-peer {'off' if pp == 0 else pp}: associate + C-ECHO + release ms: median"
            f" {statistics.median(times):.2f}  p95 {times[int(0.95 * len(times))]:.2f}  (n={len(times)})"
        )
    print(f"load average at each round: {', '.join(loads)}")
    return 0
