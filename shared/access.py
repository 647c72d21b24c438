"""Who may open an association: calling AE titles, optionally bound to source addresses.

pynetdicom's own ``require_calling_aet`` knows only AE titles. The policy here
also knows the peer's address, so it is applied by an ACSE that checks the
A-ASSOCIATE-RQ before pynetdicom negotiates it, and rejects with the standard
reason (rejected-permanent, service-user, calling-AE-title-not-recognized).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pynetdicom import evt
from pynetdicom.acse import ACSE

log = logging.getLogger(__name__)

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
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
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


def install_policy(policy: PeerPolicy):
    """An EVT_CONN_OPEN handler that gives each new association the checking ACSE."""

    def _on_open(event: evt.Event) -> None:
        if policy.open:
            return
        acse = _PeerCheckingACSE(event.assoc)
        acse.policy = policy
        event.assoc.acse = acse

    return (evt.EVT_CONN_OPEN, _on_open)
