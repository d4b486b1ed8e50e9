# xmodal: two commands for a fresh clone. `make demo` runs the main job on the built-in
# default model; `make test` runs lint and the tests. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= data/demo
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test lint format bench venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

# The demo corpus (deterministic: seed 0), then the default model's recall on its test split.
$(DEMO)/test.jsonl: | $(STAMP)
	$(BIN)/xmodal demo-corpus --out $(DEMO)

demo: $(STAMP) $(DEMO)/test.jsonl
	$(BIN)/xmodal eval --pairs $(DEMO)/test.jsonl

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/encoder_throughput.py

clean-demo:
	rm -rf $(DEMO)
