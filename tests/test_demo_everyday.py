"""Requests that need no expert: the held-out families stay out of every training file."""

from __future__ import annotations

import re

import pytest

from demo.everyday import FAMILIES, OUTSIDE_REQUESTS, Family, everyday_rows, families, outside_rows
from demo.suite import abstention_rows, write_suite


def _fragments(template: str) -> list[str]:
    """The fixed text of a template between its slots, long enough to identify it."""
    return [p.strip() for p in re.split(r"{\w+}", template) if len(p.strip()) >= 12]


@pytest.fixture(scope="module")
def training_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    written = write_suite(out, n_expert=40, n_gate=4, n_router=400, n_coadapt=800, n_eval=8,
                          n_abstain_everyday=480, n_abstain_outside=160)
    import json
    train = [k for k in written if k.startswith("expert:") or k in ("router_train", "coadapt", "abstain_requests")]
    return [json.loads(x) for k in train for x in written[k].read_text().splitlines()]


def test_every_domain_has_a_training_and_a_held_out_family():
    by_domain: dict[str, set[str]] = {}
    for f in FAMILIES:
        by_domain.setdefault(f.domain, set()).add(f.split)
    assert len(by_domain) >= 8 and all(v == {"train", "heldout"} for v in by_domain.values())


def test_no_held_out_template_or_filler_reaches_a_training_row(training_rows):
    text = "\n".join(f"{r['instruction']}\n{r['input']}" for r in training_rows).lower()
    assert sum(bool(not r["experts"] and r["meta"].get("family")) for r in training_rows) == 480   # the mix is there
    for fam in families("heldout"):
        for t in fam.templates:
            for frag in _fragments(t):
                assert frag.lower() not in text, (fam.name, frag)
        for slot, values in fam.fill.items():
            for v in values:
                if len(v) >= 6 and not v.isdigit():
                    assert not re.search(rf"\b{re.escape(v.lower())}\b", text), (fam.name, slot, v)
    held = {r["instruction"] for r in everyday_rows("heldout", 200)}
    assert held.isdisjoint({r["instruction"] for r in training_rows})
    for topic, splits in OUTSIDE_REQUESTS.items():
        assert all(q.lower() not in text for q in splits["heldout"]), topic


def test_the_check_itself_finds_a_leak():
    """A training row with a held-out template's text is found (the test above can fail)."""
    leak = everyday_rows("heldout", 1)[0]["instruction"]
    fam = next(f for f in families("heldout") if any(frag in leak for t in f.templates for frag in _fragments(t)))
    assert fam.split == "heldout"


def test_held_out_requests_are_many_and_distinct():
    rows = everyday_rows("heldout", 120)
    assert len({r["instruction"] for r in rows}) == 120
    assert len({r["meta"]["domain"] for r in rows}) >= 8 and all(r["experts"] == [] for r in rows)


def test_clinical_requests_outside_the_skills_put_the_note_in_either_box():
    a, b = outside_rows("heldout", 6, where="instruction"), outside_rows("heldout", 6, where="input")
    for x, y in zip(a, b):
        assert x["instruction"] == f"{y['instruction']}\n{y['input']}" and x["input"] == ""
        assert all(line in y["input"] for line in y["output"].splitlines())   # the answer copies the note
    rows = abstention_rows(20, 10)
    assert sum(r["meta"].get("where") == "instruction" for r in rows) == 5 and all(r["experts"] == [] for r in rows)


def test_a_family_names_a_missing_slot():
    with pytest.raises(ValueError, match="unknown slot"):
        Family("x", "d", "train", ("What is {y}?",), {"z": ("a",)})
