# Set-up is two commands: `make demo` and `make test` (each creates .venv when missing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow soak bench bench-peers sweep lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m benchmarks.demo

test: $(STAMP)
	$(BIN)/ruff check asyncdepo
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# beamline mode over 100,000 files arriving in waves: memory flat, CPU per file flat, no polling when idle
# (ASYNCDEPO_SOAK_FILES=N for another count); prints the figures per wave
soak: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slow tests/e2e/test_watch_soak.py

# The fault suite (tests/chaos: >= 20 seeded SIGKILL points per target, every fault class on every target,
# changing sources, awkward names, every recovery path) and the contract suite, run with the rest of the
# tests (all but the beamline soak) under branch coverage of engine/, transport/ and adapters/ (the CLI
# processes the tests start included); a fast subset runs in `make test`. Prints the suite's figures (kill
# points survived, faults injected, files verified, bytes lost) and the coverage per module.
test-chaos: $(STAMP)
	rm -rf .coverage-chaos && mkdir -p .coverage-chaos
	export COVERAGE_FILE=$(CURDIR)/.coverage-chaos/data; \
	  $(BIN)/python -m coverage run -m pytest -q -m "slow or not slow" -rxX tests \
	    --ignore=tests/e2e/test_watch_soak.py; \
	  status=$$?; $(BIN)/python -m coverage combine -q && $(BIN)/python -m coverage report; exit $$status

bench: $(STAMP) tools
	$(BIN)/python -m benchmarks.bench_engine
	-$(BIN)/python -m benchmarks.bench_pdis
	-$(BIN)/python -m benchmarks.bench_gypsum
	-$(BIN)/python -m benchmarks.bench_immport
	-$(BIN)/python -m benchmarks.bench_immport --tls off --rounds 3 --out benchmarks/results/immport-http.json
	-$(BIN)/python -m benchmarks.bench_bwlimit --chunk-size 1M --out benchmarks/results/bwlimit-1M.json

# asyncdepo vs rclone, s5cmd and boto3 on a fast nginx discard sink and on rclone serve s3 (needs root:
# installs nginx-extras when missing); results and plots in benchmarks/results/
bench-peers: $(STAMP) tools
	$(BIN)/python -m benchmarks.peers --runs 3 --tools asyncdepo,asyncdepo-md5,rclone,s5cmd,boto3,asyncdepo-direct

# a tuning sweep of --transfers x --chunk-size against a target: make sweep ARGS='TARGET --transfers 1,4,8'
sweep: $(STAMP)
	$(BIN)/python -m benchmarks.sweep $(ARGS)

# Debian tools the benchmarks compare against or run on (curl, zstd; nginx and openssl for the HTTPS front of
# the ImmPort benchmark); installed only when missing
tools:
	@command -v curl >/dev/null && command -v zstd >/dev/null && command -v nginx >/dev/null && \
	  command -v openssl >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq curl zstd openssl \
	    $$(command -v nginx >/dev/null || echo nginx-extras) >/dev/null)

# one push over 1, 2 and 4 workers of a local Dask cluster (each with a --bwlimit share standing in for a
# node's NIC), and the overhead of --local-cluster 1 against a plain push; results in benchmarks/results/
bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks.bench_scale

# mypy is not part of `make test`: its verdict moves with the versions of the dependencies CI installs
lint: $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/ruff check asyncdepo
	$(BIN)/mypy asyncdepo

clean:
	rm -rf $(VENV) build *.egg-info .coverage-chaos

