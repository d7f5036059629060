"""Write all DICOM outputs of one screened study into a directory.

One entry point for both callers: the offline ``screener screen --out DIR`` and the
workers' report task. The SR is always written (screened, no frontal image, or failed);
one heatmap SC per screened image, and a parametric map per screened image when
``reports.parametric_map`` is set. File names are the SOP Instance UIDs, so writing the
same result twice overwrites the same files.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset

from screener.reports.common import (
    PredecessorRef,
    read_source_header,
    reference_dataset,
)
from screener.reports.heatmap import build_heatmap_sc, has_heatmap
from screener.reports.operating_point import statement_for
from screener.reports.output_uids import OutputUids
from screener.reports.sr import build_sr
from screener.results import StudyResult
from screener.settings import Settings

__all__ = ["PredecessorRef", "write_study_outputs"]

log = logging.getLogger(__name__)


def _save(ds: Dataset, out_dir: Path, prefix: str) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    path = out_dir / f"{prefix}_{ds.SOPInstanceUID}.dcm"
    tmp = path.with_suffix(".dcm.part")
    ds.save_as(tmp, enforce_file_format=True)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def write_study_outputs(
    result: StudyResult,
    out_dir: Path,
    settings: Settings,
    predecessors: list[PredecessorRef] | None = None,
) -> list[Path]:
    """Write SR + heatmap SCs (+ parametric maps) for ``result``; returns and records paths.

    An ignored study (nothing the screenability gate lets through) gets no output at all.
    """
    if result.status == "ignored":
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uids = OutputUids.for_result(result)
    created_at = datetime.now().astimezone()
    # one operating-point statement for the study: every SC and the SR state the same one
    statement = statement_for(result.threshold, result.model, settings)

    headers: dict[str, Dataset] = {}
    for image in result.images:
        header = read_source_header(image.source)
        if header is not None:
            headers[image.source.sop_instance_uid] = header

    paths: list[Path] = []
    heatmaps: dict[str, Dataset] = {}
    pmaps: dict[str, Dataset] = {}
    screened = [im for im in result.images if im.screened]
    for number, image in enumerate(screened, start=1):
        header = headers.get(image.source.sop_instance_uid)
        if header is None or not has_heatmap(image):
            log.warning(
                "no heatmap for %s: source header or arrays missing",
                image.source.sop_instance_uid,
            )
            continue
        sc = build_heatmap_sc(
            image,
            header,
            result,
            settings,
            uids,
            instance_number=number,
            created_at=created_at,
            statement=statement,
        )
        heatmaps[image.source.sop_instance_uid] = sc
        paths.append(_save(sc, out_dir, "sc"))
        if settings.reports.parametric_map:
            from screener.reports.parametric_map import build_parametric_map
            from screener.screening.cam import expand_to_display

            if image.cam is None:  # the map is resampled from a display-size CAM
                expand_to_display(image, image.display_image)

            pmap = build_parametric_map(
                image,
                header,
                result,
                settings,
                uids,
                instance_number=number,
                created_at=created_at,
            )
            pmaps[image.source.sop_instance_uid] = pmap
            paths.append(_save(pmap, out_dir, "pmap"))

    sources = evidence_sources(result, headers)
    sr = build_sr(
        result,
        sources,
        heatmaps,
        settings,
        uids,
        created_at=created_at,
        predecessors=predecessors,
        pmaps=pmaps,
        statement=statement,
    )
    paths.insert(0, _save(sr, out_dir, "sr"))
    result.outputs.extend(str(p) for p in paths if str(p) not in result.outputs)
    return paths


def evidence_sources(result: StudyResult, headers: dict[str, Dataset]) -> list[Dataset]:
    """The SR's evidence: every source, full headers first (the SR copies patient and
    study from the first one), then references made from what the result knows."""
    known = [
        headers[im.source.sop_instance_uid]
        for im in result.images
        if im.source.sop_instance_uid in headers
    ]
    return known + [
        reference_dataset(im.source)
        for im in result.images
        if im.source.sop_instance_uid not in headers
    ]
