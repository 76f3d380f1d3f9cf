"""The Experts tab: what is loaded — base model, device, router, and every expert with its card."""

from __future__ import annotations

import streamlit as st

from app.service import Service
from app.text import md_escape


def render(svc: Service) -> None:
    info = svc.info()
    r = info["router"]
    c = st.columns([3, 2, 1, 2])
    # Text values as wrapped Markdown: a metric card cuts long ones ("embedded S…", "sigmoid · trai…").
    for col, label, value in ((c[0], "Base model", info["base_model"]),
                              (c[1], "Device / dtype", f"{info['device']} / {info['dtype']}"),
                              (c[3], "Router", f"{r['mode']} · {'trained' if r['trained'] else 'untrained'}")):
        col.markdown(f"**{label}**  \n{md_escape(str(value))}")
    c[2].metric("Decoder layers", info["layers"])
    st.caption(f"Manifest `{info['manifest']}` · context {info['context_length']} tokens · router temperature "
               f"{r['temperature']} · pooling {r['pooling']} · default granularity {r['granularity']}")
    if not r["trained"]:
        st.warning("The router is not trained: every prompt gets uniform weights.")
    st.dataframe(svc.experts_table(), hide_index=True, width="stretch")
    for name in svc.experts:
        card = svc.expert_card(name)
        with st.expander(f"{name} — training data and metrics"):
            if card["card"]:
                st.json(card["card"], expanded=1)
            else:
                st.caption("No expert card (atmoe_expert.json) was shipped with this adapter.")
            st.caption("Adapter config")
            st.json(card["config"], expanded=False)
