"""Orthanc nodes: the JSON config Switchyard generates for them, and a small REST client.

The client is synchronous (stdlib urllib, basic auth); async callers use
asyncio.to_thread. It is all the REST Switchyard needs, so no HTTP library.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
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
        "StorageCompression": False,
        "OverwriteInstances": False,
        "HttpDescribeErrors": True,
        "ConcurrentJobs": 2,
        "StableAge": 2,
        "SyncStorageArea": True,
    } | (overrides or {})


class OrthancError(RuntimeError):
    pass


class OrthancClient:
    def __init__(self, node: NodeConfig, timeout: float = 5.0) -> None:
        self.base = node.rest_url.rstrip("/")
        token = base64.b64encode(f"{node.username}:{node.password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}
        self.timeout = timeout

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        req = urllib.request.Request(self.base + path, data=data, headers=self.headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as rsp:
                return rsp.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{path}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise OrthancError(f"{path}: {getattr(exc, 'reason', exc)}") from exc

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
