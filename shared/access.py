"""Who may open an association with a Switchyard SCP, and over what transport.

Shared by every DICOM server Switchyard runs (ingest's Storage SCP, the
probe's Q/R SCP), so both admit peers with the same rules and config shape:

- calling AE titles, optionally bound to source addresses, each with rights
  (for the Q/R SCP: find, retrieve), and a limit on associations per peer. pynetdicom's own
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationServer

if TYPE_CHECKING:
    from pynetdicom.transport import AssociationServer

log = logging.getLogger("switchyard.access")

# An (event, handler) pair for evt_handlers.
Handler = tuple[evt.NotificationEvent, Callable[[evt.Event], None]]

# A-ASSOCIATE-RJ result, source, diagnostic (PS3.8 9.3.4).
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


@dataclass(frozen=True)
class Rule:
    """One allowed AE title, the addresses it may come from (empty: any), and its rights."""

    ae: str
    hosts: frozenset[str] = frozenset()
    rights: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PeerPolicy:
    """Allowed peers and what each may do; no rules means no allowlist was configured."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_config(
        cls,
        calling_aes: Iterable[str],
        peers: Iterable[str],
        resolve: Callable[[str], set[str]] | None = None,
        rights: frozenset[str] = frozenset(),
        entries: Iterable[tuple[str, str, Iterable[str]]] = (),
    ) -> PeerPolicy:
        """``calling_aes`` and ``"AE"``/``"AE@host"`` ``peers`` get ``rights``; ``entries``
        are (AE, host or "", rights) each with their own."""
        resolve = resolve or _resolve
        rules: list[Rule] = [Rule(ae.strip(), frozenset(), rights) for ae in calling_aes]
        for entry in peers:
            ae, sep, host = entry.partition("@")
            ae, host = ae.strip(), host.strip()
            if not ae or (sep and not host):
                raise ValueError(f"allowed_peers entry {entry!r}: expected 'AE' or 'AE@host'")
            rules.append(Rule(ae, frozenset(resolve(host)) if host else frozenset(), rights))
        for ae, host, granted in entries:
            ae, host = ae.strip(), host.strip()
            if not ae:
                raise ValueError("a peer entry without an AE title")
            rules.append(Rule(ae, frozenset(resolve(host)) if host else frozenset(), frozenset(granted)))
        return cls(tuple(rules))

    @property
    def open(self) -> bool:
        return not self.rules

    def rights(self, calling_ae: str, address: str) -> frozenset[str] | None:
        """What this peer may do (every matching rule counts); None: not an allowed peer."""
        calling_ae = calling_ae.strip()
        found: frozenset[str] | None = None
        for rule in self.rules:
            if rule.ae == calling_ae and (not rule.hosts or address in rule.hosts):
                found = rule.rights if found is None else found | rule.rights
        return found

    def allows(self, calling_ae: str, address: str) -> bool:
        return self.open or self.rights(calling_ae, address) is not None


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


@dataclass(frozen=True)
class Gate:
    """How a pynetdicom SCP admits an association: policy, per-peer limit, contexts by right.

    ``closed``: an empty policy refuses everyone (the Q/R front door) instead of
    admitting anyone. ``needs`` maps an abstract syntax (SOP class UID) to the
    right it requires; contexts whose right the peer lacks are refused at
    negotiation (abstract-syntax-not-supported).
    """

    policy: PeerPolicy
    closed: bool = False
    per_peer_limit: int = 0
    needs: Mapping[str, str] = field(default_factory=dict)

    def admits(self, calling_ae: str, address: str) -> frozenset[str] | None:
        if self.policy.open:
            return None if self.closed else frozenset(self.needs.values())
        return self.policy.rights(calling_ae, address)


def held_by(assoc: Association, calling_ae: str, address: str) -> int:
    """Other live acceptor associations of this AE from this address, negotiating or established."""
    n = 0
    for other in assoc.ae.active_associations:
        if other is assoc or not other.is_acceptor or other.is_rejected or other.is_aborted or other.is_released:
            continue
        rq = other.requestor.primitive
        if rq is not None and other.requestor.address == address and str(rq.calling_ae_title).strip() == calling_ae:
            n += 1
    return n


class _PeerCheckingACSE(ACSE):
    """pynetdicom's ACSE, with the gate applied before negotiation."""

    gate: Gate

    def _reject(self, calling: str, reason: tuple[int, int, int]) -> None:
        self.requestor.ae_title = calling
        self.send_reject(*reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = str(rq.calling_ae_title).strip() if rq is not None else ""
        address = self.requestor.address
        rights = self.gate.admits(calling, address)
        if rights is None:
            log.warning("association rejected: calling AE %r from %s is not an allowed peer", calling, address)
            return self._reject(calling, REJECT_CALLING_AE)
        limit = self.gate.per_peer_limit
        if limit and (held := held_by(self.assoc, calling, address)) >= limit:
            log.warning(
                "association rejected: calling AE %r from %s already holds %d associations (per-peer limit)",
                calling,
                address,
                held,
            )
            return self._reject(calling, REJECT_LOCAL_LIMIT)
        if self.gate.needs:
            # A context the peer has no right to is not negotiated at all (abstract syntax not supported).
            needs = self.gate.needs
            self.acceptor.supported_contexts = [
                cx
                for cx in self.acceptor.supported_contexts
                if str(cx.abstract_syntax) not in needs or needs[str(cx.abstract_syntax)] in rights
            ]
        super()._negotiate_as_acceptor()


def install_policy(policy: PeerPolicy | Gate) -> Handler:
    """An EVT_CONN_OPEN handler that gives each new association the checking ACSE."""
    gate = policy if isinstance(policy, Gate) else Gate(policy)

    def _on_open(event: evt.Event) -> None:
        if gate.policy.open and not gate.closed and not gate.per_peer_limit:
            return
        acse = _PeerCheckingACSE(event.assoc)
        acse.gate = gate
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

    listener = server.socket
    if listener is None:
        raise ValueError("the server has no listening socket")

    def get_request() -> tuple[ssl.SSLSocket, Any]:
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
            assoc_sock = event.assoc.dul.socket
            sock = assoc_sock.socket if assoc_sock is not None else None
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
                log.warning(
                    "TLS handshake with %s failed: %s",
                    event.assoc.requestor.address,
                    getattr(exc, "reason", None) or type(exc).__name__,
                )
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    return (evt.EVT_CONN_OPEN, _on_open)
