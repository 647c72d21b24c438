"""PACS front door: a Query/Retrieve SCP answered from the probe's projection of the log.

C-FIND (Patient Root and Study Root, PATIENT / STUDY / SERIES / IMAGE) is
answered from the ``instances`` table of a CatalogStore the probe keeps in its
own file; C-MOVE (to configured destinations) and C-GET send the blob files as
stored: straight from the file after its meta group
(STORE_SEND_CHUNKED_DATASET), in the transfer syntax they were received in,
so what leaves is byte-identical to what came in.

Handlers run on pynetdicom threads and never raise: bad requests get a DICOM
failure status. Who may associate at all, with which rights, and how many
associations each peer may hold is decided before any of them runs
(shared.access). The door is closed by default: no configured peers, no
association. A C-GET/C-MOVE must name what it retrieves (PatientID,
StudyInstanceUID or AccessionNumber, or a series/instance UID): the archive
is never handed out by one broad request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_context, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from shared.access import Gate, PeerPolicy, bound_reads, defer_tls_handshake, install_policy, server_tls_context
from shared.blobs import BlobStore
from shared.config import Config
from shared.dimse import NODELAY_HANDLER
from shared.readmodel.catalog import CatalogStore

log = logging.getLogger("switchyard.probe.qr")

PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
}
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# Keyword -> instances column, and the level from which it is a key of the answer.
COLUMNS = {
    "PatientID": ("patient_id", "PATIENT"),
    "PatientName": ("patient_name", "PATIENT"),
    "PatientBirthDate": ("patient_birth_date", "PATIENT"),
    "StudyInstanceUID": ("study_instance_uid", "STUDY"),
    "StudyDate": ("study_date", "STUDY"),
    "AccessionNumber": ("accession_number", "STUDY"),
    "StudyDescription": ("study_description", "STUDY"),
    "SeriesInstanceUID": ("series_instance_uid", "SERIES"),
    "Modality": ("modality", "SERIES"),
    "SeriesNumber": ("series_number", "SERIES"),
    "SOPInstanceUID": ("sop_instance_uid", "IMAGE"),
    "SOPClassUID": ("sop_class_uid", "IMAGE"),
    "InstanceNumber": ("instance_number", "IMAGE"),
}
# The unique key of each level: one answer per distinct value.
UNIQUE = {
    "PATIENT": "patient_id",
    "STUDY": "study_instance_uid",
    "SERIES": "series_instance_uid",
    "IMAGE": "sop_instance_uid",
}
UID_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}

# C-FIND / C-MOVE / C-GET failure statuses.
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
MOVE_DESTINATION_UNKNOWN = 0xA801
# PS3.7 C.5 general status "Refused: Not Authorized": the operation is understood
# but this peer may not invoke it; a retry will not help (unlike 0xA7xx, out of resources).
NOT_AUTHORIZED = 0x0124

# Rights (probe.qr_peers) and the SOP classes each one opens.
FIND, RETRIEVE = "find", "retrieve"
NEEDS = {
    PatientRootQueryRetrieveInformationModelFind: FIND,
    StudyRootQueryRetrieveInformationModelFind: FIND,
    PatientRootQueryRetrieveInformationModelGet: RETRIEVE,
    StudyRootQueryRetrieveInformationModelGet: RETRIEVE,
    PatientRootQueryRetrieveInformationModelMove: RETRIEVE,
    StudyRootQueryRetrieveInformationModelMove: RETRIEVE,
}
# A retrieve must name what it wants by one of these (exact value, no wildcard).
IDENTIFYING = ("PatientID", "StudyInstanceUID", "AccessionNumber", "SeriesInstanceUID", "SOPInstanceUID")


class BadQuery(ValueError):
    """The identifier cannot be answered (status and reason for the peer)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def level_of(identifier: Dataset, sop_class: str | None) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise BadQuery(IDENTIFIER_MISMATCH, f"unknown QueryRetrieveLevel {level!r}")
    if level == "PATIENT" and sop_class not in PATIENT_ROOT:
        raise BadQuery(IDENTIFIER_MISMATCH, "PATIENT level is not in the Study Root model")
    return level


def identifies(identifier: Dataset) -> bool:
    """Whether a retrieve names what it wants: a non-empty identifying key without wildcards."""
    for keyword in IDENTIFYING:
        if keyword not in identifier:
            continue
        raw = identifier[keyword].value
        if isinstance(raw, (list, MultiValue)):
            raw = "\\".join(str(v) for v in raw)
        value = "" if raw is None else str(raw).strip()
        if value and not any(c in value for c in "*?"):
            return True
    return False


def refusal(status: int, comment: str) -> Dataset:
    """A failure status with an Error Comment saying why (no patient values in it)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def where_clause(identifier: Dataset, level: str) -> tuple[str, list[str]]:
    """SQL conditions for the matching keys (single value, wildcard, UID list, date range)."""
    conds: list[str] = []
    params: list[str] = []
    depth = LEVELS.index(level)
    for keyword, (column, key_level) in COLUMNS.items():
        if keyword not in identifier or LEVELS.index(key_level) > depth:
            continue
        raw = identifier[keyword].value
        if isinstance(raw, (list, MultiValue)):  # a UID list arrives multi-valued
            raw = "\\".join(str(v) for v in raw)
        value = "" if raw is None else str(raw).strip()
        if not value or value == "*":
            continue
        if keyword in UID_KEYS:
            uids = [u.strip() for u in value.split("\\") if u.strip()]
            conds.append(f"{column} IN ({', '.join('?' * len(uids))})")
            params += uids
        elif keyword in ("StudyDate", "PatientBirthDate") and "-" in value:
            low, _, high = value.partition("-")
            if low:
                conds.append(f"{column} >= ?")
                params.append(low)
            if high:
                conds.append(f"{column} <= ?")
                params.append(high)
        elif "*" in value or "?" in value:
            conds.append(f"{column} LIKE ? ESCAPE '\\'")
            params.append(_like(value))
        else:
            conds.append(f"{column} = ?")
            params.append(value)
    return (" AND ".join(conds) or "TRUE"), params


# Location states in which a node holds the instance (RetrieveAETitle names such nodes).
HELD = ("forwarded", "verified")


def find(store: CatalogStore, identifier: Dataset, level: str) -> list[dict]:
    """One row per distinct unique key of the level, with every column known at that level,
    and ``nodes``: the nodes holding its instances (backslash-separated ids)."""
    where, params = where_clause(identifier, level)
    depth = LEVELS.index(level)
    cols = [c for c, lv in COLUMNS.values() if LEVELS.index(lv) <= depth]
    key = UNIQUE[level]
    select = ", ".join(f"any_value({c}) AS {c}" if c != key else c for c in cols)
    held = ", ".join(f"'{state}'" for state in HELD)
    sql = (
        f"SELECT {select}, string_agg(DISTINCT modality, '\\' ORDER BY modality) AS modalities,"
        " count(*) AS n, string_agg(DISTINCT held.nodes, '\\') AS nodes FROM instances"
        " LEFT JOIN (SELECT sop_instance_uid AS held_sop, string_agg(DISTINCT node_id, '\\') AS nodes"
        f" FROM locations WHERE state IN ({held}) GROUP BY sop_instance_uid) held"
        f" ON held.held_sop = instances.sop_instance_uid WHERE {where} GROUP BY {key} ORDER BY {key}"
    )
    return store.rows(sql, params)


def instances(store: CatalogStore, identifier: Dataset, level: str) -> list[tuple[str, str, str, str]]:
    """(sop uid, sop class, transfer syntax, blob key) of every instance under the matches."""
    where, params = where_clause(identifier, level)
    rows = store.rows(
        "SELECT sop_instance_uid, sop_class_uid, transfer_syntax_uid, blob_key FROM instances"
        f" WHERE {where} ORDER BY study_instance_uid, series_instance_uid, sop_instance_uid",
        params,
    )
    return [tuple(r.values()) for r in rows]


# Character sets an answer may be encoded in (the query's, when it names one of these).
CHARSETS = (
    "ISO_IR 6",
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 144",
    "ISO_IR 148",
    "ISO_IR 192",
)
UTF8 = "ISO_IR 192"


def query_charset(identifier: Dataset) -> str:
    """The query's Specific Character Set when it is one we encode; ``""`` (default repertoire) if none."""
    raw = identifier.get("SpecificCharacterSet", "")
    values = [str(v).strip() for v in raw] if isinstance(raw, (list, MultiValue)) else [str(raw).strip()]
    values = [v for v in values if v]
    if not values:
        return ""
    return values[0] if len(values) == 1 and values[0] in CHARSETS else UTF8


def _fits(text: str, charset: str) -> bool:
    from pydicom.charset import convert_encodings

    try:
        codec = convert_encodings([charset])[0] if charset not in ("", "ISO_IR 6") else "ascii"
        text.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def answer_charset(asked: str, values: list[str]) -> str:
    """The query's character set when every value fits it, else UTF-8 (named in the answer): never ``?``."""
    if all(_fits(v, asked) for v in values):
        return asked
    return UTF8


def answer(
    identifier: Dataset, level: str, row: dict, retrieve_aes: list[str] | None = None, charset: str = ""
) -> Dataset:
    """The requested keys: values we have, empty otherwise; RetrieveAETitle where the instances can be had.

    Text is encoded in the query's character set (set in the answer as 0008,0005), or in
    UTF-8 when a value does not fit it.
    """
    out = Dataset()
    texts: list[str] = []
    for elem in identifier:
        if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if elem.keyword == "RetrieveAETitle":
            out[elem.tag] = DataElement(elem.tag, "AE", list(retrieve_aes or []))
            continue
        if elem.keyword in COLUMNS and COLUMNS[elem.keyword][0] in row:
            value = row[COLUMNS[elem.keyword][0]] or ""
        elif elem.keyword == "ModalitiesInStudy" and level != "IMAGE":
            value = row.get("modalities") or ""
        elif elem.keyword in (
            "NumberOfStudyRelatedInstances",
            "NumberOfSeriesRelatedInstances",
            "NumberOfPatientRelatedInstances",
        ):
            value = str(row.get("n", ""))
        else:
            value = [] if elem.VR == "SQ" else None
        if isinstance(value, str) and value:
            texts.append(value)
        out[elem.tag] = DataElement(elem.tag, elem.VR, value)
    if "RetrieveAETitle" not in identifier and retrieve_aes:
        out.RetrieveAETitle = list(retrieve_aes)  # a return key whether asked or not (PS3.4 C.4.1.1.3.2)
    charset = answer_charset(charset, texts)
    if charset:
        out.SpecificCharacterSet = charset
    out.QueryRetrieveLevel = level
    return out


class BlobInstance(Dataset):
    """Stands in for a dataset in C-MOVE/C-GET: sent from its blob file, never decoded."""

    def __init__(self, sop_uid: str, sop_class: str, transfer_syntax: str, path: Path | None) -> None:
        super().__init__()
        self.SOPInstanceUID = sop_uid
        self.SOPClassUID = sop_class
        self._blob_ts = transfer_syntax
        self._blob_path = path


def _send_blob_files(event: evt.Event) -> None:
    """Make this association send BlobInstances from their file (chunked, as stored)."""
    assoc = event.assoc
    original = assoc.send_c_store

    def send_c_store(dataset, *args, **kwargs):
        if isinstance(dataset, BlobInstance):
            if dataset._blob_path is None:
                # pynetdicom counts the exception as this sub-operation's failure.
                raise FileNotFoundError(f"no blob for {dataset.SOPInstanceUID}")
            as_stored = any(
                cx.abstract_syntax == dataset.SOPClassUID and cx.transfer_syntax[0] == dataset._blob_ts and cx.as_scu
                for cx in assoc.accepted_contexts
            )
            # As stored when the peer accepted that transfer syntax; otherwise decoded, so
            # pynetdicom can convert between the uncompressed little endian syntaxes.
            dataset = dataset._blob_path if as_stored else dcmread(dataset._blob_path)
        return original(dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store  # type: ignore[method-assign]  # pynetdicom has no hook for how it sends


BLOB_SENDER = (evt.EVT_ESTABLISHED, _send_blob_files)


@dataclass
class FrontDoor:
    cfg: Config
    store: CatalogStore
    blobs: BlobStore
    scratch: Path
    policy: PeerPolicy = PeerPolicy()
    # Node id -> its AE title (the live membership when the probe passes it; else the config's nodes).
    node_ae: Callable[[str], str] | None = None

    def retrieve_aes(self, row: dict) -> list[str]:
        """Where the match's instances can be retrieved: this SCP (C-GET/C-MOVE from the blobs), then
        every node holding them."""
        aes = [self.cfg.probe.qr_ae_title]
        for node_id in sorted(set(filter(None, (row.get("nodes") or "").split("\\")))):
            ae = self.node_ae(node_id) if self.node_ae is not None else self._config_ae(node_id)
            if ae and ae not in aes:
                aes.append(ae)
        return aes

    def _config_ae(self, node_id: str) -> str:
        return next((n.ae_title for n in self.cfg.nodes if n.id == node_id), "")

    def may_retrieve(self, event: evt.Event) -> bool:
        """Checked again in the handler: a context opened by mistake still cannot retrieve."""
        req = event.assoc.requestor
        rights = self.policy.rights(str(req.ae_title), req.address)
        return rights is not None and RETRIEVE in rights

    def destination(self, ae_title: str) -> tuple[str, int] | None:
        for entry in self.cfg.probe.move_destinations:
            ae, _, target = entry.partition("@")
            if ae.strip() == ae_title.strip():
                host, _, port = target.rpartition(":")
                return host, int(port)
        return None

    def blob_file(self, blob_key: str) -> Path:
        path = self.blobs.local_path(blob_key)
        if path is not None:
            return path
        return self.blobs.to_scratch_file(blob_key, self.scratch)

    # -- handlers (pynetdicom threads; never raise) ----------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        try:
            identifier = event.identifier
            level = level_of(identifier, event.request.AffectedSOPClassUID)
            charset = query_charset(identifier)
            rows = find(self.store, identifier, level)
        except BadQuery as exc:
            log.info("C-FIND refused: %s", exc)
            yield exc.status, None
            return
        except Exception:  # noqa: BLE001 - a handler answers, it never raises
            log.exception("C-FIND failed")
            yield UNABLE_TO_PROCESS, None
            return
        log.info("C-FIND at %s level: %d matches", level, len(rows))
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            try:
                yield 0xFF00, answer(identifier, level, row, self.retrieve_aes(row), charset)
            except Exception:  # noqa: BLE001 - a handler answers, it never raises
                log.exception("C-FIND answer could not be built")
                yield UNABLE_TO_PROCESS, None
                return

    def _matches(self, event: evt.Event) -> list[tuple[str, str, str, str]]:
        identifier = event.identifier
        return instances(self.store, identifier, level_of(identifier, event.request.AffectedSOPClassUID))

    def _sub_operations(self, event, matches, temps: list[Path]) -> Iterator[tuple[int, Dataset | None]]:
        for sop, sop_class, ts, blob_key in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            try:
                path = self.blob_file(blob_key)
            except Exception as exc:  # noqa: BLE001 - one missing blob fails one sub-operation
                log.warning("blob for %s not readable: %s", sop, exc)
                path = None
            if path is not None and path.parent == self.scratch:
                temps.append(path)
            yield 0xFF00, BlobInstance(sop, sop_class, ts, path)

    def _failure(self, what: str, event: evt.Event) -> tuple[int | Dataset, str] | list:
        """Matches for a retrieve, or (status, reason) when it is refused or cannot be answered."""
        if not self.may_retrieve(event):
            log.warning(
                "%s refused: calling AE %r from %s has no retrieve right",
                what,
                str(event.assoc.requestor.ae_title),
                event.assoc.requestor.address,
            )
            return refusal(NOT_AUTHORIZED, "calling AE not authorized to retrieve"), "not authorized"
        try:
            if not identifies(event.identifier):
                log.info("%s refused: no PatientID, StudyInstanceUID, AccessionNumber or UID", what)
                return refusal(
                    IDENTIFIER_MISMATCH, "retrieve needs PatientID, StudyInstanceUID or AccessionNumber"
                ), "too broad"
            return self._matches(event)
        except BadQuery as exc:
            log.info("%s refused: %s", what, exc)
            return exc.status, str(exc)
        except Exception:  # noqa: BLE001 - a handler answers, it never raises
            log.exception("%s failed", what)
            return UNABLE_TO_PROCESS, "internal error"

    def on_move(self, event: evt.Event):
        dest = self.destination(str(event.move_destination))
        if dest is None:
            log.info("C-MOVE to unknown destination refused")
            yield None, None  # pynetdicom answers 0xA801 Move destination unknown
            return
        matches = self._failure("C-MOVE", event)
        handlers = [NODELAY_HANDLER, BLOB_SENDER]
        if isinstance(matches, tuple):
            # pynetdicom only reports a failure after the destination and one sub-operation.
            yield dest[0], dest[1], {"contexts": [build_context(Verification)], "evt_handlers": handlers}
            yield 1
            yield matches[0], None
            return
        contexts = sorted({(c, ts) for _, c, ts, _ in matches})[:128]
        yield (
            dest[0],
            dest[1],
            {
                "contexts": [build_context(c, ts) for c, ts in contexts] or [build_context(Verification)],
                "evt_handlers": handlers,
            },
        )
        log.info("C-MOVE of %d instances to %s", len(matches), str(event.move_destination).strip())
        yield len(matches)
        yield from self._send(event, matches)

    def on_get(self, event: evt.Event):
        matches = self._failure("C-GET", event)
        if isinstance(matches, tuple):
            yield 1
            yield matches[0], None
            return
        log.info("C-GET of %d instances", len(matches))
        yield len(matches)
        yield from self._send(event, matches)

    def _send(self, event, matches):
        temps: list[Path] = []
        try:
            yield from self._sub_operations(event, matches, temps)
        finally:
            for t in temps:
                t.unlink(missing_ok=True)


def peer_policy(cfg: Config) -> PeerPolicy:
    """probe.qr_peers with their rights; the older allowlists as find + retrieve (their old meaning)."""
    pcfg = cfg.probe
    return PeerPolicy.from_config(
        pcfg.qr_allowed_calling_aes,
        pcfg.qr_allowed_peers,
        rights=frozenset({FIND, RETRIEVE}),
        entries=[(p.ae, p.host, p.rights) for p in pcfg.qr_peers],
    )


def _log_rejection(event: evt.Event) -> None:
    """AE titles and address only: nothing about patients is known at association time."""
    req = event.assoc.requestor
    log.warning(
        "Q/R association rejected: calling AE %r from %s, called AE %r",
        req.ae_title,
        req.address,
        event.assoc.acceptor.ae_title,
    )


def start(
    cfg: Config, store: CatalogStore, blobs: BlobStore, node_ae: Callable[[str], str] | None = None
) -> tuple[ThreadedAssociationServer, FrontDoor]:
    """Start the Q/R SCP (non-blocking). Returns the server (call .shutdown()) and the handlers.

    Peers are admitted as by ingest (shared.access): the calling AE (and
    address) allowlist and the called AE are checked at association, before
    any C-FIND, C-MOVE or C-GET, and TLS is optional.
    """
    pcfg = cfg.probe
    policy = peer_policy(cfg)
    if policy.open:
        log.warning(
            "Q/R front door closed: no probe.qr_peers configured, every association is refused. Open it"
            ' per peer, e.g. probe.qr_peers = [{ae = "VIEWER", host = "10.0.0.5", rights = ["find"]}]'
            ' (rights: "find", "retrieve")'
        )
    else:
        for rule in policy.rules:
            log.info(
                "Q/R peer %r from %s: %s",
                rule.ae,
                ", ".join(sorted(rule.hosts)) or "any address",
                " + ".join(sorted(rule.rights)),
            )
    if pcfg.qr_allowed_calling_aes or pcfg.qr_allowed_peers:
        log.info("probe.qr_allowed_calling_aes / qr_allowed_peers are read as find + retrieve; prefer probe.qr_peers")
    gate = Gate(policy, closed=True, per_peer_limit=pcfg.qr_max_associations_per_peer, needs=NEEDS)
    tls = server_tls_context(pcfg.qr_tls_cert_file, pcfg.qr_tls_key_file, pcfg.qr_tls_ca_file, "probe.qr_tls")
    # The probe sends C-STOREs only from here, so the process-global flag is safe to set.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    scratch = Path(pcfg.catalog_db_path).parent / "probe-qr-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    door = FrontDoor(cfg, store, blobs, scratch, policy, node_ae)
    ae = AE(ae_title=pcfg.qr_ae_title)
    ae.maximum_associations = pcfg.qr_max_associations
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = pcfg.qr_network_timeout_s
    ae.require_called_aet = True  # a wrong called AE: rejected, called-AE-title-not-recognized
    for sop_class in (
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
    ):
        ae.add_supported_context(sop_class)
    ae.add_supported_context(Verification)  # C-ECHO, answered by pynetdicom
    # C-GET sends on the requestor's association: accept its storage contexts in the SCP role.
    # The acceptor picks the first of its own syntaxes the peer proposed: prefer explicit
    # VR little endian, the syntax modalities send most, so most blobs go out as stored.
    syntaxes = [ExplicitVRLittleEndian] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian]
    for cx in StoragePresentationContexts:
        assert cx.abstract_syntax is not None  # (set in every one of pynetdicom's contexts)
        ae.add_supported_context(cx.abstract_syntax, syntaxes, scp_role=True, scu_role=False)
    server = ae.start_server(
        (pcfg.qr_host, pcfg.qr_port),
        block=False,
        ssl_context=tls,
        evt_handlers=[
            NODELAY_HANDLER,
            install_policy(gate),
            bound_reads(pcfg.qr_network_timeout_s),
            (evt.EVT_REJECTED, _log_rejection),
            BLOB_SENDER,
            (evt.EVT_C_FIND, door.on_find),
            (evt.EVT_C_MOVE, door.on_move),
            (evt.EVT_C_GET, door.on_get),
        ],
    )
    assert server is not None  # (block=False returns the server)
    if tls:
        defer_tls_handshake(server, tls, pcfg.qr_network_timeout_s)
    return server, door
