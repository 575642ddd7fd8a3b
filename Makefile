# The two commands of the README: `make quickstart` (the main job, end to end) and `make test`;
# `make lint`, `make structure` and `make bench` are in CONTRIBUTING.md.
# Each installs what it needs: the venv .venv/, torch 2.13.0 first (the local CPU wheel, so pip
# never resolves another torch), then robustlab with its dev extras, then the data.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.robustlab-installed
FMNIST := /usr/share/datasets/fashion-mnist
RUN    := runs/quickstart

.PHONY: install data browser test quickstart lint structure bench bench-env clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml src/robustlab/_version.py | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(STAMP)

data:
	@if [ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST): run 'sudo apt-get install dataset-fashion-mnist'"; \
	  echo "or set ROBUSTLAB_DATA to a folder holding the four *-ubyte.gz files"; \
	fi

# Headless Chromium and its driver for the report's browser test (Debian packages); where apt
# is not at hand the test is skipped and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Chromium and ChromeDriver (Debian packages chromium, chromium-driver)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
	  echo "chromium/chromedriver not found and apt-get unavailable: the browser test will be skipped"; \
	fi

test: install data browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The house rules of CONTRIBUTING.md (import circles, forbidden arrows, sizes, inline checks).
structure: install
	$(BIN)/python -m pytest -q tests/test_structure.py

# The release test (slow, tests/test_release.py): builds the sdist and the wheel, checks them
# with twine, installs the wheel into a fresh venv holding torch alone and runs the CLI from it.
.PHONY: test-release
test-release: install data
	$(BIN)/python -m pytest -m slow -p no:warnings -vv --durations=0 tests/test_release.py

quickstart: install data
	@if [ -f $(RUN)/train_state.safetensors ]; then resume=--resume; else resume=; fi; \
	$(BIN)/robustlab train --config configs/quickstart.toml --out $(RUN) $$resume
	$(BIN)/robustlab evaluate $(RUN)/model.safetensors --norm linf --eps 0.1 --suite fast --n 1000
	$(BIN)/robustlab report $(RUN) -o $(RUN)/report.html

# Peers for benchmarks/ only (never runtime dependencies), in their own venv.
bench-env:
	$(MAKE) -C benchmarks env

bench:
	$(MAKE) -C benchmarks bench

# The documentation site (mkdocs.yml, docs/) into site/, strictly: any warning fails it.
.PHONY: docs
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs build site *.egg-info
