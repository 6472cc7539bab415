#!/usr/bin/env bash
# N processes on this machine (127.0.0.1), each with its own CPU devices, joined by JAX's
# distributed runtime with gloo collectives: a multi-host run without accelerators.
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 bash launch/local.sh --config=configs/peg.py:demo --workdir=runs/local
#   MODULE=pegjax.evaluate bash launch/local.sh --model=DIR --task=FOLDER:test    (any pegjax command)
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}
MODULE=${MODULE:-pegjax.main}
# Each process's own device count replaces any in XLA_FLAGS; the caller's other XLA flags stay.
other_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
export XLA_FLAGS="${other_flags} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
export PEGJAX_CPU_COLLECTIVES=gloo
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  "$PYTHON" -m "$MODULE" --coordinator="127.0.0.1:${PORT}" --num_processes="${NUM_PROCESSES}" \
    --process_id="$i" "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
