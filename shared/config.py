"""One typed configuration for every service: TOML file, then environment overrides.

The defaults run the whole stack on one machine (see README). A service reads the
config once, in ``__main__``, and passes it down; nothing re-reads it.

Environment overrides: ``SWITCHYARD_CONFIG`` names the TOML file;
``SWITCHYARD_<SECTION>__<KEY>=value`` sets one field (lists as JSON, scalars
converted by the field's type); ``SWITCHYARD_NODES`` takes a JSON list of nodes.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec


class NatsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: str = "nats://127.0.0.1:4222"
    # More servers of the same JetStream cluster: a client connects to any of
    # them and fails over to the others (``url`` stays the first one tried).
    servers: list[str] = msgspec.field(default_factory=list)
    events_stream: str = "SWITCHYARD"
    heartbeats_stream: str = "HEARTBEATS"
    # How long JetStream remembers a Nats-Msg-Id: a retried publish inside this
    # window records the fact once.
    duplicate_window_s: float = 24 * 3600.0
    heartbeat_max_age_s: float = 600.0
    # "file" in production; tests may use "memory" for their own throwaway server.
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    connect_timeout_s: float = 2.0
    publish_timeout_s: float = 5.0
    # This process's nkey seed; "{identity}" becomes the service name (or "admin").
    # Empty: no authentication, refused unless allow_unauthenticated (dev only, logged loudly).
    nkey_seed_file: str = ""
    allow_unauthenticated: bool = False
    # TLS to NATS: the CA that signed the server; cert and key for mTLS.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Reply inbox per identity, so no identity may subscribe to another's replies.
    inbox_prefix: str = "_INBOX_{identity}"
    # 0: a log purged or truncated under a store stops it (exit non-zero). N: the
    # operator accepts that the events stream now starts at sequence N (what came
    # before is lost); stores and membership start from what the log still holds.
    accepted_log_start: int = 0

    def server_urls(self) -> list[str]:
        """Every server to connect to: ``url`` then ``servers``, without repeats."""
        return list(dict.fromkeys([self.url, *self.servers]))


class BlobConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    backend: Literal["local", "s3"] = "local"
    path: str = "var/blobs"
    s3_endpoint: str = "127.0.0.1:9000"
    s3_bucket: str = "switchyard"
    s3_access_key: str = "minioadmin"
    s3_secret_key: str = "minioadmin"
    s3_region: str = "us-east-1"
    s3_secure: bool = False


class NodeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An Orthanc node: its DICOM endpoint and its REST API."""

    id: str
    host: str = "127.0.0.1"
    dicom_port: int = 4242
    ae_title: str = "ORTHANC"
    rest_url: str = "http://127.0.0.1:8042"
    username: str = "switchyard"
    password: str = "switchyard"


class NodeCredentials(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """REST credentials for nodes added at run time (secrets stay out of the log)."""

    username: str = "switchyard"
    password: str = "switchyard"


class IngestConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    ae_title: str = "SWITCHYARD"
    host: str = "127.0.0.1"
    port: int = 11112
    metrics_port: int = 9101
    # Where the Storage SCP spools incoming datasets before they reach the blob store
    # (on the blob store's filesystem, a local store adopts the file without a copy).
    spool_dir: str = "var/spool"
    # Per worker process.
    max_associations: int = 16
    # Open associations one peer (calling AE + address) may hold, per worker process,
    # so one peer cannot take every slot from the others. 0: no per-peer limit.
    max_associations_per_peer: int = 4
    # Processes sharing the port (SO_REUSEPORT); worker N serves metrics on metrics_port + N.
    workers: int = 1
    max_pdu: int = 262144
    network_timeout_s: float = 60.0
    max_object_bytes: int = 4 * 1024**3
    # Empty: any calling AE may store. Otherwise only these AE titles.
    allowed_calling_aes: list[str] = []
    # Extra header keywords carried in the received event (queryable in the catalog).
    extra_tags: list[str] = []
    # Peers allowed besides allowed_calling_aes: "AE" (any address) or "AE@host"
    # (host: an IP address or a name resolved once at start). Both lists empty: anyone.
    allowed_peers: list[str] = []
    # DICOM over TLS: set cert and key to serve TLS only; a CA file also
    # requires and verifies client certificates.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""


class Weights(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The placement score's weights, defined once: config reads them, the policy scores with them.

    A node's score (lower gets new studies) adds each weight times its load
    field; free disk counts against. Scores within ``tie`` are equal.
    """

    pending_jobs: float = 1.0
    # Placements reserved since the node's last heartbeat.
    inflight: float = 1.0
    cpu: float = 0.02
    instances: float = 0.0001
    rtt_ms: float = 0.05
    disk_free_gb: float = 0.01
    tie: float = 1e-9


class SchedulerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metrics_port: int = 9102
    # A node whose last heartbeat is older than this is down.
    heartbeat_timeout_s: float = 5.0
    # How long a received instance waits for a live node before it is retried.
    no_node_retry_s: float = 2.0
    # Placement score weights: [scheduler.weights] in TOML.
    weights: Weights = msgspec.field(default_factory=Weights)
    # Placements per instance (first + re-placements) before its dead letter is final.
    max_attempts: int = 3
    # How often missed heartbeats are checked (also catches a silent probe).
    check_interval_s: float = 0.5
    # Exponential smoothing of heartbeat load fields (1.0: last value only).
    load_smoothing: float = 0.5


class RoutingRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Instances whose header matches go to ``pools`` (one placement per pool: fan-out).

    ``match`` maps a received-event field (``modality``, ``calling_ae``,
    ``called_ae``, ``sop_class_uid``, ``study_description``, ...) or a keyword
    from ``ingest.extra_tags`` to an exact value or an fnmatch glob, or a list
    of them (any may match). Every key must match; an empty ``match`` matches all.
    """

    name: str
    pools: list[str]
    match: dict[str, str | list[str]] = {}


class RoutingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which nodes may take which instances. First matching rule wins; no match: pool "all"."""

    rules: list[RoutingRule] = []
    # Pool name -> node ids. "all" (every node) is built in and cannot be redefined.
    pools: dict[str, list[str]] = {}

    def __post_init__(self) -> None:
        if "all" in self.pools:
            raise ValueError('routing.pools: "all" is built in (every node)')
        names = set()
        for rule in self.rules:
            if not rule.pools:
                raise ValueError(f"routing rule {rule.name!r}: no pools")
            if rule.name in names:
                raise ValueError(f"routing rule {rule.name!r} defined twice")
            names.add(rule.name)
            unknown = [p for p in rule.pools if p != "all" and p not in self.pools]
            if unknown:
                raise ValueError(f"routing rule {rule.name!r}: unknown pools {unknown}")
            if len(set(rule.pools)) != len(rule.pools):
                raise ValueError(f"routing rule {rule.name!r}: a pool named twice")


class ForwarderConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metrics_port: int = 9103
    ae_title: str = "SWITCHYARD"
    max_deliver: int = 5
    ack_wait_s: float = 60.0
    retry_backoff_s: list[float] = msgspec.field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0])
    batch: int = 16
    # After a fetch that did not fill a batch, wait this long before the next one:
    # at a trickle each fetch returned one placement, at a few pull round trips each.
    fetch_linger_s: float = 0.02
    network_timeout_s: float = 30.0
    scratch_dir: str = "var/forwarder"
    # Open associations (and concurrent C-STOREs) per node.
    concurrency_per_node: int = 2


class QRPeer(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One peer allowed at the Q/R front door, and what it may do there.

    ``host`` (an IP address or a name resolved once at start) binds the AE title
    to that address; empty admits the AE from any address. ``rights``: "find"
    (C-FIND) and/or "retrieve" (C-GET and C-MOVE). Least privilege by default.
    """

    ae: str
    host: str = ""
    rights: list[Literal["find", "retrieve"]] = msgspec.field(default_factory=lambda: ["find"])

    def __post_init__(self) -> None:
        if not self.ae.strip():
            raise ValueError("probe.qr_peers: an entry without an AE title")
        if not self.rights:
            raise ValueError(f"probe.qr_peers {self.ae!r}: no rights (use find and/or retrieve)")


class ProbeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metrics_port: int = 9104
    ae_title: str = "SWITCHYARD"
    interval_s: float = 1.0
    timeout_s: float = 2.0
    # The probe's own DuckDB store: what was forwarded where, each node's /changes cursor.
    db_path: str = "var/probe.duckdb"
    # A forwarded instance not seen on its node within this many seconds fails verification.
    verify_deadline_s: float = 60.0
    # How often each node's /changes is polled, and how many changes per request.
    changes_interval_s: float = 0.5
    changes_limit: int = 200
    # PACS front door: a Query/Retrieve SCP answered from the probe's own projection of
    # the log (a CatalogStore in its own file) with the bytes from the blob store.
    qr_port: int = 11113
    qr_host: str = "127.0.0.1"
    qr_ae_title: str = "SWITCHYARD_QR"
    catalog_db_path: str = "var/probe-catalog.duckdb"
    # C-MOVE destinations the front door knows, each "AE_TITLE@host:port".
    move_destinations: list[str] = []
    # Who may associate with the front door, and with which rights. Nothing configured:
    # the front door refuses every association (closed by default). E.g.
    # qr_peers = [{ae = "VIEWER", host = "10.0.0.5", rights = ["find"]},
    #             {ae = "PACS", host = "10.0.0.9", rights = ["find", "retrieve"]}]
    qr_peers: list[QRPeer] = []
    # Older form, still accepted: each entry may find AND retrieve (as before).
    # AE titles from any address, and "AE" or "AE@host" entries.
    qr_allowed_calling_aes: list[str] = []
    qr_allowed_peers: list[str] = []
    # Associations open at once (pynetdicom's maximum_associations), and per peer
    # (calling AE + address), so one peer cannot take every slot. 0: no per-peer limit.
    qr_max_associations: int = 16
    qr_max_associations_per_peer: int = 4
    # DICOM over TLS for the front door, as ingest's: cert and key serve TLS only;
    # a CA file also requires and verifies client certificates.
    qr_tls_cert_file: str = ""
    qr_tls_key_file: str = ""
    qr_tls_ca_file: str = ""
    # Read timeout of a front door association (also the ACSE/DIMSE timeout).
    qr_network_timeout_s: float = 30.0
    # nats-server's monitoring endpoint (its -m / http_port, e.g. http://nats:8222): when set,
    # the probe's /metrics also exports /varz and /jsz as switchyard_nats_* (shared.natsmon).
    nats_monitor_url: str = ""


class CatalogToken(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One HTTP API credential: only its sha256 is in the config, so the file gives no access."""

    name: str
    role: Literal["viewer", "operator"]
    # Lower-case hex of sha256(token bytes).
    sha256: str

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"catalog token {self.name!r}: sha256 must be 64 lower-case hex digits")


class CatalogConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metrics_port: int = 9105
    db_path: str = "var/catalog.duckdb"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # HTTP API credentials (services/catalog/auth.py). None configured: every request is 401.
    tokens: list[CatalogToken] = []
    # Deprecated: one plain-text token, taken as an operator token (WARNING at start).
    token: str = ""
    # Viewers see no patient name, ID, birth date or accession number unless this is set.
    viewer_sees_patient_data: bool = False
    # HTTPS: set both to serve TLS only.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # A connection must complete a request's headers within this long (from connect or the
    # last response), and a request body within body_timeout_s, or it is cut off.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("catalog: set both tls_cert_file and tls_key_file, or neither")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("catalog: header_timeout_s and body_timeout_s must be positive")
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("catalog.tokens: each token needs its own name")

    # Live follower: a batch (one transaction) closes when full or follow_linger_s after
    # its first event; a full batch means the catalog fell behind and catches up in bulk.
    batch: int = 8192
    follow_linger_s: float = 1.0
    # A rebuild (catalog, probe front door) holds up to this much raw log in memory and
    # folds it set-based; beyond it, it folds early and upserts later folds (slower).
    rebuild_memory_mib: int = 4096


class TelemetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    traces: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    log_level: str = "INFO"
    metrics_host: str = "127.0.0.1"
    # The web console links an event to its trace: "{trace_id}" is replaced (e.g.
    # "http://grafana:3000/explore?...{trace_id}"); "" shows no link.
    trace_url_template: str = ""
    # Share of new traces kept (parent-based: a span follows its parent's decision).
    # OTEL_TRACES_SAMPLER overrides it; errors are kept by the collector's tail sampling.
    sample_ratio: float = 1.0
    # "json": one JSON object per log line, with trace_id/span_id when a span is active.
    log_format: Literal["text", "json"] = "text"
    # "otlp": also push the registry over OTLP/HTTP (shared.otlpmetrics); /metrics is served either way.
    # OTEL_METRICS_EXPORTER overrides it.
    metrics: Literal["prometheus", "otlp"] = "prometheus"


def _default_nodes() -> list[NodeConfig]:
    return [
        NodeConfig(
            id=f"node{i}",
            dicom_port=4242 + i - 1,
            ae_title=f"NODE{i}",
            rest_url=f"http://127.0.0.1:{8042 + i - 1}",
        )
        for i in (1, 2, 3)
    ]


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    blobs: BlobConfig = msgspec.field(default_factory=BlobConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    forwarder: ForwarderConfig = msgspec.field(default_factory=ForwarderConfig)
    probe: ProbeConfig = msgspec.field(default_factory=ProbeConfig)
    catalog: CatalogConfig = msgspec.field(default_factory=CatalogConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    nodes: list[NodeConfig] = msgspec.field(default_factory=_default_nodes)
    node_credentials: NodeCredentials = msgspec.field(default_factory=NodeCredentials)

    def __post_init__(self) -> None:
        # Rules may only match what the received event carries.
        from shared.events import InstanceReceivedV1

        known = {*InstanceReceivedV1.__struct_fields__, *self.ingest.extra_tags} - {"extra_tags"}
        for rule in self.routing.rules:
            unknown = sorted(set(rule.match) - known)
            if unknown:
                raise ValueError(
                    f"routing rule {rule.name!r} matches {unknown}: neither a received-event"
                    " field nor in ingest.extra_tags"
                )

    def node(self, node_id: str) -> NodeConfig | None:
        return next((n for n in self.nodes if n.id == node_id), None)


class ConfigError(ValueError):
    pass


_PREFIX = "SWITCHYARD_"


def _parse_value(raw: str) -> object:
    """Lists and tables come as JSON; scalars stay strings and msgspec converts
    them by the field's type ("3000" -> int), so a password "12345678" stays a string."""
    if raw.lstrip().startswith(("[", "{")):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _apply_env(data: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    for name, raw in env.items():
        if not name.startswith(_PREFIX) or name == "SWITCHYARD_CONFIG":
            continue
        rest = name[len(_PREFIX) :].lower()
        if rest == "nodes":
            data["nodes"] = _parse_value(raw)
            continue
        section, sep, key = rest.partition("__")
        if not sep or not key:
            continue
        if section not in Config.__struct_fields__:
            raise ConfigError(f"{name}: unknown section {section!r}")
        data.setdefault(section, {})[key] = _parse_value(raw)
    return data


def load_config(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment overrides, validate."""
    env = dict(os.environ if env is None else env)
    path = path or env.get("SWITCHYARD_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    data = _apply_env(data, env)
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc


def _toml_value(v: object) -> str:
    """TOML for a value: JSON scalars and arrays are TOML; tables become inline tables."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def dump_toml(cfg: Config) -> str:
    """Render a config as TOML (used to hand generated configs to child processes)."""
    data = msgspec.to_builtins(cfg)
    lines: list[str] = []
    nodes = data.pop("nodes")
    for section, fields in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in fields.items())
        lines.append("")
    for node in nodes:
        lines.append("[[nodes]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in node.items())
        lines.append("")
    return "\n".join(lines)


def parse_routing(document: str) -> RoutingConfig:
    """A routing rules document (TOML: ``[[rules]]`` and ``[pools]``, or both under ``[routing]``).

    The form the console records in ``routing.rules_changed.v1`` and the scheduler
    applies; ValueError with the reason when it is not valid.
    """
    import tomllib

    try:
        data = tomllib.loads(document)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from exc
    if set(data) == {"routing"} and isinstance(data["routing"], dict):
        data = data["routing"]
    try:
        return msgspec.convert(data, RoutingConfig)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ValueError(str(exc)) from exc
