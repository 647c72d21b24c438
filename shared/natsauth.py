"""NATS identities, their least-privilege permissions, and the credentials that prove them.

One nkey identity per service plus ``admin`` (the CLI: membership, stream and
KV administration, rebuilds). The server config holds only public keys; each
process reads its own seed file. Given these permissions the subject an event
arrives on names the identity that published it (docs/security.md), which is
what ``shared.bus`` checks on every delivery.

Pure functions (no I/O) except ``generate``, ``write_route_password`` and ``write_credentials``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import Config, NatsConfig
from shared.fsmode import write_private  # seeds and the auth include: 0600 from the start

if TYPE_CHECKING:
    from shared.bus import Bus

SERVICES = ("ingest", "scheduler", "forwarder", "probe", "catalog")
IDENTITIES = (*SERVICES, "admin")
# Test deployments only (rendered when asked for): may publish and read anything.
HARNESS = "harness"

KV_STREAM = "KV_study-affinity"
KV_BUCKET = "study-affinity"
# The scheduler's durables and their filters: fixed names, so no other identity may touch them.
SCHEDULER_DURABLES = {
    "scheduler": "dicom.instance.received",
    "scheduler-replace": "dicom.instance.dead_lettered",
    "scheduler-verify": "dicom.instance.verification_failed.>",
    "scheduler-operator": "dicom.instance.operator.retry_requested",
}
# Operator actions the console (the catalog identity) records, besides the admin's node states.
CATALOG_ACTIONS = (
    "dicom.instance.operator.retry_requested",
    "dicom.instance.operator.dead_letter_cancelled",
    "dicom.instance.operator.rules_changed",
)
# Membership states and who may record them.
ADMIN_STATES = ("added", "drained", "undrained", "removed")
SCHEDULER_STATES = ("down", "up")


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = field(default=())


def inbox_prefix(cfg: NatsConfig, identity: str) -> str:
    """Each identity's reply inbox: no identity may subscribe to another's replies."""
    return cfg.inbox_prefix.format(identity=identity)


def seed_path(cfg: NatsConfig, identity: str) -> Path | None:
    """The seed file of ``identity`` (``{identity}`` in the setting is replaced); None: no auth."""
    return Path(cfg.nkey_seed_file.format(identity=identity)) if cfg.nkey_seed_file else None


def _read_stream(stream: str) -> list[str]:
    """Follow a stream with ephemeral (ordered or push) consumers, the form nats-py uses for them."""
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.FC.{stream}.>"]


def _durable(stream: str, name: str, filter_subject: str) -> list[str]:
    """One named pull consumer: created with its filter in the subject (the server checks it matches)."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter_subject}",
        f"$JS.API.CONSUMER.INFO.{stream}.{name}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
    ]


def permissions(identity: str, cfg: NatsConfig) -> Permissions:
    """What ``identity`` may publish and subscribe to: only what that service does."""
    s, h = cfg.events_stream, cfg.heartbeats_stream
    inbox = f"{inbox_prefix(cfg, identity)}.>"
    base = ["$JS.API.INFO", f"$JS.API.STREAM.INFO.{s}", f"$JS.API.STREAM.INFO.{h}"]  # check_streams
    if identity == "ingest":
        return Permissions((*base, "dicom.instance.received", "dicom.instance.resent"), (inbox,))
    if identity == "scheduler":
        # dead_lettered: the final one when verification failed on a second node (an instance problem).
        pub = [
            *base,
            *_read_stream(s),
            "dicom.instance.placed.*",
            "dicom.instance.dead_lettered",
            *(f"node.state.*.{st}" for st in SCHEDULER_STATES),
            f"$JS.API.STREAM.MSG.GET.{s}",
            f"$JS.API.DIRECT.GET.{s}",
            f"$JS.API.STREAM.INFO.{KV_STREAM}",
            f"$KV.{KV_BUCKET}.>",
            f"$JS.API.STREAM.MSG.GET.{KV_STREAM}",
            f"$JS.API.DIRECT.GET.{KV_STREAM}.>",
        ]
        for name, filt in SCHEDULER_DURABLES.items():
            pub += _durable(s, name, filt)
        return Permissions(tuple(pub), (inbox, "node.heartbeat.>"))
    if identity == "forwarder":
        # One durable per node (forwarder-<node>, nodes come and go): any name filtered to
        # placed.<node>, except the scheduler's durables.
        pub = [
            *base,
            *_read_stream(s),
            "dicom.instance.forwarded.*",
            "dicom.instance.forward_failed.*",
            "dicom.instance.dead_lettered",
            *_durable(s, "*", "dicom.instance.placed.*"),
        ]
        deny = [x for name in SCHEDULER_DURABLES for x in _durable(s, name, ">")]
        return Permissions(tuple(pub), (inbox,), tuple(deny))
    if identity == "probe":
        pub = [
            *base,
            *_read_stream(s),
            "node.heartbeat.*",
            "dicom.instance.verified.*",
            "dicom.instance.verification_failed.*",
        ]
        return Permissions(tuple(pub), (inbox,))
    if identity == "catalog":
        # The console's operator actions: its own subjects, and node changes as the admin CLI
        # records them (the event's actor field says which person asked).
        actions = (*CATALOG_ACTIONS, *(f"node.state.*.{st}" for st in ADMIN_STATES))
        # The overview's consumer lag: INFO only (no create, next, ack, delete) on any consumer of
        # the events stream; forwarder-<node> names come and go with nodes, and subject wildcards
        # match whole tokens only, so "*" is the narrowest pattern that covers them.
        lag = f"$JS.API.CONSUMER.INFO.{s}.*"
        return Permissions((*base, *_read_stream(s), *_read_stream(h), *actions, lag), (inbox,))
    if identity == "admin":
        return Permissions(("$JS.API.>", "$JS.FC.>", *(f"node.state.*.{st}" for st in ADMIN_STATES)), (inbox,))
    if identity == HARNESS:
        return Permissions((">",), (">",))
    raise ValueError(f"unknown NATS identity {identity!r}")


def may_delete_consumers(identity: str) -> bool:
    """Only admin deletes consumers; services' ephemeral consumers expire on their own."""
    return identity in ("admin", HARNESS)


def _conf_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def render_authorization(public_keys: dict[str, str], cfg: NatsConfig) -> str:
    """The server's ``authorization`` block: public nkeys and permissions, no secret."""
    users = []
    for identity, key in public_keys.items():
        p = permissions(identity, cfg)
        pub = f"allow: {_conf_list(p.publish)}"
        if p.publish_deny:
            pub += f", deny: {_conf_list(p.publish_deny)}"
        users.append(
            f"    # {identity}\n    {{nkey: {json.dumps(key)}, permissions: {{\n"
            f"      publish: {{{pub}}}\n      subscribe: {{allow: {_conf_list(p.subscribe)}}}\n    }}}}"
        )
    return "authorization {\n  users = [\n" + ",\n".join(users) + "\n  ]\n}\n"


def render_tls(cert_file: str, key_file: str, ca_file: str = "", verify: bool = False) -> str:
    """The server's ``tls`` block; ``verify``: clients must present a certificate from ``ca_file`` (mTLS)."""
    lines = [f"  cert_file: {json.dumps(cert_file)}", f"  key_file: {json.dumps(key_file)}"]
    if ca_file:
        lines.append(f"  ca_file: {json.dumps(ca_file)}")
    if verify:
        lines.append("  verify: true")
    return "tls {\n" + "\n".join(lines) + "\n}\n"


def new_seed() -> bytes:
    """A fresh user nkey seed (``SU...``)."""
    import nkeys

    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def public_key(seed: bytes) -> str:
    import nkeys

    key: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return key.decode()


def sign_nonce(seed: bytes, nonce: str) -> str:
    """The CONNECT ``sig`` for a server's INFO nonce: base64url ed25519 signature, unpadded."""
    import nkeys

    sig = nkeys.from_seed(bytearray(seed)).sign(nonce.encode())
    return base64.urlsafe_b64encode(sig).decode().rstrip("=")


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


@dataclass(frozen=True)
class Credentials:
    directory: Path
    auth_conf: Path  # the server's authorization include
    public_keys: dict[str, str]

    def seed_file(self, identity: str) -> Path:
        return self.directory / f"{identity}.nk"

    @property
    def seed_template(self) -> str:
        """For ``nats.nkey_seed_file``."""
        return str(self.directory / "{identity}.nk")


def generate(
    directory: Path, cfg: NatsConfig, identities: Iterable[str] = IDENTITIES, keep: bool = True
) -> Credentials:
    """One seed per identity under ``directory`` (0700, seeds 0600) and the server's auth include.

    ``keep``: reuse seeds already there, so a restarted stack keeps its identities.
    """
    directory = Path(directory)
    _private_dir(directory)
    keys: dict[str, str] = {}
    for identity in identities:
        path = directory / f"{identity}.nk"
        if not (keep and path.exists()):
            write_private(path, new_seed())
        keys[identity] = public_key(path.read_bytes().strip())
    auth_conf = directory / "auth.conf"
    write_private(auth_conf, render_authorization(keys, cfg).encode())
    return Credentials(directory, auth_conf, keys)


# The cluster routes' shared secret, next to the seeds (the k8s secrets component reads it).
ROUTE_PASSWORD_FILE = "route-password"
_ROUTE_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ROUTE_ALPHABET = _ROUTE_FIRST + "0123456789"


def new_route_password() -> str:
    """40 characters, a letter then letters and digits (~238 bits): safe unquoted in a route URL and read
    by nats-server's config parser as a string when it comes from the environment (not a number)."""
    import secrets

    return secrets.choice(_ROUTE_FIRST) + "".join(secrets.choice(_ROUTE_ALPHABET) for _ in range(39))


def write_route_password(directory: Path) -> Path:
    """``directory``/route-password (0600, no newline), kept when there: a new one takes every server
    restarted at once (a server with the new password and one with the old cannot route)."""
    path = Path(directory) / ROUTE_PASSWORD_FILE
    if not path.exists():
        write_private(path, new_route_password().encode())
    return path


class NoCredentials(RuntimeError):
    """No seed configured and unauthenticated mode not chosen."""


def connect_options(cfg: NatsConfig, identity: str) -> dict[str, Any]:
    """nats.connect keyword arguments for ``identity``: seed, own inbox, TLS.

    Without a seed the connection is refused unless ``allow_unauthenticated``
    (dev only), and then a WARNING says the bus is unauthenticated.
    """
    import logging
    import ssl

    options: dict[str, Any] = {"inbox_prefix": inbox_prefix(cfg, identity)}
    seed = seed_path(cfg, identity)
    if seed is not None:
        options["nkeys_seed"] = str(seed)
    elif cfg.allow_unauthenticated:
        logging.getLogger(__name__).warning(
            "WARNING: the NATS bus is unauthenticated (nats.allow_unauthenticated): anyone who reaches %s "
            "can read and forge the log",
            cfg.url,
        )
    else:
        raise NoCredentials(
            "nats.nkey_seed_file is not set: generate credentials with `switchyard nats "
            "credentials`, or set nats.allow_unauthenticated = true for a throwaway dev bus"
        )
    if cfg.tls_ca_file or cfg.tls_cert_file or cfg.url.startswith("tls://"):
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_file or None)
        if cfg.tls_cert_file:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file or None)
        options["tls"] = ctx
    return options


def secure_local(
    cfg: Config, data_dir: Path, identities: Iterable[str] = IDENTITIES
) -> tuple[Config, Credentials | None]:
    """(config using generated seeds, credentials) for a stack under ``data_dir``.

    Left as is (credentials None) when the config already names a seed or opts
    out of authentication. Logs where the credentials are, never their values.
    """
    import logging

    import msgspec

    if cfg.nats.nkey_seed_file or cfg.nats.allow_unauthenticated:
        return cfg, None
    creds = generate(Path(data_dir) / "nats-creds", cfg.nats, identities)
    logging.getLogger(__name__).info("NATS credentials (one nkey seed per identity, 0600) in %s", creds.directory)
    nats_cfg = msgspec.structs.replace(cfg.nats, nkey_seed_file=creds.seed_template)
    return msgspec.structs.replace(cfg, nats=nats_cfg), creds


def server_conf(creds: Credentials | None, tls: str = "") -> str:
    """Lines the local nats-server config adds: the authorization block, and a tls block if any.

    Inlined, not an ``include`` (nats-server resolves those relative to the config's directory).
    """
    return (creds.auth_conf.read_text() if creds else "") + tls


async def declare(cfg: NatsConfig, identity: str = "admin", settle_s: float = 60.0) -> None:
    """The admin step: declare the streams and the scheduler's KV bucket (services only check them).

    A cluster that has just started may not yet have enough peers to place an R3
    stream ("no suitable peers for placement"), or a meta leader to ask: tried
    again for up to ``settle_s`` (a nats-init Job or the local stack starts with the servers).
    """
    import asyncio

    import nats.errors
    import nats.js.errors

    from shared.bus import Bus

    once = asyncio.Event()
    once.set()
    bus = await Bus.connect(cfg, "switchyard-admin", once, identity=identity)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    try:
        while True:
            try:
                await _declare_on(bus, cfg)
                return
            except (
                nats.js.errors.BadRequestError,
                nats.js.errors.ServiceUnavailableError,
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
            ) as exc:
                if isinstance(exc, nats.js.errors.BadRequestError) and exc.err_code != PLACEMENT_NOT_YET:
                    raise
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)  # the cluster is forming: back off, then ask again
    finally:
        await bus.close()


# JetStream's "no suitable peers for placement": a cluster still forming.
PLACEMENT_NOT_YET = 10005


async def _declare_on(bus: Bus, cfg: NatsConfig) -> None:
    import nats.js.errors
    from nats.js.api import KeyValueConfig, StorageType

    await bus.ensure_streams()
    try:
        await bus.js.key_value(KV_BUCKET)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        await bus.js.create_key_value(
            KeyValueConfig(
                bucket=KV_BUCKET,
                history=1,
                replicas=cfg.replicas,
                storage=StorageType.FILE if cfg.storage == "file" else StorageType.MEMORY,
            )
        )
