"""The listener's per-association copy of its supported contexts (fast_receive.cheap_to_copy)."""

from __future__ import annotations

import copy

from screener.dicom.fast_receive import cheap_to_copy
from screener.dicom.sop_classes import supported_contexts


def test_copy_equals_pynetdicoms_deepcopy_and_is_independent() -> None:
    template = supported_contexts(())
    cheap = cheap_to_copy(template)
    copied = copy.deepcopy(cheap)  # what pynetdicom's RequestHandler does per association
    reference = copy.deepcopy(template)
    assert len(copied) == len(reference) > 100
    for got, want in zip(copied, reference, strict=True):
        assert type(got) is type(want)
        assert got.abstract_syntax == want.abstract_syntax
        assert got.transfer_syntax == want.transfer_syntax
        assert (got.context_id, got.result, got.scu_role, got.scp_role) == (
            want.context_id,
            want.result,
            want.scu_role,
            want.scp_role,
        )
    # negotiation may change a copy; the template and other copies must not see it
    copied[0].transfer_syntax.clear()
    copied[0].result = 0x03
    again = copy.deepcopy(cheap)
    assert again[0].transfer_syntax == reference[0].transfer_syntax
    assert again[0].result is None
