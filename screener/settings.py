"""The one typed settings object of pacs-screener.

Sources, highest priority first: keyword arguments, ``SCREENER_*`` environment variables
(nested delimiter ``__``), the TOML file named by ``SCREENER_CONFIG``, and the embedded
``config/default.toml``. The environment variable names are a public contract.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from platformdirs import user_data_dir
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from screener.identity import PRODUCT_NAME

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent / "default.toml"


def _default_config_path() -> Path:
    """config/default.toml of the source tree, or the copy packaged beside this module."""
    tree = PACKAGE_ROOT / "config" / "default.toml"
    return tree if tree.exists() else DEFAULT_CONFIG_FILE


class TlsSettings(BaseModel):
    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    client_ca: str = ""  # non-empty: mutual TLS, clients must present a certificate


def _valid_ae_title(value: str) -> str:
    """``value`` if DICOM allows it as an AE title (PS3.5 VR AE, the rule `screener echo`
    applies too: screener.dicom.ae_title); a ValueError naming the problem otherwise."""
    from screener.dicom.ae_title import ae_title_problem

    problem = ae_title_problem(value, quote=False)
    if problem:
        raise ValueError(problem)
    return value


class ListenerSettings(BaseModel):
    ae_title: str = "SCREENER"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests, demo)
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    processes: int = Field(1, ge=1, le=64)
    max_spool_fill: float = Field(0.95, gt=0.0, le=1.0)
    max_pdu: int = Field(0, ge=0)
    single_image_complete_modalities: list[str] = Field(default_factory=list)
    storage_sop_classes: list[str] = Field(default_factory=list)  # empty: all storage
    require_called_ae_title: bool = True  # refuse associations not addressed to ae_title
    # --- hostile-network bounds (issue 9); owned by the listener work ---
    association_request_timeout_seconds: float = Field(10.0, gt=0)  # ARTIM-style deadline
    idle_timeout_seconds: float = Field(60.0, gt=0)
    association_max_seconds: float = Field(3600.0, gt=0)
    max_associations: int = Field(64, ge=1)
    max_associations_per_address: int = Field(16, ge=1)
    max_pending_connections: int = Field(256, ge=1)  # connections before their A-ASSOCIATE-RQ
    max_pending_per_address: int = Field(32, ge=1)
    max_dataset_mb: int = Field(1024, ge=1)  # one data set held in memory while received
    receive_budget_mb: int = Field(4096, ge=1)  # all data sets being received, per process
    direct_io: bool = True  # spool files written and read past the page cache (O_DIRECT)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _valid_ae_title(value)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _allowed_calling_ae_titles(cls, value: list[str]) -> list[str]:
        return [_valid_ae_title(title) for title in value]


class ModelSettings(BaseModel):
    engine: Literal["onnxruntime", "tensorrt", "torch"] = "onnxruntime"
    intra_op_threads: int = Field(1, ge=0)
    # images per engine call; 0: the engine's default (8 on CPU, 32 with TensorRT: a GPU
    # needs large batches, and the TensorRT plan's profile is built for this maximum)
    max_batch: int = Field(0, ge=0, le=256)
    max_wait_ms: int = Field(200, ge=0)
    glue_threads: int = Field(0, ge=0)  # infer consumer's CPU glue threads; 0: cores - 1, 1 to 4
    pipeline_depth: int = Field(2, ge=1, le=16)  # batches queued between consumer threads
    scheme: Literal["raw", "crop", "segment"] = "crop"  # see engines/weights/MODEL_CARD.md
    heatmap: Literal["cam", "occlusion"] = "cam"
    model_dir: str = ""  # empty: the weights shipped in engines/weights
    plan_cache_dir: str = ""  # TensorRT plans; empty: <data_dir>/plans

    @model_validator(mode="after")
    def _engine_batch(self) -> ModelSettings:
        if self.max_batch == 0:
            self.max_batch = 32 if self.engine == "tensorrt" else 8
        return self


class ThresholdSettings(BaseModel):
    # Unset (the default): version 0 is the model manifest's validation operating point of
    # the configured scheme, so a swapped model brings its own. Set: the site's own value
    # for the production scheme (other schemes always use their own; screener.thresholds)
    default_value: float | None = Field(None, ge=0.0, le=1.0)
    target_sensitivity: float | None = Field(None, gt=0.0, le=1.0)


class ReportSettings(BaseModel):
    parametric_map: bool = False
    # Long side of the display image prepare keeps and of the heatmap film (= both
    # default.toml). 1024 serves readers (viewers fit the SC to a viewport, the CAM comes
    # from a 7 x 7 grid, the original film hangs beside it) at a quarter of the CPU and of
    # the SC's size of 2048 (4.6 MB instead of 18 MB per 2048-px film). Scores do not depend
    # on it: the networks' images come from the film through a fixed grid
    # (screener.screening.prepare.SCORING_GRID).
    heatmap_max_size: int = Field(1024, ge=64)
    manufacturer: str = "pacs-screener project"
    institution_name: str = ""


class Destination(BaseModel):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str = ""  # empty: the listener's AE title
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _valid_ae_title(value)

    @field_validator("calling_ae_title")
    @classmethod
    def _calling_ae_title(cls, value: str) -> str:
        return value and _valid_ae_title(value)

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DeliverySettings(BaseModel):
    """Retries over a horizon, a circuit breaker per destination, a periodic sweep."""

    max_attempts: int = Field(0, ge=0)  # optional extra cap per delivery; 0: the horizon decides
    backoff_seconds: float = Field(2.0, ge=0.0)
    backoff_max_seconds: float = Field(300.0, ge=0.0)
    backoff_jitter: float = Field(0.2, ge=0.0, le=1.0)  # each wait shortened by up to this share
    give_up_after_hours: float = Field(24.0, gt=0.0)  # keep retrying this long, then dead
    sweep_interval_seconds: float = Field(30.0, gt=0.0)  # send what is due without new jobs
    breaker_failures: int = Field(3, ge=1)  # consecutive failed associations: destination down
    # an association is kept open this long after its last C-STORE for the next study; 0: closed
    association_idle_seconds: float = Field(30.0, ge=0.0)
    destinations: list[Destination] = Field(default_factory=list)


class RetentionSettings(BaseModel):
    """What is pruned, and when; never an output before it was delivered."""

    outputs_days: float = Field(30.0, ge=0.0)  # 0: keep delivered outputs forever
    spool_days: float = Field(0.0, ge=0.0)  # 0: keep (reprocess re-screens from the spool)


class ScreeningSettings(BaseModel):
    """The screenability gate: which received objects are screened (issue 10)."""

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    # CR Image Storage and Digital X-Ray Image Storage - For Presentation
    sop_classes: list[str] = Field(
        default_factory=lambda: ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"]
    )
    # Body Part Examined values of the chest (an empty value is accepted)
    body_parts: list[str] = Field(
        default_factory=lambda: ["CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHEST_PA", "TORSO"]
    )
    # Anatomic Region Sequence codes of the chest (SCT Chest, Thorax, Lung; SRT Chest)
    anatomic_region_codes: list[str] = Field(
        default_factory=lambda: ["43799004", "51185008", "39607008", "T-D3000", "T-28000"]
    )
    min_size: int = Field(256, ge=1)  # rows and columns at least this many pixels
    # Rows x Columns at most this many: a header's size is checked before any pixel is read
    max_pixels: int = Field(50_000_000, ge=1)
    accept_derived: bool = False  # screen Image Type DERIVED\SECONDARY objects


MIN_SECRET_KEY_CHARS = 32  # session signing keys: configured or kept in data_dir


class HttpSettings(BaseModel):
    """The HTTP service: health, metrics, web console, JSON API (issue 12)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls_certificate: str = ""  # PEM; with tls_private_key: HTTPS (else run behind a TLS proxy)
    tls_private_key: str = ""
    secret_key: str = ""  # signs session cookies; empty: a random key kept in <data_dir>
    session_hours: float = Field(12.0, gt=0)  # a console session ends this long after login
    session_idle_minutes: float = Field(30.0, gt=0)  # ... or after this long without a request
    # sign-in throttling (console form and API Basic alike), counted in this process
    login_max_failures: int = Field(5, ge=1)  # per user name within the window, then 429
    login_max_failures_per_address: int = Field(20, ge=1)  # per client address, likewise
    login_window_minutes: float = Field(15.0, gt=0)  # failures older than this are forgotten
    login_lockout_seconds: float = Field(30.0, gt=0)  # first lockout; doubles per failure
    heartbeat_max_age_seconds: float = Field(60.0, gt=0)  # /healthz: older beats are dead

    @field_validator("secret_key")
    @classmethod
    def _long_enough(cls, value: str) -> str:
        """A short key lets anyone who guesses it forge an admin session: refused, never
        used as given (empty is fine: a random key is kept in ``data_dir``)."""
        if value and len(value.strip()) < MIN_SECRET_KEY_CHARS:
            raise ValueError(
                f"must be at least {MIN_SECRET_KEY_CHARS} characters, or empty for a random "
                "key kept in data_dir (make one: python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(48))')"
            )
        return value

    @property
    def tls(self) -> bool:
        """HTTPS (and secure cookies): both the certificate and its key are set."""
        return bool(self.tls_certificate and self.tls_private_key)


class LoggingSettings(BaseModel):
    format: Literal["text", "json"] = "text"
    directory: str = ""  # non-empty: each service process also logs to <directory>/<name>.log


class WorkerSettings(BaseModel):
    # Celery task events (sent, received, started, succeeded) exist for monitors such as
    # Flower, which turns them on in running workers itself; off, a study's four stage
    # tasks publish 16 fewer messages.
    task_events: bool = False
    # An infer consumer holding work with no batch finished for this long is stuck (an
    # engine call that never returns): its heartbeat goes stale, /healthz names it, and
    # the supervisor that started it (serve, a combined worker) restarts it. Far above any
    # batch (seconds on the CPU); the hard time limit a Celery infer task would have.
    stuck_after_seconds: float = Field(300.0, gt=0)


class ReconcilerSettings(BaseModel):
    interval_seconds: float = Field(30.0, gt=0)
    stale_seconds: float = Field(300.0, gt=0)
    max_attempts: int = Field(5, ge=1)


class _TomlSource(PydanticBaseSettingsSource):
    """Embedded defaults, then the file named by SCREENER_CONFIG merged over them."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns everything at once

    def __call__(self) -> dict[str, Any]:
        data = _load_toml(_default_config_path())
        extra = os.environ.get("SCREENER_CONFIG")
        if extra:
            path = Path(extra)
            if not path.is_file():
                raise ConfigError(
                    f"SCREENER_CONFIG names {path}, which does not exist or is not a file; "
                    "point it at a TOML file or unset it"
                )
            data = _deep_merge(data, _load_toml(path))
        _warn_unknown_env()
        return data


class ConfigError(ValueError):
    """A configuration file or variable is unusable; the message names it (operator-facing)."""


class DataDirError(ConfigError, OSError):
    """A data folder cannot be created (still an OSError for callers that catch those)."""


def _load_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix its syntax") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror})") from None
    unknown = _unknown_keys(Settings, data)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
            "check the spelling against config/default.toml"
        )
    return data


def _unknown_keys(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names in ``data`` that are not fields of ``model`` (recursively), e.g. typos."""
    unknown: list[str] = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(prefix + key)
            continue
        sub = _model_of(field.annotation)
        if sub is None:
            continue
        if isinstance(value, dict):
            unknown += _unknown_keys(sub, value, f"{prefix}{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    unknown += _unknown_keys(sub, item, f"{prefix}{key}[{i}].")
    return unknown


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings class of a field, or of the items of a list field."""
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


# SCREENER_* variables that are not settings: the config file, and test/tool switches
_NON_SETTING_ENV: tuple[str, ...] = ("SCREENER_CONFIG", "SCREENER_TEST_", "SCREENER_CXR_DIR")
_NON_SETTING_ENV += ("SCREENER_SHARED_DIR", "SCREENER_SERVICES")
_warned_env: set[str] = set()


def _warn_unknown_env() -> None:
    """Warn once per process about SCREENER_* variables that set nothing (likely typos)."""
    import logging

    for name in sorted(os.environ):
        if not name.startswith("SCREENER_") or name.startswith(_NON_SETTING_ENV):
            continue
        path = name[len("SCREENER_") :].lower().split("__")
        if _env_known(path) or name in _warned_env:
            continue
        _warned_env.add(name)
        logging.getLogger("screener.settings").warning(
            "environment variable %s is not a setting and is ignored; nested settings use "
            "a double underscore, e.g. SCREENER_LISTENER__PORT",
            name,
        )


def _env_known(path: list[str]) -> bool:
    model: type[BaseModel] | None = Settings
    for part in path:
        if model is None:
            return True  # inside a dict/list value: pydantic validates it
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = _model_of(field.annotation)
    return True


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    """Effective configuration; build with :func:`get_settings` or ``Settings()``."""

    model_config = SettingsConfigDict(
        env_prefix="SCREENER_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Field(default_factory=lambda: Path(user_data_dir(PRODUCT_NAME)))
    database_url: str = ""  # empty: SQLite file in data_dir
    broker_url: str = ""  # empty: embedded SQLAlchemy transport on a file in data_dir
    study_quiet_seconds: float = Field(30.0, ge=0)
    disclaimer: str = "NOT FOR DIAGNOSTIC USE."
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)

    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    threshold: ThresholdSettings = Field(default_factory=ThresholdSettings)
    reports: ReportSettings = Field(default_factory=ReportSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    reconciler: ReconcilerSettings = Field(default_factory=ReconcilerSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    screening: ScreeningSettings = Field(default_factory=ScreeningSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        """Upper-cased, so that ``debug`` works for every command (logging and Celery)."""
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0].lower() if value else ""
        if scheme not in ("", "sqlite", "postgresql"):
            raise ValueError(
                f"database {scheme!r} is not supported; use sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST/DB"
            )
        return value

    @model_validator(mode="after")
    def _derive_urls(self) -> Settings:
        self.data_dir = Path(self.data_dir).expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'screener.sqlite3'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.sqlite3'}"
        return self

    # Derived locations: one place decides where files live.
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def tensor_dir(self) -> Path:
        return self.data_dir / "tensors"

    def ensure_dirs(self) -> None:
        """Create the data folders; :class:`DataDirError` (one line, exit 2) if one cannot be."""
        for path in (self.data_dir, self.spool_dir, self.outbox_dir, self.tensor_dir):
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                why = exc.strerror or str(exc)
                if path != self.data_dir:
                    why = f"{path}: {why}"
                raise DataDirError(
                    f"cannot create the data folder {self.data_dir} ({why}); "
                    "check SCREENER_DATA_DIR"
                ) from exc

    def masked(self) -> dict[str, Any]:
        """Settings as a dict with passwords in URLs and key paths masked, for display."""
        data = self.model_dump(mode="json")
        for key in ("database_url", "broker_url"):
            data[key] = mask_url(data[key])
        for key in ("secret_key", "tls_private_key"):
            if data["http"].get(key):
                data["http"][key] = "***"
        tls = data["listener"]["tls"]
        if tls.get("private_key"):
            tls["private_key"] = "***"
        for dest in data["delivery"]["destinations"]:
            if dest["tls"].get("private_key"):
                dest["tls"]["private_key"] = "***"
        return data


# query parameters that carry a password: libpq's (psycopg) and redis-py's ``?password=``
SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


def mask_url(url: str) -> str:
    """Replace the passwords of a URL by ``***`` (for logs, ``config show`` and ``status``):
    the one in the userinfo and any ``password=`` query parameter, which libpq and redis
    accept as well."""
    parts = urlsplit(url)
    masked = parts
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        masked = masked._replace(netloc=netloc)
    if parts.query:
        masked = masked._replace(query=_mask_query(parts.query))
    return url if masked == parts else urlunsplit(masked)


def _mask_query(query: str) -> str:
    """``query`` with the values of :data:`SECRET_QUERY_KEYS` replaced by ``***``."""
    from urllib.parse import unquote_plus

    pieces = []
    for piece in query.split("&"):
        key, sep, value = piece.partition("=")
        if sep and value and unquote_plus(key).strip().lower() in SECRET_QUERY_KEYS:
            piece = f"{key}=***"
        pieces.append(piece)
    return "&".join(pieces)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings(...)`` instead."""
    return Settings()
