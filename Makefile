# seqpar: make install | make demo | make test | make test-gpu | make bench | make demo-kernels | make demo-deepspeed
# The venv lives in .venv/ at the repo root. torch==2.13.0 is installed first so that the CPU wheel
# satisfies every later requirement (an unpinned torch would pull a multi-GB CUDA build).
PY      ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.seqpar-installed
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-gpu test-cluster demo demo-data demo-deepspeed demo-kernels bench clean

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

# README "Train on your own data": a JSON Lines corpus (the standard library's docstrings) -> sentencepiece
# tokenizer -> megatron .bin/.idx -> the tiny hybrid trained on one CPU process -> Hugging Face export.
demo-data: install
	$(BIN)/python -m seqpar.data.documents --demo-corpus runs/demo_data/corpus.jsonl
	$(BIN)/python -m seqpar.data.tokenizer --input runs/demo_data/corpus.jsonl --vocab-size 2048 --output runs/demo_data/tokenizer.model
	$(BIN)/python -m seqpar.data.preprocess --input runs/demo_data/corpus.jsonl --json-key text --tokenizer runs/demo_data/tokenizer.model --output-prefix runs/demo_data/corpus --seq-len 256 --force
	$(BIN)/python -m seqpar.train recipes/tiny_data.yaml --set train.overwrite=true
	$(BIN)/python -m seqpar.export.hf runs/tiny_data runs/tiny_data/hf --force

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
