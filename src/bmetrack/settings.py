"""One declarative registry of every method setting (defaults from METHOD.md).

The CLI (``--set name=value``), the web app and the report all read settings
through :func:`resolve_settings`, so a default lives in exactly one place and the
report can list every value that produced its numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REGISTRY",
    "Setting",
    "Settings",
    "SettingsError",
    "parse_assignments",
    "resolve_settings",
]


class SettingsError(ValueError):
    """A setting name or value that does not exist or is out of range."""


@dataclass(frozen=True)
class Setting:
    """One method setting: its default, type, unit, allowed range and origin."""

    name: str
    default: Any
    kind: type
    description: str
    method_section: str
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    is_list: bool = False

    def convert(self, value: Any) -> Any:
        """Return ``value`` converted to this setting's type, or raise SettingsError."""
        if self.is_list:
            items = value
            if isinstance(value, str):
                items = [part for part in value.replace(";", ",").split(",") if part.strip()]
            if not isinstance(items, list | tuple):
                msg = f"Setting {self.name!r} takes a list; got {value!r}. Write e.g. 'a,b,c'."
                raise SettingsError(msg)
            return tuple(self._convert_one(item) for item in items)
        return self._convert_one(value)

    def _convert_one(self, value: Any) -> Any:
        try:
            if self.kind is bool and isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in {"true", "false", "yes", "no", "1", "0"}:
                    raise ValueError(value)
                converted: Any = lowered in {"true", "yes", "1"}
            elif isinstance(value, str):
                converted = self.kind(value.strip())
            else:
                converted = self.kind(value)
        except (TypeError, ValueError):
            msg = (
                f"Setting {self.name!r} takes a {self.kind.__name__}; got {value!r}. "
                f"Default is {self.default!r}."
            )
            raise SettingsError(msg) from None
        if self.choices and converted not in self.choices:
            msg = (
                f"Setting {self.name!r} must be one of {', '.join(map(str, self.choices))}; "
                f"got {converted!r}."
            )
            raise SettingsError(msg)
        if self.minimum is not None and converted < self.minimum:
            msg = f"Setting {self.name!r} must be >= {self.minimum}; got {converted!r}."
            raise SettingsError(msg)
        if self.maximum is not None and converted > self.maximum:
            msg = f"Setting {self.name!r} must be <= {self.maximum}; got {converted!r}."
            raise SettingsError(msg)
        return converted


def _registry(*settings: Setting) -> dict[str, Setting]:
    return {setting.name: setting for setting in settings}


REGISTRY: dict[str, Setting] = _registry(
    # --- Study protocol (METHOD.md 1)
    Setting(
        "nominal_months",
        (0, 3, 6, 12),
        int,
        "Nominal visit time points after the procedure.",
        "1",
        unit="month",
        minimum=0,
        is_list=True,
    ),
    Setting(
        "visit_window_days_month_3",
        30,
        int,
        "A visit matches month 3 when within this many days of its nominal date.",
        "1",
        unit="day",
        minimum=0,
        maximum=365,
    ),
    Setting(
        "visit_window_days_month_6",
        45,
        int,
        "Window around the nominal month-6 date.",
        "1",
        unit="day",
        minimum=0,
        maximum=365,
    ),
    Setting(
        "visit_window_days_month_12",
        60,
        int,
        "Window around the nominal month-12 date.",
        "1",
        unit="day",
        minimum=0,
        maximum=365,
    ),
    Setting(
        "visit_window_days_default",
        30,
        int,
        "Window for nominal months without their own setting (studies with other schedules).",
        "1",
        unit="day",
        minimum=0,
        maximum=365,
    ),
    Setting(
        "baseline_max_days_before_procedure",
        180,
        int,
        "Month 0 is any date up to the procedure, at most this many days before it.",
        "1",
        unit="day",
        minimum=0,
    ),
    # --- Segmentation (METHOD.md 2)
    Setting(
        "reference_min_bodies",
        2,
        int,
        "Fewer usable reference vertebral bodies than this gives a warning.",
        "3",
        minimum=1,
    ),
    # --- Edema (METHOD.md 3)
    Setting(
        "reference_erosion_mm",
        2.0,
        float,
        "Erosion of reference bodies to avoid the cortex.",
        "3",
        unit="mm",
        minimum=0,
    ),
    Setting(
        "edema_k_sd",
        3.0,
        float,
        "Edema threshold: reference median +- k x MAD-based SD.",
        "3",
        unit="SD",
        minimum=0,
    ),
    Setting(
        "edema_rule",
        "stir_and_t1",
        str,
        "Which sequences must agree for an edema voxel.",
        "3",
        choices=("stir_and_t1", "stir_only", "t1_only"),
    ),
    Setting(
        "edema_surface_margin_mm",
        1.0,
        float,
        "Edema is counted this far inside the body surface.",
        "3",
        unit="mm",
        minimum=0,
    ),
    Setting(
        "edema_min_cluster_ml",
        0.1,
        float,
        "Edema clusters smaller than this are removed.",
        "3",
        unit="ml",
        minimum=0,
    ),
    Setting(
        "cement_fraction_of_reference",
        0.3,
        float,
        "Cement: signal below this fraction of reference marrow on both T1 and STIR.",
        "3",
        minimum=0,
        maximum=1,
    ),
    Setting(
        "rim_width_mm",
        2.0,
        float,
        "Peri-cement rim: STIR-bright shell within this distance of the cement.",
        "3",
        unit="mm",
        minimum=0,
    ),
    Setting(
        "bme_present_threshold_percent",
        5.0,
        float,
        "BME is present when bme_percent is at least this.",
        "3",
        unit="%",
        minimum=0,
        maximum=100,
    ),
    Setting(
        "bme_extent_edges_percent",
        (0.0, 25.0, 50.0, 75.0, 100.0),
        float,
        "Upper edges of the BME extent categories for figures: 0, 1-25, 26-50, 51-75, 76-100.",
        "3",
        unit="%",
        minimum=0,
        maximum=100,
        is_list=True,
    ),
    # --- Deformity (METHOD.md 4)
    Setting(
        "genant_grade1_min_percent",
        20.0,
        float,
        "Height loss from which a body is Genant grade 1.",
        "4",
        unit="%",
        minimum=0,
        maximum=100,
    ),
    Setting(
        "genant_grade2_min_percent",
        25.0,
        float,
        "Height loss from which a body is Genant grade 2.",
        "4",
        unit="%",
        minimum=0,
        maximum=100,
    ),
    Setting(
        "genant_grade3_min_percent",
        40.0,
        float,
        "Height loss above which a body is Genant grade 3.",
        "4",
        unit="%",
        minimum=0,
        maximum=100,
    ),
    # --- Analyses (METHOD.md 5)
    Setting(
        "confidence_level",
        0.95,
        float,
        "Confidence level of every interval in the report.",
        "5",
        minimum=0.5,
        maximum=0.999,
    ),
    Setting(
        "responder_min_drop_points",
        2.0,
        float,
        "Responder: VAS drop of at least this many points (MCID) ...",
        "5.3",
        unit="VAS point",
        minimum=0,
        maximum=10,
    ),
    Setting(
        "responder_min_drop_percent",
        30.0,
        float,
        "... or a drop of at least this percent of baseline VAS.",
        "5.3",
        unit="%",
        minimum=0,
        maximum=100,
    ),
    Setting(
        "responder_sensitivity_points",
        (1.5, 3.0),
        float,
        "MCID values of the responder sensitivity analysis.",
        "5.3",
        unit="VAS point",
        minimum=0,
        maximum=10,
        is_list=True,
    ),
    Setting(
        "significance_level",
        0.05,
        float,
        "Alpha used where the report states 'significant'.",
        "5",
        minimum=0.0001,
        maximum=0.5,
    ),
)


@dataclass(frozen=True)
class Settings(Mapping[str, Any]):
    """An immutable, validated set of values for every registered setting.

    Use :func:`resolve_settings` to build one; ``settings["edema_k_sd"]`` reads
    a value and ``settings.changed()`` lists those that differ from METHOD.md.
    """

    data: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise SettingsError(_unknown_setting_message(name)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def changed(self) -> dict[str, Any]:
        """Settings whose value differs from the registry default."""
        return {
            name: value
            for name, value in self.data.items()
            if value != REGISTRY[name].convert(REGISTRY[name].default)
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe copy (tuples become lists)."""
        return json.loads(json.dumps(dict(self.data)))

    def visit_window_days(self, month: int) -> int:
        """Window half-width for a nominal month (month 0 has its own rule)."""
        key = f"visit_window_days_month_{month}"
        if key in self.data:
            return int(self.data[key])
        return int(self.data["visit_window_days_default"])

    def describe(self) -> list[dict[str, Any]]:
        """One row per setting for the report: name, value, default, unit, section, text."""
        return [
            {
                "name": name,
                "value": _plain(self.data[name]),
                "default": _plain(REGISTRY[name].convert(REGISTRY[name].default)),
                "changed": name in self.changed(),
                "unit": REGISTRY[name].unit,
                "method_section": REGISTRY[name].method_section,
                "description": REGISTRY[name].description,
            }
            for name in self.data
        ]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _unknown_setting_message(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, REGISTRY, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"Unknown setting {name!r}.{hint} 'bmetrack settings' lists them all."


def resolve_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Return the registry defaults with ``overrides`` applied and validated."""
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in REGISTRY:
            raise SettingsError(_unknown_setting_message(name))
    values = {
        name: setting.convert(overrides.get(name, setting.default))
        for name, setting in REGISTRY.items()
    }
    grades = [values[f"genant_grade{g}_min_percent"] for g in (1, 2, 3)]
    if grades != sorted(grades):
        msg = f"Genant thresholds must increase from grade 1 to 3; got {grades}."
        raise SettingsError(msg)
    months = values["nominal_months"]
    if not months or months[0] != 0 or list(months) != sorted(set(months)):
        msg = f"Setting 'nominal_months' must start at 0 and increase strictly; got {list(months)}."
        raise SettingsError(msg)
    edges = values["bme_extent_edges_percent"]
    if list(edges) != sorted(set(edges)) or edges[-1] != 100:
        msg = (
            "Setting 'bme_extent_edges_percent' must increase strictly and end at 100; "
            f"got {list(edges)}."
        )
        raise SettingsError(msg)
    return Settings(values)


def parse_assignments(assignments: Iterable[str]) -> dict[str, str]:
    """Parse ``name=value`` strings from the command line."""
    parsed: dict[str, str] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name.strip():
            msg = f"Expected a setting as name=value; got {assignment!r}."
            raise SettingsError(msg)
        parsed[name.strip()] = value
    return parsed
