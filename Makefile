# Two commands for users: `make run` and `make test`. Each first sets up what it needs (once): .venv with the
# Python packages, and for `make test` Debian's chromium for the browser tests (.ci/browser).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8501
# Debian's python3 has no venv module until python3-venv is installed; as root (or with sudo without a password)
# it is installed here, otherwise the message says so.
VENV_HINT := xaicomp: $(PYTHON) -m venv failed: install Debian's python3-venv (as root: apt-get install python3-venv)

.PHONY: install browser run test screenshots lint bench results clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		rm -rf $(VENV); \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "xaicomp: installing python3-venv (apt-get)"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv; \
		elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
			echo "xaicomp: installing python3-venv (sudo apt-get)"; \
			sudo -n apt-get update -qq && sudo -n apt-get install -y -qq --no-install-recommends python3-venv; \
		fi; \
		$(PYTHON) -m venv $(VENV) || { echo "$(VENV_HINT)"; exit 1; }; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Debian's chromium for the browser tests: installed when missing and possible, else one line says what to install.
browser:
	@sh .ci/browser

# No file watcher: the app does not reload itself when files change (with one, Streamlit watches every file under
# the folder and floods the log with "Inotify queue overflowed").
run: install
	@echo "xaicomp: open http://$(HOST):$(PORT) in your browser (Ctrl+C stops)"
	$(VENV)/bin/streamlit run app.py --server.address $(HOST) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false --server.fileWatcherType none

# Writes only to temporary folders and test-artifacts/ (screenshots: test-artifacts/screenshots/).
test: browser install
	$(PY) -m pytest

# Refreshes the README's pictures in docs/screenshots/ (the browser walk through every page, about 3 minutes).
screenshots: browser install
	XAICOMP_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q -p no:cacheprovider tests/test_browser.py \
		-k test_every_page_and_slider

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(VENV)/bin/xaicomp bench --json

# Regenerates results/summary.json, docs/results/*.png and RESULTS.md (about 60 minutes on 2 cores).
# RAY=HEAD:6379 evaluates the plans on that Ray cluster, RAY=local on a local Ray instance (README: Scaling out).
results: install
	$(PY) -m xaicomp_core.results $(if $(RAY),--ray $(filter-out local,$(RAY)))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
