# Only python3 is assumed; every target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHARED_FMNIST := ../shared/data/fashion-mnist
KERAS_CACHE := $(or $(KERAS_HOME),$(HOME)/.keras)/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo demo-cluster test test-quick bench bench-seeds bench-search bench-label bench-serve bench-data bench-soak gpu-check lint lock seed-data clean

# Every install comes from the lock files (locks/*.txt, made by `make lock`), the same versions as
# on the cluster's nodes (cluster.yaml installs locks/base.txt or locks/gpu.txt).
$(STAMP): pyproject.toml locks/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -r locks/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# Byte-compiled on every core (pip compiles in one process). It must be done up front:
	@# installed with --no-compile and left so, the suite took 1,958 s instead of ~1,130.
	@# A file that fails to compile here fails where it is imported, as it would anyway.
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null || true
	touch $(STAMP)

# Re-resolve the stack after changing pyproject.toml's dependencies (needs the package index).
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --quiet
lock:
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(UV_COMPILE) -o locks/base.txt
	$(UV_COMPILE) --extra dev -c locks/base.txt -o locks/dev.txt
	$(UV_COMPILE) --extra gpu -c locks/base.txt -o locks/gpu.txt
	$(BIN)/uv pip compile benchmarks/daft.in --python-version 3.11 --quiet -o locks/daft.txt
	$(BIN)/uv pip compile benchmarks/bentoml.in --python-version 3.11 --quiet -o locks/bentoml.txt

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

# The demo on a local two-node cluster (the worker cannot see this machine's files) with a local
# S3 server as the shared storage; both are torn down at the end. Needs root (unshare -m).
demo-cluster: $(STAMP) seed-data
	$(BIN)/python jobs/demo.py --out $(DEMO_DIR)-cluster --cluster

test: $(STAMP) seed-data
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

test-quick: $(STAMP) seed-data
	$(BIN)/python -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

bench: bench-seeds bench-search bench-label bench-serve bench-data

bench-seeds: $(STAMP) seed-data
	$(BIN)/python benchmarks/seeds.py

bench-data: $(STAMP) seed-data
	$(BIN)/python benchmarks/data.py

bench-search: $(STAMP) seed-data
	$(BIN)/python benchmarks/search.py

# The peers that pin a stack of their own run in environments of their own, each from its lock:
# runs/bench/daft-env (bench-label; daft 0.7 needs pyarrow < 26) and runs/bench/bentoml-env
# (bench-serve; BentoML brings its own web stack).
runs/bench/%-env/.installed-stamp: locks/%.txt
	$(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet -r $<
	touch $@

bench-label: $(STAMP) seed-data runs/bench/daft-env/.installed-stamp
	$(BIN)/python benchmarks/label.py --daft-python runs/bench/daft-env/bin/python

bench-serve: $(STAMP) seed-data runs/bench/bentoml-env/.installed-stamp
	$(BIN)/python benchmarks/serve.py --bentoml-python runs/bench/bentoml-env/bin/python

# The GPU paths on a real accelerator (benchmarks/gpu_check.py): train, a search sharing the card,
# labelling and serving, with a table. Where nvidia-smi lists a GPU, TensorFlow's CUDA libraries
# (locks/gpu.txt) are installed first; elsewhere the script says there is no GPU and exits 0.
gpu-check: $(STAMP) seed-data
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then \
		$(BIN)/python -m pip install --quiet -r locks/gpu.txt; fi
	$(BIN)/python benchmarks/gpu_check.py

# Soak runs (not in `make bench`): clfsys serve at concurrency 32 for 10 minutes, then
# clfsys label over 200,000 small files, each checking for errors and flat memory.
bench-soak: $(STAMP) seed-data
	$(BIN)/python benchmarks/soak.py --part serve
	$(BIN)/python benchmarks/soak.py --part label
	$(BIN)/python benchmarks/soak.py --part listing

lint: $(STAMP)
	$(BIN)/ruff check clfsys tests benchmarks jobs deploy

clean:
	rm -rf $(VENV) runs .pytest_cache
