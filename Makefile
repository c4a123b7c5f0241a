# smoe-compress — set-up, build, test, demo and benchmarks.
# `make demo` and `make test` work on a fresh Debian machine (they install what is missing).

SWIFT     ?= swift
PYTHON    ?= python3
BIN       := .build/release/smoe-compress
DEMO_DIR  ?= out/demo
APT_PKGS  := libhdf5-dev libopenblas-dev liblapacke-dev pkg-config
LOGS      := .build/test-logs
# Recipes run in bash with pipefail, so a test run piped through tee still fails make.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: all deps deps-python slurm-install build build-tests test test-swift test-slurm test-python test-python-run test-summary demo bench bench-scale fixtures goldens clean fuzz

all: build

## Debian packages (as root, only when missing) for HDF5 and OpenBLAS/LAPACKE.
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

## Python packages the test suite uses when present: h5py (interop tests), scipy (the assignment
## solver against SciPy), safetensors (files written by the reference implementation), pytest
## (tools/ tests). Each missing one is installed with pip, else from Debian (python3-*, for a
## system Python that refuses pip). Optional: without them the suite still runs and those tests
## skip, saying so (the summary at the end of `make test` lists every skip). torch and
## transformers are not installed here: they are large, and only the capture tests need them.
PY_DEPS := numpy:python3-numpy h5py:python3-h5py scipy:python3-scipy safetensors:python3-safetensors pytest:python3-pytest
deps-python:
	@for d in $(PY_DEPS); do m=$${d%%:*}; deb=$${d#*:}; \
		$(PYTHON) -c "import $$m" 2>/dev/null && continue; \
		$(PYTHON) -m pip install --quiet $$m >/dev/null 2>&1 || { \
			SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
			DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$deb >/dev/null 2>&1; }; \
		$(PYTHON) -c "import $$m" 2>/dev/null || echo "note: python3 cannot import $$m; the tests that need it will be skipped"; \
	done

build: deps
	$(SWIFT) build -c release --product smoe-compress

## The whole suite: the Python helper tests (their capture tests skip without torch) and the
## Swift tests (XCTest) side by side after one build, then one summary of every skipped test and
## why. The Swift tests run one class at a time from a queue (tools/swift-tests.sh): one worker
## beside the Python tests, two once they are done, so both cores stay busy. The Python output
## streams first; the Swift progress and then every class's XCTest output (in class order, also
## in .build/test-logs/swift.log) follow. make fails, naming the suite, when either suite fails;
## the summary is printed either way.
test: deps deps-python build-tests slurm-install
	@mkdir -p $(LOGS); rm -f $(LOGS)/swift.log $(LOGS)/python.done
	@tools/slurm/with-local-cluster.sh tools/swift-tests.sh $(LOGS) $(LOGS)/python.done > $(LOGS)/swift-run.log 2>&1 & swift=$$!; \
	$(MAKE) --no-print-directory test-python-run; python=$$?; touch $(LOGS)/python.done; \
	tail -n +1 -s 2 -f --pid=$$swift $(LOGS)/swift-run.log; wait $$swift; status=$$?; \
	tools/test-summary.sh $(LOGS)/python.log $(LOGS)/swift.log; \
	[ $$python = 0 ] || echo "== FAILED: the python tool tests (make test-python-run exited $$python)"; \
	[ $$status = 0 ] || echo "== FAILED: the swift tests (tools/swift-tests.sh exited $$status; $(LOGS)/swift.log)"; \
	[ $$python = 0 ] && [ $$status = 0 ]

build-tests:
	$(SWIFT) build --build-tests

## The Swift tests run with a real single-node Slurm up (installed by slurm-install, started in a
## temporary folder by tools/slurm/with-local-cluster.sh, stopped by its PIDs afterwards), so the
## Slurm test submits tools/slurm/ for real; where the daemons cannot start it skips, saying why.
SWIFT_TEST := tools/slurm/with-local-cluster.sh $(SWIFT) test --skip-build --disable-swift-testing
test-swift: build-tests slurm-install
	@mkdir -p $(LOGS)
	$(SWIFT_TEST) 2>&1 | tee $(LOGS)/swift.log

## slurm-wlm and munge (Debian), as root, only when missing.
slurm-install:
	@tools/slurm/local-cluster.sh install

## Only the cluster tests (Slurm job array, Kubernetes manifests) and the shard tests.
test-slurm: build-tests slurm-install
	tools/slurm/with-local-cluster.sh $(SWIFT) test --skip-build --disable-swift-testing --filter 'ClusterTests|ShardTests'

## The Python tests drive the debug smoe-compress, so they build it first (else two of them skip).
## They run twice: as the machine is, then with torch and transformers hidden
## (tools/testing/without_torch first on PYTHONPATH), so a suite that only passes where torch is
## installed fails here too (issue 12: pytest exits 5 when a module-level skip leaves no test).
## test-python-run runs them on what is built (make test runs it beside the Swift tests).
test-python: build-tests
	@$(MAKE) --no-print-directory test-python-run

## One BLAS / OpenMP thread for the Python tests too: they run beside a Swift test worker on two
## cores (tools/swift-tests.sh says why); the models are tiny, a second thread would only spin.
test-python-run: export OMP_NUM_THREADS ?= 1
test-python-run: export OPENBLAS_NUM_THREADS ?= 1
test-python-run:
	@mkdir -p $(LOGS); rm -f $(LOGS)/python*.log
	@if $(PYTHON) -c "import pytest" 2>/dev/null; then \
		$(PYTHON) -m pytest -q -rs tools 2>&1 | tee $(LOGS)/python.log && \
		echo "== python tool tests again, with torch and transformers hidden" && \
		PYTHONPATH=$(CURDIR)/tools/testing/without_torch $(PYTHON) -m pytest -q -rs -p no:cacheprovider tools 2>&1 \
			| tee $(LOGS)/python-without-torch.log; \
	else echo "SKIPPED [1] tools/: pytest is not importable by $(PYTHON)" | tee $(LOGS)/python.log; fi

test-summary:
	@tools/test-summary.sh $(LOGS)/python.log $(LOGS)/swift.log

## Runs the whole pipeline on bundled fixtures and prints what it wrote.
demo: build
	@mkdir -p $(DEMO_DIR)
	@echo "== inspect the bundled trained Switch-style model"
	$(BIN) inspect Fixtures/trained-switch.h5
	@echo "== routing statistics on its calibration capture"
	$(BIN) stats Fixtures/trained-switch.h5 --calib Fixtures/trained-switch.calib.h5 -o $(DEMO_DIR)/trained-switch.stats.h5 --quiet
	@echo "== align every expert to the most used one (same function)"
	$(BIN) align Fixtures/trained-switch.h5 --stats $(DEMO_DIR)/trained-switch.stats.h5 -o $(DEMO_DIR)/trained-switch.aligned.h5 --quiet
	@echo "== merge 8 -> 4 experts per layer"
	$(BIN) merge Fixtures/trained-switch.h5 --calib Fixtures/trained-switch.calib.h5 --stats $(DEMO_DIR)/trained-switch.stats.h5 --groups 4 -o $(DEMO_DIR)/trained-switch.merged.h5 --quiet
	@echo "== how far the merged model moved, on held-out tokens merging did not see"
	$(BIN) eval Fixtures/trained-switch.h5 $(DEMO_DIR)/trained-switch.merged.h5 --calib Fixtures/trained-switch.heldout.h5 --quiet
	@echo "== everything in one command on the trained Mixtral-style model (GLU, top-2): merge 8 -> 4, then rank 32"
	$(BIN) compress Fixtures/trained-mixtral.h5 --calib Fixtures/trained-mixtral.calib.h5 --eval-calib Fixtures/trained-mixtral.heldout.h5 --groups 4 --rank 32 -o $(DEMO_DIR)/trained-mixtral.compressed.h5 --quiet
	@echo "== the planted Mixtral-style model (known answers): its 8 experts are noisy permuted copies of 4 families,"
	@echo "   so merging to 4 groups must find the families and barely move the outputs"
	$(BIN) compress Fixtures/planted-mixtral.h5 --calib Fixtures/planted-mixtral.calib.h5 --groups 4 -o $(DEMO_DIR)/planted-mixtral.merged.h5 --quiet
	@echo "== wrote:"; ls -l $(DEMO_DIR)

## Benchmarks (release build); compares against SciPy when it is importable.
bench: deps
	$(SWIFT) build -c release --product smoe-bench
	.build/release/smoe-bench all

## Wall time and peak RSS per stage on one Mixtral-8x7B-shaped layer (issue 15): the release
## smoe-compress run as subprocesses by `smoe-bench scale`; stages the memory model puts above
## SCALE_MAX_RSS GiB are skipped (docs/ALGORITHM.md, "Scale"). SCALE_ARGS adds options
## (e.g. SCALE_ARGS="--d-model 1024 --d-ff 3584" for the 1/16 shape, --stages, --keep, --json).
SCALE_MAX_RSS ?= 20
SCALE_ARGS    ?=
bench-scale: deps
	$(SWIFT) build -c release --product smoe-compress
	$(SWIFT) build -c release --product smoe-bench
	.build/release/smoe-bench scale --max-rss $(SCALE_MAX_RSS) $(SCALE_ARGS)

## Regenerates the planted fixtures (the committed ones are checked by FixtureTests).
fixtures: build
	$(BIN) synth --preset switch -o Fixtures/planted-switch.h5 --calib Fixtures/planted-switch.calib.h5
	$(BIN) synth --preset mixtral -o Fixtures/planted-mixtral.h5 --calib Fixtures/planted-mixtral.calib.h5

clean:
	rm -rf .build out

## Regenerates Fixtures/regression.json (the expected results RegressionTests checks) after an
## intended change to what a stage computes; commit it with the change and say why.
goldens:
	$(SWIFT) build --build-tests
	SMOE_REGENERATE_GOLDENS=1 $(SWIFT) test --skip-build --disable-swift-testing --filter RegressionTests

## Mutation fuzz of the release binary (issue 14): FUZZ_CASES damaged HDF5 inputs and
## FUZZ_ST_CASES damaged safetensors folders / config.json, seeded by FUZZ_SEED. Prints the
## outcome counts; fails on a crash, hang, unclean error or leftover temporary file.
FUZZ_SEED     ?= 1
FUZZ_CASES    ?= 5000
FUZZ_ST_CASES ?= 3000
fuzz: build build-tests
	SMOE_FUZZ_LONG=1 SMOE_FUZZ_BINARY=$(CURDIR)/$(BIN) FUZZ_SEED=$(FUZZ_SEED) FUZZ_CASES=$(FUZZ_CASES) FUZZ_ST_CASES=$(FUZZ_ST_CASES) \
		$(SWIFT) test --skip-build --disable-swift-testing --filter ReliabilityTests/testLongFuzzRun
