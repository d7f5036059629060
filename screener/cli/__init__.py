"""Command line interface: ``screener COMMAND``. Each module adds its commands to ``app``."""

from screener.cli import (
    admin,  # noqa: F401
    deliveries,  # noqa: F401
    screening,  # noqa: F401
    service,  # noqa: F401
    threshold,  # noqa: F401
    training,  # noqa: F401
    users,  # noqa: F401
    web,  # noqa: F401
)
from screener.cli.app import app

__all__ = ["app"]
