"""Web app users: create, authenticate, change role, deactivate, with an audit trail.

Passwords are stored as argon2id hashes (argon2-cffi defaults); the audit trail
records who created or changed a user and never a password or its hash. Like
:mod:`bmetrack.study.records`, functions take a session and an ``actor`` and
never commit.
"""

from __future__ import annotations

import contextlib
import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bmetrack.study.models import AuditEvent, User, UserRole
from bmetrack.study.records import (
    Problem,
    RecordNotFoundError,
    StaleRecordError,
    ValidationError,
    require_actor,
)

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "USERNAME_PATTERN",
    "authenticate",
    "create_user",
    "get_user",
    "hash_password",
    "list_users",
    "parse_role",
    "set_active",
    "set_password",
    "set_role",
]

USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{2,64}$")
MIN_PASSWORD_LENGTH = 10

_HASHER = PasswordHasher()
# Verified when the user name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


def hash_password(password: str) -> str:
    """Argon2id hash of ``password`` (salted; the text to store)."""
    return _HASHER.hash(password)


def parse_role(role: str | UserRole) -> UserRole:
    """``role`` as a UserRole; ValueError naming the valid roles otherwise."""
    try:
        return UserRole(str(role).strip().lower())
    except ValueError:
        choices = ", ".join(member.value for member in UserRole)
        msg = f"role must be one of {choices}; got {role!r}."
        raise ValueError(msg) from None


def _password_problems(password: str, record: str) -> list[Problem]:
    if len(password) < MIN_PASSWORD_LENGTH:
        return [
            Problem(
                record,
                "password",
                "(hidden)",
                f"must be at least {MIN_PASSWORD_LENGTH} characters; choose a longer one",
            )
        ]
    return []


def _audit(
    session: Session,
    user: User,
    action: str,
    field: str,
    old: str | None,
    new: str | None,
    actor: str,
) -> None:
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            entity=User.__tablename__,
            entity_id=user.id,
            field=field,
            old_value=old,
            new_value=new,
            reason="",
        )
    )


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        msg = f"No user with id {user_id}."
        raise RecordNotFoundError(msg)
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def create_user(
    session: Session, username: str, password: str, role: str | UserRole, *, actor: str
) -> User:
    """Add a user; ValidationError for a bad or taken name, a short password or a bad role."""
    require_actor(actor)
    record = f"user {username!r}"
    problems: list[Problem] = []
    name = str(username).strip()
    if not USERNAME_PATTERN.fullmatch(name):
        problems.append(
            Problem(record, "username", username, "use 2-64 letters, digits, '.', '-' or '_'")
        )
    elif session.scalar(select(User.id).where(func.lower(User.username) == name.lower())):
        problems.append(Problem(record, "username", username, "is taken; choose another name"))
    problems += _password_problems(password, record)
    try:
        kind = parse_role(role)
    except ValueError as error:
        problems.append(Problem(record, "role", role, str(error)))
    if problems:
        raise ValidationError(problems)
    user = User(username=name, password_hash=hash_password(password), role=kind, active=True)
    session.add(user)
    session.flush()
    _audit(session, user, "create", "", None, f"{name} ({kind.value})", actor)
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this name and password, else None (same cost either way)."""
    user = session.scalar(select(User).where(User.username == str(username).strip()))
    if user is None or not user.active:
        with contextlib.suppress(VerificationError):
            _HASHER.verify(_DUMMY_HASH, password)
        return None
    try:
        _HASHER.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def _checked(session: Session, user_id: int, expected_row_version: int | None) -> User:
    user = get_user(session, user_id)
    if expected_row_version is not None and user.row_version != expected_row_version:
        msg = (
            f"user {user.username} was changed by someone else since you opened it (version "
            f"{user.row_version}, yours {expected_row_version}); reload and re-apply your change"
        )
        raise StaleRecordError(msg)
    return user


def set_role(
    session: Session,
    user_id: int,
    role: str | UserRole,
    *,
    actor: str,
    expected_row_version: int | None = None,
) -> User:
    require_actor(actor)
    user = _checked(session, user_id, expected_row_version)
    try:
        kind = parse_role(role)
    except ValueError as error:
        raise ValidationError(
            [Problem(f"user {user.username}", "role", role, str(error))]
        ) from None
    if kind != user.role:
        _audit(session, user, "update", "role", user.role.value, kind.value, actor)
        user.role = kind
        session.flush()
    return user


def set_active(
    session: Session,
    user_id: int,
    active: bool,
    *,
    actor: str,
    expected_row_version: int | None = None,
) -> User:
    """Activate or deactivate a user (a deactivated user can no longer log in)."""
    require_actor(actor)
    user = _checked(session, user_id, expected_row_version)
    if bool(active) != user.active:
        _audit(
            session, user, "update", "active", str(user.active).lower(), str(active).lower(), actor
        )
        user.active = bool(active)
        session.flush()
    return user


def set_password(
    session: Session,
    user_id: int,
    password: str,
    *,
    actor: str,
    expected_row_version: int | None = None,
) -> User:
    require_actor(actor)
    user = _checked(session, user_id, expected_row_version)
    problems = _password_problems(password, f"user {user.username}")
    if problems:
        raise ValidationError(problems)
    user.password_hash = hash_password(password)
    _audit(session, user, "update", "password", None, "(changed)", actor)
    session.flush()
    return user
