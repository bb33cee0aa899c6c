#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: the same command on every worker (host) at once.
#
#   launch/tpu_vm.sh TPU_NAME ZONE --config=configs/base.py --workdir=gs://BUCKET/runs/NAME [flags...]
#
# Each worker runs `python3 -m idenc_jax.main FLAGS --config.distributed=True`; on a TPU VM,
# jax.distributed.initialize() finds the coordinator, the process count and this worker's index from
# the TPU metadata, so no addresses are passed. Every worker reads its own share of each batch and
# all of them write their shards of each checkpoint, so the workdir must be storage every worker sees
# at the same path: a gs:// bucket (or a shared mount such as Filestore).
#
# Environment:
#   PROJECT       gcloud project (default: gcloud's configured project)
#   REPO_DIR      the repository on the workers (default: ~/idenc_jax)
#   SYNC=1        first copy this checkout to REPO_DIR on every worker (gcloud ... scp)
#   SETUP=1       first `pip install -r requirements.txt` and jax[tpu] on every worker
#   PYTHON        interpreter on the workers (default: python3)
# A preempted (spot) slice sends SIGTERM: the run saves a checkpoint and exits 0; rerunning this
# script with the same workdir resumes from it.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [idenc_jax.main flags...]" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2

REPO_DIR=${REPO_DIR:-'~/idenc_jax'}
PYTHON=${PYTHON:-python3}
gcloud_args=(--zone="$zone" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project="$PROJECT")
fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command="$1"
}

if [[ "${SYNC:-0}" == 1 ]]; then
  on_all_workers "mkdir -p $REPO_DIR"
  gcloud compute tpus tpu-vm scp --recurse "$(dirname "$0")/.."/{idenc_jax,configs,launch,requirements.txt} \
    "$tpu:$REPO_DIR" "${gcloud_args[@]}"
fi
if [[ "${SETUP:-0}" == 1 ]]; then
  on_all_workers "cd $REPO_DIR && $PYTHON -m pip install -q -r requirements.txt 'jax[tpu]'"
fi

# Quote the flags for the remote shell; the remote command must be identical on every worker.
flags=$(printf '%q ' "$@")
on_all_workers "cd $REPO_DIR && PYTHONPATH=. $PYTHON -m idenc_jax.main $flags --config.distributed=True"
