# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install postgres chromium demo test bench lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	# An editable install leaves the package uncompiled, and PYTHONDONTWRITEBYTECODE (set on
	# many CI and container images) keeps Python from caching it: every run would compile it.
	$(BIN)/python -m compileall -q pipelines > /dev/null
	touch $(STAMP)

demo: install
	$(BIN)/ona-usage demo

# The destination tests start a throwaway PostgreSQL server; install Debian's if there is none.
postgres:
	scripts/ensure-postgres

# The report test opens the HTML report in a real headless Chromium; install Debian's if missing.
chromium:
	scripts/ensure-chromium

# Two workers for the two cores: each starts its own emulators and PostgreSQL cluster.
test: install postgres chromium
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

bench: install
	$(BIN)/python benchmarks/run.py

# Re-pin the whole dependency tree after changing pyproject.toml.
lock:
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) *.duckdb .pytest_cache
