"""Mining on real data: no known positive among the negatives, the margin filter holds, seeds
reproduce, BM25 mining works for Chinese."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

from pegjax import bm25, export, mine
from pegjax.encode import Encoder
from pegjax.models.bert import BertConfig, EmbeddingModel


@pytest.fixture(scope="module")
def scifact_train(shared_data):
    """150 SciFact train queries over a real sub-corpus: their positives plus 400 other abstracts."""
    data = mine.from_beir(str(shared_data / "scifact"), "train")
    rng = np.random.default_rng(0)
    wanted = sorted({r for p in data.positives[:150] for r in p})
    others = sorted(set(rng.choice(len(data.corpus_texts), 400, replace=False)) - set(wanted))
    keep = wanted + others
    new_row = {old: new for new, old in enumerate(keep)}
    return mine.MiningInput(data.query_texts[:150], [[new_row[r] for r in p] for p in data.positives[:150]],
                            [data.corpus_texts[r] for r in keep])


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return Encoder.from_pretrained(minilm_path, max_length=128)


def test_mined_negatives_exclude_positives_and_respect_the_margin(scifact_train, minilm, tmp_path):
    config = mine.MiningConfig(negatives=5, rank_start=3, rank_end=60, absolute_margin=0.02, seed=7)
    records, summary = mine.mine(scifact_train, config, minilm, cache_dir=str(tmp_path / "cache"))
    assert len(records) == 150 and summary["queries"] == 150
    for record in records:
        assert not set(record["neg"]) & set(record["pos"])
        assert len(record["neg"]) == len(record["neg_scores"]) <= 5
        assert all(s <= min(record["pos_scores"]) - 0.02 + 1e-6 for s in record["neg_scores"])
    short = sum(len(r["neg"]) < 5 for r in records)  # the margin leaves some queries short
    assert summary["queries_with_too_few_negatives"] == short and short < 15
    assert summary["candidates_dropped_by_margin"] > 0
    assert summary["negative_score"]["mean"] < summary["positive_score"]["mean"]
    # Scores are the model's: recompute one.
    first = records[0]
    embedded = minilm.encode([first["query"], first["neg"][0]])
    assert first["neg_scores"][0] == pytest.approx(float(embedded[0] @ embedded[1]), abs=1e-5)

    # Same seed, same file (the second run reads the cached corpus embeddings).
    assert len(os.listdir(tmp_path / "cache")) == 1
    again, _ = mine.mine(scifact_train, config, minilm, cache_dir=str(tmp_path / "cache"))
    assert again == records
    other_seed, _ = mine.mine(scifact_train, mine.MiningConfig(negatives=5, rank_start=3, rank_end=60,
                                                              absolute_margin=0.02, seed=8), minilm,
                              cache_dir=str(tmp_path / "cache"))
    assert other_seed != records


def test_chinese_bm25_tokens():
    assert bm25.tokens("高血压 Hello, world") == ["高", "血", "压", "高血", "血压", "hello", "world"]


def test_medical_zh_pairs_mine_end_to_end_with_bm25_and_a_chinese_model(shared_data, tmp_path):
    from pegjax.data.tokenizer import load_tokenizer

    config = BertConfig(vocab_size=21128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    model = EmbeddingModel(config, pooling="cls")
    tokenizer = load_tokenizer(str(shared_data / "vocab" / "bert-base-chinese-vocab.txt"))
    folder = str(tmp_path / "zh")
    export.save(Encoder(model, nn.unbox(model.init(jax.random.key(0))), tokenizer, max_length=128), folder)
    pairs = tmp_path / "pairs.jsonl"
    with open(shared_data / "medical_zh" / "train_pairs.jsonl", encoding="utf-8") as src, open(pairs, "w", encoding="utf-8") as dst:
        for line, _ in zip(src, range(600)):
            dst.write(line)
    out = tmp_path / "mined.jsonl"
    done = subprocess.run([sys.executable, "-m", "pegjax.mine", f"--model={folder}", f"--queries={pairs}",
                           f"--corpus={shared_data / 'medical_zh' / 'corpus.jsonl'}", "--candidates=bm25",
                           "--rank_start=2", "--rank_end=50", "--drop_above_positive=false", f"--out={out}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert len(records) == 600
    assert all(len(r["neg"]) == 5 and not set(r["neg"]) & set(r["pos"]) for r in records)
    assert all(any("\u4e00" <= c <= "\u9fff" for c in r["neg"][0]) for r in records)
    summary = json.loads(open(str(out) + ".summary.json").read())
    assert summary["candidates"] == "bm25" and summary["queries_with_too_few_negatives"] == 0


def test_bad_pairs_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q2", "pos": []}\n')
    with pytest.raises(mine.DataError, match=r"pairs.jsonl:2: 'pos' must be a non-empty list"):
        mine.from_pairs(str(path))


def test_an_interrupted_write_leaves_no_file_that_looks_complete(tmp_path):
    """Mined files are written beside their name and renamed into place: a run killed while
    writing leaves nothing at the final path, so the next run mines again instead of training on
    half a file."""
    from pegjax import mine

    out = str(tmp_path / "mined.jsonl")
    records = [{"query": f"q{i}", "pos": ["p"], "neg": ["n"] * 5} for i in range(100)]
    records[60] = {"query": object()}  # json cannot write it: the write stops at record 60
    with pytest.raises(TypeError):
        mine.write(records, {"queries": 100}, out)
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["mined.jsonl.summary.json"]
    records[60] = {"query": "q60", "pos": ["p"], "neg": ["n"] * 5}
    mine.write(records, {"queries": 100}, out)
    assert sum(1 for _ in open(out)) == 100 and sorted(os.listdir(tmp_path)) == ["mined.jsonl", "mined.jsonl.summary.json"]
