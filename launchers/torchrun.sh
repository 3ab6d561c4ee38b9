#!/usr/bin/env bash
# Thin torchrun wrapper: prints the command, then runs `python -m seqpar.train RECIPE [args]`.
#   single node:  NPROC=2 launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml [--set a.b=v] [--resume]
#   multi node, static (run on every node):
#                 NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 [MASTER_PORT=29500] NPROC=8 launchers/torchrun.sh RECIPE
#   multi node, c10d rendezvous (what launchers/slurm.sbatch uses; no node ranks):
#                 NNODES=2 RDZV_ENDPOINT=host0:29500 RDZV_ID=job42 [RDZV_IS_HOST=1 on host0] launchers/torchrun.sh RECIPE
# Multi node: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME default to the interface that routes to the
# rendezvous host (`ip route get`), printed; SOCKET_IFNAME=eth1 (or either variable) overrides; the
# node advertises its address on that interface (torchrun --local-addr; LOCAL_ADDR overrides).
# SIGTERM / SIGINT / SIGUSR1 to torchrun reach the workers, which checkpoint at the next step and exit 75.
# The recipe is validated first (`--check`, for NNODES x NPROC ranks; CHECK=0 skips it).
# See launchers/README.md for every variable. PYTHON defaults to .venv/bin/python when present.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NPROC=n] [NNODES=n NODE_RANK=r MASTER_ADDR=host | NNODES=n RDZV_ENDPOINT=host:port RDZV_ID=id] $0 RECIPE.yaml [seqpar-train args]" >&2
  exit 2
fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
# seconds torchrun gives its workers to checkpoint after a forwarded signal before it SIGKILLs them
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}

# The interface whose address routes to $1 (an IP or a resolvable name): gloo and NCCL must bind it,
# not whatever the hostname resolves to (often 127.0.1.1 or another network).
route_iface() {
  local ip
  ip=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
  [ -n "$ip" ] || { echo "launchers/torchrun.sh: cannot resolve rendezvous host '$1'" >&2; return 1; }
  if ip -o route get "$ip" 2>/dev/null | grep -q '^local '; then
    # the rendezvous host is this host: the interface that carries the address (lo only for 127.x)
    ip -o -4 addr show to "$ip" | awk 'NR == 1 {print $2}'
  else
    ip -o route get "$ip" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1
  fi
}

if [ -n "${RDZV_ENDPOINT:-}" ]; then
  : "${RDZV_ID:?c10d rendezvous needs RDZV_ID (the same on every node, e.g. the Slurm job id)}"
  RDZV_HOST=${RDZV_ENDPOINT%:*}
  RDZV=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
  # the rendezvous host cannot always tell that the endpoint is itself (addresses of secondary NICs)
  [ -n "${RDZV_IS_HOST:-}" ] && RDZV+=(--rdzv-conf "is_host=$RDZV_IS_HOST")
elif [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?multi-node needs MASTER_ADDR (host of node 0) or RDZV_ENDPOINT}"
  : "${NODE_RANK:?multi-node needs NODE_RANK (0 on MASTER_ADDR)}"
  RDZV_HOST=$MASTER_ADDR
  RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  RDZV_HOST=
  RDZV=(--standalone --nnodes 1)
fi

if [ -n "$RDZV_HOST" ]; then
  IFACE=${SOCKET_IFNAME:-}
  if [ -z "$IFACE" ] && [ -z "${GLOO_SOCKET_IFNAME:-}${NCCL_SOCKET_IFNAME:-}" ]; then
    IFACE=$(route_iface "$RDZV_HOST") || exit 2
    [ -n "$IFACE" ] || { echo "launchers/torchrun.sh: no route to rendezvous host '$RDZV_HOST'; set SOCKET_IFNAME" >&2; exit 2; }
    SRC="routes to $RDZV_HOST"
  else
    SRC="set by the caller"
  fi
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$IFACE}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$IFACE}
  echo "+ GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME ($SRC; override with SOCKET_IFNAME=...)"
  # this node's address on that interface: what the other nodes' workers connect to (torchrun would
  # advertise the FQDN, which often resolves to 127.0.0.1 / another network)
  LOCAL_ADDR=${LOCAL_ADDR:-$(ip -o -4 addr show dev "${GLOO_SOCKET_IFNAME%%,*}" 2>/dev/null | awk 'NR == 1 {sub(/\/.*/, "", $4); print $4}')}
  [ -n "$LOCAL_ADDR" ] && RDZV+=(--local-addr "$LOCAL_ADDR")
fi

# a bad recipe stops here with one line per field (exit 2), before any node starts torchrun
if [ "${CHECK:-1}" = 1 ]; then
  "$PYTHON" -m seqpar.train "$@" --check --world "$((NNODES * NPROC))" >/dev/null || exit $?
fi
# seqpar.train.torchrun is torchrun (torch.distributed.run, same arguments, in this process) that ends a
# failed run with one line and the workers' exit code; its own traceback goes to <out_dir>/logs/torchrun_*.log
CMD=("$PYTHON" -m seqpar.train.torchrun "${RDZV[@]}" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS"
     --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_TIMEOUT"
     ${TORCHRUN_ARGS:-} -m seqpar.train "$@")
echo "+ ${CMD[*]}"
exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "${CMD[@]}"
