"""One AE-title rule (PS3.5 VR AE) for `screener echo` and the settings: at most 16
characters, printable ASCII without the backslash, not empty or only spaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from screener.dicom.ae_title import ae_title_problem
from tests.cli_support import Cli, in_process_cli

VALID = [
    "SCREENER",
    "A",
    "ABCDEFGHIJKLMNOP",  # 16: the maximum
    "MY PACS",
    " PACS ",  # padding is not significant, and allowed
    "pacs-01_a.b",
    "!#$%&'()*+,-./:;",
    '<=>?@[]^_`{|}~"0',
]

INVALID = {
    "": "empty",
    " " * 16: "only spaces",
    "ABCDEFGHIJKLMNOPQ": "17 characters",
    "ABCDEFGHIJKLMNOP ": "17 characters",  # the padding is sent, so it counts
    "SCR\\EENER": "'\\\\'",
    "SCR\tEENER": "'\\t'",
    "SCREENER\n": "'\\n'",
    "\x1bSCREENER": "'\\x1b'",
    "SCREENER\x7f": "'\\x7f'",
    "SCRÉENER": "'É'",
    "SCR\u00a0EENER": "'\\xa0'",  # a non-breaking space from a copied document
    "SCR\x85EENER": "'\\x85'",  # a C1 control character
    "放射線科": "'",
}


@pytest.mark.parametrize("value", VALID)
def test_valid_ae_titles(value: str) -> None:
    assert ae_title_problem(value) is None


@pytest.mark.parametrize(("value", "why"), INVALID.items())
def test_invalid_ae_titles_say_why(value: str, why: str) -> None:
    problem = ae_title_problem(value)
    assert problem is not None and why in problem


def test_the_repertoire_is_printable_ascii_without_backslash() -> None:
    allowed = {chr(c) for c in range(0x110) if ae_title_problem(f"A{chr(c)}B") is None}
    assert allowed == {chr(c) for c in range(0x20, 0x7F)} - {"\\"}


def test_the_value_can_be_left_out_of_the_reason() -> None:
    """The settings' error line never repeats a rejected value; the character is named."""
    for value in ("SECRET-LONG-TITLE", "SECRET\\1"):
        problem = ae_title_problem(value, quote=False)
        assert problem is not None and "SECRET" not in problem
    assert "'\\\\'" in str(ae_title_problem("SECRET\\1", quote=False))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    return in_process_cli(capsys, monkeypatch, tmp_path)


@pytest.mark.parametrize("value", ["SCRÉENER", "SCR\u00a0EENER", "SCR\\EENER", "SCR\tEENER"])
@pytest.mark.parametrize("option", ["--aet", "--calling-aet"])
def test_echo_refuses_what_dicom_forbids_before_any_association(
    value: str, option: str, cli: Cli
) -> None:
    """Non-ASCII titles reached pynetdicom, which raised ValueError (exit 1, "rerun with
    --debug"): now a usage error (exit 2) naming the option and the character."""
    args = ["--aet", "PACS", option, value] if option == "--calling-aet" else [option, value]
    done = cli("echo", "127.0.0.1", "1", *args)
    assert done.code == 2, (done.out, done.err)
    line = done.error_line()
    assert option in line and repr(value) in line


def test_echo_checks_the_configured_calling_ae_title(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """listener.ae_title is used when --calling-aet is not given: checked by the same rule
    (the settings accept a backslash or a non-ASCII letter today)."""
    monkeypatch.setenv("SCREENER_LISTENER__AE_TITLE", "SCRÉENER")
    done = cli("echo", "127.0.0.1", "1", "--aet", "PACS")
    assert done.code == 2, (done.out, done.err)
    line = done.error_line()
    assert "listener.ae_title" in line and "'É'" in line


def test_echo_function_refuses_invalid_titles_without_the_network() -> None:
    from screener.dicom.echo import echo

    with pytest.raises(ValueError, match="backslash"):
        echo("no-such-host.invalid", 104, "PA\\CS")
    with pytest.raises(ValueError, match="16"):
        echo("no-such-host.invalid", 104, "PACS", calling_aet="X" * 17)


@pytest.mark.parametrize("title", ["PACS\\1", "\tPACS", "PACSÉ", "PACS\u00a0"])
def test_settings_refuse_what_dicom_forbids_in_every_configured_ae_title(title: str) -> None:
    """The settings accepted a backslash, control and non-ASCII characters (pynetdicom
    raised later, at the first association) and did not check destinations at all."""
    from pydantic import ValidationError

    from screener.settings import Destination, ListenerSettings

    with pytest.raises(ValidationError):
        ListenerSettings(ae_title=title)
    with pytest.raises(ValidationError):
        ListenerSettings(allowed_calling_ae_titles=["MODALITY", title])
    with pytest.raises(ValidationError):
        Destination(ae_title=title, host="127.0.0.1", port=104)
    with pytest.raises(ValidationError):
        Destination(ae_title="PACS", host="127.0.0.1", port=104, calling_ae_title=title)
    assert Destination(ae_title="PACS", host="127.0.0.1", port=104).calling_ae_title == ""
