"""Orthanc nodes: the JSON config Switchyard generates for them, and a small REST client.

The client is synchronous (urllib3: a keep-alive pool, basic auth); async
callers use asyncio.to_thread.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError, ProtocolError

from shared.config import NodeConfig


def node_config(
    node: NodeConfig, storage_dir: Path, http_port: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Orthanc config for one node: takes whatever the forwarder sends, unchanged.

    ``overrides`` replaces top-level keys (tests: e.g. a narrower AcceptedTransferSyntaxes).
    """
    return {
        "Name": node.id,
        "StorageDirectory": str(storage_dir),
        "IndexDirectory": str(storage_dir),
        "HttpPort": http_port,
        "DicomPort": node.dicom_port,
        "DicomAet": node.ae_title,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {node.username: node.password},
        "Plugins": [],
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
        "UnknownSopClassAccepted": True,
        "TcpNoDelay": True,
        # Orthanc's default, stated: the probe's REST client keeps its connections.
        "KeepAlive": True,
        "StorageCompression": False,
        "OverwriteInstances": False,
        "HttpDescribeErrors": True,
        "ConcurrentJobs": 2,
        "StableAge": 2,
        "SyncStorageArea": True,
    } | (overrides or {})


class OrthancError(RuntimeError):
    pass


# Connections kept per client: one per concurrent caller (the probe's threads, at most 32).
POOL_SIZE = 32


def _reason(exc: BaseException) -> str:
    """The socket error under urllib3's wrapping (e.g. "[Errno 111] Connection refused"), else its own text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return str(seen) or type(seen).__name__
        nested = [a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)]
        seen = seen.__cause__ or (nested[0] if nested else None) or getattr(seen, "reason", None)
        if not isinstance(seen, BaseException):
            seen = None
    return str(exc) or type(exc).__name__


class OrthancClient:
    """Keep-alive REST client over one urllib3 connection pool per node; thread-safe.

    A new TCP connection per request cost the probe more CPU than the
    requests themselves. Orthanc closes a connection idle for about a second,
    so only callers that come back sooner (the probe's polls) keep theirs;
    urllib3 drops a kept connection it finds closed before using it.
    """

    def __init__(self, node: NodeConfig, timeout: float = 5.0) -> None:
        self.node = node
        self.base = node.rest_url.rstrip("/")
        url = urllib.parse.urlsplit(self.base)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"REST URL {node.rest_url!r} must be http(s)")
        self._prefix = url.path.rstrip("/")
        self.headers = urllib3.make_headers(basic_auth=f"{node.username}:{node.password}")
        self.timeout = timeout
        self._pool = urllib3.connection_from_url(
            self.base,
            maxsize=POOL_SIZE,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            headers=self.headers,
        )

    def close(self) -> None:
        self._pool.close()

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        method = method or ("POST" if data is not None else "GET")
        try:
            try:
                rsp = self._pool.urlopen(method, self._prefix + path, body=data, retries=False)
            except ProtocolError:
                # The node closed a kept connection as the request went out (restart, its
                # keep-alive timeout): once more, on a fresh connection.
                rsp = self._pool.urlopen(method, self._prefix + path, body=data, retries=False)
        except (HTTPError, OSError) as exc:
            raise OrthancError(f"{path}: {_reason(exc)}") from exc
        if rsp.status >= 400:
            raise OrthancError(f"{path}: HTTP {rsp.status}")
        return rsp.data

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def get_bytes(self, path: str) -> bytes:
        return self._request(path)

    def post_json(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return json.loads(self._request(path, data=data, method="POST"))

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/system")
        return result

    def statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/statistics")
        return result

    def pending_jobs(self) -> int:
        jobs = self.get_json("/jobs?expand")
        return sum(1 for j in jobs if j.get("State") in ("Pending", "Running"))

    def instance_id(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, if it holds it."""
        found = self.post_json("/tools/lookup", sop_instance_uid.encode())
        return next((f["ID"] for f in found if f.get("Type") == "Instance"), None)

    def instance_file(self, sop_instance_uid: str) -> bytes | None:
        orthanc_id = self.instance_id(sop_instance_uid)
        return None if orthanc_id is None else self.get_bytes(f"/instances/{orthanc_id}/file")

    def sop_instance_uids(self) -> set[str]:
        """Every SOP Instance UID the node holds (test and demo sized nodes only)."""
        ids = self.get_json("/instances")
        return {self.get_json(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in ids}
