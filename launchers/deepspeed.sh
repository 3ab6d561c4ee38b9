#!/usr/bin/env bash
# Thin wrapper of the DeepSpeed launcher: prints the command, then runs
# `deepspeed ... --module seqpar.train RECIPE [args]` (the launcher adds --local_rank=N; seqpar.train accepts it).
#   single host:  NPROC=2 launchers/deepspeed.sh recipes/tiny_hybrid_zero2_cp2.yaml [--set a.b=v] [--resume] [--dry-run]
#   multi node:   HOSTFILE=hosts MASTER_ADDR=host0 launchers/deepspeed.sh RECIPE          (DeepSpeed starts every
#                 node over ssh/pdsh; hostfile lines "hostname slots=N")
#                 HOSTFILE=hosts MASTER_ADDR=host0 NODE_RANK=r launchers/deepspeed.sh RECIPE   (run once on each
#                 node yourself, no ssh: DeepSpeed's --no_ssh --node_rank)
# MASTER_PORT defaults to a free port (single host) or 29500 (multi node). PYTHON defaults to .venv/bin/python
# when present; the deepspeed CLI next to it is used. Without CUDA, DS_ACCELERATOR defaults to cpu (gloo).
# The recipe is checked first for the world it launches (NPROC, or the slots of HOSTFILE): `--check --world N`,
# a bad field or a missing file stops here with one line (exit 2); CHECK=0 skips it.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NPROC=n] [HOSTFILE=f MASTER_ADDR=host [NODE_RANK=r] [MASTER_PORT=p]] $0 RECIPE.yaml [seqpar-train args]" >&2
  exit 2
fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
BIN_DIR=$(dirname "$(command -v "$PYTHON")")
DEEPSPEED=${DEEPSPEED:-$( [ -x "$BIN_DIR/deepspeed" ] && echo "$BIN_DIR/deepspeed" || echo deepspeed )}
NPROC=${NPROC:-2}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
if [ -n "${HOSTFILE:-}" ]; then
  : "${MASTER_ADDR:?multi-node needs MASTER_ADDR (address of the first host in HOSTFILE)}"
  HOSTS=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
  if [ -n "${NODE_RANK:-}" ]; then
    HOSTS+=(--no_ssh --node_rank "$NODE_RANK")
  fi
else
  PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  HOSTS=(--num_nodes 1 --num_gpus "$NPROC" --no_ssh_check --master_addr 127.0.0.1 --master_port "$PORT")
fi
# a bad recipe stops here with one line per problem (exit 2), before the deepspeed launcher starts anything
if [ "${CHECK:-1}" = 1 ]; then
  if [ -n "${HOSTFILE:-}" ]; then
    WORLD=$(awk '!/^[[:space:]]*(#|$)/ {n += (match($0, /slots=[0-9]+/) ? substr($0, RSTART + 6, RLENGTH - 6) : 1)} END {print n + 0}' "$HOSTFILE" 2>/dev/null || echo 0)
  else
    WORLD=$NPROC
  fi
  if [ "$WORLD" -gt 0 ]; then
    "$PYTHON" -m seqpar.train "$@" --check --world "$WORLD" >/dev/null || exit $?
  fi
fi
CMD=("$DEEPSPEED" "${HOSTS[@]}" --module seqpar.train "$@")
echo "+ ${CMD[*]}"
exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "${CMD[@]}"
