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

test: $(BIN)/nlm $(BIN)/lmplz browser
	$(BIN)/ruff check nlm cluster serve jobs tests scripts
	$(BIN)/python scripts/lint_imports.py
	$(BIN)/python -m pytest tests

# KenLM's lmplz (Heafield et al. 2013): the Kneser-Ney n-gram bar of `nlm bench quality`
# (nlm/bench/ngram.py; the `kenlm` module that scores with it is in the dev extra). PyPI ships
# only kenlm's sdist: build the estimator from it. It needs cmake, Boost and zlib headers: CI runs
# as root on Debian, install them there; elsewhere say what to install.
KENLM := build/kenlm-0.3.0
$(BIN)/lmplz: | $(BIN)/nlm
	@if ! command -v cmake >/dev/null || [ ! -e /usr/include/boost/program_options.hpp ] \
	    || [ ! -e /usr/include/zlib.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q cmake zlib1g-dev libboost-program-options-dev \
	      libboost-system-dev libboost-thread-dev libboost-test-dev; \
	  else \
	    echo "error: KenLM needs cmake, Boost and zlib headers: sudo apt-get install -y cmake zlib1g-dev libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev"; exit 1; \
	  fi; \
	fi
	rm -rf $(KENLM) && mkdir -p build
	$(BIN)/pip download -q --no-deps --no-binary kenlm kenlm==0.3.0 -d build
	tar xzf build/kenlm-0.3.0.tar.gz -C build
	cmake -S $(KENLM) -B $(KENLM)/build -DCMAKE_BUILD_TYPE=Release >/dev/null
	$(MAKE) -C $(KENLM)/build -j2 lmplz >/dev/null
	cp $(KENLM)/build/bin/lmplz $(BIN)/lmplz

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
