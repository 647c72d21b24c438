"""Console benchmark: what one /api/overview poll costs the catalog, next to /api/totals (the baseline).

A fresh catalog file with N instances (received, placed, forwarded, verified:
4N events, the catalog bench's events), served by ``build_app`` in process;
p50/p99 over repeated GETs of each route with an operator token. Every open
console polls /api/overview every 5 s.

    .venv/bin/python -m tests.bench console [--instances=N] [--requests=N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from services.catalog.api import build_app
from shared import events as ev
from shared.config import CatalogConfig, CatalogToken
from shared.readmodel.catalog import CatalogStore
from tests.bench.catalog import chunks, instance_events, load

TOKEN = "bench-operator"


def fill(path: Path, n: int) -> CatalogStore:
    store = CatalogStore(path)
    seq = 0
    for ids in chunks(n, 5000):
        seqs, payloads = [], []
        for i in ids:
            for e in instance_events(i):
                seq += 1
                seqs.append(seq)
                payloads.append(ev.encode(e))
        store.apply_raw(seqs, payloads)
    return store


async def latencies(store: CatalogStore, paths: list[str], requests: int) -> dict[str, tuple[float, float]]:
    catalog = CatalogConfig(
        tokens=[CatalogToken(name="bench", role="operator", sha256=hashlib.sha256(TOKEN.encode()).hexdigest())]
    )
    app = build_app(store, catalog, {}, ("node1", "node2", "node3"))
    out = {}
    async with TestClient(TestServer(app)) as client:
        for path in paths:
            times = []
            for _ in range(requests):
                t = time.perf_counter()
                rsp = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
                await rsp.read()
                times.append((time.perf_counter() - t) * 1000)
                assert rsp.status == 200, rsp.status
            times.sort()
            out[path] = (statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))])
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench console")
    p.add_argument("--instances", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=50)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store = fill(Path(tmp) / "catalog.duckdb", args.instances)
        print(f"catalog of {args.instances} instances ({4 * args.instances} events) in {time.perf_counter() - t:.1f}s")
        try:
            result = asyncio.run(latencies(store, ["/api/totals", "/api/overview"], args.requests))
        finally:
            store.close()
    for path, (p50, p99) in result.items():
        print(f"{path:<16} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  ({args.requests} requests)")
    print(f"load average {load()}")
    return 0
