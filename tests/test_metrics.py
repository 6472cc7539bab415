"""Our metrics equal pytrec_eval's on the same run over the real SciFact test qrels."""

import numpy as np
import pytest
import pytrec_eval

from pegjax import metrics
from pegjax.data.retrieval import load_beir

K = (1, 3, 5, 10, 100, 1000)


@pytest.fixture(scope="module")
def scifact(shared_data):
    return load_beir(str(shared_data / "scifact"), "test")


def make_run(data, seed=0):
    """A run file with every hard case: graded positives, relevant docs at random ranks, queries
    whose relevant docs are never retrieved, tied scores."""
    rng = np.random.default_rng(seed)
    qrels = {q: dict(rel) for q, rel in data.qrels.items()}
    run = {}
    for n, (query_id, relevance) in enumerate(sorted(qrels.items())):
        if len(relevance) > 1:  # several graded positives
            for i, doc in enumerate(sorted(relevance)):
                relevance[doc] = 1 + i % 3
        docs = list(rng.choice(data.corpus_ids, size=150, replace=False))
        if n % 4 != 0:  # every 4th query retrieves none of its relevant documents
            docs += list(relevance)
        scores = np.round(rng.random(len(docs)), 2)  # rounding makes ties
        run[query_id] = {d: float(s) for d, s in zip(docs, scores)}
    return qrels, run


def test_metrics_equal_pytrec_eval(scifact):
    qrels, run = make_run(scifact)
    ours_mean, ours, skipped = metrics.evaluate(qrels, run, K)
    assert skipped == 0 and len(ours) == 300
    cut = ",".join(map(str, K))
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cut}", f"recall.{cut}", f"map_cut.{cut}"})
    theirs = evaluator.evaluate(run)
    for query_id, values in theirs.items():
        for k in K:
            assert ours[query_id][f"ndcg@{k}"] == pytest.approx(values[f"ndcg_cut_{k}"], abs=1e-6)
            assert ours[query_id][f"recall@{k}"] == pytest.approx(values[f"recall_{k}"], abs=1e-6)
            assert ours[query_id][f"map@{k}"] == pytest.approx(values[f"map_cut_{k}"], abs=1e-6)
    # MRR@k is trec_eval's recip_rank on the run cut at k (trec_eval's own order).
    for k in (1, 10, 100):
        cut_run = {q: {d: scores[d] for d in metrics.rank(scores)[:k]} for q, scores in run.items()}
        reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut_run)
        for query_id, values in reciprocal.items():
            assert ours[query_id][f"mrr@{k}"] == pytest.approx(values["recip_rank"], abs=1e-6)
        assert ours_mean[f"mrr@{k}"] == pytest.approx(np.mean([v["recip_rank"] for v in reciprocal.values()]), abs=1e-6)
    assert any(ours[q]["recall@1000"] == 0 for q in ours)  # the never-retrieved queries are in
    assert ours_mean["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in theirs.values()]), abs=1e-6)


def test_query_without_relevant_documents_is_left_out_and_counted():
    qrels = {"a": {"d1": 1}, "b": {"d2": 0}}
    run = {"a": {"d1": 0.5, "d3": 0.9}, "b": {"d2": 1.0}}
    mean, per_query, skipped = metrics.evaluate(qrels, run, (1, 2))
    assert skipped == 1 and set(per_query) == {"a"}
    assert mean["mrr@2"] == 0.5 and mean["recall@1"] == 0.0


def test_a_query_the_run_lacks_scores_zero_and_stays_in_the_mean():
    """trec_eval -c's convention, not pytrec_eval's default (which evaluates only the run's queries):
    per query the values equal pytrec_eval's, the absent query is 0, the mean is over all judged."""
    qrels = {"a": {"d1": 1}, "b": {"d2": 2, "d3": 1}, "c": {"d4": 1}}
    run = {"a": {"d1": 0.9, "d9": 0.5}, "b": {"d3": 0.8, "d2": 0.7}}  # "c" returned nothing
    mean, per_query, skipped = metrics.evaluate(qrels, run, (1, 10))
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,10", "recall.1,10"}).evaluate(run)
    assert set(theirs) == {"a", "b"} and skipped == 0
    for query_id, values in theirs.items():
        assert per_query[query_id]["ndcg@10"] == pytest.approx(values["ndcg_cut_10"], abs=1e-9)
    assert all(value == 0.0 for value in per_query["c"].values())
    assert mean["ndcg@10"] == pytest.approx(sum(v["ndcg_cut_10"] for v in theirs.values()) / 3, abs=1e-9)
    assert mean["recall@10"] == pytest.approx(2 / 3)
