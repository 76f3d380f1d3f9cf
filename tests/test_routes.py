"""The routing export (atmoe.analysis.routes): arrays equal the engine's routing row by row, the index and balance
statistics describe them, a rerun resumes, an interrupted run leaves no half-written file, and the loader in
docs/analysis.md reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_demo

from atmoe import ATMoE, GroupLayout
from atmoe.analysis.routes import balance, export_routes, load_routes
from atmoe.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "analysis.md"
ROWS = [{"instruction": "List the vital signs.", "input": "Vitals: HR 135, SpO2 88.", "experts": ["vitals"]},
        {"instruction": "Summarize this case in one line, in plain language.", "id": "case-2"},
        {"instruction": "List the lab results as bullet points.", "input": "Labs: Na 128, K 4.1.",
         "experts": ["labs", "bullets"]},
        {"instruction": "Triage this patient."},
        {"instruction": "Flag each value as low, normal or high.", "input": "Labs: K 5.6."}]


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> tuple[Path, ATMoE]:
    path = tiny_demo(tmp_path_factory.mktemp("routes"))
    return path, ATMoE.load(path, device="cpu")


@pytest.fixture()
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def test_export_holds_each_rows_routing(demo, rows: Path, tmp_path: Path) -> None:
    _, m = demo
    stats = export_routes(m, rows, tmp_path / "out", batch_size=2)
    alpha, beta, index, meta = load_routes(tmp_path / "out")
    assert alpha.dtype == np.float16 and alpha.shape == (5, m.num_layers, len(m.groups))
    assert beta.shape == (5, m.num_layers, len(m.experts))
    for i, r in enumerate(ROWS):
        t = m.route(r["instruction"], input=r.get("input", ""))
        assert np.allclose(alpha[i], t.group_weights, atol=2e-3) and np.allclose(beta[i], t.expert_weights, atol=2e-3)
    assert [x["row"] for x in index] == list(range(5)) and index[1]["id"] == "case-2" and index[2]["id"] == 2
    assert index[2]["experts"] == ["labs", "bullets"] and "experts" not in index[1]
    assert index[0]["alpha_shape"] == [m.num_layers, len(m.groups)] and index[0]["model"] == meta["model_hash"]
    assert meta["experts"] == m.experts and meta["rows"] == 5
    assert stats == json.loads((tmp_path / "out" / "balance.json").read_text())
    assert np.allclose(stats["mean_weight"], balance(alpha, beta, m.layout)["mean_weight"], atol=1e-6)
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_balance_statistics_on_a_known_input() -> None:
    layout = GroupLayout(["g", "h"], ["a", "b", "c"], ["g", "g", "h"])
    alpha = np.array([[[0.5, 0.5]], [[1.0, 0.0]]])              # 2 rows, 1 layer
    beta = np.array([[[1.0, 0.0, 1.0]], [[0.25, 0.75, 1.0]]])
    s = balance(alpha, beta, layout)
    # w: row 0 = (0.5, 0, 0.5), row 1 = (0.25, 0.75, 0)
    assert np.allclose(s["mean_weight"], [[0.375, 0.375, 0.25]])
    assert np.allclose(s["mean_alpha"], [[0.75, 0.25]])
    assert np.allclose(s["dominant_share"], [[0.5, 0.5, 0.0]])    # row 0: a and c tie → the first, a
    assert s["max_mean_ratio"] == pytest.approx([0.375 / (1 / 3)])
    h0, h1 = np.log(2), -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert s["entropy_weight"] == pytest.approx([(h0 + h1) / 2], abs=1e-6)
    assert s["entropy_alpha"] == pytest.approx([np.log(2) / 2], abs=1e-6)
    assert s["unused"] == [] and balance(alpha, beta * [1, 1, 0], layout)["unused"] == ["c"]


def test_rerun_skips_finished_chunks_and_a_crash_leaves_no_final_file(demo, rows: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, m = demo
    out = tmp_path / "out"
    calls, kill_at = [], [2]
    route_batch = ATMoE.route_batch

    def crashing(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) in kill_at:
            raise Killed   # a kill between chunks
        return route_batch(self, prompts, *args, **kwargs)

    monkeypatch.setattr(ATMoE, "route_batch", crashing)
    with pytest.raises(Killed):
        export_routes(m, rows, out, batch_size=2)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.json", "000000.npz", "run.json"]
    assert not (out / "alpha.npy").exists() and not (out / "index.jsonl").exists()
    calls.clear()
    kill_at.clear()
    export_routes(m, rows, out, batch_size=2)
    assert calls == [2, 1]                    # the finished first chunk was not routed again
    clean = tmp_path / "clean"
    monkeypatch.setattr(ATMoE, "route_batch", route_batch)
    export_routes(m, rows, clean, batch_size=2)
    for name in ("alpha.npy", "beta.npy", "index.jsonl", "balance.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    with pytest.raises(ValueError, match="another run.*batch_size differs"):
        export_routes(m, rows, out, batch_size=3)
    export_routes(m, rows, out, batch_size=3, restart=True)
    assert len(load_routes(out)[2]) == 5


def test_token_granularity_keeps_every_token(demo, rows: Path, tmp_path: Path) -> None:
    _, m = demo
    export_routes(m, rows, tmp_path / "tok", batch_size=2, granularity="token")
    _, _, index, meta = load_routes(tmp_path / "tok")
    ta = np.load(tmp_path / "tok" / "token_alpha.npy")
    assert ta.shape[0] == sum(x["token_count"] for x in index) == meta["files"]["token_alpha"][0]
    r, x = ROWS[2], index[2]
    t = m.route(r["instruction"], input=r["input"], granularity="token")
    assert x["tokens"] == t.tokens and x["token_count"] == x["prompt_tokens"]
    assert np.allclose(ta[x["token_start"]:x["token_start"] + x["token_count"]], t.token_group_weights, atol=2e-3)


def test_the_documented_loader_reads_an_export(demo, rows: Path, tmp_path: Path, monkeypatch) -> None:
    _, m = demo
    export_routes(m, rows, tmp_path / "routes")
    section = DOCS.read_text(encoding="utf-8").split("### Loading an export", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(DOCS), "exec"), scope)
    table, weights = scope["table"], scope["weights"]
    assert list(table.columns) == ["id", "instruction", *m.experts] and len(table) == len(ROWS)
    assert np.allclose(weights[3], m.route(ROWS[3]["instruction"]).effective_weights, atol=3e-3)


def test_cli_exports_a_dataset_and_refuses_half_arguments(demo, rows: Path, tmp_path: Path, capsys) -> None:
    path, _ = demo
    assert main(["route", "--dataset", str(rows), "--out", str(tmp_path / "c"), "--manifest", str(path),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    assert "5 rows" in capsys.readouterr().out and (tmp_path / "c" / "meta.json").is_file()
    assert main(["route", "--out", str(tmp_path / "d"), "--manifest", str(path)]) == 2
    assert main(["route", "--manifest", str(path)]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_cli_atlas_reads_an_export(demo, rows: Path, tmp_path: Path, capsys) -> None:
    import pandas as pd

    from atmoe.analysis.atlas import atlas

    _, m = demo
    export_routes(m, rows, tmp_path / "r")
    assert main(["atlas", str(tmp_path / "r"), "--csv", str(tmp_path / "a.csv")]) == 0
    assert "nearest-centroid accuracy" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "a.csv", keep_default_na=False)
    assert list(frame.label) == ["vitals", "—", "labs+bullets", "—", "—"]
    alpha, beta, _, _ = load_routes(tmp_path / "r")
    assert np.allclose(frame[["x", "y"]], atlas(alpha, beta, m.layout)[0][["x", "y"]])
    assert main(["atlas", str(tmp_path / "nothing")]) == 2
