import pytest

from bmetrack.settings import REGISTRY, SettingsError, parse_assignments, resolve_settings


def test_defaults_follow_method_md():
    settings = resolve_settings()
    assert settings["nominal_months"] == (0, 3, 6, 12)
    assert settings.visit_window_days(3) == 30
    assert settings.visit_window_days(6) == 45
    assert settings.visit_window_days(12) == 60
    assert settings["edema_k_sd"] == 3.0
    assert settings["edema_min_cluster_ml"] == 0.1
    assert settings["bme_present_threshold_percent"] == 5.0
    assert settings["responder_min_drop_points"] == 2.0
    assert settings["responder_min_drop_percent"] == 30.0
    assert settings.changed() == {}


def test_override_is_converted_and_reported_as_changed():
    settings = resolve_settings({"edema_k_sd": "2.5", "nominal_months": "0,1,3"})
    assert settings["edema_k_sd"] == 2.5
    assert settings["nominal_months"] == (0, 1, 3)
    assert settings.changed() == {"edema_k_sd": 2.5, "nominal_months": (0, 1, 3)}
    assert settings.visit_window_days(1) == settings["visit_window_days_default"]
    rows = {row["name"]: row for row in settings.describe()}
    assert rows["edema_k_sd"]["changed"] is True
    assert rows["edema_k_sd"]["default"] == 3.0
    assert set(rows) == set(REGISTRY)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"edema_k": 2}, "Did you mean edema_k_sd"),
        ({"edema_k_sd": "three"}, "takes a float"),
        ({"edema_k_sd": -1}, ">= 0"),
        ({"edema_rule": "stir"}, "must be one of"),
        ({"bme_present_threshold_percent": 150}, "<= 100"),
        ({"genant_grade2_min_percent": 50}, "must increase"),
        ({"nominal_months": "3,6"}, "must start at 0"),
        ({"bme_extent_edges_percent": "0,50,40,100"}, "increase strictly"),
    ],
)
def test_bad_settings_are_named(overrides, fragment):
    with pytest.raises(SettingsError, match=fragment):
        resolve_settings(overrides)


def test_parse_assignments():
    assert parse_assignments(["edema_k_sd=2", "x = y"]) == {"edema_k_sd": "2", "x": " y"}
    with pytest.raises(SettingsError, match="name=value"):
        parse_assignments(["edema_k_sd"])


def test_settings_json_safe():
    import json

    assert json.loads(json.dumps(resolve_settings().to_dict()))["nominal_months"] == [0, 3, 6, 12]
