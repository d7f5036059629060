"""``screener web``: the HTTP service alone (health, metrics, web console, JSON API)."""

from __future__ import annotations

import typer

from screener.cli.app import app, ready_database, stop_if_port_unavailable


@app.command("web")
def web(
    host: str | None = typer.Option(None, help="override http.host"),
    port: int | None = typer.Option(None, min=0, max=65535, help="override http.port"),
) -> None:
    """Serve /healthz, /metrics, the web console and /api on http.host:http.port."""
    from screener.logging_setup import configure_from_settings
    from screener.settings import Settings
    from screener.web.server import run_server

    settings = Settings()
    if host is not None:
        settings.http.host = host
    if port is not None:
        settings.http.port = port
    configure_from_settings(settings, "web")
    # serves an installation that serve/listen/worker or `db upgrade` created: a database
    # that does not exist is a mistyped URL (exit 4), not a new empty one to show
    ready_database(settings, create=False)
    settings.ensure_dirs()
    try:
        run_server(settings)
    except OSError as exc:
        stop_if_port_unavailable(
            exc,
            f"{settings.http.host}:{settings.http.port}",
            "--port or SCREENER_HTTP__PORT",
            action="serve HTTP on",
        )
        raise
