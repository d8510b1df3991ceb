"""User administration (admin role only)."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from bmetrack.study import records, users
from bmetrack.study.db import session_scope
from bmetrack.study.models import UserRole
from bmetrack.web.app import render
from bmetrack.web.auth import Admin

router = APIRouter()


def _page(
    request: Request, message: str = "", errors: list[str] | None = None, status_code: int = 200
) -> Response:
    with session_scope(request.app.state.engine) as session:
        listing = users.list_users(session)
        return render(
            request,
            "users.html",
            status_code=status_code,
            users=listing,
            roles=[role.value for role in UserRole],
            message=message,
            errors=errors or [],
        )


@router.get("/admin/users")
def user_list(request: Request, user: Admin) -> Response:
    return _page(request, request.query_params.get("message", ""))


@router.post("/admin/users")
def add_user(
    request: Request,
    user: Admin,
    username: str = Form(""),
    password: str = Form(""),
    role: str = Form("viewer"),
) -> Response:
    try:
        with session_scope(request.app.state.engine) as session:
            users.create_user(session, username, password, role, actor=user.username)
    except records.ValidationError as error:
        return _page(
            request, errors=[f"{p.field}: {p.reason}" for p in error.problems], status_code=422
        )
    return RedirectResponse("/admin/users?message=User+created.", status_code=303)


@router.post("/admin/users/{user_id}")
def change_user(
    request: Request,
    user: Admin,
    user_id: int,
    role: str = Form(""),
    active: str = Form(""),
    row_version: str = Form(""),
) -> Response:
    expected = int(row_version) if row_version.strip().isdigit() else None
    try:
        with session_scope(request.app.state.engine) as session:
            if role:
                users.set_role(
                    session, user_id, role, actor=user.username, expected_row_version=expected
                )
                expected = None  # the first change moved the version on
            if active in ("yes", "no"):
                if active == "no" and user_id == user.id:
                    raise records.ValidationError(
                        [
                            records.Problem(
                                "user", "active", active, "you cannot deactivate yourself"
                            )
                        ]
                    )
                users.set_active(
                    session,
                    user_id,
                    active == "yes",
                    actor=user.username,
                    expected_row_version=expected,
                )
    except records.ValidationError as error:
        return _page(
            request, errors=[f"{p.field}: {p.reason}" for p in error.problems], status_code=422
        )
    except records.StaleRecordError as error:
        return _page(request, errors=[str(error)], status_code=409)
    except records.RecordNotFoundError as error:
        return _page(request, errors=[str(error)], status_code=404)
    return RedirectResponse("/admin/users?message=Saved.", status_code=303)
