"""Who may associate: calling AE titles bound to addresses, and the server TLS context."""

from __future__ import annotations

import ssl
from types import SimpleNamespace
from typing import cast

import msgspec
import pytest
from pydicom.dataset import Dataset
from pynetdicom.events import Event

from services.probe import qr
from shared.access import Gate, PeerPolicy, server_tls_context
from shared.config import Config, ConfigError, dump_toml, load_config


def test_empty_policy_admits_anyone():
    policy = PeerPolicy.from_config([], [])
    assert policy.open and policy.allows("ANY", "10.0.0.1")


def test_calling_aes_admit_from_any_address():
    policy = PeerPolicy.from_config(["CT1"], [])
    assert policy.allows("CT1", "10.0.0.1") and policy.allows("CT1 ", "127.0.0.1")
    assert not policy.allows("CT2", "10.0.0.1")


def test_peer_bound_to_an_address_is_admitted_only_from_it():
    policy = PeerPolicy.from_config([], ["MR1@10.1.2.3", "US1"])
    assert policy.allows("MR1", "10.1.2.3")
    assert not policy.allows("MR1", "10.1.2.4")
    assert policy.allows("US1", "192.0.2.1")
    assert not policy.allows("CT1", "10.1.2.3")


def test_host_names_resolve_once_at_start():
    policy = PeerPolicy.from_config([], ["MR1@pacs.example"], resolve=lambda host: {"10.9.9.9", "10.9.9.10"})
    assert policy.allows("MR1", "10.9.9.10") and not policy.allows("MR1", "10.9.9.11")


@pytest.mark.parametrize("entry", ["@10.0.0.1", "MR1@", ""])
def test_malformed_entries_are_config_errors(entry):
    with pytest.raises(ValueError):
        PeerPolicy.from_config([], [entry])


def test_tls_is_off_unless_cert_and_key_are_set(pki):
    assert server_tls_context("", "", "", "probe.qr_tls") is None
    with pytest.raises(ValueError, match="probe.qr_tls_cert_file and probe.qr_tls_key_file"):
        server_tls_context(str(pki["server_crt"]), "", "", "probe.qr_tls")


def test_a_ca_file_requires_client_certificates(pki):
    server_only = server_tls_context(str(pki["server_crt"]), str(pki["server_key"]), "", "ingest.tls")
    assert server_only is not None and server_only.verify_mode == ssl.CERT_NONE
    mutual = server_tls_context(str(pki["server_crt"]), str(pki["server_key"]), str(pki["ca"]), "ingest.tls")
    assert mutual is not None and mutual.verify_mode == ssl.CERT_REQUIRED
    assert mutual.minimum_version >= ssl.TLSVersion.TLSv1_2


# ------------------------------------------------------------------ rights and the Q/R front door


def test_rights_are_the_union_of_every_matching_rule():
    policy = PeerPolicy.from_config([], [], entries=[("VIEWER", "", ["find"]), ("VIEWER", "10.0.0.5", ["retrieve"])])
    assert policy.rights("VIEWER", "10.0.0.9") == {"find"}
    assert policy.rights("VIEWER", "10.0.0.5") == {"find", "retrieve"}
    assert policy.rights("OTHER", "10.0.0.5") is None


def test_a_closed_gate_admits_no_one_without_rules_an_open_one_anyone():
    assert Gate(PeerPolicy(), closed=True).admits("ANY", "127.0.0.1") is None
    assert Gate(PeerPolicy(), needs={"1.2": "find"}).admits("ANY", "127.0.0.1") == {"find"}


def test_qr_peers_from_toml_and_the_older_keys_as_find_and_retrieve(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[probe]\nqr_peers = [{ae = "VIEWER", host = "10.0.0.5"},'
        ' {ae = "PACS", rights = ["find", "retrieve"]}]\nqr_allowed_calling_aes = ["OLD"]\n'
    )
    cfg = load_config(path, env={})
    assert [(p.ae, p.host, p.rights) for p in cfg.probe.qr_peers] == [
        ("VIEWER", "10.0.0.5", ["find"]),
        ("PACS", "", ["find", "retrieve"]),
    ]
    policy = qr.peer_policy(cfg)
    assert policy.rights("VIEWER", "10.0.0.5") == {"find"} and policy.rights("VIEWER", "10.0.0.6") is None
    assert policy.rights("PACS", "192.0.2.1") == {"find", "retrieve"}
    assert policy.rights("OLD", "192.0.2.1") == {"find", "retrieve"}
    # The generated config (handed to the services) carries the entries.
    path.write_text(dump_toml(cfg))
    assert load_config(path, env={}).probe.qr_peers == cfg.probe.qr_peers
    env = {"SWITCHYARD_PROBE__QR_PEERS": '[{"ae": "ENV", "rights": ["retrieve"]}]'}
    assert load_config(None, env=env).probe.qr_peers[0].rights == ["retrieve"]


@pytest.mark.parametrize(
    "toml",
    [
        'qr_peers = [{ae = "X", rights = []}]',
        'qr_peers = [{ae = "X", rights = ["store"]}]',
        'qr_peers = [{ae = " "}]',
        'qr_peers = [{ae = "X", hosts = "a"}]',
    ],
)
def test_bad_qr_peers_are_config_errors(tmp_path, toml):
    path = tmp_path / "s.toml"
    path.write_text(f"[probe]\n{toml}\n")
    with pytest.raises(ConfigError):
        load_config(path, env={})


def test_the_default_front_door_is_closed():
    assert qr.peer_policy(Config()).open
    assert Gate(qr.peer_policy(Config()), closed=True).admits("TESTSCU", "127.0.0.1") is None


def _identifier(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("keys", "ok"),
    [
        ({}, False),
        ({"PatientID": ""}, False),
        ({"PatientID": "*"}, False),
        ({"PatientID": "AB*"}, False),
        ({"AccessionNumber": "?"}, False),
        ({"StudyInstanceUID": ""}, False),
        ({"PatientName": "DOE^JOHN"}, False),
        ({"StudyDate": "20200101"}, False),
        ({"PatientID": "P1"}, True),
        ({"AccessionNumber": "A1"}, True),
        ({"StudyInstanceUID": "1.2.3"}, True),
        ({"SeriesInstanceUID": "1.2.3.4"}, True),
        ({"SOPInstanceUID": "1.2.3.4.5"}, True),
        ({"PatientID": "*", "StudyInstanceUID": "1.2.3"}, True),
    ],
)
def test_a_retrieve_must_name_what_it_wants(keys, ok):
    assert qr.identifies(_identifier(**keys)) is ok


def test_retrieve_handlers_refuse_a_peer_without_the_right(tmp_path):
    """Defence in depth behind the context refusal: the handler itself answers 0x0124."""
    policy = PeerPolicy.from_config([], [], entries=[("FINDER", "", ["find"]), ("GETTER", "", ["find", "retrieve"])])
    door = qr.FrontDoor(Config(), store=None, blobs=None, scratch=tmp_path, policy=policy)  # type: ignore[arg-type]

    def event(ae: str, **keys: str) -> Event:
        """The parts of a pynetdicom C-GET event the handler reads."""
        stand_in = SimpleNamespace(
            assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title=ae, address="127.0.0.1")),
            identifier=_identifier(**keys),
        )
        return cast(Event, stand_in)

    gen = door.on_get(event("FINDER", StudyInstanceUID="1.2.3"))
    assert next(gen) == 1
    status, _ = next(gen)
    assert int(status.Status) == qr.NOT_AUTHORIZED == 0x0124
    gen = door.on_get(event("GETTER"))
    assert next(gen) == 1
    status, _ = next(gen)
    assert int(status.Status) == 0xA900 and "StudyInstanceUID" in status.ErrorComment


def test_the_local_stack_opens_the_door_for_its_dev_ae_only_and_says_so():
    import io

    from shared.config import QRPeer
    from switchyard import stack as ls

    out = io.StringIO()
    cfg = ls.open_dev_qr(Config(), out)
    assert [(p.ae, p.host, p.rights) for p in cfg.probe.qr_peers] == [("DEVSCU", "127.0.0.1", ["find", "retrieve"])]
    assert "DEVSCU" in out.getvalue() and "probe.qr_peers" in out.getvalue()
    own = msgspec.structs.replace(Config().probe, qr_peers=[QRPeer(ae="VIEWER")])
    mine = msgspec.structs.replace(Config(), probe=own)
    assert ls.open_dev_qr(mine, io.StringIO()) is mine
