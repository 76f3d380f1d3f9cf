"""What a new user met trying the dashboard (issue 23 §6), each pinned by an AppTest on the tiny demo: an old answer
is marked once the routing on show moved on, Compare keeps line breaks, Export shows the page's full link, the per-token
view's labels are readable and its caption names only what is drawn, the Experts tab's cards are not cut off."""

from __future__ import annotations

import json
from dataclasses import replace

from app_session import NOTE, PROMPT, at, generate, manifest, ok  # noqa: F401 (at, manifest: fixtures)
from streamlit.testing.v1 import AppTest

from app.text import word_diff


_generate = generate


def _earlier(at: AppTest) -> list[str]:
    return [i.value for i in at.info if "Earlier answer" in i.value]


def test_an_answer_is_marked_once_route_only_or_apply_moved_the_routing_on(at: AppTest) -> None:
    _generate(at)
    assert not _earlier(at)
    at.text_area(key="prompt").input("Summarize this case in one line.")
    at.button(key="FormSubmitter:prompt_form-Route only").click().run()
    ok(at)
    marked = _earlier(at)
    assert len(marked) == 1 and "List the vital signs" in marked[0] and "router only" in marked[0].lower()
    _generate(at, "Summarize this case in one line.")
    assert not _earlier(at)
    at.slider(key="ov_g:style").set_value(0.0)
    at.button(key="FormSubmitter:overrides_form-Apply").click().run()
    ok(at)
    assert len(_earlier(at)) == 1


def test_compare_keeps_the_answers_line_breaks(at: AppTest) -> None:
    _generate(at)
    ans = at.session_state["answer"]
    plain = replace(ans, text="HR 135: high\nSpO2 88: low")
    changed = replace(ans, text="HR 135: high\nSpO2 88: normal\nRR 18: normal")
    at.session_state["compare"] = {"plain": plain, "changed": changed, "prompt": PROMPT}
    at.run()
    ok(at)
    old_md, new_md, _ = word_diff(plain.text, changed.text)
    shown = [m.value for m in at.markdown]
    assert old_md in shown and new_md in shown
    assert old_md.count("  \n") == 1 and new_md.count("  \n") == 2     # one hard break per line break
    assert ":orange-background[~~low~~]" in old_md and ":blue-background[**RR 18\\: normal**]" in new_md


def test_export_shows_the_pages_full_link(at: AppTest) -> None:
    _generate(at)
    at.slider(key="ov_g:style").set_value(0.0)
    at.button(key="FormSubmitter:overrides_form-Apply").click().run()
    ok(at)
    links = [c.value for c in at.code if "preset=" in c.value]
    assert len(links) == 1
    link = links[0]
    assert "q=" in link and "note=" in link and "preset=" in link
    assert link.split("?", 1)[1].count("=") == 3          # exactly the page's three parameters


def test_per_token_labels_are_readable_and_the_caption_names_what_is_drawn(at: AppTest) -> None:
    _generate(at, granularity="token")
    fig = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "token_heatmap" in c.proto.id)
    assert fig["layout"]["xaxis"]["tickfont"]["size"] >= 14
    assert at.checkbox(key="tok_answer_only").value is True
    caption = [c.value for c in at.caption if "Hover the heatmap" in c.value]
    assert caption and "dashed" not in caption[0] and not fig["layout"].get("shapes")
    at.checkbox(key="tok_answer_only").uncheck().run()
    fig = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "token_heatmap" in c.proto.id)
    assert fig["layout"]["shapes"][0]["line"]["dash"] == "dash"
    assert any("dashed line" in c.value for c in at.caption)


def test_experts_tab_shows_long_values_whole(at: AppTest) -> None:
    texts = [m.value for m in at.markdown]
    assert any("**Router**" in t and "trained" in t for t in texts)
    assert any("**Base model**" in t for t in texts)
    assert all(len(str(m.value)) <= 12 for m in at.metric)       # only short numbers are left on metric cards
