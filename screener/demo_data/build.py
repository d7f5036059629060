"""Rebuild the bundled demo studies from the corpus (a maintainer tool; needs ../shared).

Only images whose licence allows redistribution are used: NIH ChestX-ray14 (via
``muhammedtalo/COVID-19``; unrestricted use, attribution requested) and CC BY 3.0 images
(Hannover Medical School via ``ml-workgroup/covid-19-image-repository``, and ieee8023 rows
marked CC BY 3.0). The corpus holds no lateral view under such a licence (all 46 are
CC BY-NC-SA or unspecified), so the "awkward" study pairs a frontal image whose
ViewPosition wrongly says LATERAL with one that has no ViewPosition at all: the view
filter has to decide from the pixels. Attribution: NOTICE at the repository root.

    python -m screener.demo_data.build ../shared/data/cxr
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydicom.uid import JPEG2000Lossless, RLELossless

from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    corpus_rows,
    make_instance,
)

HERE = Path(__file__).resolve().parent
NIH = "NIH ChestX-ray14"
UID_ROOT = "2.25."  # fixed UIDs below keep the bundled files stable across rebuilds

# (key, description, selector, views, modality)
STUDIES: list[dict[str, Any]] = [
    {"key": "nih-normal-pa", "label": "normal", "view": "PA", "licence": NIH, "modality": "CR"},
    {
        "key": "nih-pneumonia-pa",
        "label": "pneumonia",
        "view": "PA",
        "licence": NIH,
        "modality": "DX",
    },
    {
        "key": "hannover-covid-ap",
        "label": "covid",
        "view": "AP",
        "licence": "CC BY 3.0",
        "source": "ml-workgroup",
        "modality": "CR",
    },
    {
        "key": "ieee8023-covid-pa",
        "label": "covid",
        "view": "PA",
        "licence": "CC BY 3.0",
        "source": "hida6",
        "modality": "DX",
    },
]


def _fix_uid(ds: Any, sop_instance_uid: str) -> Any:
    """Keep the chosen SOP Instance UID (pydicom's compress() makes a new one by default)."""
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    return ds


def _pick(rows: list[dict[str, str]], spec: dict[str, Any], used: set[str]) -> dict[str, str]:
    for row in rows:
        if (
            row["id"] not in used
            and row["split"] == "test"
            and row["label"] == spec["label"]
            and row["view"] == spec["view"]
            and row["license"].startswith(spec["licence"])
            and spec.get("source", "") in row["source"]
        ):
            used.add(row["id"])
            return row
    raise LookupError(f"no corpus image for {spec}")


def build(cxr_dir: Path, out_dir: Path = HERE) -> list[dict[str, Any]]:
    rows = sorted(corpus_rows(cxr_dir), key=lambda r: r["id"])
    used: set[str] = set()
    catalogue: list[dict[str, Any]] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.dcm"):
        old.unlink()
    for number, spec in enumerate(STUDIES, start=1):
        row = _pick(rows, spec, used)
        study = _identity(number, spec["key"])
        ds = _fix_uid(
            make_instance(
                corpus_image(cxr_dir, row["id"]),
                study=study,
                modality=spec["modality"],
                view_position=spec["view"],
                transfer_syntax=RLELossless if number % 2 else JPEG2000Lossless,
                sop_instance_uid=f"{study.study_instance_uid}.1",
                series_instance_uid=f"{study.study_instance_uid}.100",
                series_description=f"CHEST {spec['view']}",
            ),
            f"{study.study_instance_uid}.1",
        )
        catalogue.append(_entry(spec["key"], study, [(row, spec["view"])], _write(ds, out_dir)))
    # The awkward one: two frontal NIH images, tags wrong (LATERAL) and absent.
    spec_a = {"label": "pneumonia", "view": "PA", "licence": NIH}
    spec_b = {"label": "normal", "view": "AP", "licence": NIH}
    row_a, row_b = _pick(rows, spec_a, used), _pick(rows, spec_b, used)
    study = _identity(len(STUDIES) + 1, "nih-view-tags-wrong")
    datasets = [
        _fix_uid(
            make_instance(
                corpus_image(cxr_dir, row["id"]),
                study=study,
                view_position=tag,
                transfer_syntax=RLELossless,
                series_number=index,
                instance_number=1,
                sop_instance_uid=f"{study.study_instance_uid}.{index}",
                series_instance_uid=f"{study.study_instance_uid}.10{index}",
                series_description="CHEST",
            ),
            f"{study.study_instance_uid}.{index}",
        )
        for index, (row, tag) in enumerate([(row_a, "LATERAL"), (row_b, None)], start=1)
    ]
    files = [_write(ds, out_dir) for ds in datasets]
    images = [(row_a, "LATERAL (wrong tag)"), (row_b, "(no tag)")]
    catalogue.append(_entry("nih-view-tags-wrong", study, images, *files))
    (HERE / "catalogue.json").write_text(json.dumps(catalogue, indent=2) + "\n")
    return catalogue


def _identity(number: int, key: str) -> StudyIdentity:
    uid = f"{UID_ROOT}{270418300000000000000 + number}"
    return StudyIdentity(
        patient_id=f"DEMO{number:03d}",
        patient_name=f"DEMO^{key.upper().replace('-', '_')[:30]}",
        study_instance_uid=uid,
        accession_number=f"DEMOACC{number:03d}",
        study_date="20200401",
        study_time="120000",
        study_description=f"XR CHEST demo {key}",
    )


def _write(ds: Any, out_dir: Path) -> str:
    """Flat files (packaged as ``screener.demo_data`` package data); returns the name."""
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.name


def _entry(
    key: str, study: StudyIdentity, images: list[tuple[dict[str, str], str]], *files: str
) -> dict[str, Any]:
    return {
        "key": key,
        "study_instance_uid": study.study_instance_uid,
        "images": [
            {
                "file": file,
                "corpus_id": row["id"],
                "label": row["label"],
                "view_tag": tag,
                "source": row["source"],
                "original_path": row["original_path"],
                "license": row["license"],
            }
            for (row, tag), file in zip(images, files, strict=True)
        ],
    }


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data/cxr"))
