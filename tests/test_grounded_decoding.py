"""Grounded decoding (`GenerationSettings(grounded=True)`): an answer never writes a value its prompt (or the manifest's
reference values) does not hold, whatever the logits say, and never stops half-way through one."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_demo

from atmoe import ATMoE, Overrides
from atmoe.generation import GenerationSettings, decode
from atmoe.grounding import (
    DigitVocab,
    NumberGuard,
    Reference,
    numbers,
    unsupported_measurements,
    unsupported_values,
)
from atmoe.load.files import LoadError
from atmoe.load.manifest import Manifest
from demo.suite import EXPERT_VALUES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A vocabulary like a BPE's around numbers: single digits, multi-digit and mixed tokens, dots, words, an end token.
PIECES = ["", *"0123456789", ".", " ", "\n", "mg", " K", "SpO2", "12", "1.5", ". ", ".\n", "- ", ": high", "x"]
END = 0


class CharTokenizer:
    def __init__(self, pieces: list[str] = PIECES) -> None:
        self.pieces = pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def batch_decode(self, ids, skip_special_tokens=False):
        return [self.pieces[i[0]] for i in ids]


VOCAB = DigitVocab(CharTokenizer())


def _run(guard: NumberGuard | None, logits: torch.Tensor, pieces: list[str] = PIECES) -> tuple[str, bool]:
    """Greedy over a fixed sequence of logits [N, V] with the guard (if any): (text, ended by the end token)."""
    text = ""
    for i, step in enumerate(logits):
        row = step.clone()[None]
        if guard is not None:
            row = guard.mask(row, len(logits) - i)
            assert torch.isfinite(row).any(), f"every token blocked after {text!r}"
        t = int(row.argmax())
        if t == END:
            return text, True
        if guard is not None:
            guard.advance([t])
        text += pieces[t]
    return text, False


values = st.sampled_from(["5", "12", "120", "1.5", "37.5", "96", "0.8", "7"])


@settings(max_examples=300, deadline=None)
@given(st.lists(values, min_size=0, max_size=4), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_a_grounded_answer_writes_only_values_its_sources_hold(source_values, length, seed):
    source = "Labs: " + ", ".join(f"K {v}" for v in source_values)
    logits = torch.randn(length, len(PIECES), generator=torch.Generator().manual_seed(seed)) * 3
    text, _ = _run(NumberGuard(VOCAB, [source], end_ids=[END]), logits)
    assert unsupported_values(text, source) == [], text          # also when cut by its length


def test_the_guard_is_what_keeps_the_values_grounded():
    """Without it the same logits write values the source lacks; with a reference value, that one is allowed."""
    source = "Labs: K 5, Na 120."
    rng = torch.Generator().manual_seed(0)
    free = [_run(None, torch.randn(30, len(PIECES), generator=rng) * 3)[0] for _ in range(20)]
    assert sum(bool(unsupported_values(t, source)) for t in free) >= 10
    digits = torch.full((6, len(PIECES)), -5.0)
    digits[:, PIECES.index("3")] = 5                                  # the model wants to write "333…"
    digits[:, PIECES.index(" ")] = 4
    def mid_line(reference: tuple[str, ...] = ()) -> NumberGuard:   # after "K ": no list ordinal can start here
        guard = NumberGuard(VOCAB, [source], end_ids=[END])
        guard.allow(0, reference)
        for piece in (" K", " "):                            # one token per step, of the batch's one row
            guard.advance([PIECES.index(piece)])
        return guard

    assert numbers(_run(mid_line(), digits)[0]) == []
    assert set(numbers(_run(mid_line(("33",)), digits)[0])) == {"33"}    # an allowed value is writable


def test_ordinals_words_and_full_stops_stay_writable():
    guard = NumberGuard(VOCAB, ["K 5"], end_ids=[END])
    for piece in ["1", ".", " ", "K", " ", "5", ".", "\n", "SpO2", " ", "5"]:
        i = PIECES.index(piece) if piece in PIECES else PIECES.index(" K")
        row = guard.mask(torch.zeros(1, len(PIECES)), 10)
        assert torch.isfinite(row[0, i]), (guard.rows[0]["line"], piece)
        guard.advance([i])
    blocked = guard.mask(torch.zeros(1, len(PIECES)), 10)[0]
    assert not torch.isfinite(blocked[PIECES.index("3")])            # "53" is no value of the note
    assert torch.isfinite(blocked[END])                               # "… 5" may end the answer


def test_a_value_is_never_left_half_written_at_the_length_limit():
    guard = NumberGuard(VOCAB, ["Na 120"], end_ids=[END])
    want_one = torch.full((1, len(PIECES)), -5.0)
    want_one[0, PIECES.index("1")] = 5
    assert torch.isfinite(guard.mask(want_one.clone(), 3)[0, PIECES.index("1")])      # "1", "2", "0" fit
    assert not torch.isfinite(guard.mask(want_one.clone(), 2)[0, PIECES.index("1")])  # "120" no longer fits


def test_a_named_reference_value_is_writable_only_on_a_line_that_names_it():
    """A measurement's range belongs after that measurement: the platelets' range is not the heart rate's (the one
    invented value grounded decoding let through, docs/abstention.md). Names match whole, a capital one as written."""
    pieces = ["", *"0123456789", " ", "HR", "Plt", "heart rate", "hr", "HRx", " (normal ", "-", ")"]
    vocab = DigitVocab(CharTokenizer(pieces))

    def writable(line: str) -> set[str]:
        """The digits the guard allows next, after the answer's current line is `line` (one piece a step)."""
        guard = NumberGuard(vocab, ["HR 41, Plt 120."], end_ids=[END])
        guard.allow(0, ["60", "100"], names=["HR", "heart rate"])
        guard.allow(0, ["150", "400"], names=["Plt", "platelets"])
        for piece in re.findall("|".join(map(re.escape, sorted(pieces[1:], key=len, reverse=True))), line):
            guard.advance([pieces.index(piece)])
        allowed = guard.mask(torch.zeros(1, len(pieces)), 10)[0]
        return {d for d in "0123456789" if torch.isfinite(allowed[pieces.index(d)])}

    assert writable("HR 41 (normal ") == {"1", "4", "6"}       # 100, 120 (the note's), 41, 60: not 150 or 400
    assert writable("HR 41 (normal 1") == {"0", "2"}
    assert writable("heart rate 41 (normal ") == {"1", "4", "6"}
    assert writable("Plt 120 (normal ") == {"1", "4"}          # 150, 120, 400, 41
    assert writable("Plt 120 (normal 1") == {"2", "5"}
    assert writable("hr 41 (normal ") == writable("HRx 41 (normal ") == {"1", "4"}   # no name: the note's alone
    assert writable("HR 41 (normal 60-100) ") == {"1", "4", "6"}


# Measurements a manifest declares, by their names (`Manifest.measurements`): a capital name as written, a lower case
# one in any case; and a vocabulary that writes names whole or in pieces, values, and what stands between.
MEASURED = [("Glu", "blood sugar"), ("K", "potassium"), ("Cr", "creatinine")]
NAME_PIECES = ["", " blood", " sugar", "Blood", " sug", "ar", " K", "K", "OK", " creat", "inine", " creatinine", " is",
               " of", " was", ":", " ", "\n", "- ", "1", "0", "5", "10", " 10", ".", "mg", "x", " lowers", "s"]
NAME_VOCAB = DigitVocab(CharTokenizer(NAME_PIECES))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["lisinopril 10 mg", "K 5, metformin 10 mg", "potassium 5, blood sugar 10", "Cr 1.0"]),
       st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_a_grounded_answer_writes_no_value_under_a_measurement_its_source_lacks(source, length, seed):
    """Whatever the logits, no value follows the name of a declared measurement the source does not name (by any of
    its names), whole or finished across tokens ("blood" + " sugar" + " 10", " creat" + "inine" + " is 10"), and every
    value is the source's. One the source names may take a value under any of its names."""
    logits = torch.randn(length, len(NAME_PIECES), generator=torch.Generator().manual_seed(seed)) * 3
    text = _run(NumberGuard(NAME_VOCAB, [source], end_ids=[END], measurements=MEASURED), logits, NAME_PIECES)[0]
    assert unsupported_measurements(text, MEASURED, source) == [], text
    assert unsupported_values(text, source) == [], text


def test_unsupported_measurements_is_the_same_check_after_the_fact():
    answer = "- Blood sugar was 10\n- potassium 5, K: 5, OK 7\nmetformin lowers blood sugar; creatinine of about 1.0"
    assert unsupported_measurements(answer, MEASURED, "K 5", "") == ["Blood sugar", "creatinine"]
    assert unsupported_measurements(answer, MEASURED, "potassium 5, Cr 1.0, blood sugar 10") == []
    assert unsupported_measurements("blood sugars 10, k 5, 1. creatinine", MEASURED, "") == []   # other words
    assert unsupported_measurements("K\n10\ncreatinine:\n 10", MEASURED, "") == []   # a value on the next line


def test_the_guard_is_what_keeps_the_measurements_grounded():
    source = "lisinopril 10 mg"
    rng = torch.Generator().manual_seed(0)
    free = [_run(None, torch.randn(30, len(NAME_PIECES), generator=rng) * 3, NAME_PIECES)[0] for _ in range(40)]
    assert any(unsupported_measurements(t, MEASURED, source) for t in free)   # 3 of these 40 (seeded)

    def digits_allowed(source: str, *line: str) -> bool:
        """Whether the guard lets the note's value "10" begin next (each line ends where a value could start)."""
        guard = NumberGuard(NAME_VOCAB, [source], end_ids=[END], measurements=MEASURED)
        for piece in line:
            guard.advance([NAME_PIECES.index(piece)])
        row = guard.mask(torch.zeros(1, len(NAME_PIECES)))[0]
        return bool(torch.isfinite(row[NAME_PIECES.index("1")]))

    assert digits_allowed(source, "- ", "mg", " ")                   # the note's value, unlabelled
    for line in (("Blood", " sug", "ar", " "), (" creat", "inine", " is", " "), (" K", ":", " "),
                 (" creatinine", " was", " ")):
        assert not digits_allowed(source, *line), line                # under a measurement the note lacks
        assert digits_allowed("blood sugar 10, K 10, creatinine 10", *line), line   # under one it names
    assert digits_allowed(source, "OK", " ")                            # "OK" names nothing
    assert digits_allowed(source, " blood", " sugar", " lowers", " ")   # a mention, then other words
    assert digits_allowed("potassium 10", " K", " ")                    # the note's potassium as K


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ATMoE.load(tiny_demo(tmp_path_factory.mktemp("grounded")), device="cpu")


def test_generate_hands_the_setting_to_the_decoder(tiny):
    prompt, note = "List the lab results.", "72 yo M. HR 88, BP 142/90, potassium 5.6 mmol/L."
    for seed in range(6):
        g = tiny.generate(prompt, input=note, max_new_tokens=24, temperature=3.0, seed=seed, grounded=True)
        assert unsupported_values(g.text, prompt, note) == [], g.text
    free = [tiny.generate(prompt, input=note, max_new_tokens=24, temperature=3.0, seed=s).text for s in range(6)]
    assert any(unsupported_values(t, prompt, note) for t in free)    # the tiny model does invent without it
    with pytest.raises(ValueError, match="grounded must be True or False"):
        GenerationSettings(grounded="yes")


def test_decode_gives_the_guard_the_tokens_it_chose():
    seen = []

    class Spy:
        def mask(self, logits, left):
            seen.append(("mask", left))
            return logits

        def advance(self, tokens):
            seen.append(("advance", tokens))

    def forward(input_ids, **_):
        return torch.tensor([[[0.0, 3.0, 1.0]]]).expand(input_ids.shape[0], 1, -1)

    ids = torch.zeros(1, 2, dtype=torch.long)
    list(decode(forward, ids, torch.ones_like(ids), GenerationSettings(max_new_tokens=3), {0}, 0, guard=Spy()))
    assert seen == [("mask", 3), ("advance", [1]), ("mask", 2), ("advance", [1]), ("mask", 1), ("advance", [1])]


def test_an_experts_reference_values_are_writable_only_where_the_routing_engaged_it(tiny, monkeypatch):
    """Kept out, or with the ranges expert disabled, the reference ranges are not the answer's to write: only the
    prompt's values are; with it engaged, its declared values join them (asked once, after the prompt routed)."""
    later: list[list[list[str]]] = []
    real = NumberGuard.__init__

    def spy(self, *args, **kw):
        real(self, *args, **kw)
        if self._later is not None:
            ask = self._later
            self._later = lambda: later.append([list(v) for v in ask()]) or later[-1]

    monkeypatch.setattr(NumberGuard, "__init__", spy)
    ranges = tiny.manifest.reference_values["ranges"]
    prompt, note = "List the lab results with normal ranges.", "Na 128, K 6.1."
    tiny.generate(prompt, input=note, max_new_tokens=3, grounded=True,
                  overrides={"groups": {"knowledge": 1.0}, "experts": {"ranges": 1.0}})
    assert later[-1] == [ranges]
    tiny.generate(prompt, input=note, max_new_tokens=3, grounded=True, overrides=Overrides(disabled=["ranges"]))
    assert later[-1] == [[]]
    g = tiny.generate(prompt, input=note, max_new_tokens=3, grounded=True, overrides=Overrides(disabled=tiny.experts))
    assert later[-1] == [[]] and g.trace.experts_off


def test_generate_guards_the_manifests_measurements_whatever_the_routing(tiny, monkeypatch):
    """The guard of every grounded call gets the manifest's declared measurements, also when no expert is engaged:
    a value under a measurement's name is the note's or none, whoever writes it."""
    seen = []
    real = NumberGuard.__init__

    def spy(self, *args, measurements=(), **kw):
        seen.append(list(measurements))
        real(self, *args, measurements=measurements, **kw)

    monkeypatch.setattr(NumberGuard, "__init__", spy)
    declared = tiny.manifest.measurements
    assert ("HR", "heart rate") in declared and len(declared) == len(EXPERT_VALUES["ranges"])
    tiny.generate("List the vital signs.", input="HR 88.", max_new_tokens=2, grounded=True)
    tiny.generate("List the vital signs.", input="HR 88.", max_new_tokens=2, grounded=True,
                  overrides=Overrides(disabled=tiny.experts))
    tiny.generate("List the vital signs.", input="HR 88.", max_new_tokens=2)
    assert seen == [declared, declared]


def test_manifest_reference_values_are_read_and_checked(tmp_path):
    path = tiny_demo(tmp_path / "m", trained=False)
    d = json.loads(path.read_text())
    d["groups"][1]["experts"][1]["values"] = ["135", "145"]
    path.write_text(json.dumps(d))
    assert ATMoE.load(path, device="cpu").manifest.reference_values == {"ranges": [Reference(("135", "145"))]}
    d["groups"][1]["experts"][1]["values"] = ["1", {"names": ["Na", "sodium"], "values": ["135", "145"]}]
    assert Manifest.from_dict(d, root=path.parent).reference_values == {
        "ranges": [Reference(("1",)), Reference(("135", "145"), ("Na", "sodium"))]}
    assert Manifest.from_dict(d, root=path.parent).measurements == [("Na", "sodium")]
    for bad in ("135-145", [{"names": ["Na"]}], [{"names": [], "values": ["135"]}], [{"names": "Na", "values": ["1"]}]):
        d["groups"][1]["experts"][1]["values"] = bad
        with pytest.raises(LoadError, match="'values' must be a list of strings or of"):
            Manifest.from_dict(d, root=path.parent)
