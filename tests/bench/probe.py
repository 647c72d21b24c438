"""Probe benchmark: verification lag and front-door C-FIND latency on real servers.

Starts three Orthanc nodes and the whole stack on free ports, routes a corpus,
then reports per instance forwarded -> verified lag (baseline in the same run:
placed -> forwarded, the forwarder's own lag) and the wall time of a DCMTK
findscu STUDY query against the Q/R SCP (baseline: DCMTK echoscu to the same
SCP, i.e. process start + association + one round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from shared import events as ev
from shared.bus import Bus
from switchyard import stack as ls
from switchyard.corpus import corpus_index, generate_studies
from tests.fixtures.servers import _new_node, make_stack
from tests.fixtures.util import wait_for


def _events(cfg) -> list[ev.AnyEvent]:
    async def read():
        bus = await Bus.connect(cfg.nats, "bench-reader")
        try:
            return [d.event async for d in bus.replay("dicom.instance.>")]
        finally:
            await bus.close()

    return asyncio.run(read())


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=ls.dicom_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return (time.perf_counter() - started) * 1000


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench probe")
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--per-series", type=int, default=10)
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args([a for a in argv if a != "--"])
    base = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    nodes = [_new_node(i, base / "orthanc") for i in (1, 2, 3)]
    stack = None
    try:
        for n in nodes:
            n.start()
        stack = make_stack(base / "stack", nodes)
        files = generate_studies(
            base / "corpus", studies=args.studies, series_per_study=2, instances_per_series=args.per_series, seed=777
        )
        index = corpus_index(files)
        total = len(files)
        started = time.perf_counter()
        assert stack.send([base / "corpus"], extra=["+sd", "+r"]).returncode == 0

        def all_verified() -> list[ev.AnyEvent] | None:
            e = _events(stack.cfg)
            return e if sum(isinstance(x, ev.InstanceVerifiedV1) for x in e) >= total else None

        events = wait_for(all_verified, timeout=240, interval=0.5, what="all verified")
        wall = time.perf_counter() - started
        placed = {e.event_id: e for e in events if isinstance(e, ev.InstancePlacedV1)}
        fwd = {e.sop_instance_uid: e for e in events if isinstance(e, ev.InstanceForwardedV1)}
        ver = {e.sop_instance_uid: e for e in events if isinstance(e, ev.InstanceVerifiedV1)}
        failed = [e for e in events if isinstance(e, ev.InstanceVerificationFailedV1)]
        verify_lag = [(ver[s].occurred_at - fwd[s].occurred_at).total_seconds() * 1000 for s in ver]
        forward_lag = [
            (f.occurred_at - placed[f.placement_id].occurred_at).total_seconds() * 1000 for f in fwd.values()
        ]
        print(
            f"instances: {total} in {len(index)} studies; all verified {wall:.1f} s after the send started;"
            f" verification failures: {len(failed)}"
        )
        print(
            f"forwarded -> verified lag ms: p50 {_pct(verify_lag, 0.5):.0f}  p95 {_pct(verify_lag, 0.95):.0f}"
            f"  max {max(verify_lag):.0f}"
        )
        print(
            f"baseline placed -> forwarded lag ms: p50 {_pct(forward_lag, 0.5):.0f}"
            f"  p95 {_pct(forward_lag, 0.95):.0f}  max {max(forward_lag):.0f}"
        )

        p = stack.cfg.probe
        target = ["-aet", "BENCH", "-aec", p.qr_ae_title, "127.0.0.1", str(p.qr_port)]
        study = next(iter(index))
        find = [
            str(ls.DCMTK_BIN / "findscu"),
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "-k",
            "StudyDate=",
            "-k",
            "NumberOfStudyRelatedInstances=",
            *target,
        ]
        echo = [str(ls.DCMTK_BIN / "echoscu"), *target]
        finds = [_timed(find) for _ in range(args.queries)]
        echoes = [_timed(echo) for _ in range(args.queries)]
        wild = [
            str(ls.DCMTK_BIN / "findscu"),
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientName=DEMO*",
            "-k",
            "StudyInstanceUID=",
            *target,
        ]
        wilds = [_timed(wild) for _ in range(args.queries)]
        print(f"findscu STUDY by UID ms: median {statistics.median(finds):.1f}  p95 {_pct(finds, 0.95):.1f}")
        print(
            f"findscu STUDY PatientName=DEMO* ({len(index)} studies) ms: median {statistics.median(wilds):.1f}"
            f"  p95 {_pct(wilds, 0.95):.1f}"
        )
        print(f"baseline echoscu ms: median {statistics.median(echoes):.1f}  p95 {_pct(echoes, 0.95):.1f}")
        return 0 if not failed else 1
    finally:
        if stack is not None:
            stack.close()
        for n in nodes:
            n.stop()
