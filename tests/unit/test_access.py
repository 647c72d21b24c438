"""Who may associate: calling AE titles bound to addresses, and the server TLS context."""

from __future__ import annotations

import ssl

import pytest

from shared.access import PeerPolicy, server_tls_context


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
