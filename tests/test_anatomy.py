import pytest

from bmetrack.anatomy import LevelError, label_from_level, level_from_label, normalise_level


@pytest.mark.parametrize(
    ("name", "label"),
    [("C1", 1), ("C7", 7), ("T1", 8), ("T12", 19), ("L1", 20), ("L5", 24), ("L6", 25), ("S1", 26)],
)
def test_verse_labels(name, label):
    assert label_from_level(name) == label
    assert level_from_label(label) == name


@pytest.mark.parametrize("text", ["th12", "t 12", "T-12", " t12 "])
def test_normalise_variants(text):
    assert normalise_level(text) == "T12"


@pytest.mark.parametrize("text", ["T13", "L7", "X1", "", "C8", "S2"])
def test_unknown_levels_are_errors(text):
    with pytest.raises(LevelError, match="not a vertebral level"):
        normalise_level(text)


def test_unknown_label():
    with pytest.raises(LevelError, match="labels run from 1"):
        level_from_label(27)
