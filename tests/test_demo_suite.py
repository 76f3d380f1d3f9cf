"""The demo suite's promises: deterministic, compositional, held-out phrasings and combinations really held out,
flags a learnable rule, and every split written."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter

import pytest

from demo.suite import (ALL_COMBOS, ALL_PHRASES, BLIND_PHRASES, EVAL_COMBOS, EXPERT_VALUES, FRESH_PHRASES, GROUPS,
                        HELDOUT_COMBOS, MEASURES, PHRASES, ROUTER_PHRASES, TRAIN_COMBOS, WRITER_PHRASES, Case, answer,
                        complex_rows, expert_rows, line, note, sample_case, write_suite)

EXPERTS = [e for names in GROUPS.values() for e in names]
N_EXPERT, N_ROUTER, N_COADAPT = 1600, 1200, 2400   # write_suite's defaults: the sizes the build trains on


@pytest.fixture(scope="module")
def training_rows() -> dict[str, list[dict]]:
    rows = {f"expert:{e}": expert_rows(e, N_EXPERT) for e in EXPERTS}
    rows["router_train"] = complex_rows(N_ROUTER, off_topic=0.1)
    rows["coadapt"] = complex_rows(N_COADAPT, off_topic=0.1, wide=True)
    rows["cover"] = complex_rows(480, cover=True)
    return rows


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    assert complex_rows(40, seed=3, heldout=True) == complex_rows(40, seed=3, heldout=True)
    assert complex_rows(40, seed=3, off_topic=0.1) == complex_rows(40, seed=3, off_topic=0.1)
    assert expert_rows("flags", 20, seed=3) == expert_rows("flags", 20, seed=3)
    assert complex_rows(40, seed=3, heldout=True) != complex_rows(40, seed=4, heldout=True)
    assert expert_rows("flags", 20, seed=3) != expert_rows("flags", 20, seed=3, split="gate")


def _compose_from_solo(case, task: str, knowledge: str | None, style: str | None) -> str:
    """A combination's reference rebuilt by string operations on the solo answers only."""
    task_lines = answer(case, task).splitlines()                   # "Na 128"
    abbrev = lambda text: text.split(" ", 1)[0]  # noqa: E731 — every unstyled line starts with its abbreviation
    suffix = {abbrev(t): "" for t in task_lines}
    if knowledge:  # the knowledge expert's lines over the whole note, kept for the task's measurements
        for k in answer(case, None, knowledge).splitlines():
            if abbrev(k) in suffix:
                plain_line = next(t for t in task_lines if abbrev(t) == abbrev(k))
                assert k.startswith(plain_line) and len(k) > len(plain_line), (k, plain_line)
                suffix[abbrev(k)] = k[len(plain_line):]                # ": low" | " (normal 135-145)"
    head = {abbrev(t): abbrev(t) for t in answer(case, None).splitlines()}
    if style:  # what the style expert alone does to each line's name: "Na" → "- Na" | "sodium"
        for raw, styled in zip(answer(case, None).splitlines(), answer(case, None, None, style).splitlines(),
                               strict=True):
            rest = raw[len(abbrev(raw)):]                              # " 128"
            assert styled.endswith(rest) and styled != raw, (raw, styled)
            head[abbrev(raw)] = styled[: len(styled) - len(rest)]
    return "\n".join(head[abbrev(t)] + t[len(abbrev(t)):] + suffix[abbrev(t)] for t in task_lines)


def test_every_combination_is_the_composition_of_its_parts_solo_answers() -> None:
    rng = random.Random(7)
    for _ in range(60):
        case = sample_case(rng)
        for combo in ALL_COMBOS:
            assert answer(case, *combo) == _compose_from_solo(case, *combo), combo


def _case_of(note_text: str) -> Case:
    """The case back from its note (the rows store the note, not the case)."""
    first, *body = note_text.splitlines()
    age, _, sex, _, complaint = first.rstrip(".").split(" ", 4)
    parts = {line.split(": ")[0]: tuple(tuple(x.split(" ")) for x in line.split(": ")[1].rstrip(".").split(", "))
             for line in body}
    case = Case(int(age), sex, complaint, parts["Labs"], parts["Vitals"], body[0].startswith("Vitals"))
    assert note(case) == note_text
    return case


def test_rows_carry_the_composed_references() -> None:
    rows = complex_rows(64, heldout=True) + complex_rows(60) + [r for e in EXPERTS for r in expert_rows(e, 10)]
    for row in rows:
        task, knowledge, style = row["meta"]["combo"]
        assert row["experts"] == [e for e in (task, knowledge, style) if e]
        case = _case_of(row["input"])
        assert row["output"] == answer(case, task, knowledge, style)
        if task is not None:
            assert row["output"] == _compose_from_solo(case, task, knowledge, style)


def test_heldout_phrasings_never_appear_in_training_rows(training_rows) -> None:
    instructions = [r["instruction"] for rows in training_rows.values() for r in rows]
    for e in EXPERTS:
        train, held = PHRASES[e]
        for phrase in held:
            assert not any(phrase in t for t in train), (e, phrase)
            assert not any(phrase in i for i in instructions), (e, phrase)
    assert not any("'s capital." in i or "together?" in i for i in instructions)  # held-out off-topic wordings
    # and the eval rows ask with held-out phrasings only
    for row in complex_rows(64, heldout=True):
        for e in row["experts"]:
            assert any(p in row["instruction"] for p in PHRASES[e][1]), row["instruction"]
            assert not any(p in row["instruction"] for p in PHRASES[e][0]), row["instruction"]


def test_fresh_wordings_are_in_no_other_phrasing_and_ask_the_same_rows(training_rows) -> None:
    """The second held-out set: no fresh wording is, or is inside, a training, router or held-out phrasing, nor any
    training row; `wordings="fresh"` asks the very rows (notes, combinations, answers) of the held-out set."""
    instructions = [r["instruction"] for rows in training_rows.values() for r in rows]
    for e in EXPERTS:
        assert len(set(FRESH_PHRASES[e])) == len(PHRASES[e][1])   # same draws, so the same notes follow
        others = PHRASES[e][0] + PHRASES[e][1] + ROUTER_PHRASES[e]
        for phrase in FRESH_PHRASES[e]:
            assert not any(phrase in o or o in phrase for o in others), (e, phrase)
            assert not any(phrase in i for i in instructions), (e, phrase)
    held, fresh = complex_rows(48, seed=24, heldout=True), complex_rows(48, seed=24, heldout=True, wordings="fresh")
    assert [(r["input"], r["output"], r["experts"]) for r in held] == [(r["input"], r["output"], r["experts"])
                                                                       for r in fresh]
    for row in fresh:
        for e in row["experts"]:
            assert any(p in row["instruction"] for p in FRESH_PHRASES[e]), row["instruction"]
    with pytest.raises(ValueError, match="wordings"):
        complex_rows(4, wordings="fresh")


@pytest.mark.parametrize("split", ["router_train", "coadapt"])
def test_heldout_combinations_are_unseen_but_every_pair_inside_them_is_trained(training_rows, split) -> None:
    trained = {tuple(r["meta"]["combo"]) for r in training_rows[split] if r["experts"]}
    assert trained == set(TRAIN_COMBOS)
    assert not trained & set(HELDOUT_COMBOS)
    trained_sets = [set(r["experts"]) for r in training_rows[split]]
    for combo in HELDOUT_COMBOS:
        for pair in itertools.combinations([e for e in combo if e], 2):
            assert any(set(pair) <= s for s in trained_sets), (combo, pair)
    evaluated = {tuple(r["meta"]["combo"]) for r in complex_rows(64, heldout=True)}
    assert evaluated == set(EVAL_COMBOS) and set(HELDOUT_COMBOS) <= evaluated


def test_the_cover_rows_add_the_heldout_combinations_as_a_third_in_training_wordings(training_rows) -> None:
    """Stages 1-2 hold two combinations out (above); the cover stage's rows hold every one, those two a third of the
    rows, asked in the reroute stage's wordings (training, router and outside writer's phrasings, never held-out)."""
    combos = Counter(tuple(r["meta"]["combo"]) for r in training_rows["cover"])
    assert set(combos) == set(ALL_COMBOS) and sum(combos[c] for c in HELDOUT_COMBOS) == 480 // 3
    asked = {e: PHRASES[e][0] + ROUTER_PHRASES[e] + WRITER_PHRASES[e] for e in EXPERTS}
    for r in training_rows["cover"]:
        assert all(any(p in r["instruction"] for p in asked[e]) for e in r["experts"]), r["instruction"]


def test_at_least_ten_training_phrasings_per_skill_and_all_used(training_rows) -> None:
    router = [r["instruction"] for r in training_rows["router_train"]]
    for e in EXPERTS:
        train = PHRASES[e][0]
        assert len(set(train)) >= 10, e
        used = {p for p in train if any(p in i for i in router)}
        assert len(used) >= 10, (e, len(used))


def _words(texts) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z0-9']+", t.lower())}


def test_router_only_wordings_keep_the_heldout_wordings_unseen(training_rows) -> None:
    """Stage 2's extra wordings add no word of a held-out phrasing that the training phrasings do not already
    use, so the held-out split still tests wordings the router never saw; and the wide split does use them."""
    training = _words([p for e in EXPERTS for p in PHRASES[e][0]] + list(ALL_PHRASES))
    heldout = _words([p for e in EXPERTS for p in PHRASES[e][1]])
    extra = _words([p for e in EXPERTS for p in ROUTER_PHRASES[e]])
    assert (extra & heldout) - training == set()
    coadapt = [r["instruction"] for r in training_rows["coadapt"]]
    for e in EXPERTS:
        assert len(set(ROUTER_PHRASES[e])) >= 20 and not set(ROUTER_PHRASES[e]) & set(PHRASES[e][0] + PHRASES[e][1])
        used = {p for p in ROUTER_PHRASES[e] + PHRASES[e][0] if any(p in i for i in coadapt)}
        assert len(used) >= 28, (e, len(used))
    with pytest.raises(ValueError, match="held-out"):
        complex_rows(4, heldout=True, wide=True)



def _clash(a: str, b: str) -> bool:
    """One wording holds the other's whole word sequence (two words or more), or they are the same words."""
    def inside(s: list[str], t: list[str]) -> bool:
        return len(s) >= 2 and any(t[i:i + len(s)] == s for i in range(len(t) - len(s) + 1))

    a_words, b_words = re.findall(r"[a-z0-9']+", a.lower()), re.findall(r"[a-z0-9']+", b.lower())
    return a_words == b_words or inside(a_words, b_words) or inside(b_words, a_words)


def test_outside_writers_wordings_keep_every_heldout_set_unseen_as_sentences() -> None:
    """The writer's training wordings share no sentence with a held-out, fresh or blind one, and the blind set none
    with any training or other held-out one (`demo/wordings/*.json`: the rule, what it dropped); single words may
    recur, since users share words. Each blind wording is found in its rows and in no other skill's."""
    assert _clash("Add normal ranges", "Add normal ranges.") and not _clash("bloods?", "Summarise the bloods.")
    for e in EXPERTS:
        held = PHRASES[e][1] + FRESH_PHRASES[e] + BLIND_PHRASES[e]
        assert len(set(WRITER_PHRASES[e])) >= 55 and len(set(BLIND_PHRASES[e])) >= 4, e
        assert not [(w, h) for w in WRITER_PHRASES[e] for h in held if _clash(w, h)]
        train = PHRASES[e][0] + ROUTER_PHRASES[e] + WRITER_PHRASES[e] + PHRASES[e][1] + FRESH_PHRASES[e]
        assert not [(b, t) for b in BLIND_PHRASES[e] for t in train if _clash(b, t)]
        assert not [(b, c) for b in BLIND_PHRASES[e] for c in BLIND_PHRASES[e] if b != c and b in c]
    writer = complex_rows(480, off_topic=0.1, wide=True, writer=True)
    used = {p for e in EXPERTS for p in WRITER_PHRASES[e] if any(p in r["instruction"] for r in writer)}
    assert len(used) >= 250 and writer != complex_rows(480, off_topic=0.1, wide=True)
    for row in complex_rows(96, heldout=True, wordings="blind"):
        for e in row["experts"]:
            assert any(p in row["instruction"] for p in BLIND_PHRASES[e]), row["instruction"]
    with pytest.raises(ValueError, match="training wordings"):
        complex_rows(4, heldout=True, writer=True)
    with pytest.raises(ValueError, match="held-out rows only"):
        complex_rows(4, wordings="blind")

def test_flags_are_correct_with_a_clear_gap() -> None:
    for m in MEASURES.values():   # abnormal values are drawn well outside the range: ≥ 15 % of its width
        width = m.high - m.low
        assert m.too_low is None or m.too_low[1] <= m.low - 0.15 * width, m.abbrev
        assert m.too_high is None or m.too_high[0] >= m.high + 0.15 * width, m.abbrev
    rng, seen = random.Random(11), set()
    for _ in range(1500):
        case = sample_case(rng)
        lines = answer(case, None, "flags").splitlines()
        for (a, v), text in zip(case.measurements, lines, strict=True):
            m, x = MEASURES[a], float(v)
            expected = "low" if x < m.low else "high" if x > m.high else "normal"
            assert text == f"{a} {v}: {expected}"
            # as written (rounded), no value sits near a boundary: ≥ one display unit and ≥ 5 % of the width
            gap = min(abs(x - m.low), abs(x - m.high))
            assert gap >= max(10 ** -m.decimals, 0.05 * (m.high - m.low)) - 1e-9, (a, v)
            seen.add((a, expected))
    for m in MEASURES.values():   # every flag a measure can have does occur
        for flag, possible in (("low", m.too_low), ("normal", True), ("high", m.too_high)):
            assert ((m.abbrev, flag) in seen) == bool(possible), (m.abbrev, flag)


def test_write_suite_writes_every_split(tmp_path) -> None:
    sizes = dict(n_expert=5, n_gate=3, n_router=10, n_coadapt=12, n_writer=8, n_cover=9, n_eval=6,
                 n_abstain_everyday=4, n_abstain_outside=2)
    written = write_suite(tmp_path / "s", seed=0, **sizes)
    expected = {**{f"expert:{e}": f"experts/{e}.jsonl" for e in EXPERTS},
                **{f"gate:{e}": f"gate/{e}.jsonl" for e in EXPERTS},
                "router_train": "router_train.jsonl", "coadapt": "coadapt.jsonl", "writer": "writer.jsonl",
                "cover": "cover.jsonl", "eval": "eval.jsonl",
                "off_topic": "off_topic.jsonl", "abstain_requests": "abstain_requests.jsonl"}
    assert {k: p.relative_to(tmp_path / "s").as_posix() for k, p in written.items()} == expected
    counts = {"expert": 5, "gate": 3, "router_train": 10, "coadapt": 12, "writer": 8, "cover": 9, "eval": 6,
              "off_topic": 16, "abstain_requests": 6}
    for key, path in written.items():
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == counts[key.split(":")[0]], key
        for r in rows:
            assert set(r) == {"instruction", "input", "output", "experts", "meta"}, key
            # an everyday request waits for the base model's answer (the build's abstain stage); the rest have theirs
            assert bool(r["output"]) != bool(r["meta"].get("family")), key
    again = write_suite(tmp_path / "t", seed=0, **sizes)
    assert all(written[k].read_bytes() == again[k].read_bytes() for k in written)
    with pytest.raises(ValueError, match="n_eval"):
        write_suite(tmp_path / "u", n_eval=0)


def test_the_demo_manifests_declare_every_reference_range_value_and_only_the_ranges_expert_has_any():
    """Grounded decoding lets an answer write the manifest's `values` beside the note's: the ranges expert's ranges,
    each on the line of its own measurement, whose names (as every reference line writes them) pick it alone."""
    from atmoe.grounding import Reference, numbers
    from atmoe.load.manifest import Manifest
    from demo.config import SHIPPED_MANIFEST, STAGE1_MANIFEST

    assert set(EXPERT_VALUES) == {"ranges"}
    declared = [Reference(tuple(r["values"]), tuple(r["names"])) for r in EXPERT_VALUES["ranges"]]
    assert [r.values for r in declared] == [tuple(numbers(m.range_text)) for m in MEASURES.values()]
    for (abbrev, m), ref in zip(MEASURES.items(), declared):
        for style in (None, "plain", "bullets"):
            text = line(abbrev, m.fmt(m.low), "ranges", style)
            hits = {m.group() for m in Reference.pattern([n for r in declared for n in r.names]).finditer(text)}
            assert [r.names for r in declared if hits & set(r.names)] == [ref.names], text
    for path in (STAGE1_MANIFEST, SHIPPED_MANIFEST):
        manifest = Manifest.load(path)
        assert {e.name: e.values for _, e in manifest.experts if e.values} == EXPERT_VALUES, path
