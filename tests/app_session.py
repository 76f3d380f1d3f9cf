"""What the dashboard tests share: the page script, a sample request, a fresh page session, and the check that a
run showed no traceback and no error (Streamlit AppTest), and reading a chart's values."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from tiny_models import tiny_demo

SCRIPT = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
PROMPT = "List the vital signs. Flag each as low, normal or high. Use bullet points."
NOTE = "72 yo M with shortness of breath.\nVitals: HR 135, SpO2 88.\nLabs: Na 128, K 4.1."


def new_page(run: bool = True) -> AppTest:
    """A fresh browser session of `streamlit_app.py`, run once (unless `run=False`, e.g. to set query params first)
    and checked for tracebacks."""
    at = AppTest.from_file(SCRIPT, default_timeout=60)
    if run:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def ok(at: AppTest) -> None:
    """The last run raised nothing and showed no error."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def generate(at: AppTest, prompt: str = PROMPT, granularity: str = "sequence", max_new_tokens: int = 6) -> AppTest:
    """Fill the form (prompt, the note, a short budget, a granularity), press Generate, check the page is clean."""
    at.text_area(key="prompt").input(prompt)
    at.text_area(key="note").input(NOTE)
    at.number_input(key="max_new_tokens").set_value(max_new_tokens)
    at.radio(key="granularity").set_value(granularity)
    at.button(key="FormSubmitter:prompt_form-Generate").click().run()
    ok(at)
    return at


def z_values(trace_json: dict) -> np.ndarray:
    """A plotly JSON array: a plain list, or plotly's typed-array form {dtype, bdata (base64), shape}."""
    z = trace_json["z"]
    if isinstance(z, dict):
        arr = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
        return arr.reshape([int(n) for n in str(z.get("shape", len(arr))).split(",")]).astype(float)
    return np.array(z, dtype=float)


# Fixtures for a dashboard test module (import both: `from app_session import at, manifest`).
@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model on disk, once per test module."""
    return tiny_demo(tmp_path_factory.mktemp("app"))


@pytest.fixture()
def at(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """A fresh page session serving `manifest`."""
    monkeypatch.setenv("ATMOE_MANIFEST", str(manifest))
    return new_page()
