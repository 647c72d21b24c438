"""Pure logic of the shared package: config, events, subjects, DICOM file reading."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from shared import events as ev
from shared.blobs import content_key
from shared.bus import subject_for, subject_placed
from shared.config import ConfigError, dump_toml, load_config
from shared.dicomfile import NotDicom, dataset_bytes_digest, dataset_offset, meta_sop_and_digest, read_header


def test_defaults_run_locally():
    cfg = load_config(env={})
    assert cfg.ingest.port == 11112 and cfg.ingest.ae_title == "SWITCHYARD"
    assert [n.dicom_port for n in cfg.nodes] == [4242, 4243, 4244]
    assert [n.rest_url for n in cfg.nodes] == [f"http://127.0.0.1:{p}" for p in (8042, 8043, 8044)]


def test_file_then_environment(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[ingest]\nport = 2000\nae_title = "FROMFILE"\n[[nodes]]\nid = "a"\n')
    cfg = load_config(path, env={"SWITCHYARD_INGEST__PORT": "3000"})
    assert cfg.ingest.port == 3000 and cfg.ingest.ae_title == "FROMFILE"
    assert [n.id for n in cfg.nodes] == ["a"]
    cfg = load_config(env={"SWITCHYARD_NODES": '[{"id": "x", "dicom_port": 5000, "password": "1234"}]'})
    assert cfg.nodes[0].dicom_port == 5000 and cfg.nodes[0].password == "1234"
    cfg = load_config(
        env={
            "SWITCHYARD_CATALOG__TOKEN": "12345678",
            "SWITCHYARD_BLOBS__S3_SECURE": "true",
            "SWITCHYARD_INGEST__ALLOWED_CALLING_AES": '["CT1", "MR2"]',
        }
    )
    assert cfg.catalog.token == "12345678" and cfg.blobs.s3_secure is True
    assert cfg.ingest.allowed_calling_aes == ["CT1", "MR2"]


@pytest.mark.parametrize(
    "env",
    [
        {"SWITCHYARD_INGEST__PORT": "not-a-port"},
        {"SWITCHYARD_NOPE__X": "1"},
        {"SWITCHYARD_INGEST__NO_SUCH_FIELD": "1"},
    ],
)
def test_bad_config_is_a_clear_error(env):
    with pytest.raises(ConfigError):
        load_config(env=env)


def test_dump_toml_round_trips(tmp_path):
    cfg = load_config(env={"SWITCHYARD_CATALOG__TOKEN": 'with "quotes"'})
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path, env={}) == cfg


def test_nats_servers_of_a_cluster(tmp_path):
    """url first, then the other members, once each; from the environment (JSON) and through TOML."""
    cfg = load_config(
        env={
            "SWITCHYARD_NATS__URL": "nats://a:4222",
            "SWITCHYARD_NATS__SERVERS": '["nats://b:4222", "nats://a:4222", "nats://c:4222"]',
            "SWITCHYARD_NATS__REPLICAS": "3",
        }
    )
    assert cfg.nats.server_urls() == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert cfg.nats.replicas == 3
    assert load_config(env={}).nats.server_urls() == ["nats://127.0.0.1:4222"]
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path, env={}).nats.server_urls() == cfg.nats.server_urls()


def test_fact_ids_are_deterministic():
    assert ev.fact_id("received", "1.2.3", "abc") == ev.fact_id("received", "1.2.3", "abc")
    assert ev.fact_id("received", "1.2.3", "abc") != ev.fact_id("received", "1.2.3", "abd")


def test_events_round_trip_through_one_decoder():
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    placed = ev.InstancePlacedV1(
        event_id="e1",
        occurred_at=at,
        sop_instance_uid="1.2",
        study_instance_uid="1.3",
        sop_class_uid="1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key="k",
        dataset_digest="d",
        node_id="node1",
        reason=ev.PlacementReason.NEW_STUDY,
        candidates=[ev.Candidate("node1", 0.5)],
    )
    decoded = ev.decode(ev.encode(placed))
    assert decoded == placed and isinstance(decoded, ev.InstancePlacedV1)
    assert b'"type":"instance.placed.v1"' in ev.encode(placed)


def test_old_payloads_without_new_fields_still_decode():
    raw = b'{"type":"node.heartbeat.v1","event_id":"x","occurred_at":"2026-01-01T00:00:00Z","node_id":"n","up":true}'
    hb = ev.decode(raw)
    assert isinstance(hb, ev.NodeHeartbeatV1)
    assert hb.up and hb.pending_jobs == 0 and hb.rtt_ms is None


def test_subjects_carry_node_ids_never_uids():
    hb = ev.NodeHeartbeatV1(event_id="x", node_id="node-2", up=True)
    assert subject_for(hb) == "node.heartbeat.node-2"
    with pytest.raises(ValueError):
        subject_placed("1.2.840.113619")
    received = ev.InstanceReceivedV1(
        event_id="x",
        sop_instance_uid="1.2.3",
        sop_class_uid="1",
        study_instance_uid="1.2",
        series_instance_uid="1.2.4",
        transfer_syntax_uid="1",
        blob_key="k",
        size=1,
        dataset_digest="d",
    )
    assert "1.2.3" not in subject_for(received)


def ct_small() -> str:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    return path


def test_dataset_offset_and_digest_match_pydicom():
    path = ct_small()
    data = open(path, "rb").read()
    with open(path, "rb") as f:
        offset = dataset_offset(f)
    # The dataset starts right after group 0002, with its first element, group 0008.
    assert data[offset : offset + 2] == b"\x08\x00"
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert dataset_bytes_digest(data) == hashlib.sha256(data[offset:]).hexdigest()
    # The probe learns a node's instance from its file meta (no tags lookup).
    assert meta_sop_and_digest(data) == (pydicom.dcmread(path).SOPInstanceUID, dataset_bytes_digest(data))
    whole = hashlib.sha256(data).hexdigest()
    assert content_key(whole).endswith(whole)


def test_read_header_reads_tags_not_pixels(tmp_path):
    header = read_header(Path(ct_small()), ("Manufacturer",))
    assert header.get("Modality") == "CT"
    assert header.get("SOPInstanceUID").startswith("1.3.6.1.4.1.5962")
    assert "Manufacturer" in header.values and "PixelData" not in header.values
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(NotDicom):
        read_header(junk)
    with pytest.raises(NotDicom), open(tmp_path / "x", "wb+") as f:
        f.write(b"not dicom at all" * 20)
        f.seek(0)
        dataset_offset(f)


def test_read_header_decodes_with_the_files_character_set(tmp_path):
    """Only wanted tags are kept, but Specific Character Set still governs their decoding."""
    ds = pydicom.dcmread(ct_small())
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Zoë"
    ds.Manufacturer = "Ångström"
    path = tmp_path / "latin1.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert "Müller".encode("latin-1") in path.read_bytes()
    header = read_header(path, ("Manufacturer", "NoSuchKeyword"))
    assert header.get("PatientName") == "Müller^Zoë"
    assert header.get("Manufacturer") == "Ångström"
    assert "NoSuchKeyword" not in header.values
