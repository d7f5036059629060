"""Golden tests for public contracts a refactor must never change by accident.

Output UIDs: a PACS already holds objects under them; re-minting them would resend every
result as a new object. The values below were produced by the 0.1.0 derivation.
"""

from __future__ import annotations

from pathlib import Path

from screener.reports.output_uids import OutputUids, derive_uid
from screener.results import ImageResult, ModelInfo, SourceImageRef, StudyResult, ThresholdInfo

IDENTITY = OutputUids(
    study_instance_uid="1.2.3.4",
    source_sop_instance_uids=("1.2.3.4.1", "1.2.3.4.2"),
    model_ref="cxr-covid-effnetlite0@1.3.0",
    threshold_version=0,
    threshold_value=0.1237,
)


def test_output_uids_are_never_re_minted() -> None:
    assert IDENTITY.sr_series == "2.25.217180747931773066174516090546113662295"
    assert IDENTITY.sr_instance == "2.25.211517784001406051287506959511238009621"
    assert IDENTITY.sc_series == "2.25.178562819381638796362680240501347344928"
    assert IDENTITY.sc_instance("1.2.3.4.1") == "2.25.134339948084977396346958775914820852949"
    assert IDENTITY.pmap_series == "2.25.151131032608050293106018694008988775398"
    assert IDENTITY.pmap_instance("1.2.3.4.1") == "2.25.291806402225926858779752481641454160746"
    assert (
        IDENTITY.pmap_frame_of_reference("1.2.3.4.1")
        == "2.25.135331652598824857134779668869872725889"
    )
    assert (
        IDENTITY.tracking_uid("1.2.3.4.1", "covid")
        == "2.25.175995982739242340480932334379904856628"
    )


def test_another_scheme_never_takes_the_production_schemes_uids() -> None:
    """A site that switches ``model.scheme`` (another classifier of the same version) gets
    new UIDs for the other scheme's results; the production scheme's stay as they were
    (the golden ones above), also for results stored before the production scheme was
    recorded with them."""

    def identity(scheme: str, production: str) -> OutputUids:
        model = ModelInfo(
            "cxr-covid-effnetlite0", "1.3.0", scheme=scheme, production_scheme=production
        )
        images = [
            ImageResult(
                SourceImageRef(
                    uid, "1.2.840.10008.5.1.4.1.1.1", "1.2.3.9", IDENTITY.study_instance_uid
                )
            )
            for uid in IDENTITY.source_sop_instance_uids
        ]
        result = StudyResult(IDENTITY.study_instance_uid, model, ThresholdInfo(0.1237), images)
        return OutputUids.for_result(result)

    assert identity("crop", "crop") == IDENTITY
    assert identity("crop", "") == IDENTITY  # stored by an older version: no scheme known
    other = identity("segment", "crop")
    assert other.model_ref == "cxr-covid-effnetlite0@1.3.0/segment"
    assert other.sr_instance != IDENTITY.sr_instance


def test_uid_derivation_depends_on_every_part_of_the_identity() -> None:
    base = derive_uid("a", "b")
    assert base.startswith("2.25.") and len(base) <= 64
    assert derive_uid("a", "b") == base
    assert derive_uid("a", "c") != base and derive_uid("ab") != base


# The database schema after every migration: tables and their columns. A column that
# disappears or is renamed breaks the operators' queries, dashboards and older workers
# during a rolling upgrade; change this list only together with a migration.
SCHEMA: dict[str, list[str]] = {
    "alembic_version": ["version_num"],
    "audit_log": ["action", "actor", "at", "detail", "id", "job_id", "study_instance_uid"],
    "deliveries": [
        "attempts",
        "created_at",
        "delivered_at",
        "destination",
        "first_attempt_at",
        "id",
        "last_error",
        "next_attempt_at",
        "output_id",
        "state",
        "updated_at",
    ],
    "destination_health": [
        "consecutive_failures",
        "down_since",
        "last_error",
        "last_failure_at",
        "last_success_at",
        "name",
        "next_probe_at",
        "probe_started_at",
        "state",
        "updated_at",
    ],
    "image_results": [
        "covid",
        "covid_positive",
        "heatmap_lung_fraction",
        "id",
        "job_id",
        "normal",
        "pneumonia",
        "screened",
        "skip_reason",
        "sop_instance_uid",
        "view",
        "view_source",
    ],
    "infer_results": ["job_id", "payload", "written_at"],
    "instances": [
        "body_part_examined",
        "calling_ae_title",
        "content_digest",
        "file_path",
        "id",
        "image_laterality",
        "is_own_output",
        "modality",
        "photometric_interpretation",
        "received_at",
        "series_id",
        "size_bytes",
        "skip_reason",
        "sop_class_uid",
        "sop_instance_uid",
        "source_address",
        "study_id",
        "transfer_syntax_uid",
        "version",
        "view_position",
    ],
    "output_objects": [
        "created_at",
        "file_path",
        "id",
        "job_id",
        "kind",
        "pruned_at",
        "series_instance_uid",
        "sop_class_uid",
        "sop_instance_uid",
        "study_instance_uid",
    ],
    "process_heartbeats": ["beat_at", "host", "kind", "name", "pid", "queues", "started_at"],
    "screening_jobs": [
        "attempts",
        "created_at",
        "dispatched_at",
        "id",
        "model_name",
        "model_version",
        "reason",
        "result",
        "scheme",
        "state",
        "study_id",
        "supersedes_job_id",
        "threshold_value",
        "threshold_version",
        "trigger",
        "updated_at",
    ],
    "series": ["id", "modality", "series_description", "series_instance_uid", "study_id"],
    "stage_timings": ["finished_at", "id", "job_id", "seconds", "stage"],
    "studies": [
        "accession_number",
        "completed_at",
        "first_received_at",
        "id",
        "instance_count",
        "is_complete",
        "last_received_at",
        "own_output_only",
        "patient_id",
        "study_date",
        "study_instance_uid",
    ],
    "threshold_versions": [
        "created_at",
        "is_active",
        "model_name",
        "model_version",
        "operating_point",
        "reason",
        "set_by",
        "target_sensitivity",
        "value",
        "version",
    ],
    "users": ["created_at", "id", "last_login_at", "name", "password_hash", "role"],
    "web_sessions": ["created_at", "id", "last_seen_at", "user_id"],
}


def test_database_schema_after_all_migrations(db_url: str) -> None:
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    import screener.db.models  # noqa: F401 - registers the tables
    from screener.db.session import get_engine, upgrade

    upgrade(db_url)
    engine = get_engine(db_url)
    inspector = sa.inspect(engine)
    found = {
        table: sorted(c["name"] for c in inspector.get_columns(table))
        for table in sorted(inspector.get_table_names())
    }
    assert found == SCHEMA
    with engine.connect() as connection:  # the migrations build exactly what the models say
        assert compare_metadata(MigrationContext.configure(connection), SQLModel.metadata) == []


# The JSONL keys of `screener screen --format jsonl`: scripts and LIMS imports read them.
STUDY_KEYS = {
    "study_instance_uid",
    "status",
    "reason",
    "model",
    "threshold",
    "threshold_version",
    "operating_point",
    "probability_calibration",
    "disclaimer",
    "study_covid_score",
    "study_covid_positive",
    "images",
    "ignored_objects",
    "outputs",
}
IMAGE_KEYS = {
    "sop_instance_uid",
    "view",
    "view_source",
    "screened",
    "skip_reason",
    "probabilities",
    "covid_positive",
    "heatmap_lung_fraction",
}


def test_jsonl_keys_of_a_real_screening(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from screener.cli import app
    from screener.demo import bundled_studies

    study = bundled_studies()[0]
    done = CliRunner().invoke(
        app, ["screen", *map(str, study.files), "--out", str(tmp_path), "--format", "jsonl"]
    )
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, done.output
    for row in rows:
        assert set(row) == STUDY_KEYS
        assert row["probability_calibration"], "the JSONL says what its probabilities are"
        for image in row["images"]:
            assert set(image) == IMAGE_KEYS
            assert set(image["probabilities"] or {"covid", "pneumonia", "normal"}) == {
                "covid",
                "pneumonia",
                "normal",
            }
