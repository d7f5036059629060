"""screener.timeutil.aware: naive timestamps read back from SQLite are UTC; aware ones kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from screener.timeutil import aware


def test_naive_is_utc_and_aware_is_kept() -> None:
    naive = datetime(2024, 3, 1, 12, 30)
    assert aware(naive) == datetime(2024, 3, 1, 12, 30, tzinfo=UTC)
    assert aware(naive).tzinfo is UTC
    plus_two = datetime(2024, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    assert aware(plus_two) is plus_two  # never converted: the offset is kept
    assert aware(None) is None
    # the point of it: naive and aware values compare once both pass through aware()
    assert aware(naive) > aware(plus_two)
