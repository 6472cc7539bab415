#!/usr/bin/env bash
# One call on a machine with one CUDA GPU: correctness against the CPU, then step time, compile
# time and MFU (python -m bench.gpu --help for the knobs; extra arguments are passed on).
# Uses the machine's own jax/flax/optax (nothing installed); pegjax runs from the source tree.
# Needs ml_collections besides (pip install ml-collections).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
python3 -c "import jax, flax, optax, ml_collections; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 -m bench.gpu "$@"
