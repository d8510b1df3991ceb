"""The slice viewer on a real filed DICOM study: rendered PNGs, scrolling, the image cache."""

from __future__ import annotations

import datetime as dt
import io
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from webtest_support import PASSWORD, login

import bmetrack.imaging.quantify as quantify_module
import bmetrack.imaging.render as render_module
from bmetrack.imaging.dicom import read_series
from bmetrack.simulate.images import DEMO_PHANTOM_PARAMETERS
from bmetrack.simulate.phantom import phantom_for_visit
from bmetrack.study import db, records
from bmetrack.study.dicom_import import import_dicom
from bmetrack.study.importers import import_tables
from bmetrack.study.models import ImagingSession, Patient
from bmetrack.study.users import create_user
from bmetrack.web.app import WebSettings, create_app

PROCEDURE = dt.date(2020, 1, 10)
SIZE_PX = 384  # the viewer's longest image side (routes_imaging.SliceCache.png)


@pytest.fixture(scope="module")
def filed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object, Path]]:
    """A database with one patient, one filed phantom study (STIR + T1) and its measurement."""
    root = tmp_path_factory.mktemp("webv2_slices")
    engine = db.make_engine(root / "study.db")
    db.upgrade(engine)
    frames = {
        "patients": pd.DataFrame({"patient_code": ["P1"], "sex": ["F"]}),
        "procedures": pd.DataFrame(
            {
                "patient_code": ["P1"],
                "procedure_date": [PROCEDURE],
                "procedure_type": ["vertebroplasty"],
                "level": ["L1"],
            }
        ),
    }
    import_tables(engine, "S", frames, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        phantom = phantom_for_visit(
            [{"level": "L1", "bme_percent": 60.0, "cement_volume_ml": 0.0}],
            0,
            seed=100,
            params=DEMO_PHANTOM_PARAMETERS,
        )
        paths = phantom.write_dicom(
            root / "dicom", patient_id="P1", study_date=PROCEDURE.strftime("%Y%m%d")
        )
    report = import_dicom(engine, "S", root / "dicom", actor="test")
    assert len(report.by_status("created")) == 1, report.summary()
    with db.session_scope(engine) as session:
        imaging = session.scalars(select(ImagingSession)).one()
        patient = session.scalars(select(Patient)).one()
        records.add_measurement(
            session,
            patient,
            imaging.visit.visit_date,
            "L1",
            {"bme_percent": 58.0, "genant_grade": 1},
            actor="pipeline",
            imaging_session_id=imaging.id,
        )
        create_user(session, "radiologist", PASSWORD, "radiologist", actor="test")
    engine.dispose()
    yield root / "study.db", phantom, Path(paths["stir"])


@pytest.fixture
def viewer(filed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A logged-in client, the phantom, and the list of render calls made by the app."""
    path, phantom, stir_path = filed
    real_quantify = quantify_module.quantify_study
    real_render = render_module.render_slice
    renders: list[tuple[int, bool]] = []

    def with_true_labels(stir, t1, settings=None, **kwargs):
        return real_quantify(stir, t1, settings, labels=phantom.labels)

    def counted(image, slice_index, **kwargs):
        renders.append((slice_index, kwargs.get("overlays") is not None))
        return real_render(image, slice_index, **kwargs)

    monkeypatch.setattr(quantify_module, "quantify_study", with_true_labels)
    monkeypatch.setattr(render_module, "render_slice", counted)
    engine = db.make_engine(path)
    settings = WebSettings(secret_key="test-secret", cache_dir=tmp_path / "cache")
    with TestClient(create_app(engine, settings), follow_redirects=False) as client:
        login(client, "radiologist")
        with db.session_scope(engine) as session:
            imaging_id = session.scalars(select(ImagingSession.id)).one()
        yield client, imaging_id, read_series(stir_path), renders
    engine.dispose()


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk, read by hand."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_slices_are_rendered_scrolled_and_cached(viewer):
    client, imaging_id, stir, renders = viewer
    n_slices, n_rows, n_cols = stir.shape
    timeline = client.get("/patients/1/timeline").text
    assert f'hx-get="/fragments/slices/{imaging_id}"' in timeline
    assert "images not on disk" not in timeline
    fragment = client.get(f"/fragments/slices/{imaging_id}").text
    middle = n_slices // 2
    assert f"slice {middle + 1} / {n_slices}" in fragment
    assert f"/images/{imaging_id}/stir/{middle}.png?overlay=1" in fragment

    first = client.get(f"/images/{imaging_id}/stir/{middle}.png?overlay=1")
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    # Longest side SIZE_PX, the other one scaled by the physical extent (square pixels).
    _, row_mm, col_mm = stir.spacing_mm
    height_mm, width_mm = n_rows * row_mm, n_cols * col_mm
    expected = (
        (SIZE_PX, round(SIZE_PX * height_mm / width_mm))
        if width_mm >= height_mm
        else (round(SIZE_PX * width_mm / height_mm), SIZE_PX)
    )
    width, height = _png_size(first.content)
    assert abs(width - expected[0]) <= 1 and abs(height - expected[1]) <= 1
    picture = np.asarray(Image.open(io.BytesIO(first.content)).convert("RGB")).astype(int)
    assert picture.std() > 10  # an image, not a flat placeholder
    # The overlay draws coloured pixels (edema, rim, label contours); a grey image has none.
    plain = client.get(f"/images/{imaging_id}/stir/{middle}.png?overlay=0")
    grey = np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB")).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 1
    assert (np.abs(picture[..., 0] - picture[..., 2]) > 40).sum() > 20
    assert renders == [(middle, True), (middle, False)]

    # Scrolling (the HTMX button) moves to the next slice, which is a different image.
    nxt = client.get(f"/fragments/slices/{imaging_id}?index={middle + 1}&overlay=1").text
    assert f"/images/{imaging_id}/stir/{middle + 1}.png?overlay=1" in nxt
    other = client.get(f"/images/{imaging_id}/stir/{middle + 1}.png?overlay=1")
    assert other.status_code == 200 and other.content != first.content
    t1 = client.get(f"/images/{imaging_id}/t1/{middle}.png?overlay=1")
    assert t1.status_code == 200 and t1.content != first.content
    assert len(renders) == 4

    # Asked again: the same bytes from the cache, no new render.
    again = client.get(f"/images/{imaging_id}/stir/{middle}.png?overlay=1")
    assert again.content == first.content
    assert len(renders) == 4
    outside = client.get(f"/images/{imaging_id}/stir/{n_slices}.png")
    assert outside.status_code == 404
