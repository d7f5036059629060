"""Timezone-aware datetimes, in one place.

SQLite hands back naive datetimes for columns written as UTC-aware, PostgreSQL aware ones;
comparing the two raises ``TypeError``. Every timestamp we store is UTC, so a naive value
read back is UTC and :func:`aware` says so. Aware values are returned unchanged (never
converted), so an operator's ``--since 2024-01-01T00:00+02:00`` keeps its offset.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def aware(value: datetime) -> datetime: ...


@overload
def aware(value: None) -> None: ...


@overload
def aware(value: datetime | None) -> datetime | None: ...


def aware(value: datetime | None) -> datetime | None:
    """``value`` with UTC attached when it is naive; ``None`` stays ``None``."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
