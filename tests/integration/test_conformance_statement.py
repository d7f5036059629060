"""docs/conformance-statement.md against what the listener really offers (it cannot drift).

The SOP class and transfer syntax tables are compared with the presentation contexts of the
AE the listener builds, the status table with the listener's status constants, and the
configuration table's defaults with ``ListenerSettings``. A live association then proposes
every documented SOP class and checks each is accepted.
"""

from __future__ import annotations

import re
from pathlib import Path

from pynetdicom import AE, build_context

from screener.dicom import listener
from screener.dicom.fast_receive import HARD_MAX_PDU
from screener.dicom.listener import build_ae, start_listener
from screener.settings import ListenerSettings, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance-statement.md"


def _table_after(marker: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after ``marker``, header excluded."""
    text = DOC.read_text()
    assert marker in text, f"{marker} missing from {DOC.name}"
    rows: list[list[str]] = []
    after_marker = text.split(marker, 1)[1].split("\n", 1)[1]  # from the next line on
    for line in after_marker.lstrip("\n").splitlines():
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert len(rows) > 2
    return rows[2:]


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end > 0 else None]


def _offered() -> dict[str, set[str]]:
    ae = build_ae(Settings())
    return {
        str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax}
        for cx in ae.supported_contexts
    }


def test_sop_class_table_is_what_the_listener_offers() -> None:
    rows = _table_after("<!-- sop-class-table")
    documented = {row[1] for row in rows if row[3] == "Yes"}
    assert len(documented) == len(rows), "one row per SOP class, no duplicates"
    assert documented == set(_offered())
    assert len(documented) >= 171  # Verification + every storage class pynetdicom knows
    scu = {row[1] for row in rows if row[2] == "Yes"}
    assert scu == {
        "1.2.840.10008.1.1",
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    }


def test_transfer_syntax_table_is_what_the_listener_offers() -> None:
    documented = {row[1] for row in _table_after("<!-- transfer-syntax-table")}
    offered = _offered()
    verification = offered.pop("1.2.840.10008.1.1")
    assert verification <= documented
    for sop_class, syntaxes in offered.items():
        assert syntaxes == documented, sop_class


def test_status_codes_and_defaults_are_the_real_ones() -> None:
    section = _section("## 6 Status codes")
    statuses = set(re.findall(r"^\| (0x[0-9A-F]{4}) \|", section, re.MULTILINE))
    constants = {
        f"0x{getattr(listener, name):04X}" for name in dir(listener) if name.startswith("STATUS_")
    }
    assert statuses == constants
    defaults = ListenerSettings()
    config = _section("## 9 Configuration")
    for name, value in re.findall(r"^\| `listener\.(\w+)` \| `([^`]*)` \|", config, re.MULTILINE):
        actual = getattr(defaults, name)
        assert (
            str(actual).lower() == value.lower()
            or str(actual) == value
            or (isinstance(actual, (int, float)) and float(value) == actual)
        ), (name, value, actual)
    assert "16,777,216 bytes" in DOC.read_text() and HARD_MAX_PDU == 16_777_216


def test_a_peer_proposing_every_documented_class_gets_each_accepted(
    sqlite_settings: Settings,
) -> None:
    rows = _table_after("<!-- sop-class-table")
    sqlite_settings.listener.port = 0
    with start_listener(sqlite_settings, migrate=False, assemble=False) as handle:
        accepted: set[str] = set()
        for start in range(0, len(rows), 120):  # a requestor may propose at most 128
            ae = AE(ae_title="CONFTEST")
            ae.requested_contexts = [
                build_context(row[1], "1.2.840.10008.1.2.1") for row in rows[start : start + 120]
            ]
            assoc = ae.associate("127.0.0.1", handle.port, ae_title="SCREENER")
            assert assoc.is_established
            accepted |= {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            assoc.release()
    assert accepted == {row[1] for row in rows}
