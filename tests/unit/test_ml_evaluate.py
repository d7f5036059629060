"""`screener evaluate` accounts for every label (review #10, #11, #12): labelled images of a
study that failed are counted and the command exits 1 (as `screen` does), labels that match
no image are counted, an empty label is left out (unknown, not negative), and the report
says which threshold it measured at. Real models on the bundled demo studies."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pydicom
import pytest

from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR
from screener.offline_evaluation import read_label_file, read_labels
from tests.cli_support import Cli, in_process_cli

pytestmark = pytest.mark.skipif(
    not (SHIPPED_WEIGHTS_DIR / MANIFEST_NAME).exists(), reason="no shipped weights"
)
DEMO = Path(__file__).resolve().parents[2] / "screener" / "demo_data"
BROKEN = "2.25.270418300000000000003.1"  # its study fails: pixel data cut short
LABELS = {
    "2.25.270418300000000000001.1": "normal",
    "2.25.270418300000000000002.1": "pneumonia",
    BROKEN: "covid",
    "2.25.270418300000000000004.1": "covid",
    "2.25.270418300000000000005.2": "normal",
}


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    return in_process_cli(capsys, monkeypatch, tmp_path)


def _studies(tmp_path: Path, broken: bool) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted(DEMO.glob("*.dcm")):
        if broken and path.stem == BROKEN:
            ds = pydicom.dcmread(path)
            ds.PixelData = ds.PixelData[:100]
            ds.save_as(folder / path.name)
        else:
            (folder / path.name).symlink_to(path)
    return folder


def _labels(tmp_path: Path, labels: dict[str, str]) -> Path:
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sop_instance_uid", "label"])
        writer.writerows(labels.items())
    return path


def test_a_failed_study_and_unmatched_labels_are_counted_and_exit_1(
    cli: Cli, tmp_path: Path
) -> None:
    folder = _studies(tmp_path, broken=True)
    labels = _labels(tmp_path, LABELS | {"1.2.3.4.5": "covid"})  # in none of the files
    done = cli("evaluate", "--labels", str(labels), str(folder), "--json")
    assert done.code == 1, done.err  # a study failed (README, "Exit codes"), as for `screen`
    report = json.loads(done.out)
    assert report["n"] == 4 and report["n_labelled"] == 6 and report["n_not_scored"] == 2
    assert report["not_scored"] == {"study_failed": 1, "not_screened": 0, "not_found": 1}
    (failed,) = report["failed_studies"]
    assert failed["study_instance_uid"] == "2.25.270418300000000000003" and failed["reason"]
    assert "2.25.270418300000000000003 failed" in done.err
    text = cli("evaluate", "--labels", str(labels), str(folder))
    assert text.code == 1
    assert "2 of 6 labelled images not in the metrics: 1 study failed, 1 not found" in text.out


def test_an_empty_label_is_left_out_not_counted_negative(cli: Cli, tmp_path: Path) -> None:
    folder = _studies(tmp_path, broken=False)
    labels = _labels(tmp_path, LABELS | {"2.25.270418300000000000004.1": ""})
    done = cli("evaluate", "--labels", str(labels), str(folder), "--json")
    assert done.code == 0, done.err
    report = json.loads(done.out)
    assert report["n"] == 4 and report["n_positive"] == 1 and report["n_negative"] == 3
    assert report["n_blank_labels"] == 1 and report["n_not_scored"] == 0
    assert "1 row(s) with an empty label left out" in done.err


def test_read_labels_drops_and_counts_empty_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "l.csv"
    path.write_text("sop_instance_uid,label\n1.1,covid\n1.2,\n1.3,  \n1.4,Normal\n")
    labels = read_label_file(path)
    assert set(labels.rows) == {"1.1", "1.4"} and labels.blank == 2
    with caplog.at_level(logging.WARNING):
        assert set(read_labels(path)) == {"1.1", "1.4"}  # what `threshold tune` reads
    assert "2 row(s) with an empty label" in caplog.text


def test_the_report_says_which_threshold_it_measured_at(cli: Cli, tmp_path: Path) -> None:
    from screener.settings import Settings
    from screener.thresholds import embedded_info

    folder = _studies(tmp_path, broken=False)
    labels = _labels(tmp_path, LABELS)
    helped = cli("evaluate", "--help")
    assert "active threshold" not in helped.out and "embedded" in helped.out
    report = json.loads(cli("evaluate", "--labels", str(labels), str(folder), "--json").out)
    embedded = embedded_info(Settings(), report["scheme"])
    assert report["threshold_source"] == "embedded"
    assert report["threshold"] == embedded.value
    assert report["operating_point"] == embedded.operating_point
    given = cli("evaluate", "--labels", str(labels), str(folder), "--json", "--threshold", "0.5")
    report = json.loads(given.out)
    assert report["threshold"] == 0.5 and report["threshold_source"] == "command_line"
    assert report["operating_point"] == "given on the command line"


def test_threshold_tune_with_a_failed_study_is_not_applied(cli: Cli, tmp_path: Path) -> None:
    """`threshold tune --apply` set a threshold tuned without the images of a study that
    failed (it read only the scored ones); now it says which failed and applies nothing."""
    assert cli("db", "upgrade").code == 0  # `threshold` never creates the database
    folder = _studies(tmp_path, broken=True)
    labels = _labels(tmp_path, LABELS)
    args = ["threshold", "tune", str(folder), "--labels", str(labels)]
    args += ["--target-sensitivity", "0.5", "--plots", str(tmp_path / "plots"), "--json"]
    done = cli(*args, "--apply", "--reason", "validation subset")
    assert done.code == 1, done.err
    proposal = json.loads(done.out)
    assert proposal["not_scored"] == {"study_failed": 1, "not_screened": 0, "not_found": 0}
    (failed,) = proposal["failed_studies"]
    assert failed["study_instance_uid"] == "2.25.270418300000000000003" and failed["reason"]
    assert "is not applied" in done.err
    shown = cli("threshold", "show", "--json")
    assert json.loads(shown.out)["version"] == 0  # nothing was set

    (tmp_path / "whole").mkdir()
    whole = _studies(tmp_path / "whole", broken=False)
    done = cli("threshold", "tune", str(whole), "--labels", str(labels), "--json")
    assert done.code == 0, done.err
    assert json.loads(done.out)["failed_studies"] == []
