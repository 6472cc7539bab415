"""The global step on one CUDA GPU: correctness against the CPU, the fused attention, then step
time, memory, compile time and MFU of the recipe.

    bash bench/gpu.sh            # = python -m bench.gpu, on a machine with one CUDA GPU

1. Correctness: a tiny BERT, one small batch of ragged texts packed several to a row, with
   false negatives and padding queries, beta = gamma > 0; loss and gradient of the chunked,
   remat-ed step on the GPU (float32, highest matmul precision) against the same computation on
   the CPU backend in the same process (the CPU path is the one tests/ check against the plain
   full-batch gradient). Then cuDNN's fused attention (``jax.nn.dot_product_attention``) against
   the XLA attention on the GPU, bf16, one text a row (key lengths) and packed rows (bias).
2. Timing: BERT-base shape (random init), bf16 compute, full-length texts (query 64, passage 256
   tokens; every token real), 5 hard negatives per query, AdamW, hidden dropout 0.1:
   - 1,024 queries (6,144 passages) with cuDNN attention (no attention-probability dropout: the
     fused kernel has none), encode chunk ``--chunk``, the model's defaults (bf16 product
     results, unrolled layers); with ``--compare`` first float32 results and the layer scan;
   - the recipe's global batch, `configs/peg.py:paper`: 13,334 queries (80,004 passages), at
     loss query block ``--recipe-block`` (chunk and block are memory knobs, chosen for one 141 GB
     card: the recipe's own chunk 16 / block 16 are sized for a pod's devices);
   - 1,024 queries without any dropout; then 1,024 queries and the recipe's batch with XLA
     attention and attention dropout 0.1 (what ``attention="auto"`` picks while that dropout is
     on), as the time budget (``--budget-s``) allows.
   MFU counts the model FLOPs of forward + backward (3x forward) of real tokens; the GradCache
   recompute (one more forward) is shown separately as hardware FLOPs (HFU). Compile time is
   printed per case. A case that fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
import optax
from flax import linen as nn

from configs.peg import get_config
from pegjax import sharding
from pegjax.data import packing
from pegjax.loss import LossConfig
from pegjax.models.bert import BertConfig, EmbeddingModel
from pegjax.step import StepConfig, create_state, jit_train_step, loss_and_metrics, make_optimizer

BERT_BASE = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
PLATFORM = ["gpu"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def random_texts(rng, queries, group, query_length, passage_length, vocab, ragged=True, padding=0):
    """One text a row (ids, mask), hashes with one shared passage (a false negative), and
    ``padding`` padding queries at the end."""
    def ids_and_mask(rows, length):
        ids = rng.integers(5, vocab, size=(rows, length), dtype=np.int32)
        lengths = rng.integers(3, length + 1, size=rows) if ragged else np.full(rows, length)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        return ids * mask, mask

    query_ids, query_mask = ids_and_mask(queries, query_length)
    passage_ids, passage_mask = ids_and_mask(queries * group, passage_length)
    hashes = rng.integers(1, 2**31 - 1, size=queries * group).astype(np.int32)
    passage_ids[group + 1], passage_mask[group + 1], hashes[group + 1] = passage_ids[0], passage_mask[0], hashes[0]
    valid = np.ones(queries, np.int32)
    real = queries - padding
    query_mask[real:], query_ids[real:], valid[real:] = 0, 0, 0
    passage_mask[real * group:], passage_ids[real * group:], hashes[real * group:] = 0, 0, 0
    return {"query_ids": query_ids, "query_mask": query_mask, "passage_ids": passage_ids, "passage_mask": passage_mask,
            "passage_hashes": hashes, "positive_hashes": np.zeros((queries, 1), np.int32), "query_valid": valid}


def step_batch(texts, chunk, packed):
    """The step's batch of one shard and the StepConfig fields for its slots."""
    geometries = [packing.fitted_geometry(texts[f"{kind}_mask"], 1, chunk, max_slots=16 if packed else 1)
                  for kind in ("query", "passage")]
    batch = packing.step_batch(texts, 1, *geometries)
    return batch, dict(encode_chunk=chunk, query_slots=geometries[0].slots, passage_slots=geometries[1].slots)


def check_against_cpu():
    model = EmbeddingModel(TINY, pooling="mean", normalize=True, attention="xla")
    params = nn.unbox(model.init(jax.random.key(0)))
    batch, slots = step_batch(random_texts(np.random.default_rng(0), 16, 6, 16, 32, TINY.vocab_size, padding=2), 4, True)
    config = StepConfig(model=model, loss=LossConfig(group_size=6, temperature=0.05, query_block=4), dropout=False, **slots)
    results = {}
    for platform in ("cpu", PLATFORM[0]):
        device = jax.devices(platform)[0]
        mesh = sharding.make_mesh({"data": 1}, devices=[device])
        fn = jax.jit(jax.value_and_grad(lambda p, b: loss_and_metrics(p, b, 2.0, 1.0, None, config, mesh), has_aux=True))
        with jax.default_matmul_precision("highest"):
            (loss, _), grads = fn(jax.device_put(params, device), jax.device_put(batch, device))
        results[platform] = (float(loss), jax.tree.map(np.asarray, grads))
    loss_cpu, grad_cpu = results["cpu"]
    loss_gpu, grad_gpu = results[PLATFORM[0]]
    flat_cpu = np.concatenate([g.ravel() for g in jax.tree.leaves(grad_cpu)])
    flat_gpu = np.concatenate([g.ravel() for g in jax.tree.leaves(grad_gpu)])
    grad_error = np.linalg.norm(flat_gpu - flat_cpu) / np.linalg.norm(flat_cpu)
    loss_error = abs(loss_gpu - loss_cpu) / abs(loss_cpu)
    print(f"correctness: loss cpu {loss_cpu:.6f} gpu {loss_gpu:.6f} rel err {loss_error:.2e}; "
          f"gradient rel err {grad_error:.2e}", flush=True)
    ok = loss_error < 1e-4 and grad_error < 1e-4
    # bf16 compute (float32 parameters) as the timed steps run it, against the float32 gradient
    bf16 = dataclasses.replace(config, model=dataclasses.replace(model, dtype="bfloat16"))
    device = jax.devices(PLATFORM[0])[0]
    mesh = sharding.make_mesh({"data": 1}, devices=[device])
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss_and_metrics(p, b, 2.0, 1.0, None, bf16, mesh), has_aux=True))
    (loss_bf16, _), grads = fn(jax.device_put(params, device), jax.device_put(batch, device))
    flat_bf16 = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(grads)])
    cosine = flat_bf16 @ flat_cpu / (np.linalg.norm(flat_bf16) * np.linalg.norm(flat_cpu))
    print(f"bf16 step on {PLATFORM[0]} vs float32 on cpu: loss {float(loss_bf16):.6f}, gradient cosine {cosine:.5f}", flush=True)
    ok &= bool(cosine > 0.999)
    if PLATFORM[0] == "gpu":
        ok &= check_fused_attention()
    return ok


def check_fused_attention():
    """cuDNN attention vs XLA attention on bf16 rows, one text a row (key lengths) and packed
    (block-diagonal bias): cosine of the embeddings."""
    device = jax.devices("gpu")[0]
    base = EmbeddingModel(dataclasses.replace(BERT_BASE, attention_probs_dropout_prob=0.0), dtype="bfloat16", attention="xla")
    params = jax.device_put(nn.unbox(base.init(jax.random.key(1))), device)
    ok = True
    for packed in (False, True):
        texts = random_texts(np.random.default_rng(3), 32, 6, 64, 256, BERT_BASE.vocab_size)
        batch, slots = step_batch(texts, 64, packed)
        vectors = {}
        for implementation in ("xla", "cudnn"):
            model = dataclasses.replace(base, attention=implementation)
            fn = jax.jit(lambda p, t, s, m=model: m.embed_packed(p, t, s, slots["passage_slots"]))
            vectors[implementation] = np.asarray(fn(params, jax.device_put(batch["passage_tokens"], device),
                                                    jax.device_put(batch["passage_segments"], device)), np.float32)
        used = (batch["passage_segments"].max(axis=1)[:, None] > np.arange(slots["passage_slots"])[None, :])
        cosine = (vectors["xla"] * vectors["cudnn"]).sum(-1)[used]
        print(f"cudnn attention vs xla attention, bf16, {'packed rows' if packed else 'one text a row'} "
              f"({slots['passage_slots']} slots): min cosine {cosine.min():.5f} over {used.sum()} texts", flush=True)
        ok &= bool(cosine.min() > 0.999)
    return ok


def model_flops(config: BertConfig, queries, group, query_length, passage_length):
    """Forward FLOPs of one global batch: encoder matmuls + attention + the score matrix."""
    per_layer = 4 * config.hidden_size**2 + 2 * config.hidden_size * config.intermediate_size
    def encoder(rows, length):
        linear = 2 * per_layer * config.num_hidden_layers * rows * length
        attention = 4 * length * length * config.hidden_size * config.num_hidden_layers * rows
        return linear + attention
    passages = queries * group
    scores = 2 * queries * passages * config.hidden_size
    return encoder(queries, query_length) + encoder(passages, passage_length) + scores


def time_step(queries, group, query_length, passage_length, chunk, block, repeats, attention="auto",
              attention_dropout=0.1, model_options=None, bert_options=None):
    device = jax.devices(PLATFORM[0])[0]
    mesh = sharding.make_mesh({"data": 1}, devices=[device])
    bert = dataclasses.replace(BERT_BASE, attention_probs_dropout_prob=attention_dropout, **(bert_options or {}))
    model = EmbeddingModel(bert, pooling="cls", normalize=True, dtype="bfloat16", attention=attention,
                           **(model_options or {}))
    tx = make_optimizer(optax.constant_schedule(1e-5))
    state, state_sharding = create_state(model, tx, mesh, seed=0)
    texts = random_texts(np.random.default_rng(1), queries, group, query_length, passage_length, BERT_BASE.vocab_size,
                         ragged=False)
    batch, slots = step_batch(texts, chunk, packed=False)
    config = StepConfig(model=model, loss=LossConfig(group_size=group, temperature=0.02, query_block=block), **slots)
    schedules = {"beta": optax.constant_schedule(1.0), "gamma": optax.constant_schedule(1.0),
                 "learning_rate": optax.constant_schedule(1e-5)}
    step = jit_train_step(config, tx, schedules, mesh, state_sharding)
    batch = jax.device_put(batch, device)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    assert np.isfinite(float(metrics["loss"])), metrics
    return compile_s, times, memory, float(metrics["loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256, help="encode chunk rows (32: 16% slower on an H200)")
    parser.add_argument("--recipe-block", type=int, default=256, help="loss query block of the 80,004-passage step")
    parser.add_argument("--budget-s", type=float, default=480, help="skip a case that would start past this")
    parser.add_argument("--compare", action="store_true", help="also time the choices the defaults replaced")
    parser.add_argument("--platform", default="gpu", help="'cpu' only to dry-run this script")
    args = parser.parse_args()
    began = time.perf_counter()
    PLATFORM[0] = args.platform
    device = jax.devices(PLATFORM[0])[0]
    kind = device.device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    print(f"device: {kind}; jax {jax.__version__}; bf16 dense peak used for MFU: {peak / 1e12 if peak else '?'} TFLOP/s", flush=True)
    try:
        ok = check_against_cpu()
    except Exception as error:  # noqa: BLE001 - the timings still tell something; the table says FAILED
        print(f"correctness check raised: {error!r}", flush=True)
        ok = False
    paper = get_config("paper")
    recipe_queries = paper.train.queries_per_step
    fused = "cudnn" if args.platform == "gpu" else "xla"
    rows, failures = [], []

    def run(name, queries, block, repeats, attention, attention_dropout, reserve, model_options=None, bert_options=None):
        if time.perf_counter() - began > args.budget_s - reserve:
            print(f"  {name}: skipped (time budget)", flush=True)
            return None
        try:
            compile_s, times, memory, loss = time_step(queries, 6, 64, 256, args.chunk, block, repeats, attention,
                                                       attention_dropout, model_options, bert_options)
        except Exception as error:  # noqa: BLE001 - one failing case must not hide the others
            print(f"  {name}: FAILED {error!r}"[:2000], flush=True)
            failures.append(name)
            return None
        step_s = times[-1] if len(times) == 1 else min(times[1:])
        flops = model_flops(BERT_BASE, queries, 6, 64, 256)
        mfu = 3 * flops / step_s / peak if peak else float("nan")
        hfu = 4 * flops / step_s / peak if peak else float("nan")
        rows.append((name, args.chunk, block, compile_s, step_s, queries / step_s, mfu, hfu, memory.temp_size_in_bytes / 2**30, loss))
        print(f"  {name}: compile {compile_s:.1f} s, step times {[round(t, 3) for t in times]}, "
              f"MFU {mfu:.1%}, {time.perf_counter() - began:.0f} s so far", flush=True)
        return step_s

    # The defaults (bf16 product results, unrolled layers) at 1,024 queries and at the recipe's
    # global batch with fused attention; then what the hidden dropout costs, and XLA attention with
    # attention dropout 0.1 ("auto" picks it while that is on). --compare first times the choices
    # the defaults replaced (float32 product results; the layer scan), side by side.
    q = f"{args.queries:,} q x 6, {fused} attention"
    defaults = dict(narrow_products=True, unroll_layers=True)
    if args.compare:
        for label, options in {"float32 products, layer scan": dict(narrow_products=False, unroll_layers=False),
                               "bf16 products, layer scan": dict(narrow_products=True, unroll_layers=False)}.items():
            run(f"{q}, {label}", args.queries, 64, 3, fused, 0.0, 60, options)
    run(f"{q}, bf16 products, layers unrolled", args.queries, 64, 3, fused, 0.0, 60, defaults)
    recipe = f"recipe: {recipe_queries:,} q x 6 = {recipe_queries * 6:,}"
    if not args.skip_paper:
        run(f"{recipe}, {fused} attention", recipe_queries, args.recipe_block, 1, fused, 0.0, 100, defaults)
    run(f"{q}, no dropout at all", args.queries, 64, 3, fused, 0.0, 40, defaults, dict(hidden_dropout_prob=0.0))
    if fused != "xla":
        run(f"{args.queries:,} q x 6, xla attention + attention dropout 0.1", args.queries, 64, 3, "xla", 0.1, 40, defaults)
        if not args.skip_paper:
            run(f"{recipe}, xla attention + attention dropout 0.1", recipe_queries, args.recipe_block, 1, "xla", 0.1, 100,
                defaults)
    print()
    print(f"BERT-base shape, bf16, lengths 64/256 (every token real), one {kind}, jax {jax.__version__}; "
          f"correctness: {'ok' if ok else 'FAILED'}; {time.perf_counter() - began:.0f} s in all")
    print("| global batch | chunk | block | compile s | step s | queries/s | MFU (3x fwd) | HFU (incl. recompute) | temp GiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, chunk, block, compile_s, step_s, qps, mfu, hfu, temp, loss in rows:
        print(f"| {name} | {chunk} | {block} | {compile_s:.1f} | {step_s:.3f} | {qps:.0f} | {mfu:.1%} | {hfu:.1%} | {temp:.1f} | {loss:.3f} |")
    if not ok or failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
