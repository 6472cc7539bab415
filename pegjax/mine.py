"""Hard-negative mining: H negatives per query from a rank window, without false negatives.

    python -m pegjax.mine --model=DIR --queries=BEIR_FOLDER[:split] | PAIRS.jsonl \\
        [--corpus=corpus.jsonl] --out=mined.jsonl [--negatives=5] [--rank_start=10 --rank_end=100] \\
        [--absolute_margin=0.05 | --relative_margin=0.05] [--candidates=bm25] [--cache_dir=DIR]

Queries and positives come from a BEIR folder (qrels with relevance > 0) or a FlagEmbedding JSONL
of pairs (``{"query", "pos": [...]}``; the corpus is every positive text plus ``--corpus``). Each
query's candidates are ranked by the model (the same exact search as evaluation) or by BM25; known
positives, and any passage whose text equals a positive's, are removed; the window
``[rank_start, rank_end)`` of what remains is kept; candidates scoring above the query's lowest
positive score (or within an absolute / relative margin of it) are dropped; then ``negatives`` are
drawn with a seed per query, so the same seed gives the same file. Output: FlagEmbedding JSONL with
``neg``, ``pos_scores`` and ``neg_scores``, and ``<out>.summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from pegjax import search
from pegjax.encode import encoded_corpus
from pegjax.data.jsonl import DataError, lines, objects, titled_text  # noqa: F401  (DataError: part of this module's API)
from pegjax.data.retrieval import load_beir
from pegjax.data.training import parse_line


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    negatives: int = 5
    rank_start: int = 10
    rank_end: int = 100
    drop_above_positive: bool = True
    absolute_margin: float | None = None  # drop candidates scoring above (lowest positive - margin)
    relative_margin: float | None = None  # drop candidates scoring above lowest positive * (1 - margin)
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.rank_start < self.rank_end:
            raise ValueError(f"--rank_start={self.rank_start} --rank_end={self.rank_end}: need 0 <= start < end")
        if self.negatives < 1:
            raise ValueError(f"--negatives={self.negatives}: need at least 1")


@dataclasses.dataclass
class MiningInput:
    query_texts: list[str]
    positives: list[list[int]]  # corpus rows of each query's positives
    corpus_texts: list[str]


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def from_beir(folder: str, split: str) -> MiningInput:
    data = load_beir(folder, split)
    row = {doc_id: i for i, doc_id in enumerate(data.corpus_ids)}
    positives = [[row[d] for d, rel in data.qrels[q].items() if rel > 0 and d in row] for q in data.query_ids]
    keep = [i for i, p in enumerate(positives) if p]
    return MiningInput([data.query_texts[i] for i in keep], [positives[i] for i in keep], data.corpus_texts)


def from_pairs(path: str, corpus_path: str | None = None) -> MiningInput:
    """FlagEmbedding pairs (+ an optional corpus: BEIR corpus.jsonl or JSONL with "text")."""
    corpus, row = [], {}

    def add(text):
        key = _text_key(text)
        if key not in row:
            row[key] = len(corpus)
            corpus.append(text)
        return row[key]

    queries, positives = [], []
    for where, raw in lines(path):
        record = parse_line(raw, where)  # the training data's own check: same layout
        queries.append(record["query"])
        positives.append([add(p) for p in record["pos"]])
    if corpus_path:
        for where, item in objects(corpus_path):
            add(titled_text(item, where))
    return MiningInput(queries, positives, corpus)


def select(ranked_rows, ranked_scores, positive_rows, positive_keys, corpus_keys, lowest_positive, config, rng):
    """One query's negatives -> (rows, scores, counts of what was dropped)."""
    window, dropped = [], {"margin": 0}
    kept_rank = 0
    for row, score in zip(ranked_rows, ranked_scores):
        if row < 0 or row in positive_rows or corpus_keys[row] in positive_keys:
            continue
        if kept_rank >= config.rank_end:
            break
        kept_rank += 1
        if kept_rank <= config.rank_start:
            continue
        limit = lowest_positive if config.drop_above_positive else np.inf
        if config.absolute_margin is not None:
            limit = min(limit, lowest_positive - config.absolute_margin)
        if config.relative_margin is not None:
            limit = min(limit, lowest_positive * (1 - config.relative_margin))
        if score > limit:
            dropped["margin"] += 1
            continue
        window.append((row, score))
    take = min(config.negatives, len(window))
    chosen = sorted(rng.choice(len(window), size=take, replace=False)) if take else []
    return [window[i][0] for i in chosen], [float(window[i][1]) for i in chosen], dropped


def mine(data: MiningInput, config: MiningConfig, encoder=None, candidates: str = "dense",
         cache_dir: str | None = None, batch_size: int = 64):
    """-> (records in FlagEmbedding layout, summary dict). The encoder's prompts
    (``encoder.prompts``: "query", "document") are prepended when it encodes; the records hold the
    texts without them (training adds its own)."""
    corpus_keys = [_text_key(t) for t in data.corpus_texts]
    depth = config.rank_end + max(len(p) for p in data.positives) if data.positives else config.rank_end
    if candidates not in ("dense", "bm25"):
        raise ValueError(f"--candidates={candidates!r}: use 'dense' or 'bm25'")
    if candidates == "dense" and encoder is None:
        raise ValueError("dense mining needs --model; use --candidates=bm25 for a model that is not trained yet")
    corpus_emb = query_emb = None
    if encoder is not None:
        passage_prompt = encoder.prompts.get("document", "")
        corpus_texts = [passage_prompt + t for t in data.corpus_texts] if passage_prompt else data.corpus_texts
        corpus_emb = encoded_corpus(encoder, corpus_texts, cache_dir, batch_size)
        query_emb = encoder.encode(data.query_texts, batch_size=batch_size, show_progress=len(data.query_texts) > 2048,
                                   prompt=encoder.prompts.get("query", ""))
    if candidates == "dense":
        scores, rows = search.Index(corpus_emb).search(query_emb, depth, progress=len(data.query_texts) > 2048)
        positive_scores = [[float(query_emb[i] @ corpus_emb[r]) for r in pos] for i, pos in enumerate(data.positives)]
    else:
        from pegjax.bm25 import BM25

        bm25 = BM25(data.corpus_texts)
        scores, rows = bm25.search(data.query_texts, depth)
        if encoder is not None:  # BM25 proposes, the model scores (filters and neg_scores)
            scores = np.einsum("qd,qkd->qk", query_emb, np.asarray(corpus_emb)[rows])
            positive_scores = [[float(query_emb[i] @ corpus_emb[r]) for r in pos] for i, pos in enumerate(data.positives)]
        else:
            positive_scores = []
            for start in range(0, len(data.query_texts), 512):
                full = bm25.scores(data.query_texts[start : start + 512])
                positive_scores += [[float(full[j, r]) for r in data.positives[start + j]] for j in range(len(full))]

    records, too_few, margin_dropped = [], 0, 0
    for i, (query, positives) in enumerate(zip(data.query_texts, data.positives)):
        rng = np.random.default_rng([config.seed, i])
        chosen, chosen_scores, dropped = select(
            rows[i], scores[i], set(positives), {corpus_keys[r] for r in positives}, corpus_keys,
            min(positive_scores[i]), config, rng,
        )
        too_few += len(chosen) < config.negatives
        margin_dropped += dropped["margin"]
        records.append({
            "query": query,
            "pos": [data.corpus_texts[r] for r in positives],
            "neg": [data.corpus_texts[r] for r in chosen],
            "pos_scores": positive_scores[i],
            "neg_scores": chosen_scores,
        })
    pos_all = np.array([s for r in records for s in r["pos_scores"]] or [np.nan])
    neg_all = np.array([s for r in records for s in r["neg_scores"]] or [np.nan])
    summary = {
        "queries": len(records),
        "corpus": len(data.corpus_texts),
        "candidates": candidates,
        "config": dataclasses.asdict(config),
        "queries_with_too_few_negatives": int(too_few),
        "candidates_dropped_by_margin": int(margin_dropped),
        "positive_score": _stats(pos_all),
        "negative_score": _stats(neg_all),
    }
    return records, summary


def _stats(values: np.ndarray) -> dict:
    quantiles = np.nanpercentile(values, [5, 50, 95]) if np.isfinite(values).any() else [np.nan] * 3
    return {"mean": float(np.nanmean(values)) if np.isfinite(values).any() else None,
            "p5": float(quantiles[0]), "p50": float(quantiles[1]), "p95": float(quantiles[2])}


def write(records, summary, out: str) -> None:
    """Writes the mined JSONL and its ``.summary.json`` atomically: each is written beside its
    final name and renamed into place, the JSONL last, so a file at ``out`` is always complete."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = f"{out}.partial-{os.getpid()}"
    try:
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        os.replace(partial, out + ".summary.json")
        with open(partial, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def main(argv):
    del argv
    from absl import flags

    from pegjax import distributed

    distributed.use_cpu_cores()
    FLAGS = flags.FLAGS
    if os.path.isfile(FLAGS.queries):
        data = from_pairs(FLAGS.queries, FLAGS.corpus)
    else:
        folder, _, split = FLAGS.queries.partition(":") if not os.path.isdir(FLAGS.queries) else (FLAGS.queries, "", "")
        data = from_beir(folder, split or "train")
    encoder = None
    if FLAGS.model:
        from pegjax.encode import Encoder

        encoder = Encoder.from_pretrained(FLAGS.model, max_length=FLAGS.max_length)
        for name, prompt in (("query", FLAGS.query_prompt), ("document", FLAGS.passage_prompt)):
            if prompt is not None:
                encoder.prompts[name] = prompt
    config = MiningConfig(negatives=FLAGS.negatives, rank_start=FLAGS.rank_start, rank_end=FLAGS.rank_end,
                          drop_above_positive=FLAGS.drop_above_positive, absolute_margin=FLAGS.absolute_margin,
                          relative_margin=FLAGS.relative_margin, seed=FLAGS.seed)
    records, summary = mine(data, config, encoder, FLAGS.candidates, FLAGS.cache_dir, FLAGS.batch_size)
    write(records, summary, FLAGS.out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {FLAGS.out} ({len(records)} queries)")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", None, "Model folder (needed for --candidates=dense).")
    flags.DEFINE_string("queries", None, "BEIR folder[:split] (default split: train) or FlagEmbedding pairs JSONL.", required=True)
    flags.DEFINE_string("corpus", None, "Extra passages (JSONL with 'text'), for pairs input.")
    flags.DEFINE_string("out", None, "Output JSONL.", required=True)
    flags.DEFINE_integer("negatives", 5, "Negatives per query.")
    flags.DEFINE_integer("rank_start", 10, "First rank of the window (after removing positives).")
    flags.DEFINE_integer("rank_end", 100, "End of the window (exclusive).")
    flags.DEFINE_boolean("drop_above_positive", True, "Drop candidates scoring above the lowest positive.")
    flags.DEFINE_float("absolute_margin", None, "Also drop candidates within this margin below the positive.")
    flags.DEFINE_float("relative_margin", None, "Also drop candidates above positive * (1 - margin).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum("candidates", "dense", ["dense", "bm25"], "Who proposes candidates.")
    flags.DEFINE_string("cache_dir", None, "Cache corpus embeddings here (memory-mapped).")
    flags.DEFINE_integer("batch_size", 64, "Encoding batch size.")
    flags.DEFINE_integer("max_length", None, "Max tokens (default: the model's).")
    flags.DEFINE_string("query_prompt", None, "Prepended to queries when encoding (default: the model's), e.g. 'query: '.")
    flags.DEFINE_string("passage_prompt", None, "Prepended to passages when encoding (default: the model's), e.g. 'passage: '.")
    from pegjax.errors import guarded

    app.run(guarded(main))
