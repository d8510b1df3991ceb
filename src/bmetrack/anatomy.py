"""Vertebral levels and their VerSe / SPINEPS integer labels (METHOD.md 2).

Shared by imaging (label maps) and the study database (treated levels), so the
names and integers are defined once.
"""

from __future__ import annotations

import re

__all__ = [
    "LEVEL_LABELS",
    "LevelError",
    "label_from_level",
    "level_from_label",
    "level_sort_key",
    "normalise_level",
]


class LevelError(ValueError):
    """A vertebral level name or label that does not exist."""


def _build_labels() -> dict[str, int]:
    labels: dict[str, int] = {}
    labels.update({f"C{i}": i for i in range(1, 8)})
    labels.update({f"T{i}": 7 + i for i in range(1, 13)})
    labels.update({f"L{i}": 19 + i for i in range(1, 7)})
    labels["S1"] = 26
    return labels


LEVEL_LABELS: dict[str, int] = _build_labels()
_LEVEL_BY_LABEL = {label: level for level, label in LEVEL_LABELS.items()}
_LEVEL_PATTERN = re.compile(r"^\s*(?P<region>[CTLS])\s*-?\s*(?P<number>\d{1,2})\s*$", re.I)


def normalise_level(name: str) -> str:
    """Return the canonical level name (``"th12"`` / ``"t 12"`` -> ``"T12"``).

    Raises
    ------
    LevelError
        When ``name`` is not a vertebral level of the VerSe convention.
    """
    text = str(name).strip()
    if text.upper().startswith("TH"):
        text = "T" + text[2:]
    match = _LEVEL_PATTERN.match(text)
    candidate = (
        f"{match.group('region').upper()}{int(match.group('number'))}" if match else text.upper()
    )
    if candidate not in LEVEL_LABELS:
        msg = (
            f"{name!r} is not a vertebral level; use C1-C7, T1-T12, L1-L5 (L6 for a "
            "lumbarised segment) or S1."
        )
        raise LevelError(msg)
    return candidate


def label_from_level(name: str) -> int:
    """VerSe integer label of a level name (C1..C7 = 1..7, T1..T12 = 8..19, L1 = 20, S1 = 26)."""
    return LEVEL_LABELS[normalise_level(name)]


def level_from_label(label: int) -> str:
    """Level name of a VerSe integer label."""
    try:
        return _LEVEL_BY_LABEL[int(label)]
    except (KeyError, ValueError):
        msg = f"{label!r} is not a VerSe vertebral label; labels run from 1 (C1) to 26 (S1)."
        raise LevelError(msg) from None


def level_sort_key(name: str) -> int:
    """Cranio-caudal order of a level name (for sorting tables)."""
    return label_from_level(name)
