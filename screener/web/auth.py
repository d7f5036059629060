"""Who is asking: session cookies for pages, HTTP Basic for the API, CSRF tokens for forms.

The session cookie is signed (itsdangerous) and holds the user name, a stamp of that account
row (a keyed hash of its password hash), a random CSRF token that every form must send back,
and a random session token whose hash names a ``web_sessions`` row. The role is read from the
database on every request and the stamp compared: a removed user is logged out at once, and
removing and re-adding a user (how a password is changed) voids every cookie issued before.
Logout deletes the session row, so a copied cookie stops working with it; a session idle
longer than ``http.session_idle_minutes`` or older than ``http.session_hours`` is refused.
Roles are enforced here, on the server.

Passwords (argon2id: ~0.4 s of CPU and 64 MiB each) are checked on worker threads, never on
the event loop, at most PASSWORD_CHECK_SLOTS at once; failed sign-ins are throttled per user
name and per client address (:class:`LoginThrottle`) and written to the audit log.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal, TypeVar

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import delete, or_
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from screener.db.models import AuditLog, User, WebSession, utcnow
from screener.db.session import session_scope
from screener.settings import MIN_SECRET_KEY_CHARS, Settings
from screener.timeutil import aware
from screener.users import Role, UserInfo, authenticate
from screener.web.thread_lane import ThreadLane

log = logging.getLogger(__name__)
T = TypeVar("T")

COOKIE = "screener_session"
KEY_FILE = "web-secret-key"
# a key holding less (a key file left empty by a failed write) is never signed with
MIN_KEY_CHARS = MIN_SECRET_KEY_CHARS
# argon2id verifications at once (64 MiB each), and how many more may wait for a slot; any
# beyond are answered 503 at once, so a flood of bad passwords costs bounded memory and CPU
PASSWORD_CHECK_SLOTS = 2
PASSWORD_CHECK_QUEUE = 8
# a session's last_seen_at is written at most this often (the idle timeout's resolution)
SESSION_TOUCH_S = 60.0
# a successful HTTP Basic call is audited once per user and this long, not on every call
BASIC_OK_AUDIT_INTERVAL_S = 3600.0
# throttling state kept for at most this many user names / addresses each (memory bound)
THROTTLE_MAX_KEYS = 10_000

Method = Literal["form", "basic"]


@dataclass(frozen=True)
class Principal:
    user: UserInfo
    csrf: str  # empty for HTTP Basic (no forms)
    session: str = ""  # the web_sessions row of a cookie session; empty for HTTP Basic

    @property
    def is_admin(self) -> bool:
        return self.user.role is Role.ADMIN


@dataclass(frozen=True)
class Refused:
    """A sign-in answered without checking its password: throttled (429) or busy (503)."""

    status: int
    retry_after: int  # seconds, for the Retry-After header
    reason: str


def client_address(request: Request) -> str:
    """The peer's address (behind a trusted proxy, uvicorn has put X-Forwarded-For here)."""
    return request.client.host if request.client else "unknown"


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


class Busy(Exception):
    """Every password-check slot is taken and the queue is full."""


class PasswordChecks:
    """Runs password verifications on threads, at most ``slots`` at once.

    The wait for a slot happens on the event loop (anyio's capacity limiter), not on a
    thread: waiting checks hold no thread of the pool that /healthz and the pages use. At
    most ``queue`` checks wait; more raise :class:`Busy` at once.
    """

    def __init__(self, slots: int = PASSWORD_CHECK_SLOTS, queue: int = PASSWORD_CHECK_QUEUE):
        self._admit = slots + queue
        self._admitted = 0
        self._lock = threading.Lock()
        self._lane = ThreadLane("password-checks", slots)

    async def run(self, func: Callable[[], T]) -> T:
        with self._lock:
            if self._admitted >= self._admit:
                raise Busy
            self._admitted += 1
        try:
            return await self._lane.run(func)
        finally:
            with self._lock:
                self._admitted -= 1


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)  # monotonic times of failures
    locked_until: float = 0.0
    in_flight: int = 0  # attempts whose password is being checked now


class LoginThrottle:
    """Failed sign-ins counted per user name and per client address over a sliding window.

    Once a key (a name, an address) has ``max`` failures within the window it is locked
    for ``lockout_s``, doubled with each further failure (at most the window); a locked key
    is answered 429 without checking the password, so guessing costs the attacker time and
    the server nothing. While a key has failures, attempts in flight count against what is
    left: a burst of parallel guesses gets no more tries than a sequence. A success clears
    the user name's count (not the address's). The state lives in this process: ``screener
    web`` and ``serve`` run one, and each replica counts on its own.
    """

    def __init__(
        self,
        *,
        max_user: int,
        max_address: int,
        window_s: float,
        lockout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_user, self.max_address = max_user, max_address
        self.window_s, self.lockout_s = window_s, lockout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Failures] = {}

    def _keys(self, name: str, address: str) -> list[tuple[tuple[str, str], int]]:
        return [(("user", name[:64]), self.max_user), (("address", address), self.max_address)]

    def _recent(self, entry: _Failures, now: float) -> int:
        while entry.times and entry.times[0] <= now - self.window_s:
            entry.times.popleft()
        return len(entry.times)

    def _sweep(self, now: float) -> None:
        """Forget idle keys; when still too many, the ones that failed longest ago."""
        for key in [k for k, e in self._entries.items() if not self._recent(e, now)]:
            if not self._entries[key].in_flight and self._entries[key].locked_until <= now:
                del self._entries[key]
        if len(self._entries) >= THROTTLE_MAX_KEYS:
            idle = sorted(
                (k for k, e in self._entries.items() if not e.in_flight),
                key=lambda k: self._entries[k].times[-1] if self._entries[k].times else 0.0,
            )
            for key in idle[: len(self._entries) - THROTTLE_MAX_KEYS // 2]:
                del self._entries[key]

    def begin(self, name: str, address: str) -> float:
        """0.0 with one attempt reserved for ``name`` from ``address``; else the seconds to
        wait before trying again (nothing reserved)."""
        with self._lock:
            now = self._clock()
            wait = 0.0
            keys = self._keys(name, address)
            for key, limit in keys:
                entry = self._entries.get(key)
                if entry is None or not self._recent(entry, now):
                    continue
                if now < entry.locked_until:
                    wait = max(wait, entry.locked_until - now)
                elif entry.in_flight and len(entry.times) + entry.in_flight >= limit:
                    wait = max(wait, 1.0)  # one try at a time once the budget is spent
            if wait:
                return wait
            if len(self._entries) >= THROTTLE_MAX_KEYS:
                self._sweep(now)
            for key, _limit in keys:
                self._entries.setdefault(key, _Failures()).in_flight += 1
            return 0.0

    def end(self, name: str, address: str, ok: bool | None) -> list[tuple[str, int, float]]:
        """Release the attempt :meth:`begin` reserved and count its outcome (None: not
        checked); the keys this failure locked, as (kind, failures, seconds locked)."""
        with self._lock:
            now = self._clock()
            locked: list[tuple[str, int, float]] = []
            for key, limit in self._keys(name, address):
                entry = self._entries.setdefault(key, _Failures())
                entry.in_flight = max(0, entry.in_flight - 1)
                if ok is True and key[0] == "user":
                    entry.times.clear()
                    entry.locked_until = 0.0
                elif ok is False:
                    entry.times.append(now)
                    failures = self._recent(entry, now)
                    if failures >= limit:
                        doubled = self.lockout_s * 2 ** min(failures - limit, 30)
                        seconds = min(self.window_s, doubled)
                        entry.locked_until = now + seconds
                        locked.append((key[0], failures, seconds))
                if not entry.times and not entry.in_flight and entry.locked_until <= now:
                    del self._entries[key]
            return locked


def _session_id(token: str) -> str:
    """The web_sessions key of a cookie's session token (the database never holds the token)."""
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key = secret_key(settings)
        self.serializer = URLSafeTimedSerializer(self._key, salt="screener-session")
        http = settings.http
        self.max_age = int(http.session_hours * 3600)
        self.lifetime = timedelta(hours=http.session_hours)
        self.idle = timedelta(minutes=http.session_idle_minutes)
        self.checks = PasswordChecks()
        self.throttle = LoginThrottle(
            max_user=http.login_max_failures,
            max_address=http.login_max_failures_per_address,
            window_s=http.login_window_minutes * 60,
            lockout_s=http.login_lockout_seconds,
        )
        self._basic_audited: dict[str, float] = {}
        self._basic_lock = threading.Lock()

    def _stamp(self, password_hash: str) -> str:
        """Binds a cookie to one account row: a re-added user (new salted hash) gets a new
        stamp. Keyed, so the cookie reveals nothing about the hash."""
        digest = hmac.new(self._key.encode(), password_hash.encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    # ------------------------------------------------------------------ cookie sessions

    def issue(self, user: UserInfo) -> tuple[str, str]:
        """A cookie value for a fresh session (its web_sessions row written), and its CSRF
        token. Blocks on the database: call it off the event loop."""
        csrf, token = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
        now = utcnow()
        with session_scope(self.settings.database_url) as session:
            row = session.exec(select(User).where(User.name == user.name)).first()
            stamp = ""  # removed meanwhile: a cookie that never works
            if row is not None and row.id is not None:
                stamp = self._stamp(row.password_hash)
                session.add(
                    WebSession(
                        id=_session_id(token), user_id=row.id, created_at=now, last_seen_at=now
                    )
                )
            session.execute(  # sessions that can no longer be used: gone
                delete(WebSession).where(
                    or_(
                        col(WebSession.last_seen_at) < now - self.idle,
                        col(WebSession.created_at) < now - self.lifetime,
                    )
                )
            )
        return self.serializer.dumps({"u": user.name, "s": stamp, "c": csrf, "k": token}), csrf

    def from_cookie(self, raw: str | None) -> Principal | None:
        """The user of a session cookie value, or None (bad signature, logged out, idle,
        expired, account removed or replaced). Blocks on the database: call it off the
        event loop. Slides the idle timeout (last_seen_at, at most once a minute)."""
        if not raw:
            return None
        try:
            data = self.serializer.loads(raw, max_age=self.max_age)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not data.get("k"):
            return None  # no session token: a cookie from before sessions were kept
        now = utcnow()
        with session_scope(self.settings.database_url) as session:
            found = session.exec(
                select(User, WebSession)
                .join(WebSession, col(WebSession.user_id) == col(User.id))
                .where(col(WebSession.id) == _session_id(str(data["k"])))
            ).first()
            if found is None:
                return None  # logged out, or the account was removed
            row, web = found
            if row.name != data.get("u") or not hmac.compare_digest(
                self._stamp(row.password_hash).encode(), str(data.get("s", "")).encode()
            ):
                return None  # an account of the same name, but not the one signed in
            seen = aware(web.last_seen_at)
            if seen < now - self.idle or aware(web.created_at) < now - self.lifetime:
                session.delete(web)
                return None
            if (now - seen).total_seconds() >= SESSION_TOUCH_S:
                web.last_seen_at = now
                session.add(web)
            user = UserInfo(row.name, Role(row.role), row.created_at, row.last_login_at)
            return Principal(user, str(data.get("c", "")), web.id)

    def end(self, principal: Principal) -> None:
        """Log out: the session's row is deleted, and with it every copy of its cookie."""
        if not principal.session:
            return
        with session_scope(self.settings.database_url) as session:
            session.execute(delete(WebSession).where(col(WebSession.id) == principal.session))

    # ------------------------------------------------------------------ passwords

    async def check_password(
        self, name: str, password: str, address: str, method: Method
    ) -> UserInfo | Refused | None:
        """The user when the password is right, None when not (audited, counted), or a
        :class:`Refused` when it was not checked (throttled, or too many checks at once).

        The argon2id verification runs on a worker thread (see :class:`PasswordChecks`).
        """
        wait = self.throttle.begin(name, address)
        if wait:
            return Refused(429, max(1, math.ceil(wait)), "too many failed sign-ins")
        try:
            user = await self.checks.run(
                functools.partial(authenticate, self.settings.database_url, name, password)
            )
        except Busy:
            self.throttle.end(name, address, None)
            return Refused(503, 1, "too many sign-ins are being checked")
        except BaseException:
            self.throttle.end(name, address, None)
            raise
        locked = self.throttle.end(name, address, user is not None)
        await run_in_threadpool(self._record, name, address, method, user, locked)
        return user

    def _record(
        self,
        name: str,
        address: str,
        method: Method,
        user: UserInfo | None,
        locked: list[tuple[str, int, float]],
    ) -> None:
        """Audit rows and log lines of one sign-in (never the password)."""
        name = name[:64]
        detail: dict[str, object] = {"user": name, "address": address, "method": method}
        rows: list[AuditLog] = []
        if user is not None:
            if method == "basic" and not self._basic_due(user.name):
                return  # an API client signs in on every call: not a row per call
            rows.append(
                AuditLog(actor=f"web:{user.name}"[:64], action="web.login.ok", detail=detail)
            )
        else:
            log.warning("failed sign-in (%s) as %r from %s", method, name, address)
            rows.append(AuditLog(actor="web", action="web.login.failed", detail=detail))
        for kind, failures, seconds in locked:
            log.warning(
                "sign-ins locked for %.0f s: %d failures within %.0f min for %s %r",
                seconds,
                failures,
                self.throttle.window_s / 60,
                kind,
                name if kind == "user" else address,
            )
            rows.append(
                AuditLog(
                    actor="web",
                    action="web.login.locked",
                    detail={**detail, "locked": kind, "failures": failures, "seconds": seconds},
                )
            )
        with session_scope(self.settings.database_url) as session:
            session.add_all(rows)

    def _basic_due(self, name: str) -> bool:
        """True once per user and BASIC_OK_AUDIT_INTERVAL_S (then False until it passes)."""
        now = time.monotonic()
        with self._basic_lock:
            last = self._basic_audited.get(name)
            if last is not None and now - last < BASIC_OK_AUDIT_INTERVAL_S:
                return False
            if len(self._basic_audited) >= THROTTLE_MAX_KEYS:
                self._basic_audited.clear()
            self._basic_audited[name] = now
            return True

    async def from_basic(self, request: Request) -> Principal | Refused | None:
        """The user of an HTTP Basic header (None without one, or a wrong password)."""
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        user = await self.check_password(name, password, client_address(request), "basic")
        return user if not isinstance(user, UserInfo) else Principal(user, "")

    @staticmethod
    def csrf_ok(principal: Principal, sent: str | None) -> bool:
        return bool(principal.csrf) and hmac.compare_digest(principal.csrf, sent or "")
