# Only python3 is assumed; every target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHARED_FMNIST := ../shared/data/fashion-mnist
KERAS_CACHE := $(or $(KERAS_HOME),$(HOME)/.keras)/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-quick bench bench-seeds bench-search bench-label bench-serve lint seed-data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Keras reads ~/.keras/datasets/fashion-mnist/*.gz before trying the network.
seed-data:
	@if [ -d $(SHARED_FMNIST) ]; then \
		mkdir -p $(KERAS_CACHE) && \
		for f in $(SHARED_FMNIST)/*.gz; do \
			[ -f $(KERAS_CACHE)/$$(basename $$f) ] || cp $$f $(KERAS_CACHE)/; \
		done; \
	else echo "note: $(SHARED_FMNIST) not found; Keras will download Fashion-MNIST"; fi

demo: $(STAMP) seed-data
	$(BIN)/python jobs/demo.py --out $(DEMO_DIR)

test: $(STAMP) seed-data
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-quick: $(STAMP) seed-data
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: bench-seeds bench-search bench-label bench-serve

bench-seeds: $(STAMP) seed-data
	$(BIN)/python benchmarks/seeds.py

bench-search: $(STAMP) seed-data
	$(BIN)/python benchmarks/search.py

bench-label: $(STAMP) seed-data
	$(BIN)/python benchmarks/label.py

bench-serve: $(STAMP) seed-data
	$(BIN)/python benchmarks/serve.py

lint: $(STAMP)
	$(BIN)/ruff check clfsys tests benchmarks jobs

clean:
	rm -rf $(VENV) runs .pytest_cache
