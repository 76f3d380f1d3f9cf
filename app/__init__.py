"""The AT-MoE dashboard (Streamlit). Engine access goes through `app.service`; figures are pure (`app.figures`)."""
