"""The console's monitoring page compares the live positive rate with the validation
operating point: the threshold it names must be the one the service applies, written as the
model card and every SR write it."""

from __future__ import annotations

import re

from starlette.testclient import TestClient

from engines.manifest import SHIPPED_WEIGHTS_DIR, load_manifest
from engines.model_card import shipped_threshold
from screener.settings import Settings
from screener.thresholds import embedded_info
from screener.users import Role, add_user
from screener.web.app import create_app
from screener.web.queries import monitoring
from tests.web_support import login

CARD = (SHIPPED_WEIGHTS_DIR / "MODEL_CARD.md").read_text()


def test_the_validation_threshold_is_on_the_scale_the_service_applies(
    settings: Settings,
) -> None:
    """It showed metrics.json's raw network cut (0.0643) beside a service applying 0.1237
    on the calibrated scale."""
    reference = monitoring(settings)["validation"]
    point = load_manifest().operating_point(settings.model.scheme)
    assert point.raw_threshold is not None
    assert reference["threshold"] == shipped_threshold(point.threshold)
    assert reference["threshold"] == embedded_info(settings).value  # version 0, exactly
    raw = shipped_threshold(point.raw_threshold)
    assert reference["raw_threshold"] == raw != reference["threshold"]


def test_the_monitoring_page_states_the_threshold_as_the_model_card_does(
    sqlite_settings: Settings,
) -> None:
    """The page rounded the manifest's 0.123799... to nearest (0.1238, raw 0.0643) where the
    model card, the SR and version 0 round it down (0.1237, raw 0.0642): one cut, two texts."""
    settings = sqlite_settings
    add_user(settings.database_url, "view", Role.VIEWER, "viewer-password", "test")
    client = TestClient(create_app(settings), follow_redirects=False)
    login(client, "view", "viewer-password")
    page = client.get("/monitoring")
    assert page.status_code == 200

    # the production row of the card's scheme table: "| 0.1237 (raw 0.0642) |"
    stated = re.search(r"\(production\).*?\| (0\.\d{4}) \(raw (0\.\d{4})\) \|", CARD)
    assert stated is not None
    threshold, raw = stated.groups()
    assert (threshold, raw) == ("0.1237", "0.0642")  # the shipped model's, for the record
    assert f"**{threshold}**" in CARD  # the card's "Default threshold" line
    assert f"validation threshold {threshold} on the calibrated scale" in page.text
    assert f"(the network's raw score: {raw})" in page.text
    assert "0.1238" not in page.text and "0.0643" not in page.text
    assert f"{embedded_info(settings).value:.4f}" == threshold  # what the SR prints
