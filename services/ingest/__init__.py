"""Ingest: DICOM Storage and Verification SCP in front of the event log."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

import msgspec

from services.ingest.scp import IngestMetrics, StorageSCP, configured_aes
from shared.access import server_tls_context
from shared.blobs import open_blob_store
from shared.config import Config
from shared.runtime import run_until_stopped, running_service

log = logging.getLogger("switchyard.ingest")


def die_with_parent(parent: int) -> None:
    """In a worker: SIGTERM when the first process dies, so no orphan keeps the port."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before we asked
        raise SystemExit(f"ingest worker: parent {parent} is gone")


async def supervise(worker: int, stop: asyncio.Event) -> None:
    """Run one extra worker process; it ending before the stop signal stops the service."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.ingest",
        "--worker",
        str(worker),
        "--parent",
        str(os.getpid()),
        stdin=asyncio.subprocess.DEVNULL,
    )
    exited = asyncio.create_task(proc.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if exited.done() and not stop.is_set():
        raise RuntimeError(f"ingest worker {worker} exited with status {proc.returncode}")
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(exited), 20)
        except TimeoutError:
            proc.kill()
    await exited


async def main(cfg: Config, worker: int = 0) -> None:
    """One ingest process; with ``ingest.workers`` > 1 the first starts the others.

    All workers listen on the same port (SO_REUSEPORT: the kernel spreads new
    associations across them), each with its own NATS connection, spool
    directory and metrics port (``metrics_port`` + worker number), so
    concurrent senders are not bound to one interpreter's GIL.
    """
    icfg = cfg.ingest
    workers = max(1, icfg.workers)
    async with running_service("ingest" if worker == 0 else f"ingest-{worker}", cfg, "ingest") as svc:
        spool = Path(icfg.spool_dir) / f"worker-{worker}" if workers > 1 else Path(icfg.spool_dir)
        spool.mkdir(parents=True, exist_ok=True)
        for leftover in spool.glob("*.dcm"):
            # Spool files of associations cut off by a previous exit.
            leftover.unlink(missing_ok=True)
        if workers > 1:
            cfg = msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(icfg, spool_dir=str(spool)))
        blobs = open_blob_store(cfg.blobs)
        scp = StorageSCP(cfg, svc.bus, blobs, IngestMetrics(svc.registry, configured_aes(cfg)), svc.tracer)
        tls = server_tls_context(icfg.tls_cert_file, icfg.tls_key_file, icfg.tls_ca_file, "ingest.tls")
        server = await scp.start(tls, reuse_port=workers > 1)
        # Stop accepting and finish in-flight C-STOREs before the bus drains.
        svc.stack.push_async_callback(scp.stop, server)
        svc.serve_metrics(icfg.metrics_port + worker, checks=(("blob store", lambda: blobs.check() is None),))
        log.info(
            "storage SCP %s listening on %s:%d%s%s",
            icfg.ae_title,
            icfg.host,
            icfg.port,
            " (TLS)" if tls else "",
            f" (worker {worker} of {workers})" if workers > 1 else "",
        )
        extra = (
            [asyncio.create_task(supervise(i, svc.stop), name=f"ingest-worker-{i}") for i in range(1, workers)]
            if worker == 0
            else []
        )
        await run_until_stopped(svc.stop, extra)
