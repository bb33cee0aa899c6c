#!/usr/bin/env bash
# Several JAX processes on this machine forming one multi-process (multi-controller) job: the same
# code path as a multi-host run, on localhost. The tests use it with CPU devices and gloo collectives.
#
#   launch/local_multiprocess.sh NUM_PROCESSES --config=configs/base.py:tiny --workdir=/tmp/run [flags...]
#
# Every process runs `python -m idenc_jax.main FLAGS --config.distributed=True` with
#   IDENC_COORDINATOR=localhost:PORT  IDENC_NUM_PROCESSES=N  IDENC_PROCESS_ID=i
# which idenc_jax.main passes to jax.distributed.initialize (process 0 hosts the coordinator).
# Environment:
#   JAX_PLATFORMS          default cpu (main.py then selects gloo CPU collectives)
#   IDENC_COORDINATOR_PORT default: a free port
#   IDENC_LOG_DIR          if set, process i writes IDENC_LOG_DIR/process_i.log; else its lines go to
#                          stdout prefixed with [i]
#   PYTHON                 default python3
# Each process sees its own devices: for one CPU device per process, leave XLA_FLAGS free of
# --xla_force_host_platform_device_count.
# Exits 0 when every process exits 0. When one fails, the others are stopped (they would wait forever
# for it in the next collective) and the exit status is that of the first failure. SIGTERM/SIGINT to
# this script is forwarded to every process: they save a checkpoint and exit, as on a preemption.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES [idenc_jax.main flags...]" >&2
  exit 2
fi
num_processes=$1
shift

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
port=${IDENC_COORDINATOR_PORT:-$("$PYTHON" -c \
  'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
if [[ -n "${IDENC_LOG_DIR:-}" ]]; then
  mkdir -p "$IDENC_LOG_DIR"
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  cmd=(env IDENC_COORDINATOR="localhost:$port" IDENC_NUM_PROCESSES="$num_processes" IDENC_PROCESS_ID="$i"
       "$PYTHON" -m idenc_jax.main "$@" --config.distributed=True)
  if [[ -n "${IDENC_LOG_DIR:-}" ]]; then
    "${cmd[@]}" >"$IDENC_LOG_DIR/process_$i.log" 2>&1 &
  else
    # Process substitution keeps $! the Python process (not the prefixing sed).
    "${cmd[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  fi
  pids+=($!)
done

forward() {
  echo "local_multiprocess: forwarding $1 to the processes" >&2
  kill -s "$1" "${pids[@]}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# Wait for every process; on the first failure stop the rest.
status=0
killer=
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local_multiprocess: process with pid $pid exited with status $rc; stopping the others" >&2
      kill -s TERM "${pids[@]}" 2>/dev/null || true
      (sleep 30; kill -s KILL "${pids[@]}" 2>/dev/null || true) >/dev/null 2>&1 &
      killer=$!
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  ((${#remaining[@]})) && sleep 0.5
done
if [[ -n "$killer" ]]; then
  kill "$killer" 2>/dev/null || true
fi
exit "$status"
