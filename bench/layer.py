"""One transformer layer on one CPU core: pegjax against torch, forward and forward + backward.

    python -m bench.layer [--dropout=0.1] [--rows=16] [--length=256] [--dtype=float32]

A MiniLM-shaped post-LayerNorm layer (hidden 384, 12 heads, FFN 1536) on random inputs:
pegjax's `TransformerLayer` (jitted, one device) and `torch.nn.TransformerEncoderLayer` (one
thread), each warm, best of 15. The forward is what encoding pays per layer; forward + backward
(gradients of the parameters and the input) is what a training step pays on top of it.
``--dtype=bfloat16``: both compute in bf16 with float32 parameters (torch under CPU autocast).
Prints the CPU model. The process is pinned to one core so that both sides get the same one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time


def best_ms(fn, repeats: int = 15) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from bench.common import cpu_model
    from pegjax.models.bert import BertConfig, TransformerLayer, attention_bias

    torch.set_num_threads(1)
    shape = (args.rows, args.length, 384)
    config = BertConfig(vocab_size=100, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    config = dataclasses.replace(config, hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    layer = TransformerLayer(config, jnp.dtype(args.dtype), jnp.float32, "xla")
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32), args.dtype)
    bias = attention_bias(jnp.ones(shape[:2], jnp.int32), packed=True)
    seed = jnp.uint32(3)
    params = layer.init(jax.random.key(0), x, bias, seed)

    def loss(p, x):
        return jnp.sum(layer.apply(p, x, bias, seed)[0].astype(jnp.float32) ** 2)

    forward = jax.jit(loss)
    gradient = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ours = (best_ms(lambda: jax.block_until_ready(forward(params, x))),
            best_ms(lambda: jax.block_until_ready(gradient(params, x))))

    reference = torch.nn.TransformerEncoderLayer(384, 12, 1536, dropout=args.dropout, activation="gelu",
                                                 batch_first=True).train()
    tx = torch.randn(*shape, requires_grad=True)

    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")  # noqa: E731

    def torch_forward():
        with torch.no_grad(), autocast():
            reference(tx).sum()

    def torch_gradient():
        reference.zero_grad()
        tx.grad = None
        with autocast():
            out = reference(tx)
        (out.float() ** 2).sum().backward()

    theirs = (best_ms(torch_forward), best_ms(torch_gradient))
    print(f"CPU: {cpu_model()}, one core; layer 384/12/1536, {args.rows} rows x {args.length} tokens, "
          f"dropout {args.dropout}, {args.dtype}")
    print(f"  pegjax  forward {ours[0]:7.1f} ms   forward+backward {ours[1]:7.1f} ms")
    print(f"  torch   forward {theirs[0]:7.1f} ms   forward+backward {theirs[1]:7.1f} ms")
    print(f"  ratio torch/pegjax  forward {theirs[0] / ours[0]:.2f}x   forward+backward {theirs[1] / ours[1]:.2f}x")


if __name__ == "__main__":
    main()
