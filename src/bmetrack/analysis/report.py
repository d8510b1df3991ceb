"""The study report: one self-contained HTML file, its PDF, results.json and CSV tables.

The report follows METHOD.md section 5 items 1-7. It reads only the JSON-safe results
dict of ``analyse`` (briefs/TABLES-AND-RESULTS.md) and the PNG figures of
:mod:`bmetrack.analysis.figures`, so a report can be re-rendered from a stored
results.json. Everything is formatted here (numbers, p-values, confidence intervals,
"—" for missing values) and laid out by the Jinja2 template
``templates/report.html.j2`` with autoescaping on: study titles and other free text
from the database cannot inject markup. The CSS is inlined and figures are embedded as
base64 data URIs, so the HTML has no external reference and prints as is.

Where the statistics modules' ``to_dict()`` shapes differ from the contract (e.g. mixed
models with ``fixed_effects``/``coefficient`` instead of ``terms``/``estimate``, test
results with ``effect_size_ci_low`` instead of ``ci_low``, Wilcoxon pairs with
``condition_a``/``condition_b`` instead of ``pair``) both spellings are accepted.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from bmetrack.analysis.figures import (
    ANALGESIC_LABELS,
    EXTENT_CATEGORIES,
    SCATTER_MAX_POINTS,
    TRAJECTORY_MAX_LINES,
)
from bmetrack.jsonsafe import json_safe

__all__ = [
    "REPORT_SECTIONS",
    "ReportFiles",
    "format_ci",
    "format_number",
    "format_p",
    "format_percent",
    "json_safe",
    "render_html",
    "render_pdf",
    "write_report",
]

MISSING = "—"

#: Section headings of the report, in order (METHOD.md section 5 items 1-7).
REPORT_SECTIONS: tuple[str, ...] = (
    "Summary",
    "1. Bone marrow edema over time",
    "2. Non-recurrence of bone marrow edema",
    "3. Pain (VAS) over time",
    "4. Analgesic use over time",
    "5. Bone marrow edema and pain in the subgroup",
    "6. Study flow, missing data and settings (STROBE)",
    "7. Compared with the reference study",
)

_FIGURE_ORDER = (
    "bme_extent",
    "bme_trajectories",
    "bme_present",
    "vas",
    "analgesics",
    "bme_vas",
    "flow",
)

_STATISTIC_SYMBOL = {
    "friedman": "χ²",
    "stuart_maxwell": "χ²",
    "wilcoxon": "W",
    "mann_whitney": "U",
}
_STATISTIC_NAMES = {"chi2": "χ²", "chi-square": "χ²", "chisq": "χ²"}
_EFFECT_NAMES = {
    "kendall_w": "Kendall's W",
    "rank_biserial": "rank-biserial r",
    "matched_pairs_rank_biserial": "matched-pairs rank-biserial r",
    "cohen_g": "Cohen's g",
}


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    """The value as a finite float, or None when missing, NaN or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_number(value: Any, digits: int = 1) -> str:
    """Format a number with ``digits`` decimals and thousands separators; "—" if missing.

    Integers (Python or numpy ints) are written without decimals.
    """
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return f"{int(value):,}"
    number = _float(value)
    if number is None:
        return MISSING
    text = f"{number:,.{digits}f}"
    # Avoid "-0.0": a rounded zero has no sign.
    return text[1:] if text.startswith("-") and float(text.replace(",", "")) == 0 else text


def format_p(value: Any) -> str:
    """Format a p-value: "< 0.001" below 0.001, else three decimals; "—" if missing."""
    number = _float(value)
    if number is None:
        return MISSING
    if number < 0.001:
        return "< 0.001"
    return f"{number:.3f}"


def _p_phrase(value: Any) -> str:
    text = format_p(value)
    if text == MISSING:
        return f"p = {MISSING}"
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def format_ci(low: Any, high: Any, digits: int = 2) -> str:
    """Format a confidence interval as "low to high"; "—" if either end is missing."""
    lo, hi = _float(low), _float(high)
    if lo is None or hi is None:
        return MISSING
    return f"{format_number(lo, digits)} to {format_number(hi, digits)}"


def format_percent(value: Any, digits: int = 1) -> str:
    """Format a percentage (already on the 0..100 scale) as "12.3%"; "—" if missing."""
    text = format_number(_float(value), digits)
    return text if text == MISSING else f"{text}%"


def _int_text(value: Any) -> str:
    number = _float(value)
    return MISSING if number is None else f"{round(number):,}"


def _month_label(month: str | int) -> str:
    return f"Month {month}"


def _month_keys(*mappings: Any) -> list[str]:
    keys: set[str] = set()
    for mapping in mappings:
        if isinstance(mapping, Mapping):
            keys.update(str(key) for key in mapping)
    return sorted(keys, key=float)


def _get(mapping: Any, *path: str) -> Any:
    """Nested lookup that returns None when any level is missing."""
    current = mapping
    for key in path:
        if not isinstance(current, Mapping):
            return None
        current = current.get(key)
    return current


def _first(mapping: Mapping[str, Any] | None, *names: str) -> Any:
    if not isinstance(mapping, Mapping):
        return None
    for name in names:
        if mapping.get(name) is not None:
            return mapping[name]
    return None


# --------------------------------------------------------------------------------------
# Result objects -> text
# --------------------------------------------------------------------------------------


def _effect_text(result: Mapping[str, Any] | None) -> str:
    """ "name = 0.45 (95% CI 0.10 to 0.70)" or "—"."""
    if not result:
        return MISSING
    effect = _float(result.get("effect_size"))
    if effect is None:
        return MISSING
    raw_name = str(result.get("effect_size_name") or "effect size")
    name = _EFFECT_NAMES.get(raw_name, raw_name.replace("_", " "))
    low = _first(result, "ci_low", "effect_size_ci_low")
    high = _first(result, "ci_high", "effect_size_ci_high")
    ci = format_ci(low, high)
    text = f"{name} = {format_number(effect, 2)}"
    return text if ci == MISSING else f"{text} (95% CI {ci})"


def _test_text(result: Mapping[str, Any] | None, n_unit: str = "") -> str:
    """One-line summary of a TestResult: statistic, df, p, n and effect size."""
    if not result:
        return "not computed"
    if _float(result.get("statistic")) is None and _float(result.get("p_value")) is None:
        return str(result.get("note") or "not computed")
    test = str(result.get("test") or "")
    raw_symbol = result.get("statistic_name")
    symbol = (
        _STATISTIC_NAMES.get(str(raw_symbol).lower(), str(raw_symbol))
        if raw_symbol
        else _STATISTIC_SYMBOL.get(test, "statistic")
    )
    parts = [f"{symbol} = {format_number(result.get('statistic'), 2)}"]
    df = _float(result.get("df"))
    if df is not None:
        parts.append(f"df = {df:g}")
    parts.append(_p_phrase(result.get("p_value")))
    n = _int_text(result.get("n"))
    parts.append(f"n = {n}{' ' + n_unit if n_unit else ''}")
    text = ", ".join(parts)
    effect = _effect_text(result)
    if effect != MISSING:
        text += f"; {effect}"
    if result.get("note"):
        text += f" ({result['note']})"
    return text


def _correlation_text(result: Mapping[str, Any] | None) -> str:
    if not result:
        return "not computed"
    r = _float(result.get("r"))
    n = _int_text(result.get("n"))
    if r is None:
        note = f"; {result['note']}" if result.get("note") else ""
        return f"not estimable (n = {n}{note})"
    ci = format_ci(result.get("ci_low"), result.get("ci_high"))
    text = f"r = {format_number(r, 2)} (95% CI {ci}), {_p_phrase(result.get('p_value'))}, n = {n}"
    if result.get("n_subjects") is not None:
        text += f" observations in {_int_text(result.get('n_subjects'))} patients"
    return text


def _term_label(term: str) -> str:
    match = re.fullmatch(r"C\(month\)\[T\.(-?\d+)\]", term)
    if match:
        return f"Month {match.group(1)} vs month 0"
    if term == "Intercept":
        return "Intercept (month 0)"
    return term


def _model_view(model: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Mixed model dict (contract or MixedModelResult.to_dict shape) -> display rows."""
    if not isinstance(model, Mapping):
        return None
    terms = model.get("terms") or model.get("fixed_effects") or []
    if not terms:
        return {"rows": [], "note": str(model.get("note") or "not fitted"), "formula": ""}
    rows = []
    for term in terms:
        estimate = _first(term, "estimate", "coefficient")
        se = _first(term, "se", "std_error")
        low = _first(term, "ci_low", "ci_lower")
        high = _first(term, "ci_high", "ci_upper")
        rows.append(
            [
                _term_label(str(term.get("term"))),
                format_number(estimate, 2),
                format_number(se, 2),
                format_ci(low, high),
                format_p(term.get("p_value")),
            ]
        )
    groups = model.get("n_groups")
    if isinstance(groups, Mapping):
        groups_text = ", ".join(f"{_int_text(v)} {k}" for k, v in groups.items())
    else:
        groups_text = _int_text(groups)
    wald = model.get("wald_month") or model.get("wald")
    wald_text = None
    if isinstance(wald, Mapping):
        df = _float(wald.get("df"))
        wald_text = (
            f"χ² = {format_number(wald.get('statistic'), 2)}"
            f"{f', df = {df:g}' if df is not None else ''}, {_p_phrase(wald.get('p_value'))}"
        )
    variance = model.get("variance_components") or {}
    converged = model.get("converged")
    return {
        "formula": str(model.get("formula") or ""),
        "header": ["Term", "Estimate", "SE", "95% CI", "p"],
        "rows": rows,
        "n_obs": _int_text(model.get("n_obs")),
        "n_groups": groups_text,
        "method": str(model.get("method") or MISSING),
        "converged": MISSING if converged is None else ("yes" if converged else "no"),
        "variance": ", ".join(f"{k}: {format_number(v, 2)}" for k, v in variance.items())
        or MISSING,
        "wald": wald_text,
        "note": str(model.get("note") or ""),
    }


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


@dataclass
class _Table:
    number: int
    caption: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class _Numbering:
    tables: list[_Table] = field(default_factory=list)

    def add(
        self, caption: str, header: Sequence[str], rows: Sequence[Sequence[str]], note: str = ""
    ) -> _Table:
        table = _Table(len(self.tables) + 1, caption, list(header), [list(r) for r in rows], note)
        self.tables.append(table)
        return table


def _model_table(
    numbering: _Numbering, caption: str, model: Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, _Table | None]:
    """A mixed model's display view and its numbered table (none when not fitted)."""
    view = _model_view(model)
    if not view or not view["rows"]:
        return view, None
    return view, numbering.add(f"{caption}: {view['formula']}.", view["header"], view["rows"])


def _proportion_cells(proportion: Mapping[str, Any] | None) -> list[str]:
    """[successes / n, percent, 95% CI in percent]."""
    if not proportion:
        return [MISSING, MISSING, MISSING]
    low, high = _float(proportion.get("ci_low")), _float(proportion.get("ci_high"))
    ci = MISSING
    if low is not None and high is not None:
        ci = format_ci(100.0 * low, 100.0 * high, 1)
    return [
        f"{_int_text(proportion.get('successes'))} / {_int_text(proportion.get('n'))}",
        format_percent(proportion.get("percent")),
        ci,
    ]


def _summary_cells(summary: Mapping[str, Any] | None, digits: int = 1) -> list[str]:
    """[n, missing, median, IQR]."""
    if not summary:
        return [MISSING] * 4
    return [
        _int_text(summary.get("n")),
        _int_text(summary.get("n_missing")),
        format_number(summary.get("median"), digits),
        format_ci(summary.get("q1"), summary.get("q3"), digits),
    ]


def _setting_value(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, list | tuple):
        return ", ".join(_setting_value(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _setting_lookup(results: Mapping[str, Any], name: str) -> Any:
    for setting in results.get("settings") or []:
        if isinstance(setting, Mapping) and setting.get("name") == name:
            return setting.get("value")
    return None


# --------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------


def _figure_uri(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def _captions(results: Mapping[str, Any], months: Sequence[str]) -> dict[str, str]:
    n_patients = _int_text(results.get("n_patients"))
    n_vcf_number = _float(results.get("n_vcf"))
    n_vcf = _int_text(n_vcf_number)
    threshold = _setting_value(_setting_lookup(results, "bme_present_threshold_percent") or 5)
    month_text = ", ".join(months) if months else MISSING
    if n_vcf_number is not None and n_vcf_number > TRAJECTORY_MAX_LINES:
        lines = (
            f"Thin lines: a fixed random sample of {TRAJECTORY_MAX_LINES:,} of the {n_vcf} "
            "treated VCF (for legibility)"
        )
    else:
        lines = f"Thin lines: each of the {n_vcf} treated VCF"
    subgroup = _int_text(_get(results, "bme_pain", "n_patients") or results.get("n_subgroup"))
    level = _get(results, "bme_pain", "spearman_level") or {}
    largest = max((_float(v.get("n")) or 0.0 for v in level.values() if v), default=0.0)
    density = (
        " Panels are drawn as hexagonal density plots (darker = more patients, log scale) "
        "because of the number of points."
        if largest > SCATTER_MAX_POINTS
        else " Each dot is one patient."
    )
    return {
        "bme_extent": (
            "Extent of bone marrow edema (BME) in the treated vertebral compression fractures "
            "(VCF) at each visit. Each bar shows the VCF with BME measured at that visit "
            "(n under the bar), divided into categories by the percentage of the vertebral "
            f"body volume with edema. {n_vcf} treated VCF in {n_patients} patients; month 0 "
            "is before vertebroplasty."
        ),
        "bme_trajectories": (
            f"BME (% of vertebral body volume) of individual VCF over months {month_text}. "
            f"{lines}; thick line: median; shaded band: interquartile range, both computed "
            "from all VCF measured at that visit (n under each month)."
        ),
        "bme_present": (
            f"Percentage of treated VCF with BME present (BME ≥ {threshold}% of the body "
            "volume) at each visit, with 95% Wilson confidence intervals. n = VCF with BME "
            "measured at that visit (under each bar); the numbers are those of the table above."
        ),
        "vas": (
            "Back pain on the visual analogue scale (VAS; 0 = no pain, 10 = worst pain "
            "imaginable) at each visit. Boxes show the median and interquartile range; "
            "whiskers reach the most extreme values within 1.5 times the interquartile "
            "range; outlying values are not drawn. n = patients with a VAS at that visit."
        ),
        "analgesics": (
            "Analgesic use at each visit by WHO-ladder class (none, non-opioid, weak opioid, "
            "strong opioid), as a percentage of the patients with analgesic data at that "
            "visit (n under each bar)."
        ),
        "bme_vas": (
            f"BME and pain in the subgroup ({subgroup} patients with a single treated VCF, no "
            "new VCF and no pain at an untreated level). Top row: BME (% of body) against "
            "VAS at each follow-up visit; bottom row: change from month 0 in both. Each "
            "panel gives Spearman's ρ with its 95% CI, the p-value and n (patients with both "
            f"values).{density}"
        ),
        "flow": (
            "Flow of patients and treated VCF through the study (STROBE): patients seen, "
            "patients with a VAS and VCF with BME measured at each visit, patients not seen, "
            "and exclusions from the BME-pain subgroup by reason."
        ),
    }


def _build_context(
    results: Mapping[str, Any],
    figures: Mapping[str, Path],
    tables: Mapping[str, pd.DataFrame] | None,
    css: str,
) -> dict[str, Any]:
    numbering = _Numbering()
    bme = results.get("bme") or {}
    vas = results.get("vas") or {}
    analgesics = results.get("analgesics") or {}
    bme_pain = results.get("bme_pain") or {}
    flow = results.get("flow") or {}
    months = _month_keys(
        _get(flow, "by_month"),
        bme.get("present_by_month"),
        bme.get("extent_by_month"),
        vas.get("summary_by_month"),
    )
    follow_ups = [m for m in months if float(m) != 0]
    last = months[-1] if months else None

    # Figures (numbered in the order they appear).
    captions = _captions(results, months)
    figure_views: dict[str, dict[str, Any]] = {}
    number = 0
    for name in _FIGURE_ORDER:
        if name in figures and figures[name] is not None:
            number += 1
            figure_views[name] = {
                "number": number,
                "uri": _figure_uri(Path(figures[name])),
                "caption": captions[name],
                "alt": captions[name].split(". ")[0],
            }

    # --- Summary -------------------------------------------------------------------
    present = bme.get("present_by_month") or {}
    vas_summary = vas.get("summary_by_month") or {}
    key_numbers: list[tuple[str, str]] = [
        ("Patients", _int_text(results.get("n_patients"))),
        ("Treated VCF", _int_text(results.get("n_vcf"))),
        ("Patients in the BME-pain subgroup", _int_text(results.get("n_subgroup"))),
    ]
    for month in (months[0], last) if months else ():
        if month is None:
            continue
        cells = _proportion_cells(present.get(month))
        key_numbers.append(
            (
                f"VCF with BME present, {_month_label(month).lower()}",
                f"{cells[1]} ({cells[0]}; 95% CI {cells[2]})",
            )
        )
    for month in (months[0], last) if months else ():
        if month is None:
            continue
        cells = _summary_cells(vas_summary.get(month))
        key_numbers.append(
            (
                f"Median VAS, {_month_label(month).lower()}",
                f"{cells[2]} (IQR {cells[3]}; n = {cells[0]})",
            )
        )
    responders = vas.get("responders") or {}
    if last is not None and last in responders:
        cells = _proportion_cells(responders[last])
        key_numbers.append(
            (
                f"Pain responders, {_month_label(last).lower()}",
                f"{cells[1]} ({cells[0]}; 95% CI {cells[2]})",
            )
        )
    key_numbers.append(
        ("VCF whose BME returned after disappearing", _int_text(results.get("n_recurrences")))
    )
    key_numbers.append(
        ("Visits outside every visit window", _int_text(results.get("visits_outside_window")))
    )

    # --- 1. BME --------------------------------------------------------------------
    extent = bme.get("extent_by_month") or {}
    extent_rows = []
    for month in _month_keys(extent):
        counts = extent[month] or {}
        n = sum(int(_float(counts.get(c)) or 0) for c in EXTENT_CATEGORIES)
        row = [month, f"{n:,}"]
        for category in EXTENT_CATEGORIES:
            count = int(_float(counts.get(category)) or 0)
            row.append(f"{count:,} ({format_percent(100.0 * count / n if n else None)})")
        extent_rows.append(row)
    extent_table = numbering.add(
        "BME extent categories per visit: number of treated VCF (% of VCF with BME measured).",
        ["Month", "n", *[f"{c}%" for c in EXTENT_CATEGORIES]],
        extent_rows,
    )
    bme_summary = bme.get("summary_by_month") or {}
    bme_summary_table = numbering.add(
        "BME (% of vertebral body volume) per visit.",
        ["Month", "n", "Missing", "Median", "IQR"],
        [[m, *_summary_cells(bme_summary.get(m))] for m in _month_keys(bme_summary)],
    )
    present_table = numbering.add(
        "Treated VCF with BME present per visit, with 95% Wilson confidence intervals.",
        ["Month", "Present / n", "Percent", "95% CI (%)"],
        [[m, *_proportion_cells(present.get(m))] for m in _month_keys(present)],
    )
    bme_model = _model_view(bme.get("mixed_model"))
    bme_model_table = (
        numbering.add(
            f"Linear mixed model of BME: {bme_model['formula']}.",
            bme_model["header"],
            bme_model["rows"],
        )
        if bme_model and bme_model["rows"]
        else None
    )

    # --- 2. Recurrences --------------------------------------------------------------
    recurrences = results.get("recurrences") or []
    recurrence_table = None
    if recurrences:
        recurrence_table = numbering.add(
            "Treated VCF whose BME returned after being absent.",
            ["VCF", "Patient", "Level", "Absent at month", "Returned at month", "BME (%)"],
            [
                [
                    str(r.get("vcf_id", MISSING)),
                    str(r.get("patient_code", MISSING)),
                    str(r.get("level", MISSING)),
                    _int_text(r.get("absent_month")),
                    _int_text(r.get("returned_month")),
                    format_number(r.get("bme_percent")),
                ]
                for r in recurrences
            ],
        )

    # --- 3. VAS ------------------------------------------------------------------------
    vas_table = numbering.add(
        "VAS pain (0-10) per visit.",
        ["Month", "n", "Missing", "Median", "IQR"],
        [[m, *_summary_cells(vas_summary.get(m))] for m in _month_keys(vas_summary)],
    )
    pair_rows = []
    for pair in vas.get("pairwise") or []:
        name = pair.get("pair")
        if name is None and pair.get("condition_a") is not None:
            name = f"{pair.get('condition_a')}-{pair.get('condition_b')}"
        label = str(name or MISSING).replace("-", " vs ", 1)
        pair_rows.append(
            [
                f"Month {label}",
                _int_text(pair.get("n")),
                format_number(pair.get("median_difference"), 1)
                if "median_difference" in pair
                else format_number(pair.get("statistic"), 1),
                format_p(pair.get("p_value")),
                format_p(pair.get("p_adjusted")),
                _effect_text(pair),
            ]
        )
    has_median_difference = any("median_difference" in p for p in vas.get("pairwise") or [])
    pairwise_table = numbering.add(
        "Pairwise Wilcoxon signed-rank tests of VAS between visits (patients with both "
        "values), p-values adjusted by Holm's method.",
        [
            "Comparison",
            "n",
            "Median difference" if has_median_difference else "W",
            "p",
            "p (Holm)",
            "Effect size (95% CI)",
        ],
        pair_rows,
    )
    vas_model, vas_model_table = _model_table(
        numbering, "Linear mixed model of VAS", vas.get("mixed_model")
    )
    points = _setting_value(_setting_lookup(results, "responder_min_drop_points") or 2)
    drop_percent = _setting_value(_setting_lookup(results, "responder_min_drop_percent") or 30)
    responder_definition = f"VAS drop from month 0 of at least {points} points or {drop_percent}%"
    responder_table = numbering.add(
        f"Pain responders ({responder_definition}), with 95% Wilson confidence intervals.",
        ["Month", "Responders / n", "Percent", "95% CI (%)"],
        [[m, *_proportion_cells(responders.get(m))] for m in _month_keys(responders)],
    )
    sensitivity = vas.get("responders_sensitivity") or {}
    sensitivity_months = _month_keys(*sensitivity.values())
    sensitivity_table = None
    if sensitivity:
        rows = []
        for threshold in sorted(sensitivity, key=float):
            row = [f"≥ {format_number(float(threshold), 1)} points"]
            for month in sensitivity_months:
                cells = _proportion_cells((sensitivity[threshold] or {}).get(month))
                row.append(MISSING if cells[1] == MISSING else f"{cells[1]} ({cells[0]})")
            rows.append(row)
        sensitivity_table = numbering.add(
            "Sensitivity analysis: responders with other minimal clinically important "
            "differences (percent, responders / n).",
            ["MCID", *[_month_label(m) for m in sensitivity_months]],
            rows,
        )

    # --- 4. Analgesics -----------------------------------------------------------------
    class_counts = analgesics.get("class_counts_by_month") or {}
    count_months = _month_keys(class_counts)
    totals = {
        m: sum(int(_float(v) or 0) for v in (class_counts[m] or {}).values()) for m in count_months
    }
    class_rows = []
    for code, label in enumerate(ANALGESIC_LABELS):
        row = [f"{code} {label}"]
        for month in count_months:
            count = int(_float((class_counts[month] or {}).get(str(code))) or 0)
            total = totals[month]
            row.append(f"{count:,} ({format_percent(100.0 * count / total if total else None)})")
        class_rows.append(row)
    class_rows.append(["Patients with data", *[f"{totals[m]:,}" for m in count_months]])
    analgesic_table = numbering.add(
        "Analgesic class per visit: number of patients (% of patients with data).",
        ["Class", *[_month_label(m) for m in count_months]],
        class_rows,
    )
    stuart = analgesics.get("stuart_maxwell") or {}
    stuart_table = numbering.add(
        "Stuart-Maxwell test of marginal homogeneity of analgesic class, month 0 against "
        "each follow-up visit (patients with both visits).",
        ["Comparison", "n", "χ²", "df", "p"],
        [
            [
                f"Month 0 vs {m}",
                _int_text((stuart[m] or {}).get("n")),
                format_number((stuart[m] or {}).get("statistic"), 2),
                _int_text((stuart[m] or {}).get("df")),
                format_p((stuart[m] or {}).get("p_value")),
            ]
            for m in _month_keys(stuart)
        ],
    )

    # --- 5. BME vs pain ------------------------------------------------------------------
    spearman_rows = []
    for key, label in (("spearman_level", "Level"), ("spearman_change", "Change from month 0")):
        correlations = bme_pain.get(key) or {}
        for month in _month_keys(correlations):
            result = correlations[month] or {}
            spearman_rows.append(
                [
                    label,
                    month,
                    _int_text(result.get("n")),
                    format_number(result.get("r"), 2),
                    format_ci(result.get("ci_low"), result.get("ci_high")),
                    format_p(result.get("p_value")),
                ]
            )
    spearman_table = numbering.add(
        "Spearman correlation between BME (% of body) and VAS in the subgroup, at each "
        "follow-up visit and for the changes from month 0.",
        ["Analysis", "Month", "n", "ρ", "95% CI", "p"],
        spearman_rows,
    )
    versus = bme_pain.get("present_vs_absent") or {}
    versus_rows = []
    for month in _month_keys(versus):
        result = versus[month] or {}
        details = result.get("details") or {}
        versus_rows.append(
            [
                month,
                _int_text(details.get("n_x")),
                _int_text(details.get("n_y")),
                format_number(details.get("median_x"), 1),
                format_number(details.get("median_y"), 1),
                format_number(result.get("statistic"), 1),
                format_p(result.get("p_value")),
                _effect_text(result),
            ]
        )
    versus_table = numbering.add(
        "VAS of subgroup patients with BME present against BME absent at each follow-up "
        "visit (Mann-Whitney U test; effect size: rank-biserial r, positive when VAS is "
        "higher with BME present).",
        [
            "Month",
            "n present",
            "n absent",
            "Median VAS present",
            "Median VAS absent",
            "U",
            "p",
            "Effect size (95% CI)",
        ],
        versus_rows,
    )
    pain_model, pain_model_table = _model_table(
        numbering, "Linear mixed model of VAS on BME in the subgroup", bme_pain.get("mixed_model")
    )

    primary = bme_pain.get("primary") or {}
    primary_text = None
    if primary:
        estimate = primary.get("estimate_vas_per_10_percent_bme")
        if _float(estimate) is None:
            primary_text = str(primary.get("note") or "not computed")
        else:
            ci = format_ci(
                primary.get("ci_low_per_10_percent"), primary.get("ci_high_per_10_percent")
            )
            primary_text = (
                f"{format_number(estimate, 2)} VAS points per 10 percentage points more BME "
                f"(95% CI {ci}), {_p_phrase(primary.get('p_value'))}"
            )
        key_numbers.insert(
            len(key_numbers) - 2, ("BME-pain relation (primary analysis)", primary_text)
        )

    # --- 6. STROBE -----------------------------------------------------------------------
    missing = results.get("missing") or {}
    by_month = flow.get("by_month") or {}
    missing_rows = []
    for month in _month_keys(missing, by_month):
        seen = _get(by_month, month, "patients_seen")
        missing_rows.append(
            [
                month,
                _int_text(seen),
                _int_text(_get(missing, month, "vas")),
                _int_text(_get(missing, month, "analgesic_class")),
                _int_text(_get(by_month, month, "vcf_with_bme")),
                _int_text(_get(missing, month, "bme_percent")),
            ]
        )
    missing_table = numbering.add(
        "Data available and missing per visit.",
        [
            "Month",
            "Patients seen",
            "VAS missing",
            "Analgesic class missing",
            "VCF with BME",
            "BME missing",
        ],
        missing_rows,
    )
    settings_rows = [
        [
            str(s.get("name", MISSING)),
            _setting_value(s.get("value")),
            _setting_value(s.get("default")),
            "yes" if s.get("changed") else "no",
            str(s.get("unit") or MISSING),
            str(s.get("method_section") or MISSING),
            str(s.get("description") or ""),
        ]
        for s in results.get("settings") or []
        if isinstance(s, Mapping)
    ]
    settings_table = numbering.add(
        "Settings used for this analysis (changed = differs from the default of METHOD.md).",
        ["Setting", "Value", "Default", "Changed", "Unit", "Method section", "Meaning"],
        settings_rows,
    )
    n_changed = sum(1 for s in results.get("settings") or [] if s.get("changed"))
    software = results.get("software") or {}
    software_table = numbering.add(
        "Software versions.",
        ["Package", "Version"],
        [[str(k), str(v)] for k, v in software.items()],
    )

    # --- 7. Comparison ----------------------------------------------------------------------
    comparison_rows = []
    for row in results.get("comparison") or []:
        consistent = row.get("consistent")
        comparison_rows.append(
            [
                str(row.get("finding", MISSING)),
                str(row.get("reference", MISSING)),
                str(row.get("this_cohort", MISSING)),
                MISSING if consistent is None else ("yes" if consistent else "no"),
            ]
        )
    comparison_table = numbering.add(
        "Published findings of the reference study (Voormolen et al., AJNR 2006;27:983-8) "
        "beside the same figures from this cohort.",
        ["Finding", "Reference study", "This cohort", "Consistent"],
        comparison_rows,
    )

    data_tables = [
        {
            "name": name,
            "file": f"tables/{name}.csv",
            "rows": f"{len(frame):,}",
            "columns": ", ".join(map(str, frame.columns)),
        }
        for name, frame in (tables or {}).items()
    ]

    study = results.get("study") or {}
    title = str(study.get("title") or study.get("code") or "bmetrack study report")
    share = vas.get("share_of_relief_by_month_3_percent")
    return {
        "css": Markup(css),  # our own stylesheet, not user data
        "title": title,
        "study_code": str(study.get("code") or MISSING),
        "generated_at": _date_text(results.get("generated_at")),
        "version": str(results.get("bmetrack_version") or MISSING),
        "sections": REPORT_SECTIONS,
        "key_numbers": key_numbers,
        "figures": figure_views,
        "months": months,
        "follow_ups": follow_ups,
        "bme": {
            "extent_table": extent_table,
            "present_table": present_table,
            "summary_table": bme_summary_table,
            "friedman": _test_text(bme.get("friedman"), "VCF with complete data"),
            "model": bme_model,
            "model_table": bme_model_table,
        },
        "recurrence": {
            "n": _int_text(results.get("n_recurrences") or len(recurrences)),
            "n_vcf": _int_text(results.get("n_vcf")),
            "table": recurrence_table,
        },
        "vas": {
            "table": vas_table,
            "friedman": _test_text(vas.get("friedman"), "patients with complete data"),
            "pairwise_table": pairwise_table,
            "model": vas_model,
            "model_table": vas_model_table,
            "responder_table": responder_table,
            "responder_definition": responder_definition,
            "sensitivity_table": sensitivity_table,
            "share_by_month_3": format_percent(share),
            "last_month": last,
        },
        "analgesics": {"table": analgesic_table, "stuart_table": stuart_table},
        "bme_pain": {
            "n_patients": _int_text(bme_pain.get("n_patients") or results.get("n_subgroup")),
            "spearman_table": spearman_table,
            "versus_table": versus_table,
            "rmcorr": _correlation_text(bme_pain.get("rmcorr")),
            "rmcorr_note": str(bme_pain.get("rmcorr_note") or ""),
            "n_with_pairs": _int_text(bme_pain.get("n_patients_with_pairs")),
            "primary": primary_text,
            "primary_analysis": ", ".join(
                str(primary[key])
                for key in ("analysis", "reference_distribution")
                if primary.get(key)
            ),
            "model": pain_model,
            "model_table": pain_model_table,
        },
        "strobe": {
            "missing_table": missing_table,
            "outside_window": _int_text(results.get("visits_outside_window")),
            "duplicates": _int_text(results.get("duplicate_visits"))
            if results.get("duplicate_visits") is not None
            else None,
            "settings_table": settings_table,
            "n_settings_changed": n_changed,
            "software_table": software_table,
            "excluded": [
                (str(k).replace("_", " "), _int_text(v))
                for k, v in (flow.get("excluded_from_subgroup") or {}).items()
            ],
            "enrolled": _int_text(flow.get("enrolled")),
            "subgroup": _int_text(flow.get("subgroup")),
        },
        "comparison_table": comparison_table,
        "data_tables": data_tables,
    }


def _date_text(value: Any) -> str:
    if not value:
        return MISSING
    try:
        stamp = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return stamp.strftime("%d %B %Y, %H:%M %Z").strip().rstrip(",")


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("bmetrack.analysis", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _stylesheet() -> str:
    return (resources.files("bmetrack.analysis") / "templates" / "report.css").read_text(
        encoding="utf-8"
    )


def render_html(
    results: Mapping[str, Any],
    figures: Mapping[str, Path],
    tables: Mapping[str, pd.DataFrame] | None = None,
) -> str:
    """Render the report as one self-contained HTML document.

    Parameters
    ----------
    results : mapping
        The results dict of ``analyse`` (or a loaded results.json).
    figures : mapping of str to Path
        Figure name -> PNG file, as returned by ``figures.save_figures``; missing
        figures are left out. The images are embedded as base64 data URIs.
    tables : mapping of str to DataFrame, optional
        Data tables written beside the report; listed in an appendix.

    Returns
    -------
    str
        HTML with inlined CSS, embedded images and no external references.
    """
    if not isinstance(results, Mapping):
        msg = f"results must be the dict from analyse(), got {type(results).__name__}."
        raise TypeError(msg)
    for name, path in figures.items():
        if not Path(path).is_file():
            msg = f"figure {name!r}: no file at {path}; run save_figures() first."
            raise FileNotFoundError(msg)
    context = _build_context(results, figures, tables, _stylesheet())
    return _environment().get_template("report.html.j2").render(**context)


def render_pdf(html: str, path: Path | str) -> Path:
    """Write ``html`` (from :func:`render_html`) as an A4 PDF with WeasyPrint.

    Page size, page numbers and page breaks come from the report's print CSS.
    """
    import weasyprint  # imported here: loading pango is slow and only PDFs need it

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    weasyprint.HTML(string=html).write_pdf(target)
    return target


# --------------------------------------------------------------------------------------
# Writing all files
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report` (``pdf`` is None when no PDF was asked for)."""

    html: Path
    pdf: Path | None
    results_json: Path
    tables: dict[str, Path] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Path]:
        """What was written, by name: html, pdf, results_json and the tables folder."""
        files = {"html": self.html}
        if self.pdf is not None:
            files["pdf"] = self.pdf
        files["results_json"] = self.results_json
        if self.tables:
            files["tables"] = next(iter(self.tables.values())).parent
        return files


_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def write_report(
    results: Mapping[str, Any],
    figures: Mapping[str, Path],
    out_dir: Path | str,
    tables: Mapping[str, pd.DataFrame] | None = None,
    *,
    write_pdf: bool = True,
) -> ReportFiles:
    """Write report.html, report.pdf, results.json and tables/<name>.csv into ``out_dir``.

    Parameters
    ----------
    results : mapping
        The results dict of ``analyse``; NaN values are written as JSON null.
    figures : mapping of str to Path
        PNG figures from ``figures.save_figures``.
    out_dir : path
        Output folder (created if needed).
    tables : mapping of str to DataFrame, optional
        Each written as ``tables/<name>.csv`` (names: letters, digits, ``_.-``).
    write_pdf : bool
        Also render report.pdf (WeasyPrint; a few seconds).

    Returns
    -------
    ReportFiles
    """
    out = Path(out_dir)
    tables = dict(tables or {})
    for name in tables:
        if not _TABLE_NAME.fullmatch(name):
            msg = (
                f"table name {name!r} is not a safe file name; use letters, digits, '_', "
                "'.' or '-' (e.g. 'vcf_visits')."
            )
            raise ValueError(msg)
    out.mkdir(parents=True, exist_ok=True)
    safe = json_safe(results)
    results_path = out / "results.json"
    results_path.write_text(json.dumps(safe, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    table_paths: dict[str, Path] = {}
    if tables:
        (out / "tables").mkdir(exist_ok=True)
        for name, frame in tables.items():
            table_paths[name] = out / "tables" / f"{name}.csv"
            frame.to_csv(table_paths[name], index=False)
    html = render_html(safe, figures, tables)
    html_path = out / "report.html"
    html_path.write_text(html, encoding="utf-8")
    pdf_path = render_pdf(html, out / "report.pdf") if write_pdf else None
    return ReportFiles(html=html_path, pdf=pdf_path, results_json=results_path, tables=table_paths)
