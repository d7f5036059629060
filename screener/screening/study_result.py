"""Study assembly: one study's per-image results -> its :class:`StudyResult` (the study
score is the maximum over its screened images; the status comes from its images)."""

from __future__ import annotations

from screener.results import ImageResult, ModelInfo, StudyResult, ThresholdInfo
from screener.screening.prepare import PreparedImage


def assemble_study(
    study_instance_uid: str,
    results: list[ImageResult],
    model_info: ModelInfo,
    threshold: ThresholdInfo,
    disclaimer: str,
) -> StudyResult:
    """One study's result; status from its images (screened / no_frontal_image / failed /
    ignored: nothing the screenability gate lets through)."""
    study = StudyResult(
        study_instance_uid=study_instance_uid,
        model=model_info,
        threshold=threshold,
        disclaimer=disclaimer,
    )
    study.set_images(list(results))
    study.finalise_status()
    return study


def failed_study(
    study_instance_uid: str,
    prepared: list[PreparedImage],
    model_info: ModelInfo,
    threshold: ThresholdInfo,
    reason: str,
    disclaimer: str,
) -> StudyResult:
    """A study whose inference failed: status ``failed`` with ``reason``, its images as
    prepared (unscreened), so one failing study never stops a run."""
    study = StudyResult(
        study_instance_uid=study_instance_uid,
        model=model_info,
        threshold=threshold,
        status="failed",
        reason=reason,
        disclaimer=disclaimer,
    )
    study.set_images(
        [
            ImageResult(source=p.source, skip_reason=p.skip_reason, refused=p.refused)
            for p in prepared
        ]
    )
    return study
