"""Built on the request path's public API: the controllability curve, for one prompt or a data set (`sweep.py`); one
routing frozen into a plain PEFT adapter (`export.py`); how much of an answer each expert wrote (`attribution.py`); a
data set's routing exported as arrays with balance statistics (`routes.py`), and placed in 2-D (`atlas.py`).
See docs/analysis.md."""
