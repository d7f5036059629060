"""Patient data never echoed by the libraries under the service: a database error does not
carry the statement's parameters (a patient's ID, an accession number), and pydicom's read
validation and highdicom's name check do not warn with a birth date or a name.
SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pydicom
import pydicom.config
import pytest
import sqlalchemy as sa
from pydicom.dataelem import DataElement

from screener.db.session import get_engine
from screener.logging_setup import configure_logging
from screener.reports.writer import write_study_outputs
from screener.settings import Settings
from tests.report_results import make_result

SECRET_ID = "MRN-SECRET-4711"
BIRTH_DATE = "1971-03-14"  # a legacy form: DA does not allow it
NAME = "DOE JANE"  # no caret: highdicom's check warned with it


def test_a_database_error_does_not_carry_the_statement_parameters(db_url: str) -> None:
    """The listener logs a failed record_instance at ERROR with the exception's text;
    SQLAlchemy appended ``[parameters: (..., 'MRN-SECRET-4711', ...)]`` to it, and
    PostgreSQL's DETAIL quotes the refused key (``Key (patient_id)=(MRN-SECRET-4711)``)."""
    engine = get_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE privacy_probe (patient_id VARCHAR(64) UNIQUE)"))
        conn.execute(sa.text("INSERT INTO privacy_probe VALUES (:p)"), {"p": SECRET_ID})
    with pytest.raises(sa.exc.IntegrityError) as caught, engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO privacy_probe VALUES (:p)"), {"p": SECRET_ID})
    assert SECRET_ID not in str(caught.value)
    assert SECRET_ID not in str(caught.value.orig)  # printed as the cause in a traceback
    assert "hidden due to hide_parameters" in str(caught.value)


def test_report_writing_echoes_no_birth_date_or_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        pydicom.config.settings,
        "reading_validation_mode",
        pydicom.config.settings.reading_validation_mode,  # restored afterwards
    )
    result, sources = make_result(tmp_path, ["PA"], scores=[0.7])
    ds = pydicom.dcmread(sources[0])
    ds["PatientBirthDate"] = DataElement(0x00100030, "DA", BIRTH_DATE)
    ds.PatientName = NAME
    ds.ReferringPhysicianName = "DR SMITH"
    ds.save_as(sources[0], enforce_file_format=True)
    settings = Settings(data_dir=tmp_path / "data")
    caplog.clear()  # the source's own writing warned above; only report writing counts

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_logging("INFO")  # as every service process does
        with caplog.at_level(logging.DEBUG):
            paths = write_study_outputs(result, tmp_path / "out", settings)

    assert sorted(p.name.split("_", 1)[0] for p in paths) == ["sc", "sr"]
    echoed = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for value in (BIRTH_DATE, NAME, "DR SMITH"):
        assert not [text for text in echoed if value in text], value
    assert str(pydicom.dcmread(paths[0]).PatientName) == NAME  # the outputs still carry it
