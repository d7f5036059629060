"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, tuned for latency.

``screener serve`` must run without a broker server. kombu's ``sqla`` transport polls a
table once a second by default and hands its transport options to ``create_engine``, so
a polling interval cannot be configured through them; this subclass polls every 50 ms
and opens SQLite in WAL mode with a generous busy timeout, because the listener, the
reconciler and several workers share the file.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

POLLING_INTERVAL_S = 0.05


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Channel(kombu_sqla.Channel):
    def _engine_from_config(self) -> Any:
        engine = super()._engine_from_config()
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _get_or_create(self, queue: str) -> Any:
        """kombu's lock is per process: several processes may create one queue row at once.

        The loser of that race sees a unique-constraint error; the row exists by then.
        """
        try:
            return super()._get_or_create(queue)
        except IntegrityError:
            self.session.rollback()
            return super()._get_or_create(queue)


class Transport(kombu_sqla.Transport):
    Channel = Channel
    polling_interval = POLLING_INTERVAL_S


def split_embedded_url(broker_url: str) -> tuple[str, str | None]:
    """``sqla+sqlite:///x`` -> (``sqlite:///x``, this transport); other URLs unchanged."""
    if broker_url.startswith("sqla+"):
        return broker_url[len("sqla+") :], f"{__name__}:Transport"
    return broker_url, None
