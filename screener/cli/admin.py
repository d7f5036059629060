"""Administration commands: configuration and database."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from screener.cli.app import app
from screener.settings import Settings

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")

console = Console(stderr=True)


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (defaults < SCREENER_CONFIG < SCREENER_* env), masked."""
    settings = Settings()
    typer.echo(json.dumps(settings.masked(), indent=2, default=str))


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Alembic revision")) -> None:
    """Create or migrate the database schema to the latest revision."""
    from screener.db.session import upgrade
    from screener.settings import mask_url

    settings = Settings()
    settings.ensure_dirs()
    upgrade(settings.database_url, revision)
    console.print(f"database at {mask_url(settings.database_url)} is at revision {revision}")
