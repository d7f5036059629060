"""Golden tests for public contracts a refactor must never change by accident.

Output UIDs: a PACS already holds objects under them; re-minting them would resend every
result as a new object. The values below were produced by the 0.1.0 derivation.
"""

from __future__ import annotations

from screener.reports.output_uids import OutputUids, derive_uid

IDENTITY = OutputUids(
    study_instance_uid="1.2.3.4",
    source_sop_instance_uids=("1.2.3.4.1", "1.2.3.4.2"),
    model_ref="cxr-covid-effnetlite0@1.3.0",
    threshold_version=0,
    threshold_value=0.1237,
)


def test_output_uids_are_never_re_minted() -> None:
    assert IDENTITY.sr_series == "2.25.217180747931773066174516090546113662295"
    assert IDENTITY.sr_instance == "2.25.211517784001406051287506959511238009621"
    assert IDENTITY.sc_series == "2.25.178562819381638796362680240501347344928"
    assert IDENTITY.sc_instance("1.2.3.4.1") == "2.25.134339948084977396346958775914820852949"
    assert IDENTITY.pmap_series == "2.25.151131032608050293106018694008988775398"
    assert IDENTITY.pmap_instance("1.2.3.4.1") == "2.25.291806402225926858779752481641454160746"
    assert (
        IDENTITY.pmap_frame_of_reference("1.2.3.4.1")
        == "2.25.135331652598824857134779668869872725889"
    )
    assert (
        IDENTITY.tracking_uid("1.2.3.4.1", "covid")
        == "2.25.175995982739242340480932334379904856628"
    )


def test_uid_derivation_depends_on_every_part_of_the_identity() -> None:
    base = derive_uid("a", "b")
    assert base.startswith("2.25.") and len(base) <= 64
    assert derive_uid("a", "b") == base
    assert derive_uid("a", "c") != base and derive_uid("ab") != base
