"""Evaluation end to end on real data: same figures as sentence-transformers, both layouts, errors."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pegjax import evaluate, metrics, tasks
from pegjax.data.retrieval import DataError, RetrievalData, load_beir
from pegjax.encode import Encoder


def subset(data: RetrievalData, extra_docs: int, seed=0) -> RetrievalData:
    """Every document the qrels name plus ``extra_docs`` others: a smaller, still real corpus."""
    wanted = {d for rel in data.qrels.values() for d in rel}
    rng = np.random.default_rng(seed)
    others = [i for i, d in enumerate(data.corpus_ids) if d not in wanted]
    keep = sorted([i for i, d in enumerate(data.corpus_ids) if d in wanted] + list(rng.choice(others, extra_docs, replace=False)))
    return RetrievalData([data.corpus_ids[i] for i in keep], [data.corpus_texts[i] for i in keep],
                         data.query_ids, data.query_texts, data.qrels)


def first_queries(data: RetrievalData, count: int) -> RetrievalData:
    """The first ``count`` queries and their qrels (the corpus unchanged)."""
    return dataclasses.replace(data, query_ids=data.query_ids[:count], query_texts=data.query_texts[:count],
                               qrels={q: data.qrels[q] for q in data.query_ids[:count]})


@pytest.fixture(scope="module")
def scifact_test(shared_data):
    """150 SciFact test claims over their 150 relevant abstracts and 200 others."""
    return subset(first_queries(load_beir(str(shared_data / "scifact"), "test"), 150), extra_docs=200)


def test_minilm_scifact_matches_sentence_transformers(minilm_path, scifact_test):
    from sentence_transformers import SentenceTransformer

    # Max length 128 on both sides (the demo's): the same comparison at half the encoding time.
    ours = evaluate.evaluate_data(Encoder.from_pretrained(minilm_path, max_length=128), scifact_test, k_values=(10, 100))
    reference = SentenceTransformer(minilm_path, device="cpu")
    reference.max_seq_length = 128
    corpus = reference.encode(scifact_test.corpus_texts, batch_size=64)
    queries = reference.encode(scifact_test.query_texts, batch_size=64)
    order = np.argsort(-(queries @ corpus.T), axis=1)[:, :100]
    run = {q: {scifact_test.corpus_ids[j]: float(queries[i] @ corpus[j]) for j in order[i]}
           for i, q in enumerate(scifact_test.query_ids)}
    theirs, _, _ = metrics.evaluate(scifact_test.qrels, run, (10, 100))
    assert ours["queries"] == 150
    assert abs(ours["metrics"]["ndcg@10"] - theirs["ndcg@10"]) <= 0.005
    assert abs(ours["metrics"]["recall@100"] - theirs["recall@100"]) <= 0.005
    assert ours["metrics"]["ndcg@10"] > 0.6  # a real model on a real task, not noise


def write_cmteb_layout(root, name, data: RetrievalData, split="dev"):
    """The layout of C-MTEB/<name> and C-MTEB/<name>-qrels as downloaded from the hub."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root / name / "data")
    os.makedirs(root / f"{name}-qrels" / "data")
    pq.write_table(pa.table({"id": data.corpus_ids, "text": data.corpus_texts}),
                   root / name / "data" / "corpus-00000-of-00001.parquet")
    pq.write_table(pa.table({"id": data.query_ids, "text": data.query_texts}),
                   root / name / "data" / "queries-00000-of-00001.parquet")
    rows = [(q, d, s) for q, rel in data.qrels.items() for d, s in rel.items()]
    pq.write_table(pa.table({"qid": [r[0] for r in rows], "pid": [r[1] for r in rows], "score": [r[2] for r in rows]}),
                   root / f"{name}-qrels" / "data" / f"{split}-00000-of-00001.parquet")


def test_registered_cmteb_task_loads_from_hub_layout_and_missing_ones_are_reported(tmp_path, shared_data, monkeypatch):
    beir = load_beir(str(shared_data / "cmrc2018"), "dev")
    write_cmteb_layout(tmp_path, "CmedqaRetrieval", beir)
    monkeypatch.setenv(tasks.DATA_ENV, str(tmp_path))
    task, data = tasks.load("CmedqaRetrieval")
    assert task.split == "dev" and task.query_instruction == ""
    assert data.corpus_ids == beir.corpus_ids and data.corpus_texts == beir.corpus_texts
    assert data.qrels == beir.qrels and len(data.query_ids) == len(beir.query_ids) > 1000
    with pytest.raises(tasks.MissingTask, match=r"T2Retrieval: .*T2Retrieval does not exist; download huggingface datasets C-MTEB/T2Retrieval"):
        tasks.load("T2Retrieval")


class Lexical:
    """A stand-in encoder with exact, inspectable scores: bag of characters."""

    def encode(self, texts, **_):
        vectors = np.zeros((len(texts), 256), np.float32)
        for i, text in enumerate(texts):
            for ch in text:
                vectors[i, ord(ch) % 256] += 1
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


def test_evaluation_goes_on_past_a_missing_task(tmp_path, shared_data, monkeypatch):
    monkeypatch.delenv(tasks.DATA_ENV, raising=False)
    report = evaluate.evaluate_tasks(Lexical(), ["T2Retrieval", f"{shared_data / 'cmrc2018'}:dev"], k_values=(10,))
    assert set(report["tasks"]) == {"cmrc2018"} and report["tasks"]["cmrc2018"]["queries"] == 3219
    assert "set $PEGJAX_EVAL_DATA" in report["missing"]["T2Retrieval"]
    assert report["tasks"]["cmrc2018"]["metrics"]["ndcg@10"] > 0.3
    table = evaluate.format_table(report)
    assert "| cmrc2018 | dev | 3219 |" in table and "missing: T2Retrieval" in table


def write_beir(folder, corpus_lines, queries_lines, qrels_lines, split="test"):
    os.makedirs(folder / "qrels")
    (folder / "corpus.jsonl").write_bytes(b"\n".join(corpus_lines) + b"\n")
    (folder / "queries.jsonl").write_bytes(b"\n".join(queries_lines) + b"\n")
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels_lines) + "\n")


GOOD_CORPUS = [b'{"_id": "d1", "title": "", "text": "alpha"}', b'{"_id": "d2", "title": "T", "text": "beta"}']
GOOD_QUERIES = [b'{"_id": "q1", "text": "alpha?"}', b'{"_id": "q2", "text": "beta?"}']


@pytest.mark.parametrize("line, message", [
    (b'{"_id": "d3", "text": "gamma"', r"corpus.jsonl:3: not valid JSON"),
    (b'{"_id": "d3", "text": 7}', r"corpus.jsonl:3: field 'text' must be a string"),
    (b'{"text": "gamma"}', r"corpus.jsonl:3: missing id field \(_id or id\)"),
    (b'{"_id": "d3", "text": "\xff\xfe"}', r"corpus.jsonl:3: invalid UTF-8"),
])
def test_malformed_corpus_line_names_file_and_line(tmp_path, line, message):
    write_beir(tmp_path / "t", GOOD_CORPUS + [line], GOOD_QUERIES, ["q1\td1\t1"])
    with pytest.raises(DataError, match=message):
        load_beir(str(tmp_path / "t"), "test")


def test_qrels_problems_are_counted_and_reported(tmp_path):
    write_beir(tmp_path / "t", GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t1", "q1\tmissing-doc\t1", "q9\td2\t1", "q2\td2\t2"])
    data = load_beir(str(tmp_path / "t"), "test")
    assert data.warnings == {"qrels_unknown_document": 1, "qrels_unknown_query": 1}
    assert data.qrels == {"q1": {"d1": 1, "missing-doc": 1}, "q2": {"d2": 2}}
    assert data.corpus_texts == ["alpha", "T beta"]
    result = evaluate.evaluate_data(Lexical(), data, k_values=(1, 2))
    assert result["warnings"] == data.warnings
    assert result["metrics"]["recall@2"] == 0.75  # the unretrievable document still counts
    write_beir(tmp_path / "bad", GOOD_CORPUS, GOOD_QUERIES, ["q1\td1"])
    with pytest.raises(DataError, match=r"qrels/test.tsv:2: expected 3 tab-separated fields"):
        load_beir(str(tmp_path / "bad"), "test")


def test_command_line_writes_json(tmp_path, minilm_path, shared_data):
    beir = subset(load_beir(str(shared_data / "scifact"), "test"), extra_docs=20)
    small = RetrievalData(beir.corpus_ids, beir.corpus_texts, beir.query_ids[:20], beir.query_texts[:20],
                          {q: beir.qrels[q] for q in beir.query_ids[:20]})
    folder = tmp_path / "tiny"
    write_beir(folder, [json.dumps({"_id": i, "text": t}).encode() for i, t in zip(small.corpus_ids, small.corpus_texts)],
               [json.dumps({"_id": i, "text": t}).encode() for i, t in zip(small.query_ids, small.query_texts)],
               [f"{q}\t{d}\t{s}" for q, rel in small.qrels.items() for d, s in rel.items()])
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "pegjax.evaluate", f"--model={minilm_path}", f"--task={folder}",
                           "--task=VideoRetrieval", "--k=1,10", f"--output={out}", "--passage_max_length=128"],
                          capture_output=True, text=True, env=dict(os.environ, PEGJAX_EVAL_DATA=str(tmp_path)), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| tiny | test | 20 |" in done.stdout and "missing: VideoRetrieval" in done.stdout
    report = json.loads(out.read_text())
    assert 0 < report["tasks"]["tiny"]["metrics"]["ndcg@10"] <= 1
    assert "VideoRetrieval" in report["missing"]


def test_config_evals_run_at_their_cadence(shared_data):
    evals = {
        "cmrc": {"task": f"{shared_data / 'cmrc2018'}:trial", "log_steps": 100, "k": [10]},
        "scifact_small": {"task": f"{shared_data / 'scifact'}:test", "log_steps": 0, "k": [10]},
    }
    assert evaluate.due(evals, 200) == ["cmrc"] and evaluate.due(evals, 150) == []
    assert evaluate.due(evals, 150, final=True) == ["cmrc", "scifact_small"]
    results = evaluate.run_evals(Lexical(), evals, step=300)
    assert list(results) == ["cmrc"] and set(results["cmrc"]) == {"ndcg@10", "mrr@10", "recall@10", "map@10"}
