#!/usr/bin/env bash
# Submit launchers/slurm.sbatch: fills --nodes / --gpus-per-node (and any other sbatch option before the
# recipe), prints the sbatch command, then submits it.
#   launchers/slurm.sh --nodes 4 --gpus-per-node 8 [--time 04:00:00 --partition gpu ...] RECIPE.yaml [seqpar-train args]
#   launchers/slurm.sh --dry-run --nodes 2 RECIPE.yaml      # print the sbatch command and the plan, submit nothing
# Environment for the job (NPROC, RDZV_PORT, SOCKET_IFNAME, MAX_RESTARTS, REQUEUE, NCCL_*) is exported
# to it by sbatch; see launchers/slurm.sbatch. Before anything is submitted (and in --dry-run) the recipe is
# checked for the world the job will launch, nodes x processes per node (`--check --world N`: layout and the
# files it names; a bad one stops here with one line per problem, exit 2; CHECK=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
NODES=1 GPUS= DRY=0 OPTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    --gpus-per-node) GPUS=$2; shift 2 ;;
    --gpus-per-node=*) GPUS=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --*=*) OPTS+=("$1"); shift ;;
    --*) OPTS+=("$1" "$2"); shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--nodes N] [--gpus-per-node G] [sbatch options] RECIPE.yaml [seqpar-train args]" >&2; exit 2; }
CMD=(sbatch --nodes="$NODES" ${GPUS:+--gpus-per-node="$GPUS"} "${OPTS[@]}" launchers/slurm.sbatch "$@")
echo "+ ${CMD[*]}"
PER_NODE=${NPROC:-${GPUS##*:}}  # --gpus-per-node takes [type:]count
PER_NODE=${PER_NODE:-1}
if [ "$DRY" = 1 ]; then  # the batch script's dry run prints the plan and checks the recipe for that world
  NPROC=$PER_NODE SLURM_JOB_NUM_NODES=$NODES PYTHON=$PYTHON exec bash launchers/slurm.sbatch --dry-run "$@"
fi
if [ "${CHECK:-1}" = 1 ]; then
  if [[ "$NODES" =~ ^[0-9]+$ && "$PER_NODE" =~ ^[0-9]+$ ]]; then
    "$PYTHON" -m seqpar.train "$@" --check --world "$((NODES * PER_NODE))" >/dev/null || exit $?
  else  # a node range (--nodes 2-4): the world is known once the job starts; torchrun.sh checks it there
    echo "slurm.sh: --nodes $NODES x $PER_NODE process(es) per node is not one world size; the recipe is checked in the job" >&2
  fi
fi
exec "${CMD[@]}"
