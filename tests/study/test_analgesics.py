import pytest

from bmetrack.study.analgesics import (
    UnknownDrugError,
    analgesic_class_of,
    drug_lookup,
    split_drug_list,
)


def test_who_ladder_classes():
    assert analgesic_class_of([]) == 0
    assert analgesic_class_of(["none"]) == 0
    assert analgesic_class_of(["Paracetamol"]) == 1
    assert analgesic_class_of(["ibuprofen", "tramadol"]) == 2
    assert analgesic_class_of(["paracetamol", "Morphine"]) == 3
    assert analgesic_class_of(["OxyContin"]) == 3


def test_unknown_drug_is_an_error_with_suggestion():
    with pytest.raises(UnknownDrugError, match="Did you mean tramadol"):
        analgesic_class_of(["tramadl"])
    with pytest.raises(UnknownDrugError, match=r"analgesics\.csv"):
        analgesic_class_of(["aspirine forte extra"])


def test_split_drug_list():
    assert split_drug_list("paracetamol; tramadol") == ["paracetamol", "tramadol"]
    assert split_drug_list("paracetamol + codeine, ibuprofen") == [
        "paracetamol",
        "codeine",
        "ibuprofen",
    ]
    assert split_drug_list("") == []
    assert split_drug_list(None) == []


def test_table_classes_are_valid():
    lookup = drug_lookup()
    assert set(lookup.classes.values()) <= {0, 1, 2, 3}
    assert all(name == name.lower().strip() for name in lookup.classes)
