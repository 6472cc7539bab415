"""Compiled memory of the global step: does activation memory stay flat as the batch grows, and does
the paper recipe fit?

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.memory [--skip-paper]

1. all-MiniLM-L6-v2 shape on an 8-device data mesh: per-device temp memory of the compiled step at
   global batch Q and 8*Q queries (x 6 passages), same encode chunk and query block. Goal: <= 1.5x.
2. The recipe itself, lowered and compiled but never run: `configs/peg.py:paper` as shipped
   (BERT-base shape, bf16, 13,334 queries x 6 = 80,004 passages, lengths 64/256, its own encode
   chunk and query block) on 8 devices (fsdp=8), one text a row (the layout that needs the most
   rows; packing needs fewer). Goal: fits in 16 GiB per device. Printed beside the estimate of
   `pegjax.geometry`, which the run's check uses before any work.
Figures are XLA's own accounting (``compiled.memory_analysis()``) for the CPU backend: temp is the
peak of the buffers XLA allocates for one step (activations, gathered weights, scores), args and
out the state and batch; it is the compiler's plan, not a measured resident set, and a GPU
compilation's figures differ (fusion and layout choices).
"""

import argparse

import jax
import optax

from configs.peg import get_config
from pegjax import geometry, sharding
from pegjax.data.packing import RowGeometry, chunked_rows
from pegjax.loss import LossConfig
from pegjax.models.bert import BertConfig, EmbeddingModel
from pegjax.step import StepConfig, abstract_batch, jit_train_step, make_optimizer, state_layout

MINILM = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
GIB = 1024**3


def compiled_memory(bert, mesh_sizes, queries_per_shard, group, query_length, passage_length, chunk, block, dtype):
    mesh = sharding.make_mesh(mesh_sizes)
    model = EmbeddingModel(bert, pooling="cls", normalize=True, dtype=dtype)
    tx = make_optimizer(optax.constant_schedule(1e-5))
    state, state_sharding = state_layout(model, tx, mesh)
    config = StepConfig(model=model, loss=LossConfig(group_size=group, query_block=block), encode_chunk=chunk)
    schedules = {"beta": optax.constant_schedule(1.0), "gamma": optax.constant_schedule(1.0),
                 "learning_rate": optax.constant_schedule(1e-5)}
    step = jit_train_step(config, tx, schedules, mesh, state_sharding)
    rows = [RowGeometry(texts, chunked_rows(texts, chunk)[0], length, 1, chunk)
            for texts, length in ((queries_per_shard, query_length), (queries_per_shard * group, passage_length))]
    batch = abstract_batch(mesh, *rows, group)
    return step.lower(state, batch).compile().memory_analysis()


def describe(stats):
    return (f"temp {stats.temp_size_in_bytes / GIB:7.3f} GiB  args {stats.argument_size_in_bytes / GIB:7.3f} GiB  "
            f"out {stats.output_size_in_bytes / GIB:7.3f} GiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args()
    if len(jax.devices()) != 8:
        raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (8 devices)")

    per_shard = args.queries // 8
    small = compiled_memory(MINILM, {"data": 8}, per_shard, 6, 32, 128, chunk=4, block=4, dtype="float32")
    large = compiled_memory(MINILM, {"data": 8}, 8 * per_shard, 6, 32, 128, chunk=4, block=4, dtype="float32")
    print("MiniLM shape, data=8, chunk 4 rows/device, lengths 32/128, per device:")
    print(f"  Q={args.queries:6d} ({args.queries * 6:6d} passages): {describe(small)}")
    print(f"  Q={8 * args.queries:6d} ({8 * args.queries * 6:6d} passages): {describe(large)}")
    print(f"  temp ratio 8Q/Q: {large.temp_size_in_bytes / small.temp_size_in_bytes:.2f}x (goal <= 1.5x)")

    if not args.skip_paper:
        config = get_config("paper")
        planned = geometry.plan(config, 8, 1, BERT_BASE)
        chunk, block = config.train.encode_chunk, config.loss.query_block
        paper = compiled_memory(BERT_BASE, dict(config.mesh), planned.queries_per_shard, planned.group,
                                config.data.query_length, config.data.passage_length, chunk, block, config.model.dtype)
        total = paper.temp_size_in_bytes + paper.argument_size_in_bytes + paper.output_size_in_bytes - paper.alias_size_in_bytes
        print(f"configs/peg.py:paper as shipped: BERT-base {config.model.dtype}, mesh {dict(config.mesh)} on 8 devices, "
              f"{config.train.queries_per_step:,} queries x {planned.group} ({planned.padded_queries:,} rows with padding), "
              f"lengths {config.data.query_length}/{config.data.passage_length}, encode chunk {chunk}, query block {block}:")
        print(f"  per device: {describe(paper)}  total {total / GIB:.2f} GiB (goal <= 16 GiB)")
        print(f"  pegjax.geometry's estimate before any work: {planned.peak_bytes / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
