"""Command line interface: ``screener COMMAND``. Each module adds its commands to ``app``."""

from screener.cli import admin  # noqa: F401
from screener.cli import deliveries  # noqa: F401
from screener.cli import screening  # noqa: F401
from screener.cli import service  # noqa: F401
from screener.cli import threshold  # noqa: F401
from screener.cli.app import app

__all__ = ["app"]
