"""Deterministic UIDs for everything the screener writes.

Every output UID is a ``2.25.<decimal>`` UID (ISO/IEC 9834-8, DICOM PS3.5 B.2) whose 128-bit
number is a hash of what the output is *about*: the study, its source SOP Instance UIDs,
the model (name@version; with its scheme when that is not the production scheme:
:attr:`~screener.results.ModelInfo.screening_ref`), the threshold (version and value) and
the role of the object.
Screening the same thing twice therefore yields the same UIDs, and a PACS that already
holds the objects simply sees them again instead of receiving duplicates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from screener.results import StudyResult

UID_ROOT = "2.25."


def derive_uid(*parts: str) -> str:
    """A 2.25 UID from the SHA-256 of ``parts`` (at most 44 characters, always valid)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    number = int.from_bytes(digest[:16], "big")
    return f"{UID_ROOT}{number}"


@dataclass(frozen=True)
class OutputUids:
    """The identity of one screening of one study; every output UID is derived from it."""

    study_instance_uid: str
    source_sop_instance_uids: tuple[str, ...]
    model_ref: str
    threshold_version: int
    threshold_value: float

    @classmethod
    def for_result(cls, result: StudyResult) -> OutputUids:
        return cls(
            study_instance_uid=result.study_instance_uid,
            source_sop_instance_uids=tuple(
                sorted(im.source.sop_instance_uid for im in result.images)
            ),
            model_ref=result.model.screening_ref,
            threshold_version=result.threshold.version,
            threshold_value=result.threshold.value,
        )

    @property
    def key(self) -> str:
        """A stable text form of the identity (also useful in logs)."""
        return "|".join(
            (
                self.study_instance_uid,
                ",".join(self.source_sop_instance_uids),
                self.model_ref,
                f"t{self.threshold_version}",
                f"{self.threshold_value:.6f}",
            )
        )

    def _uid(self, role: str, *extra: str) -> str:
        return derive_uid(self.key, role, *extra)

    @property
    def sr_series(self) -> str:
        return self._uid("sr-series")

    @property
    def sr_instance(self) -> str:
        return self._uid("sr")

    @property
    def sc_series(self) -> str:
        return self._uid("sc-series")

    def sc_instance(self, source_sop_instance_uid: str) -> str:
        return self._uid("sc", source_sop_instance_uid)

    @property
    def pmap_series(self) -> str:
        return self._uid("pmap-series")

    def pmap_instance(self, source_sop_instance_uid: str) -> str:
        return self._uid("pmap", source_sop_instance_uid)

    def pmap_frame_of_reference(self, source_sop_instance_uid: str) -> str:
        return self._uid("pmap-for", source_sop_instance_uid)

    def tracking_uid(self, source_sop_instance_uid: str, finding: str) -> str:
        return self._uid("tracking", source_sop_instance_uid, finding)

    @property
    def device_observer_uid(self) -> str:
        """The model as an SR device observer: same model version, same device UID."""
        return derive_uid("device", self.model_ref)
