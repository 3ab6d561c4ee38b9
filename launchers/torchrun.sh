#!/usr/bin/env bash
# Thin torchrun wrapper: prints the command, then runs `python -m seqpar.train RECIPE [args]`.
#   single node:  NPROC=2 launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml [--set a.b=v] [--resume]
#   multi node:   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 [MASTER_PORT=29500] NPROC=8 launchers/torchrun.sh RECIPE
# PYTHON defaults to .venv/bin/python when present.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NPROC=n] [NNODES=n NODE_RANK=r MASTER_ADDR=host MASTER_PORT=p] $0 RECIPE.yaml [seqpar-train args]" >&2
  exit 2
fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?multi-node needs MASTER_ADDR (host of node 0)}"
  : "${NODE_RANK:?multi-node needs NODE_RANK}"
  RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  RDZV=(--standalone --nnodes 1)
fi
CMD=("$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC" -m seqpar.train "$@")
echo "+ ${CMD[*]}"
exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "${CMD[@]}"
