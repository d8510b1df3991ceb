"""Fixtures of the web tests: a small simulated study with one user per role."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from webtest_support import PASSWORD, ROLES, STUDY, login

from bmetrack.simulate.cohort import CohortParameters, simulate_cohort
from bmetrack.study import db
from bmetrack.study.importers import import_tables
from bmetrack.study.users import create_user
from bmetrack.web.app import WebSettings, create_app


@pytest.fixture(scope="session")
def web_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated database with 6 simulated patients and users admin, radiologist, ..."""
    path = tmp_path_factory.mktemp("web-template") / "study.db"
    engine = db.make_engine(path)
    db.upgrade(engine)
    cohort = simulate_cohort(CohortParameters(n_patients=6), seed=7)
    import_tables(engine, STUDY, cohort.frames, "test", title="web test study")
    with db.session_scope(engine) as session:
        for role in ROLES:
            create_user(session, role, PASSWORD, role, actor="test")
    engine.dispose()
    return path


@pytest.fixture
def web_engine(tmp_path: Path, web_template: Path) -> Iterator[Engine]:
    path = tmp_path / "study.db"
    shutil.copyfile(web_template, path)
    engine = db.make_engine(path)
    yield engine
    engine.dispose()


@pytest.fixture
def app_client(web_engine: Engine, tmp_path: Path) -> Iterator[TestClient]:
    settings = WebSettings(secret_key="test-secret", cache_dir=tmp_path / "cache")
    with TestClient(create_app(web_engine, settings), follow_redirects=False) as client:
        yield client


@pytest.fixture
def logged_in(app_client: TestClient) -> Callable[[str], str]:
    return lambda role: login(app_client, role)
