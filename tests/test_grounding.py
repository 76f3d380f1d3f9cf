"""The values an answer writes that its prompt does not hold (atmoe.grounding)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from atmoe.grounding import numbers, unsupported_values

NOTE = "Note: 58-year-old man on metformin 500 mg twice daily and lisinopril 10 mg daily."


def test_values_are_read_as_written():
    assert numbers("SpO2 96, B12 low, HR 118/80, Hb 1.2-1.7") == ["96", "118", "80", "1.2", "1.7"]
    assert numbers("1. metformin 500 mg\n2) lisinopril 10 mg") == ["500", "10"]     # list markers are not values
    assert numbers("- 1.1.1: Handover\nsee 2.13.0") == []                         # outlines and versions neither
    assert numbers("K 5.2. Na 140.") == ["5.2", "140"]                             # a sentence's full stop is not


def test_unsupported_values_are_those_no_source_writes():
    assert unsupported_values("blood sugar 120\nmetformin 500 mg", NOTE) == ["120"]
    assert unsupported_values("Hb 10.0, Hb 10.1", "Hb 10") == ["10.1"]             # 10.0 is the note's 10
    assert unsupported_values("120, 120 and 7", "", "7") == ["120"]                # each once; any source counts
    assert unsupported_values("", NOTE) == [] and unsupported_values(NOTE, NOTE) == []


@given(st.lists(st.integers(0, 10_000), max_size=8), st.lists(st.integers(0, 10_000), max_size=8))
def test_a_value_is_unsupported_exactly_when_no_source_holds_it(answer, source):
    text = lambda xs: ", ".join(f"x {v}" for v in xs)   # noqa: E731
    assert unsupported_values(text(answer), text(source)) == list(dict.fromkeys(
        str(v) for v in answer if v not in source))
