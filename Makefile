# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ogpsa-installed
SRCS   := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
PYTEST_ARGS ?=

.PHONY: venv build test test-slow demo demo-full demo-publish bench bench-pytest lint info clean

venv: $(STAMP)

# One line per phase, with the seconds it took. --no-compile: byte-compiling all of site-packages
# (torch, transformers, ...) cost 40 s of CPU; Python compiles what the demo imports on first use (8 s). pip hides the build's output; the extension build
# runs with -v into $(VENV)/build.log and only its "ogpsa setup:" lines and one line per compiled
# file are shown, as they happen (the log's end if it fails). CUDA kernels are compiled only when a CUDA
# device is visible or OGPSA_BUILD_CUDA=1 (setup.py; .ci/run sets it).
$(STAMP): pyproject.toml setup.py requirements-dev.txt $(SRCS)
	@set -e; t=$$(date +%s); echo "make: [1/3] virtual environment $(VENV) and pip"; \
	  test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  echo "make: [1/3] done in $$(( $$(date +%s) - t )) s"
	@set -e; t=$$(date +%s); echo "make: [2/3] pinned dependencies (requirements-dev.txt; torch is the largest)"; \
	  $(PY) -m pip install -q --no-compile -r requirements-dev.txt; \
	  echo "make: [2/3] done in $$(( $$(date +%s) - t )) s"
	@set -e; t=$$(date +%s); echo "make: [3/3] ogpsa, editable, compiling ogpsa._C (full log: $(VENV)/build.log)"; \
	  set -o pipefail; OGPSA_BUILD_PROGRESS=0 $(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee $(VENV)/build.log \
	    | sed -u -n -E 's/^ *(ogpsa setup: .*)/\1/p; s/^ *\[([0-9]+\/[0-9]+)\] .* -c [^ ]*\/(csrc\/[^ ]+) .*/ogpsa setup: [\1] compiled \2/p' \
	    || { echo "make: the build failed; the end of $(VENV)/build.log:"; tail -n 60 $(VENV)/build.log; exit 1; }; \
	  echo "make: [3/3] done in $$(( $$(date +%s) - t )) s"
	@touch $(STAMP)

build: $(STAMP)

# OMP_WAIT_POLICY=PASSIVE: the 2-rank distributed tests and the demo test run several
# processes on 2 cores; spinning OpenMP threads starve each other there
test: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# demo: the default run (SFT, 6 arms, 3 seeds). In a fresh clone (`git clone`, then `time make demo`)
# it took 5 min 29 s on 2 shared cores at 1-minute load average 2.4-4.2 (2026-12-08, a6b2e0a; pip's
# wheel cache warm): venv 5 s, dependencies 34 s, compiling ogpsa._C 168 s, demo 122 s.
# into the untracked demo_out/default, table printed.
# demo-full: the full study (SFT, DPO, SFT->DPO x 16 arms x 3 seeds; measured 32 min with 13 arms) into demo_out/full/.
# demo-publish: copy every finished run under demo_out/ into docs/demo/<run>/ for the README.
demo: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/ogpsa demo --output demo_out/default

demo-full: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/ogpsa demo --full --output demo_out/full

demo-publish:
	@for dir in demo_out/*/; do run=$$(basename $$dir); \
	  if [ -f $$dir/results.json ]; then mkdir -p docs/demo/$$run && \
	    cp $$dir/results.json $$dir/table.md $$dir/*.png docs/demo/$$run/ && \
	    echo "published $$dir -> docs/demo/$$run"; fi; done

# OMP_WAIT_POLICY=PASSIVE: on a shared, oversubscribed CPU, spinning OpenMP threads made the
# op-heavy contenders ~20x slower (reference on 5 tiny tensors: 21 ms active, 1 ms passive)
bench: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/ogpsa bench

# pytest-benchmark over the same contenders (OGPSA_BENCH_WORKLOADS, OGPSA_BENCH_K, ... in benchmarks/)
bench-pytest: $(STAMP)
	$(PY) -m pytest -q benchmarks $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

info: $(STAMP)
	$(VENV)/bin/ogpsa info

clean:
	rm -rf build *.egg-info ogpsa/*.so
