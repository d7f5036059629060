"""Write a corpus split as DICOM files plus the labels CSV of ``screener evaluate``.

    .venv/bin/python -m engines.training.dicom_eval_set --split test --out runs/eval-test

The DICOM path (decode -> VOI -> display -> engines) must reproduce the scores measured by
the training recipe on the PNGs; running ``screener evaluate`` on this set checks that, and
gives the subgroup tables by view, modality, sex and source. Headers are synthetic (the
factory's), the pixels are the corpus images; the corpus view is written as ViewPosition.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from engines.training.corpus import default_corpus_dir, read_manifest, source_group
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_instance,
    write_datasets,
)

VIEW_TAGS = {"PA": "PA", "AP": "AP", "AP_SUPINE": "AP", "LATERAL": "LATERAL", "UNKNOWN": None}


def write_split(corpus_dir: Path, split: str, out: Path, frontal_only: bool = True) -> Path:
    rows = [r for r in read_manifest(corpus_dir) if r["split"] == split]
    if frontal_only:
        rows = [r for r in rows if r["view"] != "LATERAL"]
    labels = out / "labels.csv"
    out.mkdir(parents=True, exist_ok=True)
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["sop_instance_uid", "label", "view", "modality", "sex", "source", "corpus_id"]
        )
        for row in rows:
            sex = row["sex"] or "O"
            study = StudyIdentity.new(patient_sex=sex)
            modality = row["modality"] if row["modality"] in ("CR", "DX") else "CR"
            ds = make_instance(
                corpus_image(corpus_dir, row["id"]),
                study=study,
                modality=modality,
                view_position=VIEW_TAGS.get(row["view"]),
                bits_stored=12,
            )
            write_datasets([ds], out / "dicom")
            writer.writerow(
                [
                    ds.SOPInstanceUID,
                    row["label"],
                    row["view"],
                    row["modality"],
                    row["sex"],
                    source_group(row),
                    row["id"],
                ]
            )
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, default=None)
    args = parser.parse_args()
    labels = write_split(args.corpus or default_corpus_dir(), args.split, args.out)
    print(labels)


if __name__ == "__main__":
    main()
