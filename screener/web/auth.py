"""Who is asking: session cookies for pages, HTTP Basic for the API, CSRF tokens for forms.

The session cookie is signed (itsdangerous) and holds the user name, a stamp of that account
row (a keyed hash of its password hash) and a random CSRF token that every form must send
back. The role is read from the database on every request and the stamp compared: a removed
user is logged out at once, and removing and re-adding a user (how a password is changed)
voids every cookie issued before. Roles are enforced here, on the server.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlmodel import select
from starlette.requests import Request

from screener.db.models import User
from screener.db.session import session_scope
from screener.settings import MIN_SECRET_KEY_CHARS, Settings
from screener.users import Role, UserInfo, authenticate

log = logging.getLogger(__name__)

COOKIE = "screener_session"
KEY_FILE = "web-secret-key"
# a key holding less (a key file left empty by a failed write) is never signed with
MIN_KEY_CHARS = MIN_SECRET_KEY_CHARS


@dataclass(frozen=True)
class Principal:
    user: UserInfo
    csrf: str  # empty for HTTP Basic (no forms)

    @property
    def is_admin(self) -> bool:
        return self.user.role is Role.ADMIN


def secret_key(settings: Settings) -> str:
    """http.secret_key, or a random key created once in <data_dir> (mode 0600).

    A key file with fewer than MIN_KEY_CHARS characters (left empty by a start whose write
    failed, or truncated) is replaced by a new key: signing with it would let anyone forge
    a session.
    """
    if settings.http.secret_key:
        return settings.http.secret_key
    path = Path(settings.data_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with _directory_lock(path.parent):  # replicas starting together replace a short key once
        key = _read_key(path)
        if key is not None and len(key) >= MIN_KEY_CHARS:
            return key
        if key is not None:
            log.warning(
                "%s holds %d characters of key material (at least %d needed): replacing it "
                "with a new random key; existing sessions end",
                path,
                len(key),
                MIN_KEY_CHARS,
            )
        _install_key(path, secrets.token_urlsafe(48), replace=key is not None)
        key = _read_key(path)  # another process may have created it first: its key wins
    if key is None or len(key) < MIN_KEY_CHARS:
        raise RuntimeError(f"could not create a usable session key in {path}")
    return key


def _read_key(path: Path) -> str | None:
    """The key material in ``path`` (None when there is no file; "" when not text)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return ""  # garbage: replaced like an empty file


def _install_key(path: Path, key: str, *, replace: bool) -> None:
    """Write ``key`` to a private temporary file, then put it in place.

    The file is created with mode 0600 (never readable by others, not even briefly) and is
    complete before it gets its name: a failed write (disk full) leaves no key file behind.
    Without ``replace`` the first writer wins (link fails when the name exists).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, key.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        _fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make the new name durable (best effort: some filesystems refuse a directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory`` (no lock file left behind); a no-op where the
    platform or filesystem has none (creation stays first-writer-wins through link)."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key = secret_key(settings)
        self.serializer = URLSafeTimedSerializer(self._key, salt="screener-session")
        self.max_age = int(settings.http.session_hours * 3600)

    def _stamp(self, password_hash: str) -> str:
        """Binds a cookie to one account row: a re-added user (new salted hash) gets a new
        stamp. Keyed, so the cookie reveals nothing about the hash."""
        digest = hmac.new(self._key.encode(), password_hash.encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    def _account(self, name: str) -> tuple[UserInfo, str] | None:
        """The user of that name and the stamp of its row, read fresh (role, removal)."""
        with session_scope(self.settings.database_url) as session:
            row = session.exec(select(User).where(User.name == name)).first()
            if row is None:
                return None
            info = UserInfo(row.name, Role(row.role), row.created_at, row.last_login_at)
            return info, self._stamp(row.password_hash)

    def issue(self, user: UserInfo) -> tuple[str, str]:
        """A cookie value for a fresh session, and its CSRF token."""
        csrf = secrets.token_urlsafe(24)
        account = self._account(user.name)
        stamp = account[1] if account else ""  # removed meanwhile: a cookie that never works
        return self.serializer.dumps({"u": user.name, "s": stamp, "c": csrf}), csrf

    def from_cookie(self, request: Request) -> Principal | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self.serializer.loads(raw, max_age=self.max_age)
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        account = self._account(str(data.get("u", "")))
        if account is None:
            return None
        user, stamp = account
        if not hmac.compare_digest(stamp.encode(), str(data.get("s", "")).encode()):
            return None  # an account of the same name, but not the one signed in
        return Principal(user, str(data.get("c", "")))

    def from_basic(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        user = authenticate(self.settings.database_url, name, password)
        return None if user is None else Principal(user, "")

    @staticmethod
    def csrf_ok(principal: Principal, sent: str | None) -> bool:
        return bool(principal.csrf) and hmac.compare_digest(principal.csrf, sent or "")
