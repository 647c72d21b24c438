"""Query matching of the front door: levels, models, wildcards, ranges, UID lists."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from services.probe.qr import (
    IDENTIFIER_MISMATCH,
    BadQuery,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    level_of,
    where_clause,
)


def ident(**keys) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_levels_and_models():
    assert level_of(ident(QueryRetrieveLevel="PATIENT"), PatientRootQueryRetrieveInformationModelFind) == "PATIENT"
    assert level_of(ident(QueryRetrieveLevel="IMAGE"), StudyRootQueryRetrieveInformationModelFind) == "IMAGE"
    for bad, model in (
        ("FOO", PatientRootQueryRetrieveInformationModelFind),
        ("PATIENT", StudyRootQueryRetrieveInformationModelFind),
    ):
        with pytest.raises(BadQuery) as exc:
            level_of(ident(QueryRetrieveLevel=bad), model)
        assert exc.value.status == IDENTIFIER_MISMATCH
    with pytest.raises(BadQuery):
        level_of(ident(PatientID="x"), PatientRootQueryRetrieveInformationModelFind)


def test_matching_keys_become_parameterised_conditions():
    sql, params = where_clause(
        ident(
            PatientName="DOE^J*",
            StudyDate="20240101-20240131",
            Modality="CT",
            StudyInstanceUID=["1.2", "1.3"],
            AccessionNumber="",
        ),
        "SERIES",
    )
    assert "patient_name LIKE ?" in sql and "DOE^J%" in params
    assert "study_date >= ?" in sql and "study_date <= ?" in sql and "20240101" in params and "20240131" in params
    assert "modality = ?" in sql and "CT" in params
    assert "study_instance_uid IN (?, ?)" in sql and params[-2:] != ["1.2"]
    assert "accession_number" not in sql  # empty: a return key, not a matching key


def test_keys_below_the_level_do_not_match_and_sql_wildcards_are_escaped():
    sql, params = where_clause(ident(SOPInstanceUID="1.2.3", PatientID="A_B%"), "STUDY")
    assert "sop_instance_uid" not in sql
    assert params == ["A_B%"] and "patient_id = ?" in sql
    sql, params = where_clause(ident(PatientID="A_B*"), "PATIENT")
    assert params == ["A\\_B%"]


def test_prometheus_text_parsing_keeps_plain_samples():
    from services.probe.health import parse_prometheus

    text = '# HELP x\northanc_count_instances 12 1795319964864\nfoo{a="b"} 3\nbad line\nup 1\nnan_one x\n'
    assert parse_prometheus(text) == {"orthanc_count_instances": 12.0, "up": 1.0}


def test_answers_take_the_query_character_set_or_utf8_when_a_value_does_not_fit():
    from services.probe.qr import answer, query_charset

    assert query_charset(ident()) == ""
    assert query_charset(ident(SpecificCharacterSet="ISO_IR 100")) == "ISO_IR 100"
    assert query_charset(ident(SpecificCharacterSet=["", "ISO 2022 IR 87"])) == "ISO_IR 192"
    q = ident(QueryRetrieveLevel="STUDY", PatientName="", StudyInstanceUID="", RetrieveAETitle="")
    row = {"patient_name": "Müller^Jürgen", "study_instance_uid": "1.2.3"}
    out = answer(q, "STUDY", row, ["SWITCHYARD_QR", "NODE2"], "ISO_IR 100")
    assert out.SpecificCharacterSet == "ISO_IR 100" and list(out.RetrieveAETitle) == ["SWITCHYARD_QR", "NODE2"]
    assert answer(q, "STUDY", {**row, "patient_name": "Иванов"}, [], "ISO_IR 100").SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in answer(q, "STUDY", {**row, "patient_name": "Smith"}, [], "")
