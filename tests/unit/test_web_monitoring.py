"""The console's monitoring page compares the live positive rate with the validation
operating point: the threshold it names must be the one the service applies."""

from __future__ import annotations

from engines.manifest import load_manifest
from screener.settings import Settings
from screener.thresholds import embedded_info
from screener.web.queries import monitoring


def test_the_validation_threshold_is_on_the_scale_the_service_applies(
    settings: Settings,
) -> None:
    """It showed metrics.json's raw network cut (0.0643) beside a service applying 0.1237
    on the calibrated scale."""
    reference = monitoring(settings)["validation"]
    point = load_manifest().operating_point(settings.model.scheme)
    assert point.raw_threshold is not None
    assert reference["threshold"] == round(point.threshold, 4)
    assert abs(reference["threshold"] - embedded_info(settings).value) <= 1e-4
    assert reference["raw_threshold"] == round(point.raw_threshold, 4) != reference["threshold"]
