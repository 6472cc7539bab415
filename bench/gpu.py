"""The global step on one CUDA GPU: correctness against the CPU, then step time and MFU.

    bash bench/gpu.sh            # = python -m bench.gpu, on a machine with one CUDA GPU

1. Correctness: a tiny BERT, one small batch with false negatives, beta = gamma > 0; loss and
   gradient of the chunked, remat-ed step on the GPU (float32, highest matmul precision) against the
   same computation on the CPU backend in the same process (the CPU path is the one tests/ check
   against the plain full-batch gradient). Prints the relative errors.
2. Timing: BERT-base shape (random init), bf16 compute, full-length texts (query 64, passage 256
   tokens), 5 hard negatives per query, AdamW, at 1,024 queries (6,144 passages) and at the paper's
   13,334 queries (80,004 passages). MFU counts the model FLOPs of forward + backward (3x forward);
   the GradCache recompute (one more forward) is shown separately as hardware FLOPs (HFU).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import linen as nn

from pegjax import sharding
from pegjax.loss import LossConfig
from pegjax.models.bert import BertConfig, EmbeddingModel
from pegjax.step import StepConfig, create_state, jit_train_step, loss_and_metrics, make_optimizer

BERT_BASE = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
PLATFORM = ["gpu"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def random_batch(rng, queries, group, query_length, passage_length, vocab, ragged=True, duplicates=True):
    def ids_and_mask(rows, length):
        ids = rng.integers(5, vocab, size=(rows, length), dtype=np.int32)
        lengths = rng.integers(3, length + 1, size=rows) if ragged else np.full(rows, length)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        return ids * mask, mask

    query_ids, query_mask = ids_and_mask(queries, query_length)
    passage_ids, passage_mask = ids_and_mask(queries * group, passage_length)
    hashes = rng.integers(1, 2**31 - 1, size=queries * group).astype(np.int32)
    if duplicates:  # a shared passage: a false negative to be masked
        passage_ids[group + 1], passage_mask[group + 1], hashes[group + 1] = passage_ids[0], passage_mask[0], hashes[0]
    return {
        "query_ids": query_ids, "query_mask": query_mask, "passage_ids": passage_ids, "passage_mask": passage_mask,
        "passage_hashes": hashes, "positive_hashes": np.zeros((queries, 1), np.int32),
    }


def check_against_cpu():
    model = EmbeddingModel(TINY, pooling="mean", normalize=True)
    params = nn.unbox(model.init(jax.random.key(0)))
    batch = random_batch(np.random.default_rng(0), 16, 6, 16, 32, TINY.vocab_size)
    config = StepConfig(model=model, loss=LossConfig(group_size=6, temperature=0.05, query_block=4), encode_chunk=4, dropout=False)
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
    return loss_error < 1e-4 and grad_error < 1e-4


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


def time_step(queries, group, query_length, passage_length, chunk, block, repeats):
    device = jax.devices(PLATFORM[0])[0]
    mesh = sharding.make_mesh({"data": 1}, devices=[device])
    model = EmbeddingModel(BERT_BASE, pooling="cls", normalize=True, dtype="bfloat16")
    tx = make_optimizer(optax.constant_schedule(1e-5))
    state, state_sharding = create_state(model, tx, mesh, seed=0)
    config = StepConfig(model=model, loss=LossConfig(group_size=group, temperature=0.02, query_block=block), encode_chunk=chunk)
    schedules = {"beta": optax.constant_schedule(1.0), "gamma": optax.constant_schedule(1.0),
                 "learning_rate": optax.constant_schedule(1e-5)}
    step = jit_train_step(config, tx, schedules, mesh, state_sharding)
    batch = random_batch(np.random.default_rng(1), queries, group, query_length, passage_length, BERT_BASE.vocab_size, ragged=False)
    batch = jax.device_put(batch, jax.tree.map(lambda _: sharding.batch_sharding(mesh, 1), batch))
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
    parser.add_argument("--chunk", type=int, default=32, help="encode chunk rows for the first case")
    parser.add_argument("--platform", default="gpu", help="'cpu' only to dry-run this script")
    args = parser.parse_args()
    PLATFORM[0] = args.platform
    device = jax.devices(PLATFORM[0])[0]
    kind = device.device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    print(f"device: {kind}; jax {jax.__version__}; bf16 dense peak used for MFU: {peak / 1e12 if peak else '?'} TFLOP/s", flush=True)
    ok = check_against_cpu()
    rows = []
    cases = [(f"{args.queries:,} q x 6", args.queries, args.chunk, 64, 3)]
    if not args.skip_paper:
        # 13,334 = 2 * 59 * 113: 59 rows a chunk divides both the queries and the 80,004 passages.
        cases.append(("13,334 q x 6 = 80,004", 13334, 59, 118, 1))
    for name, queries, chunk, block, repeats in cases:
        compile_s, times, memory, loss = time_step(queries, 6, 64, 256, chunk, block, repeats)
        step_s = times[-1] if len(times) == 1 else min(times[1:])
        flops = model_flops(BERT_BASE, queries, 6, 64, 256)
        mfu = 3 * flops / step_s / peak if peak else float("nan")
        hfu = 4 * flops / step_s / peak if peak else float("nan")
        rows.append((name, chunk, compile_s, step_s, queries / step_s, mfu, hfu, memory.temp_size_in_bytes / 2**30, loss))
        print(f"  {name}: times {[round(t, 3) for t in times]}", flush=True)
    print()
    print(f"BERT-base shape, bf16, lengths 64/256, one {kind}; correctness vs CPU: {'ok' if ok else 'FAILED'}")
    print("| global batch | chunk | compile s | step s | queries/s | MFU (3x fwd) | HFU (incl. recompute) | temp GiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, chunk, compile_s, step_s, qps, mfu, hfu, temp, loss in rows:
        print(f"| {name} | {chunk} | {compile_s:.1f} | {step_s:.3f} | {qps:.0f} | {mfu:.1%} | {hfu:.1%} | {temp:.1f} | {loss:.3f} |")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
