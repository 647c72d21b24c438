"""The JetStream bus: every stream, subject and consumer is declared here.

Publishing is idempotent (Nats-Msg-Id is the event's deterministic id) and
never buffered while disconnected (pending_size=0): a publish either reaches
the server or raises at once, so no fact is flushed after its caller gave up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from shared import events as ev
from shared import natsauth
from shared.config import NatsConfig

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

SUBJECT_RECEIVED = "dicom.instance.received"
SUBJECT_DEAD_LETTERED = "dicom.instance.dead_lettered"
SUBJECT_PLACED_ALL = "dicom.instance.placed.>"
SUBJECT_VERIFICATION_FAILED_ALL = "dicom.instance.verification_failed.>"
SUBJECT_HEARTBEAT_ALL = "node.heartbeat.>"
SUBJECT_NODE_STATE_ALL = "node.state.>"
SUBJECT_RETRY_REQUESTED = "dicom.instance.operator.retry_requested"
SUBJECT_RULES_CHANGED = "dicom.instance.operator.rules_changed"

_NODE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BusUnavailable(RuntimeError):
    """The event could not be handed to JetStream; nothing was recorded."""


class PublishUncertain(RuntimeError):
    """Sent, but no acknowledgement came back: the fact may or may not be recorded."""


class StreamsMissing(RuntimeError):
    """A service found the log not declared; declaring it is the admin's step."""


def node_token(node_id: str) -> str:
    """Node ids become subject tokens, so they must be subject-safe."""
    if not _NODE_TOKEN.match(node_id):
        raise ValueError(f"node id {node_id!r} must match {_NODE_TOKEN.pattern}")
    return node_id


def subject_placed(node_id: str) -> str:
    return f"dicom.instance.placed.{node_token(node_id)}"


# Where each event lives; UIDs never appear in subjects (they contain dots). The
# state is in node.state subjects so that permissions can say who may record which state.
_SUBJECTS: dict[type[ev.Event], str] = {
    ev.InstanceReceivedV1: SUBJECT_RECEIVED,
    ev.InstancePlacedV1: "dicom.instance.placed.{node}",
    ev.InstanceForwardedV1: "dicom.instance.forwarded.{node}",
    ev.InstanceForwardFailedV1: "dicom.instance.forward_failed.{node}",
    ev.InstanceDeadLetteredV1: SUBJECT_DEAD_LETTERED,
    ev.InstanceVerifiedV1: "dicom.instance.verified.{node}",
    ev.InstanceVerificationFailedV1: "dicom.instance.verification_failed.{node}",
    ev.NodeHeartbeatV1: "node.heartbeat.{node}",
    ev.NodeStateChangedV1: "node.state.{node}.{state}",
    ev.InstanceResentV1: "dicom.instance.resent",
    # Operator actions (the console): in the events stream, published by the catalog only.
    ev.InstanceRetryRequestedV1: "dicom.instance.operator.retry_requested",
    ev.InstanceDeadLetterCancelledV1: "dicom.instance.operator.dead_letter_cancelled",
    ev.RoutingRulesChangedV1: "dicom.instance.operator.rules_changed",
}
_SUBJECT_BY_TAG = {cls.__struct_config__.tag: template for cls, template in _SUBJECTS.items()}


def _subject(template: str, node_id: str, state: str) -> str:
    return template.format(
        node=node_token(node_id) if "{node}" in template else "",
        state=node_token(state) if "{state}" in template else "",
    )


def subject_for(event: ev.Event) -> str:
    """Where each event lives (see _SUBJECTS)."""
    template = _SUBJECTS.get(type(event))
    if template is None:
        raise TypeError(f"no subject for {type(event).__name__}")
    return _subject(template, getattr(event, "node_id", ""), getattr(event, "state", ""))


class _Envelope(msgspec.Struct):
    """Just what names an event's subject, for readers that leave the payload undecoded."""

    type: str
    node_id: str = ""
    state: str = ""


_envelope = msgspec.json.Decoder(_Envelope)


def raw_provenance_ok(subject: str, data: bytes) -> bool:
    """``provenance_ok`` for an undecoded payload (a cheap partial decode)."""
    try:
        env = _envelope.decode(data)
        template = _SUBJECT_BY_TAG[env.type]
        if subject == _subject(template, env.node_id, env.state):
            return True
    except (msgspec.DecodeError, KeyError, ValueError):
        return False
    return env.type == "node.state_changed.v1" and subject == f"node.state.{env.node_id}"


def provenance_ok(subject: str, event: ev.Event) -> bool:
    """Did ``event`` arrive on its own subject? Given the permissions, the subject names its publisher."""
    try:
        if subject == subject_for(event):
            return True
    except (TypeError, ValueError):
        return False
    # Logs recorded before node.state subjects carried the state (no identity may publish these now).
    return isinstance(event, ev.NodeStateChangedV1) and subject == f"node.state.{event.node_id}"


def stream_configs(cfg: NatsConfig) -> list[StreamConfig]:
    storage = StorageType.FILE if cfg.storage == "file" else StorageType.MEMORY
    return [
        # The log: every fact needed to rebuild every store, kept forever.
        StreamConfig(
            name=cfg.events_stream,
            subjects=["dicom.instance.>", SUBJECT_NODE_STATE_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=storage,
            num_replicas=cfg.replicas,
            duplicate_window=cfg.duplicate_window_s,
        ),
        # Heartbeats: high-volume telemetry, short retention, a few per node.
        StreamConfig(
            name=cfg.heartbeats_stream,
            subjects=[SUBJECT_HEARTBEAT_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=storage,
            num_replicas=cfg.replicas,
            max_age=cfg.heartbeat_max_age_s,
            max_msgs_per_subject=16,
            duplicate_window=min(60.0, cfg.heartbeat_max_age_s),
        ),
    ]


def _scheduler_durable(name: str, subject: str) -> ConsumerConfig:
    """Shared by every scheduler replica: JetStream hands each message to one of them."""
    return ConsumerConfig(
        name=name,  # with its name, nats-py creates it on CONSUMER.CREATE.<stream>.<name>.<filter> (permissions)
        durable_name=name,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,
        max_ack_pending=1024,
    )


def scheduler_consumer() -> ConsumerConfig:
    return _scheduler_durable("scheduler", SUBJECT_RECEIVED)


def forwarder_consumer(node_id: str, max_deliver: int, ack_wait_s: float) -> ConsumerConfig:
    """One durable per node: a dead node's backlog never blocks the others."""
    return ConsumerConfig(
        name=f"forwarder-{node_token(node_id)}",
        durable_name=f"forwarder-{node_token(node_id)}",
        filter_subject=subject_placed(node_id),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=256,
    )


def replacement_consumer() -> ConsumerConfig:
    """Dead-lettered placements, for re-placement."""
    return _scheduler_durable("scheduler-replace", SUBJECT_DEAD_LETTERED)


def operator_retry_consumer() -> ConsumerConfig:
    """Operators' retry requests (the console), for placement."""
    return _scheduler_durable("scheduler-operator", SUBJECT_RETRY_REQUESTED)


def verification_failed_consumer() -> ConsumerConfig:
    """Deliveries the probe could not confirm on their node, for re-placement."""
    return _scheduler_durable("scheduler-verify", SUBJECT_VERIFICATION_FAILED_ALL)


AFFINITY_BUCKET = "study-affinity"


@dataclass(frozen=True)
class Delivered:
    seq: int
    event: ev.AnyEvent | None  # None from follow_batches(decode=False): the reader parses msg.data itself
    msg: Msg


class Bus:
    def __init__(self, nc: Client, cfg: NatsConfig, identity: str = "admin") -> None:
        self.nc = nc
        self.cfg = cfg
        self.identity = identity
        self.authenticated = bool(cfg.nkey_seed_file)
        self.js: JetStreamContext = nc.jetstream(timeout=cfg.publish_timeout_s)
        self._rejected: Counter | None = None
        # Readiness (shared.metrics): durable name -> bound now; followers of the log running now.
        self.consumers: dict[str, bool] = {}
        self.followers = 0

    @classmethod
    async def connect(
        cls, cfg: NatsConfig, name: str, stop: asyncio.Event | None = None, identity: str = "admin"
    ) -> Bus:
        """Connect as ``identity`` (its nkey seed, its inbox), retrying until NATS answers or ``stop`` is set."""
        options = natsauth.connect_options(cfg, identity)
        made: list[Client] = []

        async def disconnected() -> None:
            # nats-py calls this on our own close() too: only a lost connection is worth a warning.
            if made and (made[0].is_closed or made[0].is_draining):
                log.debug("nats connection closed")
            else:
                await _log_disconnected()

        while True:
            try:
                nc = await nats.connect(
                    cfg.server_urls(),
                    name=name,
                    **options,
                    connect_timeout=cfg.connect_timeout_s,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    pending_size=0,
                    error_cb=_log_error,
                    disconnected_cb=disconnected,
                    reconnected_cb=_log_reconnected,
                )
                made.append(nc)
                return cls(nc, cfg, identity)
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                log.warning("nats not reachable at %s (%s); retrying", ", ".join(cfg.server_urls()), type(exc).__name__)
                if stop is not None and stop.is_set():
                    raise
                await asyncio.sleep(0.5)

    def export_connected(self, registry: CollectorRegistry) -> None:
        """A gauge read at scrape time: 1 while connected to NATS (readiness, alerting)."""
        from prometheus_client import Counter, Gauge

        Gauge("switchyard_bus_connected", "1 while connected to NATS", registry=registry).set_function(
            lambda: 1.0 if self.nc.is_connected else 0.0
        )
        self._rejected = Counter(
            "switchyard_bus_rejected_events",
            "Deliveries refused: undecodable, or not on their own subject (forged provenance)",
            ["reason"],
            registry=registry,
        )

    def ready(self) -> bool:
        """Connected, and every durable this process pulls from is bound (readiness, /readyz)."""
        return bool(self.nc.is_connected) and all(self.consumers.values())

    def checked(self, subject: str, data: bytes, seq: int) -> ev.AnyEvent | None:
        """Decode one delivery and check its provenance; None (logged, counted) when refused.

        The one place every consumer path decodes through: an event on a subject
        other than its own was published by an identity not allowed to record it.
        Logged without payload values (they may be patient data).
        """
        try:
            event = ev.decode(data)
        except Exception:  # noqa: BLE001 - one bad message must not stop a consumer
            log.error("undecodable message at stream seq %d; skipped", seq)
            self._count_rejected("undecodable")
            return None
        if not provenance_ok(subject, event):
            log.warning(
                "event %s at stream seq %d arrived on a subject its type may not use; refused",
                type(event).__name__,
                seq,
            )
            self._count_rejected("subject")
            return None
        return event

    def _raw_accepted(self, subject: str, data: bytes, seq: int) -> bool:
        """``checked`` for undecoded readers; undecodable payloads go on (the projection skips them itself)."""
        if raw_provenance_ok(subject, data):
            return True
        try:
            _envelope.decode(data)
        except msgspec.DecodeError:
            return True
        log.warning("event at stream seq %d arrived on a subject its type may not use; refused", seq)
        self._count_rejected("subject")
        return False

    def _count_rejected(self, reason: str) -> None:
        if self._rejected is not None:
            self._rejected.labels(reason).inc()

    async def accept(self, msg: Msg) -> ev.AnyEvent | None:
        """``checked`` for an acknowledged delivery: a refused one is terminated, never redelivered."""
        event = self.checked(msg.subject, msg.data, msg.metadata.sequence.stream)
        if event is None:
            await msg.term()
        return event

    async def check_streams(self) -> None:
        """Services only check that the admin declared the streams (they may not declare them)."""
        for name in (self.cfg.events_stream, self.cfg.heartbeats_stream):
            try:
                await self.js.stream_info(name)
            except (nats.js.errors.NotFoundError, nats.errors.TimeoutError) as exc:
                raise StreamsMissing(
                    f"stream {name} is not declared on {self.cfg.url} (or identity "
                    f"{self.identity} may not see it); run `switchyard nats init` "
                    "(admin identity) first"
                ) from exc

    async def ensure_streams(self) -> None:
        for sc in stream_configs(self.cfg):
            try:
                await self.js.add_stream(sc)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(sc)

    async def publish(self, event: ev.Event, timeout: float | None = None) -> PubAck:
        """Record one fact; PubAck.duplicate is True when it was already recorded."""
        if not self.nc.is_connected:
            raise BusUnavailable("not connected to NATS")
        # Only the dedup id: the trace context travels in the event (its traceparent field).
        try:
            return await self.js.publish(
                subject_for(event),
                ev.encode(event),
                timeout=timeout or self.cfg.publish_timeout_s,
                headers={"Nats-Msg-Id": event.event_id},
            )
        except (
            nats.errors.OutboundBufferLimitError,
            nats.errors.ConnectionClosedError,
            nats.js.errors.NoStreamResponseError,
        ) as exc:
            raise BusUnavailable(type(exc).__name__) from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise PublishUncertain("no PubAck before timeout") from exc

    async def publish_many(
        self, events: list[ev.Event], timeout: float | None = None
    ) -> list[PubAck | BusUnavailable | PublishUncertain]:
        """Record many facts pipelined: send them all, then wait for every PubAck.

        One result per event, in order: its PubAck, or the error ``publish``
        would have raised (so the caller can act on exactly the acknowledged ones).
        """
        results = await asyncio.gather(*(self.publish(e, timeout) for e in events), return_exceptions=True)
        out: list[PubAck | BusUnavailable | PublishUncertain] = []
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, (BusUnavailable, PublishUncertain)):
                raise r
            out.append(r)
        return out

    async def pull(self, config: ConsumerConfig, stream: str | None = None) -> JetStreamContext.PullSubscription:
        """Bind a pull subscription to a durable consumer declared here."""
        stream = stream or self.cfg.events_stream
        try:
            await self.js.add_consumer(stream, config)
        except nats.js.errors.BadRequestError:
            log.info("consumer %s exists with other settings; keeping it", config.durable_name)
        return await self.js.pull_subscribe_bind(config.durable_name, stream=stream)

    async def pull_batches(
        self, config: ConsumerConfig, batch: int, stop: asyncio.Event, linger: float = 0.0, fetch_timeout: float = 1.0
    ) -> AsyncGenerator[list[Msg], None]:
        """Pull from a durable consumer until ``stop``: the fetch loop every worker shares.

        Yields each fetched batch, and ``[]`` after a fetch that timed out (nothing
        pending). After a batch that was not full it waits ``linger`` seconds (or
        until ``stop``) before the next pull request: on a trickle each fetch costs
        round trips here and in nats-server. A failed fetch is logged and retried
        after 0.5 s; failing to bind raises, unless ``stop`` is set by then. Use with
        ``contextlib.aclosing`` so the subscription is dropped even when the caller
        leaves early.
        """
        name = config.durable_name or ""
        self.consumers.setdefault(name, False)
        try:
            psub = await self.pull(config)
        except (nats.errors.Error, TimeoutError) as exc:
            if not stop.is_set():
                raise
            log.info("%s: not bound, stopping (%s)", config.durable_name, type(exc).__name__)
            return
        self.consumers[name] = True
        try:
            while not stop.is_set():
                try:
                    msgs = await psub.fetch(batch, timeout=fetch_timeout)
                except TimeoutError:  # nats-py raises its own or asyncio's, by code path
                    yield []
                    continue
                except nats.errors.Error as exc:
                    log.warning("%s: fetch failed: %s", config.durable_name, exc)
                    await asyncio.sleep(0.5)
                    continue
                yield msgs
                if len(msgs) < batch and linger > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), linger)
        finally:
            self.consumers[name] = False
            await _unsubscribe(psub)

    async def replay(
        self,
        subject: str = ">",
        start_seq: int = 1,
        stream: str | None = None,
        idle_timeout: float = 0.5,
        follow: bool = False,
    ) -> AsyncGenerator[Delivered, None]:
        """Read the log in order from ``start_seq``; stop when caught up unless ``follow``."""
        stream = stream or self.cfg.events_stream
        info = await self.js.stream_info(stream)
        if not follow and info.state.last_seq < start_seq:
            return
        sub = await self.js.subscribe(
            subject,
            stream=stream,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)),
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout)
                except TimeoutError:
                    if follow:
                        continue
                    return
                meta = msg.metadata
                event = self.checked(msg.subject, msg.data, meta.sequence.stream)
                if event is None:
                    continue
                yield Delivered(meta.sequence.stream, event, msg)
                if not follow and meta.num_pending == 0:
                    return
        finally:
            await _unsubscribe(sub)

    async def follow_batches(
        self,
        start_seq: int,
        max_batch: int,
        idle_timeout: float,
        stop: asyncio.Event,
        subject: str = ">",
        stream: str | None = None,
        linger: float = 0.2,
        decode: bool = True,
    ) -> AsyncGenerator[list[Delivered], None]:
        """Follow the log from ``start_seq`` in batches.

        A batch ends when full or ``linger`` seconds after its first message:
        a projection pays a transaction per batch, and a live log trickles
        (ending batches at the first 10 ms gap made them a few events each and
        cost the catalog ~2 ms of CPU per event). With ``decode=False`` events
        are left undecoded (``Delivered.event`` is None) for readers that parse
        the raw JSON themselves, such as the SQL projections.

        Messages are taken by a subscription callback into a buffer and this
        generator wakes once per batch: nats-py's ``next_msg`` makes a task, a
        timer and a uuid per message, which was most of a live follower's CPU.
        The buffer holds at most ``max_batch`` messages; beyond that the
        callback waits, nats-py's own pending queue fills, and the ordered
        consumer restarts from the last sequence taken if it overflows.
        """
        stream = stream or self.cfg.events_stream
        buffered: collections.deque[Msg] = collections.deque()
        arrived = asyncio.Event()
        room = asyncio.Event()
        room.set()

        async def take(msg: Msg) -> None:
            while len(buffered) >= max_batch:
                room.clear()
                await room.wait()
            buffered.append(msg)
            arrived.set()

        sub = await self.js.subscribe(
            subject,
            stream=stream,
            cb=take,
            manual_ack=True,
            ordered_consumer=True,
            pending_msgs_limit=max(4 * max_batch, 65536),
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)),
        )
        loop = asyncio.get_running_loop()
        self.followers += 1
        try:
            while not stop.is_set():
                if not buffered:
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), idle_timeout)
                    except TimeoutError:
                        continue
                # Linger from the first message: let the batch fill, unless it is full already.
                due = loop.time() + linger
                while len(buffered) < max_batch and not stop.is_set():
                    arrived.clear()
                    left = due - loop.time()
                    if left <= 0:
                        break
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(arrived.wait(), left)
                batch: list[Delivered] = []
                while buffered and len(batch) < max_batch:
                    msg = buffered.popleft()
                    seq = msg.metadata.sequence.stream
                    if not decode:
                        if self._raw_accepted(msg.subject, msg.data, seq):
                            batch.append(Delivered(seq, None, msg))
                    elif (event := self.checked(msg.subject, msg.data, seq)) is not None:
                        batch.append(Delivered(seq, event, msg))
                room.set()
                if batch:
                    yield batch
        finally:
            self.followers -= 1
            await _unsubscribe(sub)

    async def close(self, timeout: float = 5.0) -> None:
        """Drain (finish in-flight publishes and acks), bounded, and never raise.

        Shutdown must exit 0 whatever the server did: with the server just gone,
        nats-py writes to a transport uvloop already closed (``RuntimeError: ...
        the handler is closed``), and drain refuses while reconnecting. Anything
        unfinished here is redelivered (unacked) or retried (unrecorded).
        """
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout)
            return
        except Exception as exc:  # noqa: BLE001 - shutdown must not fail
            log.info("drain did not finish (%s: %s); closing", type(exc).__name__, exc)
        try:
            await asyncio.wait_for(self.nc.close(), timeout)
        except Exception as exc:  # noqa: BLE001 - shutdown must not fail
            log.debug("close did not finish cleanly (%s: %s)", type(exc).__name__, exc)


async def _unsubscribe(sub: Subscription | JetStreamContext.PullSubscription) -> None:
    """Drop a subscription on the way out; the connection may be gone already (nothing to undo then)."""
    try:
        await sub.unsubscribe()
    except Exception as exc:  # noqa: BLE001 - leaving must not fail
        log.debug("unsubscribe failed (%s: %s)", type(exc).__name__, exc)


async def _log_error(exc: Exception) -> None:
    log.warning("nats error: %s", exc)


async def _log_disconnected() -> None:
    log.warning("nats disconnected")


async def _log_reconnected() -> None:
    log.info("nats reconnected")
