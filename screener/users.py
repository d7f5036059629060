"""Users of the web console and JSON API: names, roles, argon2id password hashes.

``screener users add|list|remove`` and the web login both go through these functions; every
change is written to the audit log. Passwords are never stored or logged, only hashed with
argon2id (memory-hard, the argon2-cffi defaults: 64 MiB, 3 passes).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import select

from screener.db.models import AuditLog, User, utcnow
from screener.db.session import session_scope

_hasher = PasswordHasher()
MIN_PASSWORD_LENGTH = 8


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so a wrong name costs as long as a wrong
    password. Made on first use: an argon2 hash at import would slow every CLI start."""
    return _hasher.hash("not-a-real-password")


class Role(enum.StrEnum):
    ADMIN = "admin"  # may retry deliveries, set thresholds
    VIEWER = "viewer"  # reads everything, changes nothing


@dataclass(frozen=True)
class UserInfo:
    name: str
    role: Role
    created_at: datetime
    last_login_at: datetime | None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role.value,
            "created_at": self.created_at.isoformat(),
            "last_login_at": None if self.last_login_at is None else self.last_login_at.isoformat(),
        }


def _info(row: User) -> UserInfo:
    return UserInfo(row.name, Role(row.role), row.created_at, row.last_login_at)


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or any(c.isspace() or c == ":" for c in name):
        raise ValueError("a user name is 1 to 64 characters without spaces or ':'")
    return name


def add_user(database_url: str, name: str, role: Role, password: str, actor: str) -> UserInfo:
    """Create a user; ValueError when the name is taken or the password too short."""
    name = _check_name(name)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    with session_scope(database_url) as session:
        if session.exec(select(User).where(User.name == name)).first() is not None:
            raise ValueError(f"user {name!r} exists; remove it first to change it")
        row = User(name=name, role=role.value, password_hash=_hasher.hash(password))
        session.add(row)
        session.add(
            AuditLog(actor=actor[:64], action="user.added", detail={"name": name, "role": role})
        )
        session.flush()
        return _info(row)


def list_users(database_url: str) -> list[UserInfo]:
    with session_scope(database_url) as session:
        return [_info(u) for u in session.exec(select(User).order_by(User.name)).all()]


def remove_user(database_url: str, name: str, actor: str) -> bool:
    """Delete a user; False when there was none of that name."""
    with session_scope(database_url) as session:
        row = session.exec(select(User).where(User.name == name)).first()
        if row is None:
            return False
        session.delete(row)
        session.add(AuditLog(actor=actor[:64], action="user.removed", detail={"name": name}))
    return True


def authenticate(database_url: str, name: str, password: str) -> UserInfo | None:
    """The user when the password matches, else None (same cost for unknown names)."""
    with session_scope(database_url) as session:
        row = session.exec(select(User).where(User.name == name)).first()
        try:
            _hasher.verify(row.password_hash if row else _dummy_hash(), password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        row.last_login_at = utcnow()
        session.add(row)
        return _info(row)


def get_user(database_url: str, name: str) -> UserInfo | None:
    with session_scope(database_url) as session:
        row = session.exec(select(User).where(User.name == name)).first()
        return None if row is None else _info(row)
