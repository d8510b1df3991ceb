"""Helpers shared by the web tests (a module, not conftest, so test files can import it)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

STUDY = "WEB"
PASSWORD = "correct horse battery"
ROLES = ("admin", "radiologist", "data_entry", "viewer")


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client: TestClient, role: str, password: str = PASSWORD) -> str:
    """Log in as the user named after ``role``; returns the session's CSRF token."""
    token = csrf_of(client.get("/login").text)
    response = client.post(
        "/login", data={"username": role, "password": password, "csrf_token": token}
    )
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/patients").text)
