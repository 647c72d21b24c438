"""Who may open an association with a Switchyard SCP, and over what transport.

Shared by every DICOM server Switchyard runs (ingest's Storage SCP, the
probe's Q/R SCP), so both admit peers with the same rules and config shape:

- calling AE titles, optionally bound to source addresses. pynetdicom's own
  ``require_calling_aet`` knows only AE titles; the policy here also knows the
  peer's address, so it is applied by an ACSE that checks the A-ASSOCIATE-RQ
  before pynetdicom negotiates it, and rejects with the standard reason
  (rejected-permanent, service-user, calling-AE-title-not-recognized);
- optional TLS (server certificate; a CA file also requires client
  certificates), with the handshake moved out of pynetdicom's accept thread;
- a read timeout on every accepted socket.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynetdicom import evt
from pynetdicom.acse import ACSE

if TYPE_CHECKING:
    from pynetdicom.transport import AssociationServer

log = logging.getLogger("switchyard.access")

# An (event, handler) pair for evt_handlers.
Handler = tuple[evt.NotificationEvent, Callable[[evt.Event], None]]

# A-ASSOCIATE-RJ result, source, diagnostic (PS3.8 9.3.4).
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


@dataclass(frozen=True)
class PeerPolicy:
    """Allowed (AE title, addresses) pairs; an empty address set means any address."""

    rules: tuple[tuple[str, frozenset[str]], ...] = ()

    @classmethod
    def from_config(cls, calling_aes: Iterable[str], peers: Iterable[str],
                    resolve: Callable[[str], set[str]] | None = None) -> PeerPolicy:
        resolve = resolve or _resolve
        rules: list[tuple[str, frozenset[str]]] = [(ae.strip(), frozenset()) for ae in calling_aes]
        for entry in peers:
            ae, sep, host = entry.partition("@")
            ae, host = ae.strip(), host.strip()
            if not ae or (sep and not host):
                raise ValueError(f"allowed_peers entry {entry!r}: expected 'AE' or 'AE@host'")
            rules.append((ae, frozenset(resolve(host)) if host else frozenset()))
        return cls(tuple(rules))

    @property
    def open(self) -> bool:
        return not self.rules

    def allows(self, calling_ae: str, address: str) -> bool:
        if self.open:
            return True
        calling_ae = calling_ae.strip()
        return any(ae == calling_ae and (not hosts or address in hosts) for ae, hosts in self.rules)


def _resolve(host: str) -> set[str]:
    """An IP literal as is; a name to every address it has now (resolved once, at start)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return {host}
    except OSError:
        pass
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise ValueError(f"allowed_peers host {host!r} does not resolve: {exc}") from exc


class _PeerCheckingACSE(ACSE):
    """pynetdicom's ACSE, with the peer policy applied before negotiation."""

    policy: PeerPolicy

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = str(rq.calling_ae_title) if rq is not None else ""
        address = self.requestor.address
        if not self.policy.allows(calling, address):
            log.warning("association rejected: calling AE %r from %s is not an allowed peer", calling, address)
            self.requestor.ae_title = calling
            self.send_reject(*REJECT_CALLING_AE)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


def install_policy(policy: PeerPolicy) -> Handler:
    """An EVT_CONN_OPEN handler that gives each new association the checking ACSE."""

    def _on_open(event: evt.Event) -> None:
        if policy.open:
            return
        acse = _PeerCheckingACSE(event.assoc)
        acse.policy = policy
        event.assoc.acse = acse

    return (evt.EVT_CONN_OPEN, _on_open)


def server_tls_context(cert_file: str, key_file: str, ca_file: str, prefix: str) -> ssl.SSLContext | None:
    """Server TLS from config: none unless cert and key are set; a CA also requires client certs.

    ``prefix`` names the config keys in errors, e.g. ``ingest.tls`` for ``ingest.tls_cert_file``.
    """
    if not (cert_file or key_file):
        return None
    if not (cert_file and key_file):
        raise ValueError(f"{prefix}_cert_file and {prefix}_key_file must both be set for TLS")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if ca_file:
        ctx.load_verify_locations(ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def defer_tls_handshake(server: AssociationServer, ctx: ssl.SSLContext, timeout: float) -> None:
    """Move the TLS handshake out of pynetdicom's accept loop.

    pynetdicom wraps each accepted socket with a blocking handshake in the one
    thread that accepts connections: a peer that connects and sends nothing
    would stop every other peer from connecting. The handshake happens in the
    association's own thread instead (``bound_reads``), under the network
    timeout.
    """

    def get_request() -> tuple[socket.socket, tuple[str, int]]:
        listener = server.socket
        assert listener is not None  # pynetdicom types it optional; a serving server has it
        client, address = listener.accept()
        client.settimeout(timeout)
        return ctx.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    server.get_request = get_request  # type: ignore[method-assign]  # pynetdicom has no hook for the accept step


def bound_reads(timeout: float) -> Handler:
    """An EVT_CONN_OPEN handler: the socket's read timeout, then a deferred TLS handshake.

    Sockets accepted by pynetdicom's server block without a timeout, and the
    DUL reads a whole PDU in one blocking loop: a peer that announces a long
    PDU and then sends nothing (truncated P-DATA, non-DICOM bytes read as a
    PDU header) would hold its thread and association slot forever.
    """

    def _on_open(event: evt.Event) -> None:
        dul_socket = event.assoc.dul.socket
        if dul_socket is None:
            log.warning("could not set the socket timeout: the association has no socket")
            return
        try:
            sock = dul_socket.socket
            if sock is None:
                return
            sock.settimeout(timeout)
        except (AttributeError, OSError) as exc:
            log.warning("could not set the socket timeout: %s", exc)
            return
        if isinstance(sock, ssl.SSLSocket):
            # The handshake was deferred out of the accept loop (see defer_tls_handshake).
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", event.assoc.requestor.address,
                            getattr(exc, "reason", None) or type(exc).__name__)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    return (evt.EVT_CONN_OPEN, _on_open)
