"""``screener users add|list|remove``: who may use the web console and the JSON API."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from screener.cli.app import ExitCode, app, ready_database, usage_error
from screener.settings import Settings
from screener.users import Role, add_user, get_user, list_users, remove_user

users_app = typer.Typer(
    rich_markup_mode="markdown", help="Users of the web console and API (admin | viewer)."
)
app.add_typer(users_app, name="users", no_args_is_help=True)


def _database() -> str:
    """The URL of the installation's existing database (never a new one: a typo is refused)."""
    return ready_database(Settings(), create=False).database_url


def _actor() -> str:
    from screener.thresholds import current_user

    return f"cli:{current_user()}"


@users_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[Role, typer.Option("--role", help="admin | viewer")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Add a user; the password comes from stdin (never from the command line)."""
    database = _database()  # an installation's database, and a free name, before any prompt
    if get_user(database, name.strip()) is not None:
        usage_error(f"user {name.strip()!r} exists; remove it first to change it")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        usage_error("no terminal to read the password from; use --password-stdin")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        user = add_user(database, name, role, password, _actor())
    except ValueError as exc:
        usage_error(str(exc))
    typer.echo(f"user {user.name} added ({user.role.value})")


@users_app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Users, their roles and last logins."""
    users = list_users(_database())
    if as_json:
        typer.echo(json.dumps([u.to_json() for u in users]))
        return
    for u in users:
        last = "never" if u.last_login_at is None else u.last_login_at.strftime("%Y-%m-%d %H:%M")
        typer.echo(f"{u.name:<24} {u.role.value:<7} last login {last}")


@users_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="Login name.")]) -> None:
    """Remove a user (their open sessions end at the next request)."""
    if not remove_user(_database(), name, _actor()):
        typer.echo(f"error: no user {name!r}; see 'screener users list'", err=True)
        raise typer.Exit(ExitCode.FAILED)
    typer.echo(f"user {name} removed")
