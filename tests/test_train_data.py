"""JSONL training data (`atmoe.train.data`): loading, answer-only labels and padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_tokenizer

from atmoe.train.data import IGNORE_INDEX, DataError, Example, PadCollator, encode_dataset, encode_example, load_jsonl


def _write(tmp_path: Path, lines: list[str], bom: bool = False) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(lines).encode("utf-8") + b"\n")
    return path


ROW = json.dumps({"instruction": "List the lab results.", "input": "Labs: Na 128.", "output": "Na 128", "experts": ["labs"]})


def test_loads_bom_blank_lines_and_both_shapes(tmp_path: Path) -> None:
    pc = json.dumps({"prompt": "Say hi.", "completion": "hi"})
    no_input = json.dumps({"instruction": "Say hi.", "output": "hi", "meta": {"k": 1}})
    examples = load_jsonl(_write(tmp_path, [ROW, "", "   ", pc, no_input], bom=True))
    assert examples == [Example("List the lab results.", "Labs: Na 128.", "Na 128", ["labs"]),
                        Example("Say hi.", "", "hi"), Example("Say hi.", "", "hi", None, {"k": 1})]
    assert examples[1].experts is None  # no "experts" key: unlabelled, unlike [] (needs no expert)


def test_bad_lines_are_all_reported_with_line_numbers(tmp_path: Path) -> None:
    lines = [ROW, "{not json", "[1, 2]", json.dumps({"instruction": "x"}), json.dumps({"instruction": 3, "output": "y"}),
             json.dumps({"instruction": "x", "output": "y", "experts": "labs"}), json.dumps({"prompt": "p"}), ROW]
    with pytest.raises(DataError) as err:
        load_jsonl(_write(tmp_path, lines))
    message = str(err.value)
    assert "6 bad line(s)" in message
    for lineno in range(2, 8):
        assert f"line {lineno}:" in message
    assert "line 1:" not in message and "line 8:" not in message


def test_many_bad_lines_are_summarised(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"25 bad line\(s\)(.|\n)*and 15 more"):
        load_jsonl(_write(tmp_path, ["nope"] * 25))


def test_empty_and_overlong(tmp_path: Path) -> None:
    for content in (b"", b"\n\n  \n", b"\xef\xbb\xbf"):
        (tmp_path / "e.jsonl").write_bytes(content)
        with pytest.raises(DataError, match="no examples"):
            load_jsonl(tmp_path / "e.jsonl")
    huge = json.dumps({"instruction": "x", "output": "y" * (1 << 20)})
    with pytest.raises(DataError, match="line 2: longer than"):
        load_jsonl(_write(tmp_path, [ROW, huge]))


@pytest.mark.parametrize("templated", [True, False])
def test_labels_mask_the_prompt(templated: bool) -> None:
    tok = tiny_tokenizer(chat_template=templated)
    ex = Example("Triage this patient.", "HR 140", "EMERGENT: HR 140")
    enc = encode_example(tok, ex, max_length=256)
    n = enc["prompt_length"]
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    assert enc["input_ids"][-1] == tok.eos_token_id and not enc["truncated"]
    assert tok.decode(enc["input_ids"][n:-1]) == "EMERGENT: HR 140"
    prompt = tok.decode(enc["input_ids"][:n])
    assert ("<|im_start|>assistant" in prompt) == templated and "HR 140" in prompt


def test_truncation_cuts_the_answer_and_is_counted() -> None:
    tok = tiny_tokenizer()
    short, long = Example("Say.", "", "ok"), Example("Say.", "", "EMERGENT " * 50)
    n = encode_example(tok, short, 512)["prompt_length"]
    features, n_truncated = encode_dataset(tok, [short, long], max_length=n + 5)
    assert n_truncated == 1 and features[1]["truncated"] and len(features[1]["input_ids"]) == n + 5
    with pytest.raises(ValueError, match="no room"):
        encode_example(tok, short, max_length=n)


def test_collator_right_pads() -> None:
    tok = tiny_tokenizer()
    feats, _ = encode_dataset(tok, [Example("A.", "", "yes"), Example("A longer instruction.", "input", "no way")], 256)
    batch = PadCollator(tok.pad_token_id, with_prompt_mask=True)(feats)
    width = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == (2, width)
    for row, f in enumerate(feats):
        n, length = f["prompt_length"], len(f["input_ids"])
        assert batch["attention_mask"][row].sum() == length
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == tok.pad_token_id).all()
        assert batch["prompt_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert "prompt_mask" not in PadCollator(tok.pad_token_id)(feats)


def test_a_routing_only_row_has_no_answer_and_no_lm_loss(tmp_path):
    """`"output": null` with routing labels: the row trains the router only; without labels it is refused, and an
    expert (which trains on answers) refuses it by name."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Plan a trip to Lisbon.", "output": null, "experts": []}\n')
    (ex,) = load_jsonl(path)
    assert ex.output is None and ex.experts == []
    f = encode_example(tiny_tokenizer(), ex, 64)
    assert all(x == IGNORE_INDEX for x in f["labels"]) and not f["truncated"] and len(f["input_ids"]) == f["prompt_length"]
    with pytest.raises(ValueError, match=r"output must be a string \(null only on a routing-only row, which needs \"experts\"\)"):
        Example("Plan a trip.", "", None)
