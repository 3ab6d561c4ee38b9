#!/usr/bin/env bash
# Submit launchers/slurm.sbatch: fills --nodes / --gpus-per-node (and any other sbatch option before the
# recipe), prints the sbatch command, then submits it.
#   launchers/slurm.sh --nodes 4 --gpus-per-node 8 [--time 04:00:00 --partition gpu ...] RECIPE.yaml [seqpar-train args]
#   launchers/slurm.sh --dry-run --nodes 2 RECIPE.yaml      # print the sbatch command and the plan, submit nothing
# Environment for the job (NPROC, RDZV_PORT, SOCKET_IFNAME, MAX_RESTARTS, REQUEUE, NCCL_*) is exported
# to it by sbatch; see launchers/slurm.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
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
if [ "$DRY" = 1 ]; then
  NPROC=${NPROC:-${GPUS:-1}} SLURM_JOB_NUM_NODES=$NODES bash launchers/slurm.sbatch --dry-run "$@"
  exit 0
fi
exec "${CMD[@]}"
