"""The command line: each command on real files and a real database."""

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from bmetrack.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def new_database(request, tmp_path) -> Callable[[], str]:
    """Factory of URLs of empty databases (no tables) on SQLite or a real PostgreSQL."""
    names = iter(range(1000))

    def make() -> str:
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path / f'study{next(names)}.db'}"
        return request.getfixturevalue("postgres_database")(migrated=False)

    return make


@pytest.fixture
def database(new_database) -> str:
    url = new_database()
    result = invoke("db", "upgrade", "--db", url)
    assert result.exit_code == 0, result.output
    return url


@pytest.fixture
def cohort_csv(tmp_path) -> Path:
    folder = tmp_path / "cohort"
    result = invoke("simulate", "--out", folder, "--patients", "12", "--seed", "3")
    assert result.exit_code == 0, result.output
    return folder


def _row_counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    try:
        tables = sa.inspect(engine).get_table_names()
        with engine.connect() as connection:
            return {
                t: connection.execute(
                    sa.select(sa.func.count()).select_from(sa.table(t))
                ).scalar_one()
                for t in tables
            }
    finally:
        engine.dispose()


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert "bmetrack 0." in result.output


def test_template_explains_every_column():
    result = invoke("template", "clinical")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    comments = [line for line in lines if line.startswith("#")]
    header = next(line for line in lines if not line.startswith("#"))
    for column in header.split(","):
        assert any(column in comment for comment in comments), column
    assert "vas" in header and "analgesic_drugs" in header


def test_unknown_template_is_a_clear_error():
    result = invoke("template", "visits")
    assert result.exit_code == 2
    assert "Unknown table 'visits'" in result.output


def test_import_report_export_round_trip(tmp_path, database, new_database, cohort_csv):
    result = invoke(
        "import",
        "--db",
        database,
        "--study",
        "S1",
        "--title",
        "CLI study",
        "--patients",
        cohort_csv / "patients.csv",
        "--procedures",
        cohort_csv / "procedures.csv",
        "--clinical",
        cohort_csv / "clinical.csv",
        "--measurements",
        cohort_csv / "measurements.csv",
    )
    assert result.exit_code == 0, result.output
    assert "patients: 12 rows - 12 created" in result.output

    out = tmp_path / "report"
    result = invoke("report", "--db", database, "--study", "S1", "--out", out, "--no-pdf")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["n_patients"] == 12
    assert results["study"] == {"code": "S1", "title": "CLI study"}
    assert (out / "report.html").exists()
    assert not (out / "report.pdf").exists()

    flat = tmp_path / "flat.csv"
    result = invoke(
        "export", "--db", database, "--study", "S1", "--format", "redcap", "--out", flat
    )
    assert result.exit_code == 0, result.output
    assert "redcap_event_name" in flat.read_text().splitlines()[0]

    # The REDCap export imports into a fresh database with the same content.
    other = new_database()
    assert invoke("db", "upgrade", "--db", other).exit_code == 0
    result = invoke("import", "--db", other, "--study", "S1", "--redcap", flat)
    assert result.exit_code == 0, result.output
    counts, other_counts = _row_counts(database), _row_counts(other)
    assert counts["patient"] == 12
    for table in ("patient", "procedure", "treated_level", "visit", "clinical_assessment"):
        assert counts[table] == other_counts[table], table


def test_bad_rows_are_all_listed_and_nothing_is_written(tmp_path, database, cohort_csv):
    clinical = (cohort_csv / "clinical.csv").read_text().splitlines()
    header = clinical[0].split(",")
    vas = header.index("vas")
    drugs = header.index("analgesic_drugs")
    bad = [clinical[0]]
    for i, line in enumerate(clinical[1:4]):
        cells = line.split(",")
        if i == 0:
            cells[vas] = "11"
        elif i == 1:
            cells[drugs] = "tramadl"
        else:
            cells[vas] = "seven"
        bad.append(",".join(cells))
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    before = _row_counts(database)
    result = invoke(
        "import",
        "--db",
        database,
        "--study",
        "S1",
        "--patients",
        cohort_csv / "patients.csv",
        "--procedures",
        cohort_csv / "procedures.csv",
        "--clinical",
        tmp_path / "bad.csv",
    )
    assert result.exit_code == 2
    assert "3 problems, nothing was written" in result.output
    assert "tramadl" in result.output
    assert "seven" in result.output
    assert _row_counts(database) == before


def test_database_not_created_is_explained(tmp_path, new_database):
    target = new_database().removeprefix("sqlite:///")  # a bare path means a SQLite file
    result = invoke("report", "--db", target, "--study", "S", "--out", tmp_path)
    assert result.exit_code == 2
    assert "bmetrack db upgrade" in result.output


def test_unknown_study_lists_existing(database, tmp_path):
    result = invoke("report", "--db", database, "--study", "NOPE", "--out", tmp_path)
    assert result.exit_code == 2
    assert "No study 'NOPE'" in result.output


def test_bad_setting_is_explained():
    result = invoke("settings", "--set", "edema_k=2")
    assert result.exit_code == 2
    assert "Did you mean edema_k_sd" in result.output


def test_settings_json_lists_registry():
    result = invoke("settings", "--json", "--set", "edema_k_sd=2.5")
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["edema_k_sd"]["value"] == 2.5 and rows["edema_k_sd"]["changed"]


def test_redcap_dictionary(tmp_path):
    out = tmp_path / "dictionary.csv"
    result = invoke("redcap-dictionary", "--out", out)
    assert result.exit_code == 0
    header = out.read_text().splitlines()[0]
    assert header.startswith('"Variable / Field Name"') or header.startswith(
        "Variable / Field Name"
    )


@pytest.mark.slow
def test_demo_writes_everything_the_issue_lists(tmp_path):
    """The installed console script, as `make demo` runs it."""
    out = tmp_path / "demo"
    script = Path(sys.executable).with_name("bmetrack")
    completed = subprocess.run(
        [str(script), "demo", "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    html = (out / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"bme_extent.png", "vas.png", "analgesics.png", "bme_trajectories.png"} <= figures
    assert "bme_vas.png" in figures
    assert list((out / "tables").glob("*.csv"))
    results = json.loads((out / "results.json").read_text())
    for key in (
        "n_patients",
        "n_vcf",
        "n_subgroup",
        "bme_present_percent",
        "recurrences",
        "vas_median",
        "subgroup_correlations",
    ):
        assert key in results
    row = results["subgroup_correlations"][0]
    assert {"r", "ci_low", "ci_high", "p_value"} <= set(row)
    assert (results["n_patients"], results["n_vcf"]) == (64, 89)
    assert str(out / "report.html") in completed.stdout
    assert str(out / "figures") in completed.stdout


@pytest.mark.slow
def test_demo_from_synthetic_images_runs_the_whole_chain(tmp_path):
    """simulate -> DICOM -> import-dicom -> quantify-all -> report, on a tiny cohort.

    Checks the chain, not accuracy: studies the built-in segmenter cannot label are
    reported, and the BME numbers in the report are those stored from the images.
    """
    out = tmp_path / "demo"
    result = invoke(
        "demo", "--out", out, "--patients", "3", "--images", "--workers", "2", "--no-pdf"
    )
    assert result.exit_code == 0, result.output
    assert list((out / "dicom").glob("*/*/stir"))
    truth = (out / "tables" / "phantom_truth.csv").read_text().splitlines()
    assert truth[0].startswith("level,") and len(truth) > 3
    with sqlite3.connect(out / "study.db") as connection:
        sources = {row[0] for row in connection.execute("SELECT source FROM vertebra_measurement")}
        sessions = connection.execute("SELECT COUNT(*) FROM imaging_session").fetchone()[0]
    assert sessions >= 3
    assert sources <= {"automatic"}
    assert json.loads((out / "results.json").read_text())["n_patients"] == 3


def test_pull_warns_when_uids_are_remapped_with_the_study_code(tmp_path, monkeypatch):
    monkeypatch.delenv("BMETRACK_UID_SECRET", raising=False)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert invoke("db", "upgrade", "--db", url).exit_code == 0
    # The study is unknown: the pull is refused before any traffic, after the secret was chosen.
    source = ("--dicomweb", "http://127.0.0.1:9/dicom-web", "--db", url, "--study", "PV1")
    weak = invoke("pull", *source)
    assert weak.exit_code == 2
    assert "study code as the secret" in weak.output
    assert "BMETRACK_UID_SECRET" in weak.output
    assert "No study with code 'PV1'" in weak.output  # refused before any network traffic
    strong = invoke("pull", *source, "--uid-secret", "kept-by-the-site")
    assert strong.exit_code != 0
    assert "study code as the secret" not in strong.output
    monkeypatch.setenv("BMETRACK_UID_SECRET", "kept-by-the-site")
    assert "study code as the secret" not in invoke("pull", *source).output


def test_pull_of_a_study_without_patients_is_refused(tmp_path):
    from bmetrack.study.db import make_engine, session_scope
    from bmetrack.study.records import get_or_create_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert invoke("db", "upgrade", "--db", url).exit_code == 0
    engine = make_engine(url)
    with session_scope(engine) as session:
        get_or_create_study(session, "PV1", actor="test")
    engine.dispose()
    result = invoke(
        "pull", "--study", "PV1", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--db", url
    )
    assert result.exit_code == 2
    assert "has no patients" in result.output
    assert "bmetrack import" in result.output
