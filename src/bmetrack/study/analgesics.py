"""Analgesic drug names -> WHO-ladder class (METHOD.md 1).

Class 0 none, 1 non-opioid, 2 weak opioid, 3 strong opioid. A visit's class is
the highest class among its drugs. Unknown names are an error, never class 0:
a misspelt opioid silently counted as "no analgesics" would bias the analysis.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = [
    "ANALGESIC_CLASS_NAMES",
    "AnalgesicLookup",
    "UnknownDrugError",
    "analgesic_class_of",
    "drug_lookup",
    "split_drug_list",
]

ANALGESIC_CLASS_NAMES: dict[int, str] = {
    0: "none",
    1: "non-opioid",
    2: "weak opioid",
    3: "strong opioid",
}


class UnknownDrugError(ValueError):
    """A drug name the lookup does not know."""


@dataclass(frozen=True)
class AnalgesicLookup:
    """Lower-case drug name -> (class, generic name)."""

    classes: dict[str, int]
    generics: dict[str, str]

    def classify(self, drug: str) -> int:
        """Class of one drug name; raises UnknownDrugError with close matches."""
        key = " ".join(drug.strip().lower().split())
        if key in self.classes:
            return self.classes[key]
        close = difflib.get_close_matches(key, self.classes, n=3, cutoff=0.75)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        msg = (
            f"Unknown analgesic {drug!r}.{hint} Use a generic or brand name from "
            "bmetrack/study/data/analgesics.csv, or add the drug there with its WHO class."
        )
        raise UnknownDrugError(msg)


@cache
def drug_lookup() -> AnalgesicLookup:
    """The packaged drug table."""
    text = resources.files("bmetrack.study").joinpath("data/analgesics.csv").read_text("utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    classes: dict[str, int] = {}
    generics: dict[str, str] = {}
    for row in rows:
        classes[row["name"]] = int(row["analgesic_class"])
        generics[row["name"]] = row["generic"]
    return AnalgesicLookup(classes, generics)


def split_drug_list(text: str | None) -> list[str]:
    """Split a free-text drug list on ';', ',' or '+' (empty -> [])."""
    if text is None:
        return []
    for separator in (",", "+", "/"):
        text = text.replace(separator, ";")
    return [part.strip() for part in text.split(";") if part.strip()]


def analgesic_class_of(drugs: Iterable[str]) -> int:
    """Highest WHO class among ``drugs``; no drugs -> 0."""
    lookup = drug_lookup()
    return max((lookup.classify(drug) for drug in drugs), default=0)
