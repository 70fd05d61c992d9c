# All set-up lives here: `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Corpora come from NLM_DATA_MIRROR when it is set (made absolute: `ray job submit` runs
# entrypoints from a copy of the tree), else from ../shared/data when that exists, else they are
# downloaded once into ~/.cache/nlm.
ifneq ($(NLM_DATA_MIRROR),)
export NLM_DATA_MIRROR := $(abspath $(NLM_DATA_MIRROR))
else ifneq ($(wildcard ../shared/data),)
export NLM_DATA_MIRROR := $(abspath ../shared/data)
endif

.PHONY: demo test lint format bench clean browser

$(BIN)/nlm: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# torch first: DeepSpeed ships only an sdist whose setup.py imports torch.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/nlm

demo: $(BIN)/nlm
	$(BIN)/nlm demo

test: $(BIN)/nlm browser
	$(BIN)/ruff check nlm cluster serve jobs tests scripts
	$(BIN)/python scripts/lint_imports.py
	$(BIN)/python -m pytest tests

# The playground test drives a real headless chromium (tests/test_openai.py). CI runs as root on
# Debian: install it there; elsewhere say what to install (the test fails without it).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	  else \
	    echo "note: install chromium and chromium-driver (sudo apt-get install -y chromium chromium-driver) to run the playground test"; \
	  fi; \
	fi

lint: $(BIN)/nlm
	$(BIN)/ruff check nlm cluster serve jobs tests scripts
	$(BIN)/ruff format --check nlm cluster serve jobs tests

format: $(BIN)/nlm
	$(BIN)/ruff format nlm cluster serve jobs tests
	$(BIN)/ruff check --fix nlm cluster serve jobs tests

clean:
	rm -rf $(VENV) build *.egg-info
