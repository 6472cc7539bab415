"""Compiled memory of the global step: does activation memory stay flat as the batch grows?

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.memory [--skip-paper]

1. all-MiniLM-L6-v2 shape on an 8-device data mesh: per-device temp memory of the compiled step at
   global batch Q and 8*Q queries (x 6 passages), same encode chunk and query block. Goal: <= 1.5x.
2. The paper-size step, lowered and compiled but never run: BERT-base shape, bf16 compute,
   13,440 queries x (1 + 5) = 80,640 passages (13,334 x 6 = 80,004 in the paper, rounded up so
   that 8 shards divide it), passage length 256, query length 64, on 8 devices (fsdp=8).
   Goal: fits in 16 GB per device.
Temp memory grows with the encode chunk (activations of one chunk, recomputed in the backward
pass), not with the batch: chunk 48 rows/device needs ~20 GiB for the paper step, 16 rows ~7 GiB.
Figures are XLA's own accounting (``compiled.memory_analysis()``) for the CPU backend.
"""

import argparse

import jax
import optax

from pegjax import sharding
from pegjax.loss import LossConfig
from pegjax.models.bert import BertConfig, EmbeddingModel
from pegjax.step import StepConfig, abstract_batch, jit_train_step, make_optimizer, state_layout

MINILM = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
GIB = 1024**3


def compiled_memory(bert, mesh_sizes, queries, group, query_length, passage_length, chunk, block, dtype):
    mesh = sharding.make_mesh(mesh_sizes)
    model = EmbeddingModel(bert, pooling="cls", normalize=True, dtype=dtype)
    tx = make_optimizer(optax.constant_schedule(1e-5))
    state, state_sharding = state_layout(model, tx, mesh)
    config = StepConfig(model=model, loss=LossConfig(group_size=group, query_block=block), encode_chunk=chunk)
    schedules = {"beta": optax.constant_schedule(1.0), "gamma": optax.constant_schedule(1.0),
                 "learning_rate": optax.constant_schedule(1e-5)}
    step = jit_train_step(config, tx, schedules, mesh, state_sharding)
    batch = abstract_batch(mesh, queries, group, query_length, passage_length)
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

    small = compiled_memory(MINILM, {"data": 8}, args.queries, 6, 32, 128, chunk=4, block=4, dtype="float32")
    large = compiled_memory(MINILM, {"data": 8}, 8 * args.queries, 6, 32, 128, chunk=4, block=4, dtype="float32")
    print("MiniLM shape, data=8, chunk 4 rows/device, lengths 32/128, per device:")
    print(f"  Q={args.queries:6d} ({args.queries * 6:6d} passages): {describe(small)}")
    print(f"  Q={8 * args.queries:6d} ({8 * args.queries * 6:6d} passages): {describe(large)}")
    print(f"  temp ratio 8Q/Q: {large.temp_size_in_bytes / small.temp_size_in_bytes:.2f}x (goal <= 1.5x)")

    if not args.skip_paper:
        queries = 13440
        paper = compiled_memory(BERT_BASE, {"fsdp": 8}, queries, 6, 64, 256, chunk=16, block=16, dtype="bfloat16")
        total = paper.temp_size_in_bytes + paper.argument_size_in_bytes + paper.output_size_in_bytes - paper.alias_size_in_bytes
        print(f"paper-size step: BERT-base bf16, fsdp=8, {queries} queries x 6 = {queries * 6} passages, "
              f"lengths 64/256, chunk 16 rows/device, query block 16 rows/device:")
        print(f"  per device: {describe(paper)}  total {total / GIB:.2f} GiB (goal <= 16 GB)")


if __name__ == "__main__":
    main()
