import pandas as pd
import pytest

from bmetrack.settings import resolve_settings
from bmetrack.study.cohort import DAYS_PER_MONTH, assign_visit_windows, subgroup_membership

PROCEDURE = pd.Timestamp("2020-01-01")


def _assign(days, given=None, overrides=None):
    visits = pd.Series([PROCEDURE + pd.Timedelta(days=d) for d in days])
    procedure = pd.Series([PROCEDURE] * len(days))
    given_series = None if given is None else pd.Series(given, dtype="Int64")
    return assign_visit_windows(visits, procedure, resolve_settings(overrides), given_series)


def test_nominal_dates_and_window_edges():
    nominal = {m: round(m * DAYS_PER_MONTH) for m in (3, 6, 12)}
    assert nominal == {3: 91, 6: 183, 12: 365}
    days = [0, -30, 91, 91 + 30, 91 - 30, 91 + 31, 183 + 45, 183 + 46, 365 - 60, 365 + 61]
    result = _assign(days)
    assert result.nominal_month.tolist() == [0, 0, 3, 3, 3, pd.NA, 6, pd.NA, 12, pd.NA]
    assert result.window_status.tolist() == [
        "baseline",
        "baseline",
        "in_window",
        "in_window",
        "in_window",
        "outside_window",
        "in_window",
        "outside_window",
        "in_window",
        "outside_window",
    ]
    assert result.days_from_procedure.tolist() == days
    assert result.days_from_nominal.tolist()[:5] == [0, -30, 0, 30, -30]


def test_baseline_is_up_to_procedure_within_limit():
    result = _assign([1, -180, -181])
    assert result.nominal_month.tolist() == [pd.NA, 0, pd.NA]


def test_overlapping_windows_choose_nearest():
    # With wide windows month 3 and month 6 overlap; day 130 is nearer to 3 (91) than 6 (183).
    result = _assign([130, 150], overrides={"visit_window_days_month_3": 80})
    assert result.nominal_month.tolist() == [3, 6]


def test_stated_month_is_kept_and_flagged_when_outside_its_window():
    result = _assign([91, 250, 200], given=[3, 3, None])
    assert result.nominal_month.tolist() == [3, 3, 6]
    assert result.window_status.tolist() == ["in_window", "outside_window", "in_window"]


def test_stated_unknown_month_is_an_error():
    with pytest.raises(ValueError, match="not a nominal month"):
        _assign([91], given=[4])


def test_subgroup_rules():
    frame = subgroup_membership(
        pd.Series(["a", "b", "c", "d", "e"]),
        pd.Series([1, 2, 1, 1, 3]),
        pd.Series([False, False, True, pd.NA, True], dtype="boolean"),
        pd.Series([False, False, False, True, True], dtype="boolean"),
    )
    assert frame["in_subgroup"].tolist() == [True, False, False, False, False]
    assert frame["exclusion_reasons"].tolist() == [
        "",
        "more than one treated VCF",
        "new VCF during follow-up",
        "pain at another untreated level",
        "more than one treated VCF; new VCF during follow-up; pain at another untreated level",
    ]
