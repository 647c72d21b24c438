"""NATS over mutual TLS (certificates from tests/fixtures/pki.py), with nkey authentication on top."""

from __future__ import annotations

import asyncio
import ssl

import msgspec
import nats
import nats.errors
import pytest

from shared import natsauth
from tests.fixtures.servers import make_stack
from tests.integration.placement_helpers import route_one_study

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_stack(live_nodes, pki, tmp_path):
    def configure(cfg):
        return msgspec.structs.replace(
            cfg,
            nats=msgspec.structs.replace(
                cfg.nats,
                tls_ca_file=str(pki["ca"]),
                tls_cert_file=str(pki["client_crt"]),
                tls_key_file=str(pki["client_key"]),
            ),
        )

    tls = natsauth.render_tls(str(pki["server_crt"]), str(pki["server_key"]), str(pki["ca"]), verify=True)
    s = make_stack(tmp_path / "stack", live_nodes, configure=configure, nats_tls=tls)
    yield s
    s.close()


def test_services_route_over_mutual_tls(tls_stack, tmp_path):
    route_one_study(tls_stack, tmp_path, 2424)


async def test_a_seed_without_a_client_certificate_is_refused(tls_stack, pki):
    cfg = tls_stack.cfg.nats

    async def attempt(ctx):
        nc = await nats.connect(
            cfg.url,
            tls=ctx,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
            nkeys_seed=str(natsauth.seed_path(cfg, "ingest")),
            inbox_prefix="_INBOX_ingest",
        )
        await nc.close()

    no_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await attempt(no_cert)
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await attempt(None)  # plain text to a TLS-only server
    good = ssl.create_default_context(cafile=str(pki["ca"]))
    good.load_cert_chain(str(pki["client_crt"]), str(pki["client_key"]))
    await attempt(good)
