"""AT-MoE interpretability dashboard.

    streamlit run streamlit_app.py                          # the shipped demo, assets/experts.json
    streamlit run streamlit_app.py -- --manifest path/to/experts.json
"""

from app.main import main

main()
