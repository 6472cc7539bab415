"""Training throughput on real data: pegjax's global step vs sentence-transformers' CachedMNRL.

    python -m bench.train_step [--queries 64] [--mini-batch 32] [--steps 2] [--data scifact,medical_zh]
                               [--dtypes float32] [--keep-dense-outputs]

Both sides train the same all-MiniLM-L6-v2 weights on the same real global batch: Q queries, each
with its positive and 5 other passages (SciFact: claim -> cited abstract, other abstracts;
medical_zh: patient question -> doctor's answer, other answers), so 6Q passages. Same max lengths
(the paper recipe's 64 / 256 tokens), same mini-batch (sentence-transformers' ``mini_batch_size``
texts; pegjax's ``encode_chunk`` rows of packed texts), dropout 0.1 on both, AdamW, plain InfoNCE
with scale 1/tau = 20 and every passage of the batch a candidate.

sentence-transformers pads each column of the batch to its longest text, as its data collator
does; pegjax packs texts into fixed rows (`pegjax.data.packing`, rows and their length chosen
from a sample of the data as a training run chooses them; a chunk of rows longer than the texts
holds fewer rows, never more tokens than the mini-batch) and uses one CPU device per core, as ``pegjax.main`` does.
Both are timed warm (compilation / first call not counted), taking turns for ``--steps`` rounds
(`bench.common.interleaved`: a cloud CPU's speed drifts within minutes). Prints the CPU model,
the median s/step and queries/s of each, the ratio round by round, and the float32 roofline: each
side's GFLOP/s (4 forward passes' worth of products over the real tokens, `encoder_flops`) beside
this CPU's float32 product rate.

``--keep-dense-outputs`` times a third side in the same rounds: pegjax with
``StepConfig(keep_dense_outputs=True)``, whose backward pass reuses the forward's dense-layer
outputs instead of recomputing them (the same gradient, more memory: `pegjax.step`).

``--dtypes float32,bfloat16`` runs both sides once per compute dtype: pegjax with
``EmbeddingModel(dtype=...)`` (float32 parameters and optimizer), sentence-transformers under
``torch.autocast("cpu", bfloat16)`` for its forward and backward passes. With both, it also prints
pegjax in bf16 against sentence-transformers' default, float32.
"""

import argparse
import json
import os
import statistics

import numpy as np


from bench.common import SHARED_DATA, cpu_model, encoder_flops, interleaved, minilm_path, product_peak, ratios, roofline
from pegjax.distributed import use_cpu_cores

HARD_NEGATIVES = 5
KEPT = "pegjax, dense outputs kept"


def scifact_groups(queries: int, seed: int = 0):
    """Real (claim, [cited abstract, 5 other abstracts]) groups from SciFact train."""
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
    pairs, seen = [], set()
    with open(SHARED_DATA / "scifact" / "qrels" / "train.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            query_id, doc_id, _ = line.rstrip("\n").split("\t")
            if query_id in claims and doc_id in corpus and query_id not in seen:
                seen.add(query_id)
                pairs.append((claims[query_id], corpus[doc_id]))
    return _with_negatives(pairs, sorted(corpus.values()), queries, seed)


def medical_zh_groups(queries: int, seed: int = 0):
    """Real (question, [answer, 5 other answers]) groups from medical_zh train pairs."""
    pairs = []
    with open(SHARED_DATA / "medical_zh" / "train_pairs.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            pairs.append((row["query"], row["pos"][0]))
    return _with_negatives(pairs, sorted({p for _, p in pairs}), queries, seed)


def _with_negatives(pairs, passages, queries, seed):
    rng = np.random.default_rng(seed)
    chosen = [pairs[i] for i in rng.choice(len(pairs), queries, replace=False)]
    groups = []
    for _, positive in chosen:
        others = [passages[i] for i in rng.choice(len(passages), HARD_NEGATIVES + 2, replace=False)]
        groups.append([positive] + [p for p in others if p != positive][:HARD_NEGATIVES])
    sample = [p for _, p in pairs[:2048]], [q for q, _ in pairs[:2048]]
    return [q for q, _ in chosen], groups, sample


DATA = {"scifact": scifact_groups, "medical_zh": medical_zh_groups}


def pegjax_step(queries, groups, sample, args, dtype, keep_dense_outputs=False):
    import jax
    import optax

    from pegjax import sharding
    from pegjax.data import packing
    from pegjax.data.tokenizer import load_tokenizer, pad_batch, tokenize
    from pegjax.loss import LossConfig
    from pegjax.models import hf
    from pegjax.models.bert import EmbeddingModel
    from pegjax.step import StepConfig, batch_shardings, create_state, jit_train_step, make_optimizer

    path = minilm_path()
    config, params = hf.load(path)
    model = EmbeddingModel(config, pooling="mean", normalize=True, dtype=dtype)
    tokenizer = load_tokenizer(path)
    mesh = sharding.make_mesh({"data": -1})
    shards = sharding.batch_shards(mesh)
    passages = [p for g in groups for p in g]
    texts = {"passage_hashes": np.zeros(len(passages), np.int32), "positive_hashes": np.zeros((len(queries), 1), np.int32)}
    geometries = {}
    sample_passages, sample_queries = sample
    real_lengths = []
    for kind, items, length, sampled in (("query", queries, args.query_length, sample_queries),
                                         ("passage", passages, args.passage_length, sample_passages)):
        ids = tokenize(tokenizer, items, length)
        real_lengths += [len(i) for i in ids]
        texts[f"{kind}_ids"], texts[f"{kind}_mask"] = pad_batch(ids, length, len(items))
        lengths = [len(ids) for ids in tokenize(tokenizer, sampled, length)]
        # The mini-batch is per device here: the devices together encode args.mini_batch rows.
        geometries[kind] = packing.estimate_geometry(
            [lengths], len(items) // shards, length, args.mini_batch // shards, longest_row=config.max_length,
            attention=packing.attention_length(config.hidden_size, config.intermediate_size))
    batch = packing.step_batch(texts, shards, geometries["query"], geometries["passage"])
    batch = {k: jax.device_put(batch[k], s) for k, s in batch_shardings(mesh).items()}
    tx = make_optimizer(optax.constant_schedule(2e-5), clip_norm=None)
    state, state_sharding = create_state(model, tx, mesh, seed=0, params=params)
    step_config = StepConfig(model=model, loss=LossConfig(group_size=len(groups[0]), temperature=0.05, query_block=len(queries) // shards),
                             encode_chunk=args.mini_batch // shards, dropout=os.environ.get("DROP", "1") == "1",
                             query_slots=geometries["query"].slots, passage_slots=geometries["passage"].slots,
                             query_chunk=geometries["query"].max_chunk, passage_chunk=geometries["passage"].max_chunk,
                             keep_dense_outputs=keep_dense_outputs)
    zero = optax.constant_schedule(0.0)
    step = jit_train_step(step_config, tx, {"beta": zero, "gamma": zero, "learning_rate": optax.constant_schedule(2e-5)},
                          mesh, state_sharding)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        holder["metrics"] = jax.device_get(metrics)

    run.geometries = geometries
    run.holder = holder
    run.shards = shards
    run.lower = lambda: step.lower(holder["state"], batch)  # the compiled step's HLO (bench.profile_step)
    run.flops = 4 * encoder_flops(config, real_lengths)  # forward, recomputed forward, backward (2x)
    return run


def reference_step(queries, groups, args, dtype):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    model = SentenceTransformer(minilm_path(), device="cpu")
    loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.mini_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    group = len(groups[0])

    def features(texts, length):  # as the data collator does: each column padded to its longest text
        model.max_seq_length = length
        return model.tokenize(texts)

    columns = [features(queries, args.query_length)]
    columns += [features([g[h] for g in groups], args.passage_length) for h in range(group)]
    run_tokens = sum(int(c["attention_mask"].numel()) for c in columns)
    model.train()

    def run():
        optimizer.zero_grad()
        # CachedMNRL runs its second forward inside backward(): both under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            value = loss(columns, labels=None)
            value.backward()
        optimizer.step()

    run.positions = run_tokens
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--mini-batch", type=int, default=32)
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--passage-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data", default="scifact,medical_zh")
    parser.add_argument("--dtypes", default="float32", help="compute dtypes, each run on both sides")
    parser.add_argument("--keep-dense-outputs", action="store_true",
                        help="a third side: pegjax with the forward's dense outputs kept for the backward pass")
    args = parser.parse_args()
    use_cpu_cores()
    import jax
    import torch

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; pegjax on {jax.device_count()} CPU devices, torch threads "
          f"{torch.get_num_threads()}")
    print(f"global batch {args.queries} queries x {1 + HARD_NEGATIVES} passages, lengths {args.query_length}/"
          f"{args.passage_length}, mini-batch {args.mini_batch}, dropout 0.1 on both")
    peak = None
    for name in args.data.split(","):
        queries, groups, sample = DATA[name](args.queries)
        medians = {}
        for dtype in args.dtypes.split(","):
            ours_run = pegjax_step(queries, groups, sample, args, dtype)
            theirs_run = reference_step(queries, groups, args, dtype)
            sides = {"pegjax": ours_run, "CachedMNRL": theirs_run}
            if args.keep_dense_outputs:
                sides[KEPT] = pegjax_step(queries, groups, sample, args, dtype, keep_dense_outputs=True)
            times = interleaved(sides, args.steps)
            ours, theirs = medians[dtype] = statistics.median(times["pegjax"]), statistics.median(times["CachedMNRL"])
            real = ours_run.holder["metrics"]["real_tokens"]
            fraction = ours_run.holder["metrics"]["real_token_fraction"]
            rows = ", ".join(f"{k} {g.rows * ours_run.shards} rows x {g.length} ({g.slots} slots, {g.chunk * ours_run.shards} a chunk)" for k, g in ours_run.geometries.items())
            print(f"\n{name}, {dtype}: {real:.0f} real tokens; pegjax packs them into {rows}: {fraction:.0%} real; "
                  f"sentence-transformers pads to {theirs_run.positions} positions: {real / theirs_run.positions:.0%} real")
            print(f"  pegjax step                       {ours:7.2f} s  {len(queries) / ours:7.2f} queries/s  (median of {args.steps})")
            print(f"  sentence-transformers CachedMNRL  {theirs:7.2f} s  {len(queries) / theirs:7.2f} queries/s")
            print(f"  ratio pegjax / sentence-transformers  {ratios(times['pegjax'], times['CachedMNRL'])}")
            if args.keep_dense_outputs:
                kept = statistics.median(times[KEPT])
                print(f"  {KEPT}  {kept:7.2f} s  {len(queries) / kept:7.2f} queries/s  (the same gradient; memory: "
                      "the dense outputs of every chunk)")
                print(f"  ratio pegjax, dense outputs kept / sentence-transformers  {ratios(times[KEPT], times['CachedMNRL'])}")
                print(f"  ratio pegjax, dense outputs kept / pegjax  {ratios(times[KEPT], times['pegjax'])}")
            if dtype == "float32":
                peak = peak or product_peak()
                print("\n".join("  " + line for line in roofline(
                    ours_run.flops, {"pegjax step": ours, "sentence-transformers CachedMNRL": theirs}, peak)))
            del ours_run, theirs_run, sides
        if "float32" in medians and "bfloat16" in medians:
            print(f"  {name}: pegjax bf16 / sentence-transformers float32 (its default)  "
                  f"{medians['float32'][1] / medians['bfloat16'][0]:5.2f}x")

if __name__ == "__main__":
    main()
