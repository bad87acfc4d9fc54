# Two commands for users: `make run` and `make test`. Both install into .venv first (once).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8501

.PHONY: install run test lint bench results clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: install
	@echo "xaicomp: open http://$(HOST):$(PORT) in your browser (Ctrl+C stops)"
	$(VENV)/bin/streamlit run app.py --server.address $(HOST) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(VENV)/bin/xaicomp bench --json

# Regenerates results/summary.json, docs/results/*.png and RESULTS.md (about 35 minutes on 2 cores).
results: install
	$(PY) -m xaicomp_core.results

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
