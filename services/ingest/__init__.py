"""Ingest: DICOM Storage and Verification SCP in front of the event log."""

from __future__ import annotations

import logging
from pathlib import Path

from services.ingest.scp import IngestMetrics, StorageSCP
from shared.access import server_tls_context
from shared.blobs import open_blob_store
from shared.config import Config
from shared.runtime import running_service

log = logging.getLogger("switchyard.ingest")


async def main(cfg: Config) -> None:
    async with running_service("ingest", cfg) as svc:
        spool = Path(cfg.ingest.spool_dir)
        spool.mkdir(parents=True, exist_ok=True)
        for leftover in spool.glob("*.dcm"):
            # Spool files of associations cut off by a previous exit.
            leftover.unlink(missing_ok=True)
        scp = StorageSCP(cfg, svc.bus, open_blob_store(cfg.blobs), IngestMetrics(svc.registry), svc.tracer)
        icfg = cfg.ingest
        tls = server_tls_context(icfg.tls_cert_file, icfg.tls_key_file, icfg.tls_ca_file, "ingest.tls")
        server = await scp.start(tls)
        # Stop accepting and finish in-flight C-STOREs before the bus drains.
        svc.stack.push_async_callback(scp.stop, server)
        svc.serve_metrics(cfg.ingest.metrics_port)
        log.info("storage SCP %s listening on %s:%d%s", cfg.ingest.ae_title, cfg.ingest.host, cfg.ingest.port,
                 " (TLS)" if tls else "")
        await svc.stop.wait()
