"""Study affinity: which node holds each study, shared by every scheduler replica.

Owns the JetStream KV bucket ``study-affinity`` (keyed by a hash of the study
UID, or of the (pool, study) scope) and a bounded local cache of it. The first
placement of a study is a KV ``create`` (compare-and-set), a move is an
``update`` against the revision read, so two replicas racing on one study
agree on the winner's node; the affinity survives restarts without replaying
the log.

Instances have an entry too (``instance_key``: node and the received event's
stream sequence), created with the first copy's placement: a later received
event for the same SOP Instance UID (a new version, other content) finds it
and goes where the first copy is.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from services.scheduler.routing import DEFAULT_POOL
from shared.bus import AFFINITY_BUCKET, Bus
from shared.config import Config


def study_key(study_uid: str) -> str:
    """KV keys allow few characters: a hash of the study UID (or of an affinity scope)."""
    return "s" + hashlib.blake2b(study_uid.encode(), digest_size=16).hexdigest()


def instance_key(scope: str) -> str:
    """An instance's key (a hash of its SOP Instance UID, or of its (pool, SOP) scope)."""
    return "i" + hashlib.blake2b(scope.encode(), digest_size=16).hexdigest()


def is_default_pool(pool: str) -> bool:
    return pool in ("", DEFAULT_POOL)


def affinity_scope(study_uid: str, pool: str) -> str:
    """Affinity is per (pool, study); the default pool keeps the bare study (existing KV keys)."""
    return study_uid if is_default_pool(pool) else f"{pool}|{study_uid}"


class Affinity:
    """Study -> node, in the KV bucket (shared by replicas), with a local cache."""

    # The KV holds every study; the cache only the recent ones (memory stays bounded).
    CACHE_SIZE = 100_000

    def __init__(self, kv) -> None:
        self.kv = kv
        self.cache: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def _remember(self, study: str, value: tuple[str, int]) -> None:
        self.cache[study] = value
        self.cache.move_to_end(study)
        while len(self.cache) > self.CACHE_SIZE:
            self.cache.popitem(last=False)

    def cached(self, study: str) -> tuple[str, int] | None:
        hit = self.cache.get(study)
        if hit is not None:
            self.cache.move_to_end(study)
        return hit

    async def get(self, study: str) -> tuple[str, int] | None:
        hit = self.cache.get(study)
        if hit is not None:
            self.cache.move_to_end(study)
            return hit
        try:
            entry = await self.kv.get(study_key(study))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        self._remember(study, (entry.value.decode(), entry.revision))
        return self.cache[study]

    async def claim(self, study: str, node_id: str, known: tuple[str, int] | None) -> str:
        """Set the study's node unless another replica got there first; returns the node that holds it."""
        key = study_key(study)
        try:
            if known is None:
                rev = await self.kv.create(key, node_id.encode())
            else:
                rev = await self.kv.update(key, node_id.encode(), last=known[1])
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError, nats.js.errors.APIError):
            self.cache.pop(study, None)
            current = await self.get(study)
            return current[0] if current is not None else node_id
        self._remember(study, (node_id, rev))
        return node_id

    async def claim_instance(self, scope: str, node_id: str, received_seq: int) -> str | None:
        """Record the instance's first copy on ``node_id``; for another received event of the
        same instance (a new version), the node its first copy went to instead (None: first)."""
        key = instance_key(scope)
        value = f"{node_id}|{received_seq}".encode()
        try:
            await self.kv.create(key, value)
            return None
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError, nats.js.errors.APIError):
            pass
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        holder, _, seq = (entry.value or b"").decode().partition("|")
        if not holder or seq == str(received_seq):
            return None  # this received event again (a redelivery): not a new version
        return holder

    async def move_instance(self, scope: str, node_id: str, received_seq: int) -> None:
        """The instance was placed again elsewhere: later versions follow it there."""
        await self.kv.put(instance_key(scope), f"{node_id}|{received_seq}".encode())

    def forget_node(self, node_id: str) -> None:
        """A node went down: re-read its studies from the KV (another replica may move them)."""
        for study in [s for s, (n, _) in self.cache.items() if n == node_id]:
            del self.cache[study]


async def affinity_bucket(bus: Bus, cfg: Config):
    """The KV bucket, created on first use."""
    storage = StorageType.FILE if cfg.nats.storage == "file" else StorageType.MEMORY
    try:
        return await bus.js.key_value(AFFINITY_BUCKET)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        return await bus.js.create_key_value(
            KeyValueConfig(bucket=AFFINITY_BUCKET, history=1, storage=storage, replicas=cfg.nats.replicas)
        )
