"""AT-MoE interpretability dashboard. Whoever starts it chooses the models a page may load (see `app/launch.py`):

    streamlit run streamlit_app.py                                  # the shipped demo (assets/coadapted, then assets)
    streamlit run streamlit_app.py -- --manifest A/experts.json --manifest B/experts.json   # visitors pick A or B
    streamlit run streamlit_app.py -- --models-dir models           # every models/*/experts.json and models/*.json
    streamlit run streamlit_app.py -- --allow-any-manifest          # local use only: a free manifest path box
"""

from app.launch import script_argv
from app.main import main

main(script_argv(__file__))
