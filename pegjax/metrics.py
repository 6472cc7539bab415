"""Retrieval metrics from qrels and a ranked run, with trec_eval's conventions.

    qrels: {query_id: {doc_id: relevance int}}       (relevance > 0 means relevant)
    run:   {query_id: {doc_id: score float}}

Documents are ranked by score, descending, ties broken by doc id descending (as trec_eval does),
so the figures equal pytrec_eval's on the same run file:

    nDCG@k    sum_{r<=k} rel_r / log2(r+1), over the same sum for the ideal ordering of the qrels
              (gain = the graded relevance itself, as trec_eval's ndcg_cut)
    MRR@k     1 / rank of the first relevant document within the top k, else 0
    Recall@k  relevant documents in the top k / all relevant documents
    MAP@k     sum over relevant documents in the top k of precision at their rank, / all relevant

A query with no relevant document in its qrels has no defined value and is left out of the mean
(and counted). A query in the qrels that the run lacks scores 0 on every metric and stays in the
mean, as trec_eval -c averages "over the complete set of queries in the relevance judgements": a
system that returns nothing for a query is not rewarded for it. pytrec_eval's default differs: it
evaluates only the queries present in the run, so its mean over a run that lacks queries is higher.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

DEFAULT_K = (1, 3, 5, 10, 100, 1000)
METRICS = ("ndcg", "mrr", "recall", "map")


def rank(scores: Mapping[str, float]) -> list[str]:
    """Doc ids by score descending, ties by doc id descending (trec_eval's order)."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(relevance: Mapping[str, int], ranking: list[str], k_values: Iterable[int]) -> dict[str, float]:
    """Metrics of one query: ``{"ndcg@10": ..., "mrr@10": ..., ...}``."""
    relevant = {doc: rel for doc, rel in relevance.items() if rel > 0}
    ideal = sorted(relevant.values(), reverse=True)
    out = {}
    for k in k_values:
        top = ranking[:k]
        dcg = sum(relevant.get(doc, 0) / math.log2(r + 2) for r, doc in enumerate(top))
        idcg = sum(rel / math.log2(r + 2) for r, rel in enumerate(ideal[:k]))
        hits = [r for r, doc in enumerate(top) if doc in relevant]
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
        out[f"recall@{k}"] = len(hits) / len(relevant)
        out[f"map@{k}"] = sum((i + 1) / (r + 1) for i, r in enumerate(hits)) / len(relevant)
    return out


def evaluate(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
             k_values: Iterable[int] = DEFAULT_K) -> tuple[dict[str, float], dict[str, dict[str, float]], int]:
    """(mean metrics, per-query metrics, number of queries left out for having no relevant doc)."""
    k_values = tuple(k_values)
    per_query, skipped = {}, 0
    for query_id, relevance in qrels.items():
        if not any(rel > 0 for rel in relevance.values()):
            skipped += 1
            continue
        per_query[query_id] = query_metrics(relevance, rank(run.get(query_id, {})), k_values)
    names = [f"{m}@{k}" for m in METRICS for k in k_values]
    mean = {name: (sum(q[name] for q in per_query.values()) / len(per_query) if per_query else 0.0) for name in names}
    return mean, per_query, skipped
