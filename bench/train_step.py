"""Training throughput: pegjax's global step vs sentence-transformers' CachedMultipleNegativesRankingLoss.

    python -m bench.train_step [--queries 32] [--mini-batch 32] [--steps 2]

Same all-MiniLM-L6-v2 weights, same real SciFact data (claim -> cited abstract, plus 5 other
abstracts as negatives), same global batch (Q queries x 6 passages), same max lengths (query 32,
passage 128), same mini-batch (GradCache chunk) size, AdamW, plain InfoNCE with scale 1/tau = 20 on
both sides; pegjax on this CPU's single device. Both timed warm, best of ``--steps``; prints
training pairs/s (queries/s) and the ratio.
"""

import argparse
import json
import time

import numpy as np

from bench.common import SHARED_DATA, minilm_path


def scifact_training_batch(queries: int, hard: int):
    """Real (claim, cited abstract, 5 other abstracts) groups from SciFact train."""
    corpus = {}
    with open(SHARED_DATA / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            corpus[row["_id"]] = f"{row['title']} {row['text']}"
    claims = {}
    with open(SHARED_DATA / "scifact" / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            claims[row["_id"]] = row["text"]
    pairs = []
    with open(SHARED_DATA / "scifact" / "qrels" / "train.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            query_id, doc_id, _ = line.rstrip("\n").split("\t")
            if query_id in claims and doc_id in corpus and all(q != query_id for q, _ in pairs):
                pairs.append((query_id, doc_id))
            if len(pairs) == queries:
                break
    rng = np.random.default_rng(0)
    doc_ids = sorted(corpus)
    texts_q, groups = [], []
    for query_id, doc_id in pairs:
        negatives = [d for d in rng.choice(doc_ids, size=hard + 3, replace=False) if d != doc_id][:hard]
        texts_q.append(claims[query_id])
        groups.append([corpus[doc_id]] + [corpus[d] for d in negatives])
    return texts_q, groups


def time_steps(step, steps):
    step()  # warm-up (jit compile / allocator)
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def pegjax_step(queries, groups, args):
    import jax
    import optax

    from pegjax import sharding
    from pegjax.data.tokenizer import load_tokenizer, pad_batch, tokenize
    from pegjax.loss import LossConfig
    from pegjax.models import hf
    from pegjax.models.bert import EmbeddingModel
    from pegjax.step import StepConfig, create_state, jit_train_step, make_optimizer

    path = minilm_path()
    config, params = hf.load(path)
    model = EmbeddingModel(config, pooling="mean", normalize=True)
    tokenizer = load_tokenizer(path)
    group = len(groups[0])
    passages = [p for g in groups for p in g]
    query_ids, query_mask = pad_batch(tokenize(tokenizer, queries, args.query_length), args.query_length, len(queries))
    passage_ids, passage_mask = pad_batch(tokenize(tokenizer, passages, args.passage_length), args.passage_length, len(passages))
    batch = {
        "query_ids": query_ids, "query_mask": query_mask, "passage_ids": passage_ids, "passage_mask": passage_mask,
        "passage_hashes": np.zeros(len(passages), np.int32), "positive_hashes": np.zeros((len(queries), 1), np.int32),
    }
    mesh = sharding.make_mesh({"data": -1})
    tx = make_optimizer(optax.constant_schedule(2e-5), clip_norm=None)
    state, state_sharding = create_state(model, tx, mesh, seed=0, params=params)
    step_config = StepConfig(model=model, loss=LossConfig(group_size=group, temperature=0.05, query_block=len(queries)),
                             encode_chunk=args.mini_batch, dropout=True)
    zero = optax.constant_schedule(0.0)
    step = jit_train_step(step_config, tx, {"beta": zero, "gamma": zero, "learning_rate": optax.constant_schedule(2e-5)},
                          mesh, state_sharding)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    return run


def reference_step(queries, groups, args):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    model = SentenceTransformer(minilm_path(), device="cpu")
    loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.mini_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    group = len(groups[0])

    def features(texts, length):
        model.max_seq_length = length
        return model.tokenize(texts)

    columns = [features(queries, args.query_length)]
    columns += [features([g[h] for g in groups], args.passage_length) for h in range(group)]
    model.train()

    def run():
        optimizer.zero_grad()
        value = loss(columns, labels=None)
        value.backward()
        optimizer.step()

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--mini-batch", type=int, default=32)
    parser.add_argument("--query-length", type=int, default=32)
    parser.add_argument("--passage-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    import torch

    queries, groups = scifact_training_batch(args.queries, hard=5)
    ours = time_steps(pegjax_step(queries, groups, args), args.steps)
    theirs = time_steps(reference_step(queries, groups, args), args.steps)
    print(f"global batch {len(queries)} queries x {len(groups[0])} passages, lengths {args.query_length}/"
          f"{args.passage_length}, mini-batch {args.mini_batch}, torch threads {torch.get_num_threads()}")
    print(f"pegjax step                       {ours:7.2f} s  {len(queries) / ours:7.2f} pairs/s")
    print(f"sentence-transformers CachedMNRL  {theirs:7.2f} s  {len(queries) / theirs:7.2f} pairs/s")
    print(f"ratio pegjax/st                   {theirs / ours:7.2f}x")


if __name__ == "__main__":
    main()
