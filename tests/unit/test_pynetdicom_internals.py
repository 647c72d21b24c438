"""Every pynetdicom internal Switchyard relies on, checked against the installed pynetdicom.

pyproject pins ``pynetdicom>=3.0,<4`` because of these. A failure here names
the internal and where it is used: the pin (and that code) must be revisited
before pynetdicom is upgraded. Public API is not listed here.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import socketserver

import pynetdicom
import pytest
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer, AssociationSocket

from shared import ul
from shared.access import PeerPolicy, install_policy
from shared.dimse import NODELAY_HANDLER


def require(condition: bool, internal: str, used_by: str) -> None:
    assert condition, (
        f"pynetdicom {pynetdicom.__version__}: the internal {internal} changed or is gone "
        f"(used by {used_by}); revisit the pin pynetdicom>=3.0,<4 in pyproject.toml and that code"
    )


def source(obj) -> str:
    return inspect.getsource(obj)


def test_the_major_version_is_the_pinned_one():
    require(pynetdicom.__version__.split(".")[0] == "3", "major version 3", "everything listed in this file")


def test_acse_negotiation_hook_used_by_the_peer_policy():
    hook = getattr(ACSE, "_negotiate_as_acceptor", None)
    require(
        callable(hook) and list(inspect.signature(hook).parameters) == ["self"],
        "ACSE._negotiate_as_acceptor(self)",
        "shared/access.py _PeerCheckingACSE",
    )
    require(
        "self._negotiate_as_acceptor()" in source(ACSE.negotiate_association),
        "ACSE.negotiate_association calling self._negotiate_as_acceptor()",
        "shared/access.py",
    )
    require(
        list(inspect.signature(ACSE.send_reject).parameters) == ["self", "result", "source", "diagnostic"],
        "ACSE.send_reject(result, source, diagnostic)",
        "shared/access.py",
    )
    require(
        "self.acse.negotiate_association()" in source(Association),
        "Association using the (replaceable) self.acse attribute",
        "shared/access.py install_policy",
    )


def test_socket_and_reactor_attributes_on_an_accepted_association():
    """On a real association: what EVT_CONN_OPEN handlers and settle() reach into."""
    seen: dict[str, object] = {}

    def on_open(event: evt.Event) -> None:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        seen["socket"] = sock
        seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) if sock else None
        seen["acse"] = getattr(event.assoc, "acse", None)
        seen["paused"] = getattr(event.assoc, "_is_paused", None)

    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[NODELAY_HANDLER, (evt.EVT_CONN_OPEN, on_open)]
    )
    assert server is not None
    try:
        assert asyncio.run(ul.echo("127.0.0.1", server.server_address[1], "PROBE", "PEER", 10.0))
    finally:
        server.shutdown()
    require(
        isinstance(seen.get("socket"), socket.socket),
        "Association.dul.socket.socket (the TCP socket)",
        "shared/dimse.py NODELAY_HANDLER, shared/access.py bound_reads",
    )
    require(seen.get("nodelay") == 1, "EVT_CONN_OPEN firing with the socket connected", "shared/dimse.py")
    require(
        isinstance(seen.get("acse"), ACSE),
        "Association.acse set before EVT_CONN_OPEN",
        "shared/access.py install_policy",
    )
    require(isinstance(seen.get("paused"), bool), "Association._is_paused", "shared/dimse.py settle")
    require(
        "self._is_paused" in source(Association.send_c_store),
        "send_c_store waiting on _is_paused",
        "shared/dimse.py settle",
    )
    require(
        "socket" in source(AssociationSocket.__init__) and "self.socket" in source(AssociationSocket.__init__),
        "AssociationSocket.socket",
        "shared/dimse.py, shared/access.py",
    )


def test_the_peer_policy_acse_rejects_before_negotiation():
    """install_policy's ACSE subclass, end to end: a stranger gets calling-AE-not-recognised."""
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    policy = PeerPolicy.from_config(["FRIEND"], [])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[install_policy(policy)])
    assert server is not None
    port = server.server_address[1]

    async def attempt(calling: str):
        assoc = await ul.Association.request(
            "127.0.0.1", port, calling, "PEER", [(ul.VERIFICATION, ul.IMPLICIT_VR_LITTLE_ENDIAN)], 16384, 10.0
        )
        await assoc.close()
        return assoc

    try:
        with pytest.raises(ul.Rejected) as rejected:
            asyncio.run(attempt("STRANGER"))
        friend = asyncio.run(attempt("FRIEND"))
    finally:
        server.shutdown()
    require(
        (rejected.value.result, rejected.value.source, rejected.value.reason) == (1, 1, 3),
        "ACSE.requestor / send_reject / Association.kill as _PeerCheckingACSE uses them",
        "shared/access.py",
    )
    assert friend.accepted  # the same server accepts an allowed peer


def test_c_store_from_a_file_used_by_the_qr_blob_sender():
    params = inspect.signature(Association.send_c_store).parameters
    require(
        list(params)[:2] == ["self", "dataset"] and "Path" in str(params["dataset"].annotation),
        "Association.send_c_store(dataset: str | Path | Dataset, ...)",
        "services/probe/qr.py _send_blob_files",
    )
    require(
        isinstance(getattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", None), bool)
        and "STORE_SEND_CHUNKED_DATASET" in source(Association.send_c_store),
        "pynetdicom._config.STORE_SEND_CHUNKED_DATASET",
        "services/probe/qr.py start()",
    )
    # The patched send_c_store is an instance attribute: C-GET and C-MOVE must look it up on the association.
    qr = source(QueryRetrieveServiceClass)
    require(
        "self.assoc.send_c_store(" in qr and "store_assoc.send_c_store(" in qr,
        "QueryRetrieveServiceClass calling assoc.send_c_store per sub-operation",
        "services/probe/qr.py BLOB_SENDER (the patched send_c_store)",
    )


def test_server_accept_hook_used_for_the_deferred_tls_handshake():
    require(
        issubclass(AssociationServer, socketserver.TCPServer)
        # (typeshed leaves this private method out: it is watched here on purpose)
        and "self.get_request()" in source(socketserver.BaseServer._handle_request_noblock)  # type: ignore[attr-defined]
        and "ssl_context" in source(AssociationServer.get_request),
        "AssociationServer.get_request wrapping TLS (a socketserver.TCPServer)",
        "shared/access.py defer_tls_handshake",
    )
