# Citrus-V: `make demo` and `make test` do all set-up themselves (a .venv in the project folder).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install browser test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian's chromium for the web app's browser test; without it (no apt, not root) that test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium chromium-driver) >/dev/null || \
		echo "chromium could not be installed: the browser test will be skipped"

install: $(STAMP) browser

lint: install
	$(BIN)/ruff check citrus_v tests
	$(BIN)/lint-imports --no-logo

test: install lint
	$(BIN)/python -m pytest -q --durations=15

# demo_out is the demo's own output: a second run replaces it
demo: install
	$(BIN)/citrus-v demo --overwrite

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache .import_linter_cache
