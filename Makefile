# xmodal: two commands for a fresh clone. `make demo` runs the main job on the built-in
# shapes model (the demo corpus's; the default model, xmodal-photo, is for real photos); `make test` runs lint and the tests. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= data/demo
BUNDLE ?= $(DEMO)/bundle
PORT   ?= 5000
# test_000000's scene: the dual encoder ranks a look-alike (orange cross, red triangle)
# first; the reranker puts the match on top.
QUERY  ?= a small orange star to the left of a large red circle on a black background
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test lint format bench venv clean-demo wheel-smoke

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

# The demo corpus (deterministic: seed 0), then the shapes model's recall on its test split.
$(DEMO)/test.jsonl: | $(STAMP)
	$(BIN)/xmodal demo-corpus --out $(DEMO)

# The demo: evaluate the shapes model on the test split, index the test images and
# captions, show searches both ways, then serve the pages and API until Ctrl+C.
demo: $(STAMP) $(DEMO)/test.jsonl
	$(BIN)/xmodal eval --pairs $(DEMO)/test.jsonl --model xmodal-shapes
	$(BIN)/xmodal index $(DEMO)/images/test --captions $(DEMO)/test.jsonl --bundle $(BUNDLE) \
	    --model xmodal-shapes
	@echo; echo "== text -> images, dual encoder only: $(QUERY)"
	@$(BIN)/xmodal search "$(QUERY)" --bundle $(BUNDLE) -k 3 --no-rerank
	@echo; echo "== text -> images, reranked by cross-attention"
	@$(BIN)/xmodal search "$(QUERY)" --bundle $(BUNDLE) -k 3
	@echo; echo "== image -> captions: $(DEMO)/images/test/test_000000.png"
	@$(BIN)/xmodal search --image $(DEMO)/images/test/test_000000.png --target captions --bundle $(BUNDLE) -k 3
	@echo; echo "== image -> similar images"
	@$(BIN)/xmodal search --image $(DEMO)/images/test/test_000000.png --bundle $(BUNDLE) -k 3
	@echo
	$(BIN)/xmodal serve --bundle $(BUNDLE) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q

# Build the wheel, install it into a fresh venv, run it from outside the checkout.
wheel-smoke:
	bash .ci/wheel-smoke $(PYTHON)

# Benchmarks (tens of minutes; each prints its figures as JSON). Needs the demo corpus.
bench: $(STAMP) $(DEMO)/test.jsonl
	$(BIN)/python bench/encoder_throughput.py
	$(BIN)/python bench/index_throughput.py
	$(BIN)/python bench/search_latency.py
	$(BIN)/python bench/filter_latency.py
	$(BIN)/xmodal index $(DEMO)/images/test --captions $(DEMO)/test.jsonl --bundle $(BUNDLE)
	$(BIN)/python bench/serve_load.py --bundle $(BUNDLE)
	$(BIN)/python bench/rerank_latency.py --bundle $(BUNDLE)
	$(BIN)/python bench/page_latency.py --bundle $(BUNDLE)

clean-demo:
	rm -rf $(DEMO)
