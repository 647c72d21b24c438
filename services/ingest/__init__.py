"""Ingest: DICOM Storage and Verification SCP in front of the event log."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from pynetdicom import _config as pynetdicom_config

from services.ingest.scp import IngestMetrics, StorageSCP
from shared.access import defer_tls_handshake, server_tls_context
from shared.blobs import open_blob_store
from shared.config import Config
from shared.runtime import running_service

log = logging.getLogger("switchyard.ingest")


async def main(cfg: Config) -> None:
    async with running_service("ingest", cfg) as svc:
        spool = Path(cfg.ingest.spool_dir)
        spool.mkdir(parents=True, exist_ok=True)
        for leftover in spool.glob("*.dcm"):
            # Spool files of associations aborted before a previous exit.
            leftover.unlink(missing_ok=True)
        # Datasets stream to files in the spool instead of memory, undecoded.
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(spool.resolve())

        scp = StorageSCP(cfg, svc.bus, open_blob_store(cfg.blobs), asyncio.get_running_loop(),
                         IngestMetrics(svc.registry), svc.tracer)
        icfg = cfg.ingest
        tls = server_tls_context(icfg.tls_cert_file, icfg.tls_key_file, icfg.tls_ca_file, "ingest.tls")
        server = scp.build_ae().start_server((cfg.ingest.host, cfg.ingest.port), block=False,
                                             evt_handlers=scp.handlers(), ssl_context=tls)
        if tls:
            defer_tls_handshake(server, tls, cfg.ingest.network_timeout_s)
        # Stop accepting and finish in-flight C-STOREs before the bus drains.
        svc.stack.callback(server.shutdown)
        svc.serve_metrics(cfg.ingest.metrics_port)
        log.info("storage SCP %s listening on %s:%d%s", cfg.ingest.ae_title, cfg.ingest.host, cfg.ingest.port,
                 " (TLS)" if tls else "")
        await svc.stop.wait()
