"""Write all DICOM outputs of one screened study into a directory.

One entry point for both callers: the offline ``screener screen --out DIR`` and the
workers' report task. The SR is always written (screened, no frontal image, or failed);
one heatmap SC per screened image, and a parametric map per screened image when
``reports.parametric_map`` is set. File names are the SOP Instance UIDs, so writing the
same result twice overwrites the same files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset

from screener import atomic_files
from screener.reports.common import (
    PredecessorRef,
    read_source_header,
    reference_dataset,
)
from screener.reports.heatmap import build_heatmap_sc, has_heatmap
from screener.reports.operating_point import OperatingPointStatement, statement_for
from screener.reports.output_uids import OutputUids
from screener.reports.sr import build_sr
from screener.results import StudyResult
from screener.settings import Settings

__all__ = ["PredecessorRef", "StudyObjects", "build_image_objects", "write_study_outputs"]

log = logging.getLogger(__name__)


def _save(ds: Dataset, out_dir: Path, prefix: str) -> Path:
    """Encode in memory, then write atomically (a reader never sees half a file); the
    caller makes the folder's new names durable once for the study (``fsync_dir``)."""
    path = out_dir / f"{prefix}_{ds.SOPInstanceUID}.dcm"
    encoded = BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    atomic_files.write_bytes(path, encoded.getbuffer(), sync_dir=False)
    return path


@dataclass
class StudyObjects:
    """The objects of one study before anything is written: the heatmap SCs and parametric
    maps by source SOP Instance UID, and what the SR is built from besides them."""

    uids: OutputUids
    created_at: datetime
    statement: OperatingPointStatement
    sources: list[Dataset]  # the SR's evidence (see evidence_sources)
    heatmaps: dict[str, Dataset] = field(default_factory=dict)
    pmaps: dict[str, Dataset] = field(default_factory=dict)

    def sr(
        self,
        result: StudyResult,
        settings: Settings,
        predecessors: list[PredecessorRef] | None = None,
    ) -> Dataset:
        """The study's SR, referencing these heatmaps and parametric maps."""
        return build_sr(
            result,
            self.sources,
            self.heatmaps,
            settings,
            self.uids,
            created_at=self.created_at,
            predecessors=predecessors,
            pmaps=self.pmaps,
            statement=self.statement,
        )


def build_image_objects(
    result: StudyResult, settings: Settings, headers: dict[str, Dataset] | None = None
) -> StudyObjects:
    """One heatmap SC (and parametric map when configured) per screened image whose source
    header and maps are at hand; ``headers`` (by SOP Instance UID) default to the sources'
    own files."""
    if headers is None:
        headers = {}
        for image in result.images:
            header = read_source_header(image.source)
            if header is not None:
                headers[image.source.sop_instance_uid] = header
    objects = StudyObjects(
        uids=OutputUids.for_result(result),
        created_at=datetime.now().astimezone(),
        # one operating-point statement for the study: every SC and the SR state the same one
        statement=statement_for(result.threshold, result.model, settings),
        sources=evidence_sources(result, headers),
    )
    screened = [im for im in result.images if im.screened]
    for number, image in enumerate(screened, start=1):
        header = headers.get(image.source.sop_instance_uid)
        if header is None or not has_heatmap(image):
            log.warning(
                "no heatmap for %s: source header or arrays missing",
                image.source.sop_instance_uid,
            )
            continue
        objects.heatmaps[image.source.sop_instance_uid] = build_heatmap_sc(
            image,
            header,
            result,
            settings,
            objects.uids,
            instance_number=number,
            created_at=objects.created_at,
            statement=objects.statement,
        )
        if settings.reports.parametric_map:
            from screener.reports.parametric_map import build_parametric_map
            from screener.screening.cam import expand_to_display

            if image.cam is None:  # the map is resampled from a display-size CAM
                expand_to_display(image, image.display_image)
            objects.pmaps[image.source.sop_instance_uid] = build_parametric_map(
                image,
                header,
                result,
                settings,
                objects.uids,
                instance_number=number,
                created_at=objects.created_at,
            )
    return objects


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
    objects = build_image_objects(result, settings)
    paths: list[Path] = []
    for uid, sc in objects.heatmaps.items():
        paths.append(_save(sc, out_dir, "sc"))
        if uid in objects.pmaps:
            paths.append(_save(objects.pmaps[uid], out_dir, "pmap"))
    paths.insert(0, _save(objects.sr(result, settings, predecessors), out_dir, "sr"))
    atomic_files.fsync_dir(out_dir)  # the renames survive a power cut before delivery
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
