# seqpar: make install | make demo | make test | make test-gpu | make bench | make demo-kernels | make demo-deepspeed
# The venv lives in .venv/ at the repo root. torch==2.13.0 is installed first so that the CPU wheel
# satisfies every later requirement (an unpinned torch would pull a multi-GB CUDA build).
PY      ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.seqpar-installed
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-gpu test-cluster demo demo-deepspeed demo-kernels bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# Triton kernels are tested on CPU through the Triton interpreter. --dist loadgroup: a file with module
# fixtures (shared training runs, two-host namespaces, Slurm daemons) stays on one worker, so they are
# built once (tests/conftest.py marks them); the other tests are balanced one by one.
test: install
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS) tests

# The GPU suite (tests/gpu): every Triton kernel fwd + bwd in bf16/fp16 at 4K-16K tokens vs the fp64
# reference, one-rank NCCL training steps of every recipe's model, no host sync in a steady-state step.
# Needs CUDA (compiled Triton, no interpreter); elsewhere every test skips with one reason line.
test-gpu: install
	OMP_NUM_THREADS=4 $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests/gpu

# The multi-node tests alone (also part of make test): two hosts as network namespaces, torchrun across
# them, node / rank failure, signals and resume, real Slurm daemons. Needs root, iproute2, slurm-wlm
# (.ci/run installs them).
test-cluster: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests/test_multinode.py tests/test_signals.py tests/test_slurm.py

# Trains the tiny hybrid (A softmax, S S2, L lightning, H MoH layers) with CP=2 on 2 CPU ranks.
demo: install
	NPROC=2 PYTHON=$(BIN)/python launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml

# The same tiny hybrid on the DeepSpeed engine (ZeRO-2, CP=2) through the deepspeed launcher, 2 CPU ranks.
demo-deepspeed: install
	NPROC=2 PYTHON=$(BIN)/python launchers/deepspeed.sh recipes/tiny_hybrid_zero2_cp2.yaml

# S2 layout picture and kernels vs the fp64 reference (Triton interpreter on CPU).
demo-kernels: install
	TRITON_INTERPRET=1 $(BIN)/python -m seqpar.demo

# The harness (python -m seqpar.bench: kernels, CP model, end-to-end step -> runs/bench/bench.{json,md} + PNG;
# GPU shapes on CUDA, small ones on CPU) and the stand-alone tables. Each runs on its own: one that fails is
# named at the end (exit 1) and the others still run. BENCH_ARGS go to the harness (e.g. --suites s2 --budget-s 120).
BENCH_ARGS ?=
BENCH_SCRIPTS := benchmarks/engine_recompute.py benchmarks/export_cache.py benchmarks/kernel_resources.py
bench: install
	@fail=""; \
	echo "== python -m seqpar.bench $(BENCH_ARGS)"; $(BIN)/python -m seqpar.bench $(BENCH_ARGS) || fail="$$fail seqpar.bench"; \
	for b in $(BENCH_SCRIPTS); do echo "== $$b"; $(BIN)/python $$b || fail="$$fail $$b"; done; \
	if [ -n "$$fail" ]; then echo "make bench: FAILED:$$fail (the others ran; their output is above)"; exit 1; fi

clean:
	rm -rf $(VENV) build *.egg-info
