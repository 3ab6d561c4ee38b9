# seqpar: make install | make demo | make test | make bench | make demo-kernels | make demo-deepspeed
# The venv lives in .venv/ at the repo root. torch==2.13.0 is installed first so that the CPU wheel
# satisfies every later requirement (an unpinned torch would pull a multi-GB CUDA build).
PY      ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.seqpar-installed
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo demo-deepspeed demo-kernels bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# Triton kernels are tested on CPU through the Triton interpreter.
test: install
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS) tests

# Trains the tiny hybrid (A softmax, S S2, L lightning, H MoH layers) with CP=2 on 2 CPU ranks.
demo: install
	NPROC=2 PYTHON=$(BIN)/python launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml

# The same tiny hybrid on the DeepSpeed engine (ZeRO-2, CP=2) through the deepspeed launcher, 2 CPU ranks.
demo-deepspeed: install
	NPROC=2 PYTHON=$(BIN)/python launchers/deepspeed.sh recipes/tiny_hybrid_zero2_cp2.yaml

# S2 layout picture and kernels vs the fp64 reference (Triton interpreter on CPU).
demo-kernels: install
	TRITON_INTERPRET=1 $(BIN)/python -m seqpar.demo

bench: install
	@for b in benchmarks/[a-z]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
