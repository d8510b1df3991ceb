"""Log in and out."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from bmetrack.study.db import session_scope
from bmetrack.study.users import authenticate
from bmetrack.web.app import render
from bmetrack.web.auth import LoginRateLimiter, csrf_token

router = APIRouter()


@router.get("/login")
def login_page(request: Request) -> Response:
    return render(request, "login.html", error="", username="")


@router.post("/login")
def login(request: Request, username: str = Form(""), password: str = Form("")) -> Response:
    limiter: LoginRateLimiter = request.app.state.limiter
    address = request.client.host if request.client else "?"
    if limiter.blocked(username, address):
        return render(
            request,
            "login.html",
            status_code=429,
            error="Too many failed logins; wait a few minutes and try again.",
            username=username,
        )
    with session_scope(request.app.state.engine) as session:
        user = authenticate(session, username, password)
        user_id = None if user is None else user.id
    if user_id is None:
        limiter.failed(username, address)
        return render(
            request,
            "login.html",
            status_code=401,
            error="Wrong user name or password, or the account is deactivated.",
            username=username,
        )
    limiter.succeeded(username, address)
    request.session.clear()  # a new session (and CSRF token) after login
    request.session["user_id"] = user_id
    csrf_token(request)
    return RedirectResponse("/", status_code=303)


@router.post("/logout")
def logout(request: Request) -> Response:
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
