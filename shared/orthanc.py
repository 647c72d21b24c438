"""Orthanc nodes: the JSON config Switchyard generates for them, and a small REST client.

The client is synchronous (stdlib http.client, keep-alive, basic auth); async
callers use asyncio.to_thread. It is all the REST Switchyard needs, so no HTTP
library.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from shared.config import NodeConfig


def node_config(node: NodeConfig, storage_dir: Path, http_port: int,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
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


# A reused keep-alive connection the node has closed fails like this before any response.
_STALE = (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError,
          ConnectionAbortedError, BrokenPipeError)


def _closed_while_idle(conn: http.client.HTTPConnection) -> bool:
    """An idle kept connection with anything to read has been closed by the node (poll: no fd limit)."""
    if conn.sock is None:
        return True
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0))


class OrthancClient:
    """Keep-alive REST client: a small pool of persistent connections, one per concurrent caller.

    A new TCP connection per request (urllib) cost the probe more CPU than the
    requests themselves. Orthanc closes a connection idle for about a second,
    so only callers that come back sooner (the probe's polls) keep theirs.
    Thread-safe: each request takes an idle connection (or opens one) and puts
    it back when the response was read in full.
    """

    def __init__(self, node: NodeConfig, timeout: float = 5.0) -> None:
        self.node = node
        self.base = node.rest_url.rstrip("/")
        url = urllib.parse.urlsplit(self.base)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"REST URL {node.rest_url!r} must be http(s)")
        self._conn_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._prefix = url.hostname or "", url.port, url.path.rstrip("/")
        token = base64.b64encode(f"{node.username}:{node.password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}
        self.timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        method = method or ("POST" if data is not None else "GET")
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None and _closed_while_idle(conn):
            # Readable while idle: the node closed it (Orthanc drops a connection idle for ~1 s).
            conn.close()
            conn = None
        try:
            if conn is not None:
                try:
                    status, body, keep = self._exchange(conn, method, path, data)
                except _STALE:
                    # The node closed the idle connection (restart, its keep-alive timeout): once more, fresh.
                    conn.close()
                    conn = None
            if conn is None:
                conn = self._conn_class(self._host, self._port, timeout=self.timeout)
                status, body, keep = self._exchange(conn, method, path, data)
        except (OSError, http.client.HTTPException) as exc:
            if conn is not None:
                conn.close()
            raise OrthancError(f"{path}: {exc or type(exc).__name__}") from exc
        if keep:
            with self._lock:
                self._idle.append(conn)
        else:
            conn.close()
        if status >= 400:
            raise OrthancError(f"{path}: HTTP {status}")
        return body

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str,
                  data: bytes | None) -> tuple[int, bytes, bool]:
        conn.request(method, self._prefix + path, body=data, headers=self.headers)
        rsp = conn.getresponse()
        body = rsp.read()
        return rsp.status, body, not rsp.will_close

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def get_bytes(self, path: str) -> bytes:
        return self._request(path)

    def post_json(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return json.loads(self._request(path, data=data, method="POST"))

    def system(self) -> dict:
        return self.get_json("/system")

    def statistics(self) -> dict:
        return self.get_json("/statistics")

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
