#!/usr/bin/env bash
# Run pegjax on every worker of a Cloud TPU VM slice (v4, v5e, v5p, ...), workdir on GCS.
# JAX finds the other workers itself on a TPU pod (jax.distributed.initialize() with no arguments).
#
#   TPU_NAME=peg-v4-64 ZONE=us-central2-b ACCELERATOR=v4-64 WORKDIR=gs://BUCKET/peg \
#   DATA=gs://BUCKET/train.jsonl MODEL=gs://BUCKET/bert-base-chinese \
#     bash launch/tpu_pod.sh create      # once: create the slice
#     bash launch/tpu_pod.sh setup       # once: copy this repository to every worker and install it
#     bash launch/tpu_pod.sh train [--config.KEY=VALUE ...]
#     bash launch/tpu_pod.sh delete
#
# Restarting "train" resumes from the last checkpoint in WORKDIR; preemption sends SIGTERM, which
# saves a checkpoint first.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-64}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/peg.py:paper}
action=${1:?usage: tpu_pod.sh create|setup|train|delete [--config.KEY=VALUE ...]}
shift

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "$action" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU_NAME":~/pegjax
    on_all_workers "cd ~/pegjax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]'"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR (gs://...)}" "${DATA:?set DATA}" "${MODEL:?set MODEL}"
    extra=$(printf ' %q' "$@")
    on_all_workers "cd ~/pegjax && . .venv/bin/activate && python -m pegjax.main --config=$CONFIG \
      --workdir=$WORKDIR --config.data.train_files=$DATA --config.model.path=$MODEL$extra"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    echo "unknown action: $action (create|setup|train|delete)" >&2
    exit 2
    ;;
esac
