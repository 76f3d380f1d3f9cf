"""The routing atlas (atmoe.analysis.atlas): PCA is right on inputs whose answer is known, features are the
routing's, and the separation score tells clusters from noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from atmoe import GroupLayout
from atmoe.analysis.atlas import atlas, features, pca, separation

LAYOUT = GroupLayout(["g", "h"], ["a", "b", "c"], ["g", "g", "h"])


def test_pca_finds_the_known_axes_and_variances() -> None:
    rng = np.random.default_rng(0)
    u = np.array([3.0, 0.0, 4.0, 0.0]) / 5            # the long axis
    v = np.array([0.0, 1.0, 0.0, 1.0]) / np.sqrt(2)   # the short one, orthogonal to u
    t, s = rng.normal(0, 5, 200), rng.normal(0, 1, 200)
    t, s = t - t.mean(), s - s.mean()
    s -= (s @ t) / (t @ t) * t                        # exactly uncorrelated: the axes are exactly u and v
    x = 7.0 + t[:, None] * u + s[:, None] * v
    fit = pca(x)
    assert np.allclose(fit.components[0], u, atol=1e-9) and np.allclose(fit.components[1], v, atol=1e-9)
    cov = np.cov(x.T, bias=True)
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1]
    assert np.allclose(fit.explained, eig[:2] / eig.sum())
    assert np.allclose(fit.coords, np.stack([t, s], 1))      # each point's offset along u and v
    assert np.allclose(fit.transform(x), fit.coords)
    assert np.allclose(fit.coords.mean(0), 0) and np.allclose(fit.components @ fit.components.T, np.eye(2))
    flipped = pca(-x + 14.0)                   # the sign convention: the same picture up to the data's own flip
    assert np.allclose(flipped.components, fit.components)


def test_pca_of_a_single_direction_and_of_one_point() -> None:
    x = np.outer(np.arange(5.0), [1.0, 2.0, 2.0])
    fit = pca(x)
    assert fit.explained == pytest.approx([1.0, 0.0], abs=1e-12)
    assert np.allclose(np.abs(fit.coords[:, 0]), np.abs(np.arange(5.0) - 2) * 3)
    assert np.allclose(pca(np.ones((1, 3))).coords, 0)


def test_features_are_the_routing() -> None:
    alpha = np.array([[[0.5, 0.5], [1.0, 0.0]]])            # 1 row, 2 layers
    beta = np.array([[[1.0, 0.0, 1.0], [0.5, 0.5, 1.0]]])
    assert np.allclose(features(alpha, beta, LAYOUT), [[0.75, 0.25, 0.75, 0.25, 1.0]])
    assert np.allclose(features(alpha, beta, LAYOUT, "full"), [[0.5, 0.0, 0.5, 0.5, 0.5, 0.0]])
    with pytest.raises(ValueError, match="kind"):
        features(alpha, beta, LAYOUT, "tsne")


def test_separation_tells_clusters_from_noise() -> None:
    rng = np.random.default_rng(1)
    labels = ["x"] * 20 + ["y"] * 20
    apart = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(3, 0.1, (20, 2))])
    assert separation(apart, labels)["accuracy"] == 1.0
    mixed = separation(rng.normal(0, 1, (40, 2)), labels)
    assert mixed["accuracy"] < 0.8 and mixed["chance"] == 0.5


def test_atlas_places_routings_that_differ_apart() -> None:
    rng = np.random.default_rng(2)
    n = 10
    alpha = np.concatenate([np.tile([0.9, 0.1], (n, 3, 1)), np.tile([0.2, 0.8], (n, 3, 1))])
    alpha = alpha + rng.normal(0, .01, alpha.shape)
    beta = np.tile([0.5, 0.5, 1.0], (2 * n, 3, 1))
    frame, fit = atlas(alpha, beta, LAYOUT, labels=["g-heavy"] * n + ["h-heavy"] * n)
    assert list(frame.columns) == ["x", "y", "label"] and fit.explained[0] > 0.9
    assert separation(frame[["x", "y"]].to_numpy(), frame["label"])["accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------- the dashboard tab
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from app_session import at, manifest, ok, z_values  # noqa: E402,F401

from app.examples import heldout_rows  # noqa: E402
from atmoe import ATMoE  # noqa: E402
from atmoe.analysis.routes import balance  # noqa: E402


def _chart(at, key_part: str) -> dict:  # noqa: ANN001
    for chart in at.get("plotly_chart"):
        if key_part in chart.proto.id:
            return json.loads(chart.proto.spec)
    raise AssertionError(f"no plotly chart {key_part!r}")


def _points(fig: dict) -> np.ndarray:
    xs = np.concatenate([z_values({"z": t["x"]}) for t in fig["data"]])
    ys = np.concatenate([z_values({"z": t["y"]}) for t in fig["data"]])
    return np.stack([xs, ys], 1)


def test_atlas_tab_maps_the_held_out_set_and_its_balance(at, manifest: Path) -> None:  # noqa: ANN001
    at.button(key="atlas_run").click().run()
    ok(at)
    df, _ = heldout_rows()
    res = at.session_state["atlas"]
    m = ATMoE.load(manifest, device="cpu")
    first = m.route(df["instruction"][0], input=df["input"][0])
    assert np.allclose(res["alpha"][0], first.group_weights, atol=1e-5)
    frame, _ = atlas(res["alpha"], res["beta"], m.layout, labels=df["category"].tolist())
    fig = _chart(at, "atlas_scatter")
    assert {t["name"] for t in fig["data"]} == set(df["category"])          # one colour per skill label
    shown = _points(fig)
    assert len(shown) == len(df)
    assert np.allclose(np.sort(shown[:, 0]), np.sort(frame["x"].to_numpy()), atol=1e-6)
    stats = balance(res["alpha"], res["beta"], m.layout)
    assert np.allclose(z_values(_chart(at, "atlas_load")["data"][0]), stats["mean_weight"], atol=1e-6)
    assert any("nearest-centroid" in c.value for c in at.caption)
    at.radio(key="atlas_features").set_value("full").run()
    ok(at)
    assert not np.allclose(np.sort(_points(_chart(at, "atlas_scatter"))[:, 0]), np.sort(shown[:, 0]))


# ------------------------------------------------------------------------------------ the curve over a data set
def test_dataset_sweep_lines_are_plain_generations_and_the_curve_averages_them(manifest: Path, tmp_path: Path,
                                                                             capsys) -> None:
    from atmoe.analysis.sweep import curve, router_weight, sweep_overrides, sweep_rows
    from atmoe.cli import main

    m = ATMoE.load(manifest, device="cpu")
    prompts, inputs = ["List the vital signs.", "Use bullet points, plain language."], ["Vitals: HR 135.", ""]
    frame = sweep_rows(m, prompts, "expert:bullets", inputs=inputs, steps=2, layers=(1, 3),
                       scorer=lambda i, text: {"chars": float(len(text)), "row_is": float(i)}, max_new_tokens=4)
    assert len(frame) == 4 and list(frame.row) == [0, 1, 0, 1] and list(frame.weight) == [0.0, 0.0, 1.0, 1.0]
    assert list(frame.row_is) == list(frame.row)
    for line in frame.itertuples():
        ov = sweep_overrides(m, "expert:bullets", line.weight, (1, 3))
        assert m.generate(prompts[line.row], input=inputs[line.row], overrides=ov, max_new_tokens=4).text == line.text
    c = curve(frame)
    assert list(c.weight) == [0.0, 1.0] and list(c.rows) == [2, 2]
    assert c.chars.tolist() == [frame.chars[:2].mean(), frame.chars[2:].mean()]
    own = [m.route(p, input=i).expert_weights[1:4, m.experts.index("bullets")].mean() for p, i in zip(prompts, inputs)]
    assert router_weight(m, prompts, "expert:bullets", inputs=inputs, layers=(1, 3)) == pytest.approx(np.mean(own))
    with pytest.raises(ValueError, match="cap"):
        sweep_rows(m, prompts, "group:style", steps=3, max_cells=5)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": p, "input": i, "output": "x"}) + "\n"
                            for p, i in zip(prompts, inputs)))
    assert main(["sweep", "--dataset", str(data), "--target", "group:style", "--steps", "2", "--manifest",
                 str(manifest), "--device", "cpu", "--max-new-tokens", "3", "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "router's own mean weight of group:style" in out
    assert len(pd.read_csv(tmp_path / "s.csv")) == 4


def test_atlas_tab_draws_the_controllability_curve_over_the_held_out_set(at, manifest: Path) -> None:  # noqa: ANN001
    from app.views.atlas import reference_rows
    from atmoe.analysis.sweep import curve, router_weight, sweep_rows
    from demo.metrics import score

    at.selectbox(key="curve_target").set_value("group:style")
    at.number_input(key="curve_steps").set_value(2)
    at.number_input(key="curve_rows").set_value(3)
    at.button(key="curve_run").click().run()
    ok(at)
    res = at.session_state["curve"]
    m = ATMoE.load(manifest, device="cpu")
    rows = reference_rows()[:3]
    prompts, inputs = [r["instruction"] for r in rows], [r.get("input", "") for r in rows]
    tokens = int(at.session_state["max_new_tokens"])                          # the page's generation settings
    frame = sweep_rows(m, prompts, "group:style", inputs=inputs, steps=2, max_new_tokens=tokens,
                       grounded=at.session_state["grounded"], scorer=lambda i, text: score(text, rows[i]))
    assert list(res["frame"].text) == list(frame.text)
    expected = curve(frame)
    assert res["curve"].equals(expected) and list(expected.columns) == ["weight", "rows", "new_tokens", "f1", "exact"]
    fig = _chart(at, "curve_chart")
    assert [t["name"] for t in fig["data"]] == ["f1", "exact"]
    assert np.allclose(z_values({"z": fig["data"][0]["y"]}), expected.f1)
    own = router_weight(m, prompts, "group:style", inputs=inputs)
    assert fig["layout"]["shapes"][0]["x0"] == pytest.approx(own) and res["own"] == pytest.approx(own)
    at.number_input(key="curve_steps").set_value(11)
    at.number_input(key="curve_rows").set_value(64)
    at.run()
    assert at.button(key="curve_run").disabled                      # 704 generations: over the dashboard's cap
