"""Report: sections, formatted key numbers, self-containment, escaping, PDF and files."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bmetrack.analysis import report

HEADINGS = [
    "Summary",
    "1. Bone marrow edema over time",
    "2. Non-recurrence of bone marrow edema",
    "3. Pain (VAS) over time",
    "4. Analgesic use over time",
    "5. Bone marrow edema and pain in the subgroup",
    "6. Study flow, missing data and settings (STROBE)",
    "7. Compared with the reference study",
]


def _text(html: str) -> str:
    """Visible text with tags removed and whitespace collapsed (HTML entities kept)."""
    without_style = re.sub(r"<style>.*?</style>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", without_style))


# --------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0004, "< 0.001"),
        (0.001, "0.001"),
        (0.04321, "0.043"),
        (0.5, "0.500"),
        (1.0, "1.000"),
        (None, "—"),
        (math.nan, "—"),
        ("not a number", "—"),
    ],
)
def test_format_p(value: Any, expected: str) -> None:
    assert report.format_p(value) == expected


def test_format_number_ci_percent() -> None:
    assert report.format_number(1234.567, 1) == "1,234.6"
    assert report.format_number(12, 3) == "12"
    assert report.format_number(np.int64(100000)) == "100,000"
    assert report.format_number(-0.04, 1) == "0.0"
    assert report.format_number(None) == "—"
    assert report.format_number(math.inf) == "—"
    assert report.format_ci(-0.962, 0.999) == "-0.96 to 1.00"
    assert report.format_ci(None, 0.5) == "—"
    assert report.format_percent(28.5714) == "28.6%"
    assert report.format_percent(None) == "—"


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------


def test_html_has_every_section(results: dict, figure_paths: dict[str, Path]) -> None:
    html = report.render_html(results, figure_paths)
    headings = re.findall(r"<h2>(.*?)</h2>", html)
    assert headings == HEADINGS
    assert list(report.REPORT_SECTIONS) == HEADINGS


def test_html_shows_key_numbers_formatted(results: dict, figure_paths: dict[str, Path]) -> None:
    text = _text(report.render_html(results, figure_paths))
    expected = [
        # Summary: BME present at month 12, 2/7 with Wilson CI 0.0822-0.6411.
        "28.6% (2 / 7; 95% CI 8.2 to 64.1)",
        "7.5 (IQR 7.0 to 8.8; n = 6)",
        # Extent table, month 3: 3 of 8 VCF in 1-25%.
        "3 (37.5%)",
        # Friedman on BME: statistic 17.3456, p 0.000599.
        "χ² = 17.35, df = 3, p &lt; 0.001, n = 6 VCF with complete data",
        # Mixed model term and Wald test.
        "Month 3 vs month 0 -24.38 4.10 -32.41 to -16.34 &lt; 0.001",
        "χ² = 54.32, df = 3, p &lt; 0.001",
        # VAS Friedman and Holm-adjusted pairwise p.
        "χ² = 12.61, df = 3, p = 0.006, n = 4 patients",
        "Month 0 vs 3 5 0.0 0.031 0.094 rank-biserial r = 1.00 (95% CI 0.77 to 1.00)",
        # Responders and sensitivity.
        "5 / 5 100.0% 56.5 to 100.0",
        "≥ 3.0 points 80.0% (4 / 5)",
        "87.7% of the decrease in median VAS",
        # Analgesics table and Stuart-Maxwell.
        "3 strong opioid 3 (50.0%)",
        "Month 0 vs 6 6 6.00 3 0.112",
        # BME-pain: Spearman, missing correlation, Mann-Whitney, rmcorr, model.
        "Level 3 3 0.50 -0.96 to 1.00 0.667",
        "Level 12 2 — — —",
        "Change from month 0 6 3 0.23 -0.97 to 0.99 0.850",
        "3 1 2 2.0 2.5 1.0 0.655 rank-biserial r = 0.50 (95% CI -0.71 to 0.97)",
        "0.41 VAS points per 10 percentage points more BME (95% CI 0.02 to 0.80), p = 0.039",
        "r = 0.61 (95% CI 0.02 to 0.89), p = 0.044, n = 11",
        "bme_percent 0.04 0.02 0.00 to 0.08 0.039",
        # STROBE: missing data row for month 12, outside-window count, settings.
        "12 5 1 1 7 1",
        "outside every visit window: 4",
        "edema_k_sd 2.5 3 yes SD 3",
        "nominal_months 0, 3, 6, 12 0, 3, 6, 12 no month 1",
        "statsmodels 0.14.5",
        # Comparison table.
        "BME present at 12 months 29% of treated VCF 28.6% (2 of 7) yes",
        "Pain relief and BME no relation rmcorr r = 0.61 no",
        # Non-recurrence sentence.
        "No treated VCF showed BME again after it had disappeared (0 of 8 VCF)",
    ]
    missing = [item for item in expected if item not in text]
    assert not missing, missing
    # Sentences joined by template blocks keep their spaces.
    assert "Primary analysis (mixed model" in text
    assert "nominal month). Duplicate visits" in text
    assert not re.search(r"[a-z)]\.[A-Z][a-z]", text), re.findall(r".{20}[a-z)]\.[A-Z].{20}", text)


def test_html_is_self_contained(results: dict, figure_paths: dict[str, Path]) -> None:
    html = report.render_html(results, figure_paths)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()
    for attribute in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html):
        assert attribute.startswith("data:image/png;base64,"), attribute[:40]
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 7
    assert "@page" in html  # the print stylesheet is inlined
    # Captions are numbered in order and carry n.
    assert re.findall(r"Figure (\d)\.</span>", html) == [str(i) for i in range(1, 8)]
    assert "8 treated VCF in 6 patients" in html


def test_tables_are_numbered_in_order(results: dict, figure_paths: dict[str, Path]) -> None:
    html = report.render_html(results, figure_paths)
    numbers = [int(n) for n in re.findall(r"Table (\d+)\.</span>", html)]
    assert numbers == list(range(1, len(numbers) + 1))


def test_malicious_title_is_escaped(results: dict, figure_paths: dict[str, Path]) -> None:
    evil = copy.deepcopy(results)
    evil["study"]["title"] = "<script>alert(1)</script>"
    evil["comparison"][0]["finding"] = '<img src="http://x/y.png">'
    html = report.render_html(evil, figure_paths)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '<img src="http://' not in html


def test_only_given_figures_are_embedded(results: dict, figure_paths: dict[str, Path]) -> None:
    html = report.render_html(results, {"vas": figure_paths["vas"]})
    assert html.count("data:image/png;base64,") == 1
    assert "Figure 1.</span> Back pain" in html


def test_missing_figure_file_is_an_error(results: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vas"):
        report.render_html(results, {"vas": tmp_path / "nope.png"})


def test_recurrences_are_listed(results: dict) -> None:
    changed = copy.deepcopy(results)
    changed["recurrences"] = [
        {
            "vcf_id": "P9:L2",
            "patient_code": "P9",
            "level": "L2",
            "absent_month": 6,
            "returned_month": 12,
            "bme_percent": 12.345,
        }
    ]
    changed["n_recurrences"] = 1
    text = _text(report.render_html(changed, {}))
    assert "BME returned after being absent in 1 of 8 treated VCF" in text
    assert "P9:L2 P9 L2 6 12 12.3" in text


def test_statistics_module_shapes_are_accepted(results: dict) -> None:
    """MixedModelResult.to_dict / PairResult / TestResult field names also render."""
    changed = copy.deepcopy(results)
    changed["bme"]["mixed_model"] = {
        "formula": "bme_percent ~ C(month)",
        "method": "REML",
        "converged": False,
        "n_obs": 40,
        "n_groups": {"patient": 10, "vcf": 12},
        "variance_components": {"residual": 2.0},
        "fixed_effects": [
            {
                "term": "C(month)[T.12]",
                "coefficient": -9.876,
                "std_error": 1.5,
                "z": -6.5,
                "p_value": 0.0123,
                "ci_lower": -12.81,
                "ci_upper": -6.94,
            }
        ],
    }
    changed["vas"]["pairwise"] = [
        {
            "condition_a": 0,
            "condition_b": 12,
            "n": 9,
            "median_difference": -5.5,
            "p_value": 0.004,
            "p_adjusted": 0.012,
            "effect_size": -0.91,
            "effect_size_name": "matched_pairs_rank_biserial",
            "effect_size_ci_low": -0.98,
            "effect_size_ci_high": -0.7,
        }
    ]
    text = _text(report.render_html(changed, {}))
    assert "Month 12 vs month 0 -9.88 1.50 -12.81 to -6.94 0.012" in text
    assert "10 patient, 12 vcf" in text
    assert "converged: no" in text
    assert "Month 0 vs 12 9 -5.5 0.004 0.012" in text
    assert "matched-pairs rank-biserial r = -0.91 (95% CI -0.98 to -0.70)" in text


def test_failed_analyses_show_their_note(results: dict) -> None:
    changed = copy.deepcopy(results)
    changed["vas"]["mixed_model"] = {"test": "mixed model", "note": "not computed: singular"}
    changed["bme"]["friedman"] = {"test": "Friedman", "note": "not computed: too few VCF"}
    text = _text(report.render_html(changed, {}))
    assert "The mixed model was not fitted: not computed: singular." in text
    assert "(VCF measured at every visit): not computed: too few VCF." in text


def test_nearly_empty_results_render() -> None:
    html = report.render_html({"study": {"code": "X"}}, {})
    for heading in HEADINGS:
        assert heading in html
    assert "No data." in html


# --------------------------------------------------------------------------------------
# Files and PDF
# --------------------------------------------------------------------------------------


def _page_count(pdf: Path) -> int:
    try:
        import pypdf
    except ImportError:
        return len(re.findall(rb"/Type\s*/Page\b", pdf.read_bytes()))
    return len(pypdf.PdfReader(pdf).pages)


def test_write_report_writes_every_file(
    tmp_path: Path,
    results: dict,
    figure_paths: dict[str, Path],
    vcf_visits: pd.DataFrame,
    patient_visits: pd.DataFrame,
) -> None:
    with_nan = copy.deepcopy(results)
    with_nan["vas"]["share_of_relief_by_month_3_percent"] = float("nan")
    with_nan["n_vcf"] = np.int64(8)
    with_nan["bme_present_percent"]["0"] = np.float64(100.0)
    files = report.write_report(
        with_nan,
        figure_paths,
        tmp_path / "out",
        tables={"vcf_visits": vcf_visits, "patient_visits": patient_visits},
    )
    assert files.html.name == "report.html" and files.html.is_file()
    loaded = json.loads(files.results_json.read_text(encoding="utf-8"))
    assert loaded["vas"]["share_of_relief_by_month_3_percent"] is None
    assert loaded["n_vcf"] == 8
    assert loaded["bme"]["present_by_month"]["12"]["ci_high"] == pytest.approx(0.6411)
    assert set(files.tables) == {"vcf_visits", "patient_visits"}
    back = pd.read_csv(files.tables["vcf_visits"])
    assert len(back) == len(vcf_visits)
    assert back["bme_percent"].sum() == pytest.approx(vcf_visits["bme_percent"].sum())
    html = files.html.read_text(encoding="utf-8")
    assert "tables/vcf_visits.csv" in html
    # Missing share is shown as a dash, not "nan".
    assert "— of the decrease in median VAS" in _text(html)
    assert not re.search(r"\bnan\b", _text(html), flags=re.I)
    pdf = files.pdf.read_bytes()
    assert pdf.startswith(b"%PDF")
    assert _page_count(files.pdf) >= 3


def test_write_report_without_pdf(tmp_path: Path, results: dict, vcf_visits: pd.DataFrame) -> None:
    files = report.write_report(results, {}, tmp_path, tables={"vcf": vcf_visits}, write_pdf=False)
    assert files.pdf is None
    assert not (tmp_path / "report.pdf").exists()
    assert files.as_dict() == {
        "html": tmp_path / "report.html",
        "results_json": tmp_path / "results.json",
        "tables": tmp_path / "tables",
    }


def test_pdf_has_page_numbers(tmp_path: Path, results: dict) -> None:
    pypdf = pytest.importorskip("pypdf")
    path = report.render_pdf(report.render_html(results, {}), tmp_path / "r.pdf")
    reader = pypdf.PdfReader(path)
    n = len(reader.pages)
    assert n >= 2
    assert f"Page 1 of {n}" in reader.pages[0].extract_text()
    assert reader.pages[0].mediabox.width == pytest.approx(595.28, abs=0.5)  # A4


def test_write_report_rejects_unsafe_table_name(
    tmp_path: Path, results: dict, vcf_visits: pd.DataFrame
) -> None:
    with pytest.raises(ValueError, match="safe file name"):
        report.write_report(results, {}, tmp_path, tables={"../evil": vcf_visits})


def test_report_of_simulated_study_renders(tmp_path: Path) -> None:
    """End to end with the real analysis: every results key the report reads is present."""
    analyse = pytest.importorskip("bmetrack.analysis.analyse")
    tables_module = pytest.importorskip("bmetrack.analysis.tables")
    cohort_module = pytest.importorskip("bmetrack.simulate.cohort")
    from bmetrack.analysis import figures

    cohort = cohort_module.simulate_cohort(cohort_module.CohortParameters(), seed=2006)
    tables = tables_module.build_study_tables(cohort.frames)
    results = analyse.analyse(tables)
    paths = figures.save_figures(tables, results, tmp_path / "figures", dpi=40)
    files = report.write_report(results, paths, tmp_path, tables.as_frames(), write_pdf=False)
    html = files.html.read_text(encoding="utf-8")
    text = _text(html)
    assert html.count("data:image/png;base64,") == 7
    assert not re.search(r"\b(nan|None|null)\b", text)
    n_vcf = results["n_vcf"]
    assert f"{n_vcf} treated VCF in {results['n_patients']} patients" in text
    present = results["bme"]["present_by_month"]["12"]
    assert f"{present['successes']} / {present['n']}" in text
    assert "The mixed model was not fitted" not in text
