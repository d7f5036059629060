"""Kept until engines/training moves; do not add code here.

The screening stages live in :mod:`screener.screening` (prepare, models, cam, view
decision, study result) and the offline path in :mod:`screener.offline_screening`. This
module only re-exports the names ``engines/training`` still imports from here:
``prepare_dataset``, ``ScreeningModels`` and ``default_threshold`` (the last one is
``screener.thresholds.embedded_info`` for the scheme ``models`` run; call that directly).
"""

from __future__ import annotations

from screener.results import ThresholdInfo
from screener.screening.models import ScreeningModels
from screener.screening.prepare import prepare_dataset
from screener.settings import Settings


def default_threshold(settings: Settings, models: ScreeningModels | None = None) -> ThresholdInfo:
    """Deprecated: ``screener.thresholds.embedded_info(settings, models.scheme)``."""
    from screener.thresholds import embedded_info

    return embedded_info(settings, None if models is None else models.scheme)


__all__ = ["ScreeningModels", "default_threshold", "prepare_dataset"]
