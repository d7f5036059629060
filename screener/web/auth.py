"""Who is asking: session cookies for pages, HTTP Basic for the API, CSRF tokens for forms.

The session cookie is signed (itsdangerous) and holds the user name, role is read from the
database on every request (a removed user is logged out at once) and a random CSRF token that
every form must send back. Roles are enforced here, on the server.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request

from screener.settings import Settings
from screener.users import Role, UserInfo, authenticate, get_user

COOKIE = "screener_session"


@dataclass(frozen=True)
class Principal:
    user: UserInfo
    csrf: str  # empty for HTTP Basic (no forms)

    @property
    def is_admin(self) -> bool:
        return self.user.role is Role.ADMIN


def secret_key(settings: Settings) -> str:
    """http.secret_key, or a random key created once in <data_dir> (mode 0600)."""
    if settings.http.secret_key:
        return settings.http.secret_key
    path = Path(settings.data_dir) / "web-secret-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.serializer = URLSafeTimedSerializer(secret_key(settings), salt="screener-session")
        self.max_age = int(settings.http.session_hours * 3600)

    def issue(self, user: UserInfo) -> tuple[str, str]:
        """A cookie value for a fresh session, and its CSRF token."""
        csrf = secrets.token_urlsafe(24)
        return self.serializer.dumps({"u": user.name, "c": csrf}), csrf

    def from_cookie(self, request: Request) -> Principal | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self.serializer.loads(raw, max_age=self.max_age)
        except BadSignature:
            return None
        user = get_user(self.settings.database_url, str(data.get("u", "")))
        return None if user is None else Principal(user, str(data.get("c", "")))

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
