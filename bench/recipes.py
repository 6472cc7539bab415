"""What the shipped recipes give on data they never trained on: one command per figure.

    python -m bench.recipes --recipe=medical_zh [--seeds=0,1,2] [--out=runs/recipes]
    python -m bench.recipes --recipe=scifact [--seeds=0]
    python -m bench.recipes --recipe=medical_zh --seeds=1 --name=steps56 \
        --set train.steps=56 --set progressive.beta.steps=56 --set progressive.gamma.steps=56

``--set KEY=VALUE`` (repeatable) changes the recipe's config for a variant (VALUE read as a Python
literal, else a string); ``--name`` keeps the variant's runs apart from the recipe's.

medical_zh: the train queries are split once (the quality study's split: 500 held out, never
trained or tuned on); ``configs/peg.py:medical_zh`` runs unchanged except that it mines and trains
on the other 5,737 queries, and is evaluated on the 500 held-out ones over the whole 7,244-answer
corpus: the starting model (zero-shot, e5 prompts) before training, the recipe's model after.
Char uni+bigram BM25 on the same queries is printed beside them.

scifact: ``configs/peg.py:scifact`` as shipped (it trains on SciFact train and never sees test),
SciFact test over the full corpus before and after.

Each run prints its wall time (mining, training and both evaluations) with the CPU model; a run
whose report exists under --out is not repeated.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import time

import numpy as np

from bench.common import REPO, SHARED_DATA, cpu_model

SEED_OF_SPLIT = 1234  # the quality study's split of the medical_zh train queries
HELDOUT = 500


def _recipe(variant: str):
    spec = importlib.util.spec_from_file_location("peg_recipe", REPO / "configs" / "peg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def medical_zh_split(out: str) -> str:
    """A BEIR folder with qrels ``fit`` (5,737 queries) and ``heldout`` (500); returns its path."""
    from pegjax.data.retrieval import read_qrels_tsv

    folder = os.path.join(out, "medical_zh_split")
    source = SHARED_DATA / "medical_zh"
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not os.path.exists(os.path.join(folder, name)):
            os.symlink(source / name, os.path.join(folder, name))
    qrels = {}
    for query_id, doc_id, score in read_qrels_tsv(str(source / "qrels" / "train.tsv")):
        qrels.setdefault(query_id, []).append((doc_id, score))
    ids = sorted(qrels)
    np.random.default_rng(SEED_OF_SPLIT).shuffle(ids)
    for split, chosen in (("heldout", ids[:HELDOUT]), ("fit", ids[HELDOUT:])):
        with open(os.path.join(folder, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{q}\t{d}\t{s}\n" for q in sorted(chosen) for d, s in qrels[q])
    return folder


def config_of(recipe: str, seed: int, out: str, overrides: dict | None = None):
    import ml_collections

    c = _recipe(recipe)
    c.unlock()
    for key, value in (overrides or {}).items():
        parent, _, leaf = key.rpartition(".")
        node = c
        for part in parent.split(".") if parent else ():
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"--set {key}: the {recipe} recipe's config has no such key")
        node[leaf] = value
    c.seed = seed
    c.train.export = False
    c.train.async_checkpoints = False
    c.eval_at_start = True
    if recipe == "medical_zh":
        folder = medical_zh_split(out)
        c.data.mine_from = f"{folder}:fit"
        c.evals = ml_collections.ConfigDict({
            "heldout": dict(task=f"{folder}:heldout", log_steps=0, k=[10, 100], batch_size=64),
        })
    c.lock()
    return c


def bm25_heldout(out: str) -> float:
    """nDCG@10 of pegjax's char uni+bigram BM25 on the held-out queries."""
    from pegjax import metrics
    from pegjax.bm25 import BM25
    from pegjax.data.retrieval import load_beir

    data = load_beir(medical_zh_split(out), "heldout")
    scores, rows = BM25(data.corpus_texts).search(data.query_texts, 100)
    run = {q: {data.corpus_ids[r]: float(x) for x, r in zip(s, rw)} for q, s, rw in zip(data.query_ids, scores, rows)}
    return metrics.evaluate(data.qrels, run, (10,))[0]["ndcg@10"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="medical_zh", choices=["medical_zh", "scifact"])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default=str(REPO / "runs" / "recipes"))
    parser.add_argument("--name", default=None, help="the run folder under --out (default: the recipe's name)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config change for a variant, e.g. optimizer.learning_rate.peak=1e-4")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    from pegjax import train

    rows = []
    for seed in (int(s) for s in args.seeds.split(",") if s):
        workdir = os.path.join(args.out, args.name or args.recipe, f"seed{seed}")
        report_path = os.path.join(workdir, "report.json")
        if not os.path.isfile(report_path):
            begin = time.perf_counter()
            report = train.train_and_evaluate(config_of(args.recipe, seed, args.out, overrides), workdir)
            report["wall_seconds"] = round(time.perf_counter() - begin, 1)
            with open(report_path, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        with open(report_path, encoding="utf-8") as f:
            rows.append((seed, json.load(f)))
    metric = "heldout/ndcg@10" if args.recipe == "medical_zh" else "scifact/ndcg@10"
    changes = "".join(f", {k}={v}" for k, v in overrides.items())
    print(f"\n{args.recipe}{changes}: {metric} on {cpu_model()}")
    if args.recipe == "medical_zh":
        print(f"  char uni+bigram BM25: {bm25_heldout(args.out):.4f}")
    for seed, report in rows:
        print(f"  seed {seed}: before {report['before'][metric]:.4f} -> after {report['after'][metric]:.4f} "
              f"({report['steps']} steps, {report['train_seconds']:.0f} s training, "
              f"{report.get('wall_seconds', float('nan')):.0f} s in all)")
    if len(rows) > 1:
        after = np.array([r["after"][metric] for _, r in rows])
        print(f"  mean {after.mean():.4f}, spread (max - min) {after.max() - after.min():.4f}")


if __name__ == "__main__":
    main()
